"""Old import path of `rxray explain`, kept until the CLI and tests import the modules it was split into.

Grad-CAM, gradient x input, occlusion and the importance tables are in
:mod:`rxray.batch.attribution`; the `rxray explain` step is :func:`rxray.batch.explain.explain`.
Delete this file once rxray/cli.py names ``rxray.batch.explain:explain`` and tests/test_report.py
imports ``channel_importance`` from :mod:`rxray.batch.attribution`.
"""

from rxray.batch.attribution import channel_importance
from rxray.batch.explain import explain

__all__ = ["channel_importance", "explain"]
