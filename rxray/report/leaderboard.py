"""The leaderboard's verdict (`rxray compare`): who calls the most treatments active, who names mechanisms best.

The console's findings and the report's open with it; both read the rows of
``leaderboard.csv`` as the compare step's result records them.
"""

from __future__ import annotations

from typing import Any

import pandas as pd


def leaderboard_findings(rows: list[dict[str, Any]], correction: str | None) -> dict[str, Any] | None:
    """Who calls the most treatments active and who recovers mechanisms best, from the leaderboard's rows.

    Each representation's MoA top-1 is a share of the annotated compounds it calls active, so
    one that calls only the strongest (say the interferons) can score 1.0 on a handful: the
    mechanisms are ranked by how many compounds each names right, then by top-1.
    """
    if not rows:
        return None
    board = pd.DataFrame(rows)
    by_active = board.sort_values("active_treatments", ascending=False, kind="stable")
    mechanism = board.dropna(subset=["moa_top1"]).copy()
    if "moa_compounds" not in mechanism:  # a board written before the column
        mechanism["moa_compounds"] = None
    mechanism["moa_compounds"] = pd.to_numeric(mechanism["moa_compounds"], errors="coerce")
    mechanism["named"] = (mechanism["moa_top1"] * mechanism["moa_compounds"]).round()
    mechanism = mechanism.sort_values(["named", "moa_top1"], ascending=False, kind="stable", na_position="last")
    return {"correction": correction,
            "active": [(r.representation, r.active_treatments, r.treatments_scored) for r in by_active.itertuples()],
            "mechanism": [(r.representation, r.moa_top1, r.moa_p_value,
                           None if pd.isna(r.moa_compounds) else int(r.moa_compounds))
                          for r in mechanism.itertuples()]}


def leaderboard_lines(findings: dict[str, Any] | None) -> list[str]:
    """The leaderboard in two console lines."""
    if not findings:
        return []
    lines = ["most active treatments found by: " + ", ".join(
        f"{name} {active} of {scored}" for name, active, scored in findings["active"])
        + f" ({findings['correction']} correction)"]
    if findings["mechanism"]:
        lines.append("best mechanism recovery (leave one compound out, of the annotated compounds each calls "
                     "active): " + ", ".join(_mechanism_entry(*entry) for entry in findings["mechanism"]))
    return lines


def _mechanism_entry(name: str, top1: float, p: float | None, compounds: int | None = None) -> str:
    """``name k of n right (top-1 x, p = y)``, or ``name x (p = y)`` when the board does not say n."""
    p_text = "" if p is None or pd.isna(p) else f"p = {p:.3g}"
    if compounds is None:
        return f"{name} {top1:.2f}" + (f" ({p_text})" if p_text else "")
    return f"{name} {round(top1 * compounds)} of {compounds} right (top-1 {top1:.2f}" + (f", {p_text})" if p_text
                                                                                        else ")")
