"""The report's output folder: figures/*.png and tables/*.csv under unique names, linked relatively.

Names are built from the section and the source file, made safe for URLs and file
systems, and numbered when two would collide, so every figure and table the page
links to exists exactly once and the folder opens locally even when the run lives on
s3://.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import pandas as pd

from rxray import storage
from rxray.evaluate.plots import save_figure
from rxray.report.step_outputs import FIGURES_DIR, TABLES_DIR


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


class ReportFolder:
    """The report's output folder: figures and tables get unique names and relative links."""

    def __init__(self, out: str):
        self.out = out
        self.figures = 0  # PNGs written so far
        self._names: set[str] = set()

    def _relative(self, folder: str, stem: str, suffix: str) -> str:
        base, n = _slug(re.sub(rf"{re.escape(suffix)}$", "", stem, flags=re.IGNORECASE)), 1
        name = f"{base}{suffix}"
        while f"{folder}/{name}" in self._names:
            n += 1
            name = f"{base}-{n}{suffix}"
        self._names.add(f"{folder}/{name}")
        return f"{folder}/{name}"

    def draw(self, stem: str, write_png: Callable[[str], Any]) -> str:
        """Call ``write_png(uri)`` for a new figure in figures/ (helpers that write PNGs); returns its path."""
        relative = self._relative(FIGURES_DIR, stem, ".png")
        write_png(storage.join(self.out, relative))
        self.figures += 1
        return relative

    def save_figure(self, figure, stem: str) -> str:
        """Render a matplotlib figure into figures/; returns its relative path."""
        return self.draw(stem, lambda uri: save_figure(figure, uri))

    def copy_figure(self, uri: str, stem: str) -> str:
        """Copy a step's PNG into figures/; returns its relative path."""
        return self.draw(stem, lambda target: storage.write_bytes(target, storage.read_bytes(uri)))

    def write_table(self, frame: pd.DataFrame, stem: str) -> str:
        """Write a table as CSV into tables/; returns its relative path."""
        relative = self._relative(TABLES_DIR, stem, ".csv")
        storage.write_text(storage.join(self.out, relative), frame.to_csv(index=False))
        return relative
