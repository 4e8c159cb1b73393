"""`rxray report` and the pipeline's findings: what a run found, read back from the step outputs under it.

The top layer: it reads every step's outputs and imports from any package below it,
and nothing below imports it.
"""
