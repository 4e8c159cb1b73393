"""What a run found, in the order a scientist asks: which treatments act, how, and can the numbers be trusted.

:func:`collect_findings` reads the manifests and small tables the steps wrote (never
images or site tables) and returns a plain dict; the report renders it at the top of
the page and the pipeline prints it as a few lines at the end of a run:

- the representation leaderboard (`rxray compare`): which representation calls the most
  treatments active and which recovers mechanisms best;
- mechanisms: the predicted mechanism of every active compound that moa.csv does not
  annotate (with its confidence and nearest annotated neighbours), and how often the
  same prediction names the right mechanism for the annotated ones, each left out in
  turn, against a label-shuffle null;
- activity: how many treatments are active at the score step's FDR under the headline
  correction (TVN when it was run, else plate centring), and the ranked table (mAP, q, RF
  ROC-AUC) with the stain that drives each treatment where explain measured it;
- the treatment map: its clusters and the known-relationship benchmark (same-MoA
  recall against its permutation null);
- the probe's verdict on the SimCLR encoder against random-init encoders;
- each classifier's test F1 and ROC-AUC on held-out plates (or compounds), per-compound
  accuracy, and a plate split beside a compound split of the same labels, so the leak of
  a plate split (a compound's own phenotype learnt, not its mechanism) shows;
- warnings, whenever a check fails (no active treatment, an encoder that does not
  beat random init, a classifier at chance), so a weak run never reads as a good one.
"""

from __future__ import annotations

import io
import json
import posixpath
from typing import Any, Iterable

import pandas as pd

from rxray import storage
from rxray.evaluate.treatment_map import MAP_FILES, MIN_SAME_MOA_PAIRS
from rxray.report.leaderboard import leaderboard_findings, leaderboard_lines
from rxray.report.step_outputs import StepOutput, find_step_outputs

# The first correction run heads the findings. TVN first: whitening the controls' typical variation keeps a learnt
# embedding's large nuisance directions from drowning the phenotypes in every cosine (EFAAR's Align step). On the
# default screen's SimCLR embeddings (seed 0): 21 of 21 planted treatments active and leave-one-compound-out MoA
# top-1 0.74 with TVN, 17 of 21 and 0.33 with plate centring alone (docs/science-checks.md).
HEADLINE_CORRECTIONS = ("tvn", "center", "none")
TOP_TREATMENTS = 20  # rows of the ranked table in the findings (the full table is linked)
CHANCE_ROC_AUC = 0.6  # a classifier at or below this on held-out plates is no better than chance
# A binary classifier that ranks its test sites this well but scores F1 below LOW_F1 has a cut that misses them.
GOOD_ROC_AUC, LOW_F1 = 0.9, 0.5
MAP_ALPHA = 0.05  # the treatment map recovers known relationships when its same-MoA recall has p at or below this
# The leave-one-compound-out MoA accuracy needs this many annotated active compounds whose mechanism has another
# member before it is read as a finding: with fewer, one compound moves it by 20% or more.
MIN_EVALUABLE_COMPOUNDS = 5
SCORE_TABLE_FILES = ("scores.parquet", "scores.csv")


def _first(outputs: Iterable[StepOutput], step: str) -> StepOutput | None:
    return next((o for o in outputs if o.step == step), None)


def read_table(uri: str) -> pd.DataFrame:
    """A small Parquet or CSV table at a URI."""
    if uri.endswith(".parquet"):
        return pd.read_parquet(io.BytesIO(storage.read_bytes(uri)))
    return pd.read_csv(io.StringIO(storage.read_text(uri)))


def score_table_uri(output: StepOutput) -> str | None:
    """The score table of a score output (Parquet preferred), found by name in its folder."""
    names = [posixpath.basename(str(p)) for p in output.result.outputs or []]
    names += list(SCORE_TABLE_FILES)
    for name in sorted(dict.fromkeys(names), key=lambda n: not n.endswith(".parquet")):
        if name in output.files:
            return storage.join(output.uri, name)
    return None


def headline_correction(corrections: Iterable[str]) -> str | None:
    """The correction that heads the findings and the treatment map: the first of HEADLINE_CORRECTIONS run."""
    present = set(corrections)
    return next((c for c in HEADLINE_CORRECTIONS if c in present), None)


