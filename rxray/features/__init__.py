"""CellProfiler-style profiles of sites: segmentation, cp_measure measurements, per-site medians.

``segment`` finds nuclei, cells and cytoplasm; ``measure`` runs cp_measure on them under CellProfiler's
names; ``profile`` turns one site into one row (:func:`rxray.features.profile.site_profile`);
``truth`` checks the segmentation against the synthetic generator's nuclei; ``benchmark`` times it.
"""
