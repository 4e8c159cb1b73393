"""The report's sections on representations: CellProfiler features, and the leaderboard that compares them.

Both read typed results (:class:`~rxray.results.FeaturesResult`,
:class:`~rxray.results.CompareResult`); the leaderboard figure shows, per representation,
the treatments it calls active and how well it recovers mechanisms.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from rxray.evaluate.plots import new_figure
from rxray.report.html import escape, figure_html, html_table, kv_table
from rxray.report.leaderboard import leaderboard_lines
from rxray.report.sections import Context
from rxray.report.step_outputs import StepOutput


def features_html(output: StepOutput, ctx: Context) -> str:
    """What the features step measured and kept, and its throughput."""
    result = output.result
    return kv_table({"sites": result.counts.get("rows_out"), "image side (px)": result.size,
                     "measurements": ", ".join(result.measurements), "stains": ", ".join(result.stains),
                     "features measured": result.features_measured,
                     "features kept (pycytominer feature_select)": result.features_kept,
                     "sites without cells": result.counts.get("sites_without_cells"),
                     "sites/s": result.sites_per_s, "actors": (result.pool or {}).get("actors")})


def leaderboard_figure(board: pd.DataFrame) -> Figure:
    """Per representation: treatments called active, and MoA top-1 / same-MoA recall of the treatment map."""
    names = board["representation"].tolist()
    y = np.arange(len(names))
    figure = new_figure(9.0, 1.6 + 0.45 * len(names))
    active_ax, moa_ax = figure.subplots(1, 2, sharey=True)
    active_ax.barh(y, board["active_treatments"].fillna(0), color="#4c72b0")
    active_ax.set_xlabel(f"active treatments (of {int(board['treatments_scored'].max())})")
    active_ax.set_yticks(y)
    active_ax.set_yticklabels(names, fontsize=9)
    active_ax.invert_yaxis()
    height = 0.38
    moa_ax.barh(y - height / 2, board["moa_top1"].fillna(0), height, color="#dd8452", label="MoA top-1 (LOCO)")
    moa_ax.barh(y + height / 2, board["map_same_moa_recall"].fillna(0), height, color="#55a868",
                label="map same-MoA recall")
    moa_ax.set_xlim(0, 1)
    moa_ax.set_xlabel("fraction")
    moa_ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2)
    figure.suptitle("Every representation scored the same way", fontsize=10)
    return figure


def compare_html(output: StepOutput, ctx: Context) -> str:
    """The leaderboard table and figure, and the representations left off."""
    result = output.result
    if not result.leaderboard:
        return '<p class="not-run">no representation was scored</p>'
    board = pd.DataFrame(result.leaderboard)
    note = (f"<p>Each representation scored by <code>rxray score</code> with the same settings, under "
            f"{escape(result.correction or '?')} correction: activity by mAP against same-plate controls (BH "
            f"q-values), the treatment map's same-MoA recall, and the leave-one-compound-out mechanism vote; "
            f"probe: treated vs control balanced accuracy on held-out plates; seconds: to compute it, training "
            f"included.</p>")
    parts = [note, figure_html(ctx.folder.save_figure(leaderboard_figure(board), f"compare-{output.label}"),
                               "Active treatments and mechanism recovery per representation", wide=True),
             html_table(board.drop(columns=["source"], errors="ignore"))]
    if result.skipped:
        parts.append("<p>Not on the board: " + "; ".join(f"{escape(k)}: {escape(v)}"
                                                         for k, v in result.skipped.items()) + "</p>")
    return "".join(parts)


def leaderboard_findings_html(findings: dict | None) -> str:
    """The leaderboard's verdict at the top of the Findings: who finds the most actives, who names mechanisms best."""
    if not findings:
        return ""
    lines = leaderboard_lines(findings)
    return ("<h3>Which representation</h3><p>" + "<br>".join(escape(line[0].upper() + line[1:]) for line in lines)
            + " (<a href=\"#compare\">leaderboard</a>). The findings below read the score step's embeddings.</p>")