def activity_findings(score: StepOutput, top_stain: dict[str, str]) -> dict[str, Any] | None:
    """Active treatments under the headline correction, ranked by q then mAP, with the stain explain found."""
    uri = score_table_uri(score)
    frame = read_table(uri) if uri else None
    if frame is None or frame.empty:
        return None
    correction = headline_correction(frame["correction"]) or str(frame["correction"].iloc[0])
    table = frame[frame["correction"] == correction].copy()
    table = table.sort_values(["q_value", "map"], ascending=[True, False], na_position="last")
    table["top_stain"] = table["treatment"].map(top_stain)
    tested = table["p_value"].notna()
    rows = [{"treatment": r.treatment, "map": _round(r.map), "q_value": _round(r.q_value),
             "roc_auc": _round(r.roc_auc), "active": bool(r.active),
             "top_stain": r.top_stain if isinstance(r.top_stain, str) else None}
            for r in table.head(TOP_TREATMENTS).itertuples()]
    return {"correction": correction, "fdr": score.config.get("fdr"), "n_tested": int(tested.sum()),
            "n_active": int(table["active"].sum()), "active": table.loc[table["active"], "treatment"].tolist(),
            "ranked": rows, "n_treatments": int(len(table))}


def map_findings(score: StepOutput, correction: str) -> dict[str, Any] | None:
    """The treatment map's benchmark and clusters for one correction, if the score step built a map."""
    if MAP_FILES["summary"] not in score.files:
        return None
    document = json.loads(storage.read_text(storage.join(score.uri, MAP_FILES["summary"])))
    benchmark = document["corrections"].get(correction)
    if benchmark is None:
        return None
    clusters = None
    if MAP_FILES["clusters"] in score.files:
        table = read_table(storage.join(score.uri, MAP_FILES["clusters"]))
        table = table[table["correction"] == correction]
        groups = table[table["cluster"] > 0].groupby("cluster")["treatment"].apply(list)  # 0: not related
        clusters = [members for members in groups.tolist() if len(members) > 1]
    return {"correction": correction, "benchmark": benchmark, "clusters": clusters}


def mechanism_findings(score: StepOutput, correction: str) -> dict[str, Any] | None:
    """Predicted mechanisms of the unannotated active compounds and the leave-one-compound-out benchmark."""
    if MAP_FILES["mechanisms"] not in score.files or MAP_FILES["summary"] not in score.files:
        return None
    document = json.loads(storage.read_text(storage.join(score.uri, MAP_FILES["summary"])))
    benchmark = (document["corrections"].get(correction) or {})
    table = read_table(storage.join(score.uri, MAP_FILES["mechanisms"]))
    table = table[table["correction"] == correction]
    unannotated = table[~table["annotated"].astype(bool) & table["active"].astype(bool)]
    keep = ["treatment", "predicted_moa", "confidence", "nearest_similarity", "neighbours", "status"]
    rows = [{k: (None if isinstance(v, float) and v != v else v) for k, v in row.items()}
            for row in unannotated[keep].to_dict("records")]
    prediction = benchmark.get("moa_prediction") or {}
    retrieval = {rule: (values or {}).get("mean_map") for rule, values in (benchmark.get("moa_retrieval") or {}).items()}
    return {"correction": correction, "unannotated": rows, "benchmark": prediction, "retrieval": retrieval,
            "testable": (prediction.get("n_evaluable") or 0) >= MIN_EVALUABLE_COMPOUNDS,
            "inactive_unannotated": sorted(table.loc[~table["annotated"].astype(bool)
                                                     & ~table["active"].astype(bool), "treatment"].tolist())}


def probe_findings(probe: StepOutput) -> dict[str, Any] | None:
    """The probe's treated-vs-control comparison: does the trained encoder beat every random-init one?"""
    rows = [r for r in probe.result.comparison if r.get("task") == "control"]
    if not rows:
        return None
    beats = all(r.get("margin") is not None and r["margin"] > 0 for r in rows)
    return {"beats_random_init": beats,
            "rows": [{"method": r["method"], "trained": r["trained"], "random_init": r["random_init"],
                      "margin": r["margin"]} for r in rows]}


def classifier_findings(outputs: Iterable[StepOutput]) -> list[dict[str, Any]]:
    """Each finetune run's task and its test metrics on held-out plates."""
    found = []
    for output in outputs:
        if output.step != "finetune":
            continue
        config, result = output.config, output.result
        test = result.test
        compounds = test.get("compounds") or {}
        found.append({"name": output.label, "task": result.task, "positive": config.get("positive"),
                      "label_col": config.get("label_col"), "split_by": config.get("split_by"),
                      "f1": _round(test.get("f1", test.get("f1_macro"))), "roc_auc": _round(test.get("roc_auc")),
                      "roc_auc_interval": rounded_interval(test.get("roc_auc_interval")),
                      "accuracy": _round(test.get("accuracy")), "compound_accuracy": _round(compounds.get("accuracy")),
                      "n_compounds": compounds.get("n"), "n": test.get("n"), "threshold": _round(test.get("threshold")),
                      "unlabelled": test.get("unlabelled") or []})
    return found


