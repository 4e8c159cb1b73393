"""What a site profile costs: sites per second on one core and seconds per measurement."""

from __future__ import annotations

import time

from threadpoolctl import threadpool_limits

from rxray.features.measure import Measurement
from rxray.features.profile import COUNT_FEATURE, feature_names, site_profile
from rxray.features.truth import render


def benchmark_sites(size: int, n: int = 8, seed: int = 0,
                    measurements: tuple[Measurement, ...] | None = None) -> dict:
    """Profile ``n`` generated control sites of ``size`` px on one core; rates and per-site seconds.

    Returns ``sites_per_second``, ``seconds_per_site``, ``cells_per_site``, ``features`` and
    ``seconds_per_measurement`` (per site: ``segment`` and each measurement's name). Rendering the
    sites and naming the features happen before the clock starts.
    """
    sites = [render(seed + i, size) for i in range(n)]
    names = feature_names(size, measurements=measurements)
    timings: dict[str, float] = {}
    cells = 0.0
    with threadpool_limits(limits=1):
        start = time.perf_counter()
        for image in sites:
            cells += site_profile(image, measurements=measurements, timings=timings)[COUNT_FEATURE]
        elapsed = time.perf_counter() - start
    return {
        "size": size,
        "sites": n,
        "sites_per_second": n / elapsed,
        "seconds_per_site": elapsed / n,
        "cells_per_site": cells / n,
        "features": len(names),
        "seconds_per_measurement": {name: seconds / n for name, seconds in timings.items()},
    }
