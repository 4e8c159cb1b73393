"""A run's findings against what a synthetic dataset planted (its truth.json): the numbers every science check reads.

:func:`truth_check` turns one pipeline run on a generated dataset into a flat dict: the
planted treatments called active (the interferons among them), planted nulls called, the
treatment map's test and its power, the IFN-beta classifier's ranking and F1, the
leave-one-compound-out MoA prediction and each unannotated compound's predicted mechanism
against its true one, the plate-split and compound-split MoA classifiers, the probe's
verdict and explain's leading stain. `rxray bench science` and the demo goals test read
it over several seeds and datasets; nothing here runs a step.
"""

from __future__ import annotations

import json
from typing import Any

from rxray import storage
from rxray.report.findings import collect_findings
from rxray.report.step_outputs import find_step_outputs

TRUTH_FILE = "truth.json"
INTERFERON_MOA = "interferon"


def truth_check(run: str, source: str) -> dict[str, Any]:
    """The findings of the run at ``run`` scored against ``source``'s truth.json (see the module docstring)."""
    truth = json.loads(storage.read_text(storage.join(source, TRUTH_FILE)))
    planted = truth["treatments"]
    findings = collect_findings(find_step_outputs(run))
    activity = findings.get("activity") or {}
    active = set(activity.get("active") or [])
    nulls = {name for name, t in planted.items() if t["null"]}
    phenotypes = set(planted) - nulls
    interferons = {name for name, t in planted.items() if t["moa"] == INTERFERON_MOA}
    benchmark = (findings.get("treatment_map") or {}).get("benchmark") or {}
    result: dict[str, Any] = {
        "correction": activity.get("correction"),
        "planted_active": len(active & phenotypes), "planted": len(phenotypes),
        "interferons_active": len(active & interferons), "interferons": len(interferons),
        "nulls_called": sorted(active & nulls), "nulls": len(nulls),
        "map_p": benchmark.get("p_value"), "map_recall": benchmark.get("recall_top"),
        "map_pairs": benchmark.get("n_same_moa_pairs"),
        "map_testable": (findings.get("treatment_map") or {}).get("testable"),
    }
    result.update(_mechanisms(findings.get("mechanisms"), planted))
    result.update(_classifiers(findings))
    probe = findings.get("probe")
    result["probe_beats_random_init"] = None if probe is None else probe["beats_random_init"]
    ranked = {row["treatment"]: row["top_stain"] for row in activity.get("ranked") or []}
    leading = (planted.get("IFN-beta") or {}).get("leading_channel")
    if leading is not None and ranked.get("IFN-beta") is not None:
        result["explain_ifn_beta_stain"] = ranked["IFN-beta"] == truth["channels"][leading - 1].split()[1]
    return result


def _mechanisms(mechanisms: dict[str, Any] | None, planted: dict[str, Any]) -> dict[str, Any]:
    """The leave-one-compound-out benchmark and each unannotated compound's call against its planted mechanism."""
    if not mechanisms:
        return {}
    prediction = mechanisms["benchmark"]
    calls = [{"treatment": row["treatment"], "predicted": row["predicted_moa"],
              "true": planted[row["treatment"]]["moa"], "correct": row["predicted_moa"] == planted[row["treatment"]]["moa"]}
             for row in mechanisms["unannotated"]]
    missed = [name for name in mechanisms["inactive_unannotated"] if not planted[name]["null"]]
    return {"moa_top1": prediction.get("top1"), "moa_top3": prediction.get("top3"), "moa_p": prediction.get("p_value"),
            "moa_null": prediction.get("null_mean"), "moa_evaluable": prediction.get("n_evaluable"),
            "moa_map": (mechanisms.get("retrieval") or {}).get("not_same_compound"),
            "unannotated_calls": calls, "unannotated_inactive": missed}


def _classifiers(findings: dict[str, Any]) -> dict[str, Any]:
    """The IFN-beta classifier's test ranking (with its interval's lower bound) and F1; per-compound accuracy of
    plate- and compound-split MoA runs."""
    result: dict[str, Any] = {}
    for classifier in findings.get("classifiers") or []:
        if classifier.get("positive") == "IFN-beta":
            interval = classifier.get("roc_auc_interval") or {}
            result.update(ifn_beta_roc_auc=classifier["roc_auc"], ifn_beta_roc_auc_low=interval.get("low"),
                          ifn_beta_f1=classifier["f1"])
    for leak in findings.get("split_leaks") or []:
        result.update(moa_site_accuracy_plate_split=leak["site_accuracy"],
                      moa_site_accuracy_compound_split=leak["compound_split_site_accuracy"],
                      moa_compound_accuracy_plate_split=leak["compound_accuracy"],
                      moa_compound_accuracy_compound_split=leak["compound_split_compound_accuracy"])
    return result


__all__ = ["truth_check"]