def rounded_interval(interval: dict[str, Any] | None) -> dict[str, Any] | None:
    """A ROC-AUC interval (rxray.evaluate.metrics.roc_auc_interval) with its bounds rounded like the findings."""
    if not interval:
        return None
    return {**interval, "low": _round(interval.get("low")), "high": _round(interval.get("high"))}


def interval_summary(interval: dict[str, Any] | None, positive: str | None = None) -> str | None:
    """'0.875-1.0 over 3 IFN-beta and 8 negative wells' for a rounded interval; None without one."""
    if not interval or interval.get("low") is None:
        return None
    return (f"{interval['low']}-{interval['high']} over {interval['positive_groups']} {positive or 'positive'} and "
            f"{interval['negative_groups']} negative {interval.get('unit', 'wells')}")


def split_leaks(classifiers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Classifier runs of one task and label trained on two kinds of split, side by side (plate beside compound).

    A plate split keeps every compound of the test plates in training, so its accuracy
    includes what a classifier learnt of each compound's own phenotype; a compound split
    cannot. The difference is how much of the plate split's accuracy would not carry over
    to a new compound.
    """
    by_task: dict[tuple, dict[str, dict[str, Any]]] = {}
    for classifier in classifiers:
        key = (classifier["task"], classifier["label_col"], classifier["positive"])
        by_task.setdefault(key, {})[classifier["split_by"]] = classifier
    leaks = []
    for (task, label_col, positive), runs in by_task.items():
        if "treatment" not in runs or len(runs) < 2:
            continue
        compound = runs["treatment"]
        for split_by, other in runs.items():
            if split_by == "treatment":
                continue
            leaks.append({"task": task, "label": label_col if positive is None else f"{label_col}={positive}",
                          "split": split_by, "run": other["name"], "compound_run": compound["name"],
                          "site_accuracy": other["accuracy"], "compound_split_site_accuracy": compound["accuracy"],
                          "compound_accuracy": other["compound_accuracy"],
                          "compound_split_compound_accuracy": compound["compound_accuracy"]})
    return leaks


def collect_findings(outputs: list[StepOutput]) -> dict[str, Any]:
    """Findings of a run from its step outputs (see the module docstring), with warnings for failed checks.

    An output that cannot be read leaves its part out with a warning (the step's own report
    section shows the error), so one broken artifact never hides the rest of the findings.
    """
    warnings: list[str] = []

    def part(step: str, read, *args):
        try:
            return read(*args)
        except Exception as exc:  # noqa: BLE001 - see the docstring
            warnings.append(f"could not read the {step} output: {type(exc).__name__}: {exc}")
            return None

    explain = _first(outputs, "explain")
    top_stain = dict(explain.result.top_stain) if explain else {}
    score, probe = _first(outputs, "score"), _first(outputs, "probe")
    activity = part("score", activity_findings, score, top_stain) if score else None
    treatment_map = part("score", map_findings, score, activity["correction"]) if score and activity else None
    mechanisms = part("score", mechanism_findings, score, activity["correction"]) if score and activity else None
    probe_verdict = part("probe", probe_findings, probe) if probe else None
    classifiers = part("finetune", classifier_findings, outputs) or []
    compare = _first(outputs, "compare")
    leaderboard = (part("compare", leaderboard_findings, compare.result.leaderboard, compare.result.correction)
                   if compare else None)

    if activity is not None and activity["n_active"] == 0:
        warnings.append(f"no treatment is active at FDR {activity['fdr']} under {activity['correction']} correction")
    if probe_verdict is not None and not probe_verdict["beats_random_init"]:
        warnings.append("the SimCLR encoder does not beat every random-init encoder in the treated-vs-control "
                        "probe: its embeddings may not be worth its training")
    for classifier in classifiers:
        if classifier["roc_auc"] is not None and classifier["roc_auc"] <= CHANCE_ROC_AUC:
            warnings.append(f"classifier {classifier['name']} is near chance on its test plates "
                            f"(ROC-AUC {classifier['roc_auc']})")
        elif (classifier["task"] == "binary" and classifier["roc_auc"] is not None and classifier["f1"] is not None
              and classifier["roc_auc"] >= GOOD_ROC_AUC and classifier["f1"] < LOW_F1):
            warnings.append(f"classifier {classifier['name']} ranks its test sites well (ROC-AUC {classifier['roc_auc']}) "
                            f"but its decision threshold (probability {classifier['threshold']}) calls few of its "
                            f"positives (F1 {classifier['f1']}): weak doses on the test plate, or a cut to learn on "
                            f"the validation plate (--threshold val-f1)")
    benchmark = (treatment_map or {}).get("benchmark") or {}
    if treatment_map is not None and "p_value" in benchmark:
        treatment_map["testable"] = map_testable(benchmark)
        if not treatment_map["testable"]:
            warnings.append(f"too few related treatments to test the treatment map: {untestable_reason(benchmark)}")
        elif benchmark["p_value"] > MAP_ALPHA:
            warnings.append(f"the treatment map does not recover known MoA relationships (p = {benchmark['p_value']}, "
                            f"{benchmark.get('n_same_moa_pairs')} same-MoA pairs)")
    if mechanisms is not None:
        prediction = mechanisms["benchmark"]
        if not mechanisms["testable"]:
            warnings.append(f"too few annotated active compounds to benchmark the MoA prediction "
                            f"({prediction.get('n_evaluable')} whose mechanism has another member; at least "
                            f"{MIN_EVALUABLE_COMPOUNDS} needed)")
        elif prediction.get("p_value") is not None and prediction["p_value"] > MAP_ALPHA:
            warnings.append(f"the leave-one-compound-out MoA prediction is no better than shuffled labels "
                            f"(top-1 {_round(prediction.get('top1'))}, null {_round(prediction.get('null_mean'))}, "
                            f"p = {prediction['p_value']})")
    return {"leaderboard": leaderboard, "mechanisms": mechanisms, "activity": activity, "treatment_map": treatment_map, "probe": probe_verdict,
            "classifiers": classifiers, "split_leaks": split_leaks(classifiers), "warnings": warnings}


def map_testable(benchmark: dict[str, Any]) -> bool:
    """Whether the map's same-MoA recall test has the pairs to mean anything (see MIN_SAME_MOA_PAIRS)."""
    pairs, p_floor = benchmark.get("n_same_moa_pairs") or 0, benchmark.get("p_floor")
    return pairs >= MIN_SAME_MOA_PAIRS and p_floor is not None and p_floor <= MAP_ALPHA


def untestable_reason(benchmark: dict[str, Any]) -> str:
    """Why the map's recall test cannot be read: too few same-MoA pairs, or a tail too short for any p below alpha."""
    pairs = benchmark.get("n_same_moa_pairs") or 0
    if pairs < MIN_SAME_MOA_PAIRS:
        return (f"{pairs} same-MoA pair(s) among the {benchmark.get('n_related')} active treatments, fewer than the "
                f"{MIN_SAME_MOA_PAIRS} the recall test needs")
    return (f"its top 5% holds {benchmark.get('n_selected_pairs')} of {benchmark.get('n_pairs')} pairs, where even "
            f"all same-MoA would give p = {benchmark.get('p_floor')}")


def mechanism_lines(mechanisms: dict[str, Any] | None) -> list[str]:
    """The unannotated compounds' predicted mechanisms and the leave-one-compound-out accuracy, as console lines."""
    if not mechanisms:
        return []
    lines = []
    for row in mechanisms["unannotated"]:
        if row["predicted_moa"] is None:
            lines.append(f"mechanism of {row['treatment']} (unannotated): none predicted ({row['status']})")
            continue
        nearest = ", ".join(part.split(" (")[0] + " " + part.rsplit(", ", 1)[-1].rstrip(")")
                            for part in (row["neighbours"] or "").split("; ") if part)
        lines.append(f"mechanism of {row['treatment']} (unannotated): {row['predicted_moa']} (vote share "
                     f"{row['confidence']:.2f}; nearest annotated, sphered cosine: {nearest})")
    if mechanisms["inactive_unannotated"]:
        lines.append("unannotated without a phenotype (no mechanism predicted): "
                     + ", ".join(mechanisms["inactive_unannotated"]))
    prediction = mechanisms["benchmark"]
    if prediction.get("top1") is not None and mechanisms["testable"]:
        retrieval = "; ".join(f"{rule.replace('_', ' ')} {value:.2f}" for rule, value in mechanisms["retrieval"].items()
                              if value is not None)
        lines.append(f"MoA prediction, each annotated compound left out in turn: top-1 {prediction['top1']:.2f}, top-3 "
                     f"{prediction['top3']:.2f} of {prediction['n_evaluable']} compounds (shuffled labels "
                     f"{prediction['null_mean']:.2f}, p = {prediction['p_value']})"
                     + (f"; MoA mAP, {retrieval}" if retrieval else ""))
    return lines


def findings_lines(findings: dict[str, Any]) -> list[str]:
    """The findings as a few console lines: the representation leaderboard, the mechanisms of unannotated
    compounds, then the rest."""
    lines = leaderboard_lines(findings.get("leaderboard")) + mechanism_lines(findings.get("mechanisms"))
    activity = findings.get("activity")
    if activity:
        active = ", ".join(activity["active"][:8]) + (" ..." if len(activity["active"]) > 8 else "")
        lines.append(f"active treatments: {activity['n_active']} of {activity['n_tested']} "
                     f"(q <= {activity['fdr']}, {activity['correction']} correction)"
                     + (f": {active}" if active else ""))
        stains = [f"{r['treatment']} -> {r['top_stain']}" for r in activity["ranked"] if r["active"] and r["top_stain"]]
        if stains:
            lines.append("driving stain (explain): " + ", ".join(stains[:6]))
    treatment_map = findings.get("treatment_map") or {}
    benchmark = treatment_map.get("benchmark") or {}
    if "recall_top" in benchmark:
        if _round(benchmark["recall_top"]) is None:  # NaN, written to JSON as null
            lines.append(f"treatment map: no two treatments share an MoA ({benchmark.get('n_annotated')} annotated):"
                         f" nothing to benchmark")
        elif not treatment_map.get("testable", True):
            lines.append(f"treatment map: too few related treatments to test ({untestable_reason(benchmark)})")
        else:
            related = f" among the {benchmark['n_related']} active treatments" if "n_related" in benchmark else ""
            lines.append(f"treatment map: same-MoA recall in the top 5% of pairs{related} "
                         f"{benchmark['recall_top']:.2f} (null {benchmark.get('null_mean', float('nan')):.2f}, "
                         f"p = {benchmark.get('p_value')}, {benchmark.get('n_same_moa_pairs')} same-MoA pairs)")
    pairs = [f"{p['treatment_a']} ~ {p['treatment_b']} {p['cosine']:.2f}"
             + ("" if p["same_moa"] is None else " (same MoA)" if p["same_moa"] else " (two MoAs)")
             for p in (benchmark.get("top_pairs") or [])[:3]]
    if pairs:
        lines.append("most similar treatments: " + ", ".join(pairs))
    probe = findings.get("probe")
    if probe:
        # The verdict is "beats every random-init encoder by every method": the weakest method decides it.
        weakest = min(probe["rows"], key=lambda r: r["margin"] if r["margin"] is not None else float("-inf"))
        verdict = "beats" if probe["beats_random_init"] else "does NOT beat"
        lines.append(f"SimCLR encoder {verdict} random init (treated vs control; weakest method {weakest['method']}: "
                     f"{weakest['trained']:.3f} vs {max(weakest['random_init'], default=float('nan')):.3f})")
    for classifier in findings.get("classifiers") or []:
        held_out = "compounds" if classifier.get("split_by") == "treatment" else f"{classifier.get('split_by')}s"
        per_compound = (f", per-compound accuracy {classifier['compound_accuracy']} of {classifier['n_compounds']}"
                        if classifier.get("compound_accuracy") is not None and classifier["task"] != "binary" else "")
        interval = interval_summary(classifier.get("roc_auc_interval"), classifier.get("positive"))
        interval = f" ({classifier['roc_auc_interval']['level']:.0%} CI {interval})" if interval else ""
        lines.append(f"classifier {classifier['name']} (held-out {held_out}): test F1 {classifier['f1']}, ROC-AUC "
                     f"{classifier['roc_auc']}{interval}{per_compound}")
    for leak in findings.get("split_leaks") or []:
        lines.append(f"{leak['label']} classifier on compounds it has seen ({leak['split']} split) vs never seen "
                     f"(compound split): per-compound accuracy {leak['compound_accuracy']} vs "
                     f"{leak['compound_split_compound_accuracy']}")
    lines += [f"WARNING: {w}" for w in findings.get("warnings") or []]
    return lines


def _round(value: Any, digits: int = 3) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if value != value else round(value, digits)


def run_findings(run: str) -> list[str]:
    """The findings of the step outputs under a run, in a few lines; a line saying why when they cannot be read."""
    try:
        return findings_lines(collect_findings(find_step_outputs(run)))
    except Exception as exc:  # noqa: BLE001 - a summary must never fail a finished pipeline
        return [f"findings could not be summarised: {type(exc).__name__}: {exc}"]
