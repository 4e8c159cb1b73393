"""`rxray report`: one HTML page with the figures and tables of every step output under a run.

Step outputs are found by their ``_manifest.json`` (:mod:`rxray.report.step_outputs`)
and grouped by the manifest's ``step``; each step has a section
(:mod:`rxray.report.sections`), and a step with no output gets a "not run"
section. The page opens with the run's findings (:mod:`rxray.report.findings`) and
ends with every step's wall time. Output layout under ``out``:

- ``report.html``: the page, with relative links only, so the folder opens locally
  even when the run lives on s3://;
- ``figures/*.png``: figures drawn here (embedding PCA, score bars, training curves,
  timings; :mod:`rxray.report.figures`) and copies of the figures the steps
  wrote (confusion matrices, PR and ROC curves, Grad-CAM panels, channel importance);
- ``tables/*.csv``: copies of the steps' small result tables, linked from the page;
- ``_manifest.json``: step "report", config, what was found, timings.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import pandas as pd

from rxray import storage
from rxray.config import ConfigError, ReportConfig
from rxray.report.findings import collect_findings, interval_summary, untestable_reason
from rxray.report.folder import ReportFolder
from rxray.report.representations import leaderboard_findings_html
from rxray.report.html import CSS, escape, format_value, html_table, link_html, provenance_html
from rxray.report.sections import (Context, other_html, pipeline_position, renderer,
                                            timings_html)
from rxray.report.step_outputs import (SEARCH_DEPTH, StepOutput,
                                         find_step_outputs)
from rxray.outputs import MANIFEST_FILE
from rxray.results import ReportResult
from rxray.runner import step_function
from rxray.steps import report_sections
from rxray.runtime import Timer

REPORT_FILE = "report.html"
TOP_PAIRS_SHOWN = 5  # the map's most similar pairs in the Findings


def cluster_text(members: list[str], shown: int = 8) -> str:
    """A cluster's members for the findings: the first ``shown`` names, then how many more."""
    more = f" and {len(members) - shown} more" if len(members) > shown else ""
    return f"{len(members)}: " + ", ".join(members[:shown]) + more


def mechanisms_html(mechanisms: dict[str, Any] | None) -> str:
    """The mechanism of each unannotated active compound, and the leave-one-compound-out benchmark behind it."""
    if not mechanisms:
        return ""
    parts = ["<h3>Mechanism of the unannotated compounds</h3>"]
    if mechanisms["unannotated"]:
        table = pd.DataFrame(mechanisms["unannotated"]).rename(columns={
            "predicted_moa": "predicted MoA", "confidence": "vote share",
            "nearest_similarity": "nearest cosine (sphered)",
            "neighbours": "nearest annotated treatments (MoA, cosine of sphered profiles)"})
        parts.append(html_table(table.fillna("-")))
    else:
        parts.append("<p>Every active compound is annotated in moa.csv: nothing unknown to predict.</p>")
    if mechanisms["inactive_unannotated"]:
        parts.append(f"<p>Unannotated but without a phenotype (no mechanism can be read from them): "
                     f"{escape(', '.join(mechanisms['inactive_unannotated']))}.</p>")
    prediction = mechanisms["benchmark"]
    if prediction.get("top1") is not None:
        retrieval = "; ".join(f"{escape(rule.replace('_', ' '))}: {format_value(value)}"
                              for rule, value in mechanisms["retrieval"].items() if value is not None)
        parts.append(
            f"<p>How far to trust it: each of the {prediction['n_evaluable']} annotated active compounds whose "
            f"mechanism has another member, left out in turn and predicted from the others (its {prediction['k']} "
            f"most similar annotated active treatments vote, weighted by the cosine of their consensus profiles, "
            f"sphered on all wells so that no direction every treatment moves along decides it): <b>top-1 accuracy "
            f"{format_value(prediction['top1'])}</b>, top-3 {format_value(prediction['top3'])}, against "
            f"{format_value(prediction['null_mean'])} with shuffled MoA labels (p = "
            f"{format_value(prediction['p_value'])})" + (f". MoA retrieval mAP ({retrieval})" if retrieval else "")
            + ".</p>")
        if not mechanisms["testable"]:
            parts.append('<p class="problem">Too few annotated active compounds to read this accuracy as a '
                         'finding.</p>')
        if prediction.get("per_moa"):
            parts.append("<details><summary>Per mechanism, and what each was taken for</summary>"
                         + html_table(pd.DataFrame(prediction["per_moa"]))
                         + html_table(pd.DataFrame(prediction.get("confusion") or []).fillna(0)) + "</details>")
    return "".join(parts)


def findings_html(findings: dict[str, Any]) -> str:
    """The Findings section: the representation leaderboard, mechanisms, activity, ranked treatments, the map, the probe, classifiers, warnings."""
    parts = []
    if findings["warnings"]:
        parts.append('<ul class="problem">' + "".join(f"<li>{escape(w)}</li>" for w in findings["warnings"])
                     + "</ul>")
    parts.append(leaderboard_findings_html(findings.get("leaderboard")))
    parts.append(mechanisms_html(findings.get("mechanisms")))
    activity = findings.get("activity")
    if activity:
        parts.append(f"<p><b>{activity['n_active']} of {activity['n_tested']} treatments active</b> (mAP against "
                     f"same-plate controls, Benjamini-Hochberg q &le; {escape(activity['fdr'])}, "
                     f"{escape(activity['correction'])} correction).</p>")
        columns = {"map": "mAP", "q_value": "q", "roc_auc": "RF ROC-AUC", "top_stain": "top stain"}
        ranked = pd.DataFrame(activity["ranked"]).fillna({"top_stain": "-"}).rename(columns=columns)
        parts.append(html_table(ranked))
    treatment_map = findings.get("treatment_map")
    if treatment_map:
        benchmark = treatment_map.get("benchmark") or {}
        if "recall_top" in benchmark and not treatment_map.get("testable", True):
            parts.append(f"<p>Treatment map ({escape(treatment_map['correction'])}): too few related treatments to "
                         f"test known relationships: {escape(untestable_reason(benchmark))}.</p>")
        elif "recall_top" in benchmark:
            related = (f" of the {benchmark['n_related']} treatments called active (only those are related)"
                       if "n_related" in benchmark else "")
            parts.append(f"<p>Treatment map ({escape(treatment_map['correction'])}): same-MoA recall among the 5% "
                         f"most similar pairs{related} {format_value(benchmark['recall_top'])} against a permutation "
                         f"null of "
                         f"{format_value(benchmark.get('null_mean'))} "
                         f"(p = {format_value(benchmark.get('p_value'))}, from {benchmark.get('n_same_moa_pairs')} "
                         f"same-MoA pairs; with {benchmark.get('n_selected_pairs')} of "
                         f"{benchmark.get('n_pairs')} pairs in that 5%, the smallest p possible is "
                         f"{format_value(benchmark.get('p_floor'))}).</p>")
        pairs = benchmark.get("top_pairs")
        if pairs:
            shown = pd.DataFrame(pairs[:TOP_PAIRS_SHOWN]).fillna({"moa_a": "-", "moa_b": "-"})
            shown["same_moa"] = shown["same_moa"].map({True: "yes", False: "no"}).fillna("-")
            parts.append("<p>Most similar pairs (a pair from two mechanisms is an unexpected similarity, and a miss "
                         "for the recall above):</p>")
            parts.append(html_table(shown.rename(columns={"moa_a": "MoA a", "moa_b": "MoA b",
                                                          "same_moa": "same MoA"})))
        if treatment_map.get("clusters"):
            items = "".join(f"<li>{escape(cluster_text(members))}</li>" for members in treatment_map["clusters"][:10])
            parts.append(f"<p>Clusters of similar treatments:</p><ul>{items}</ul>")
    probe = findings.get("probe")
    if probe:
        verdict = "beats" if probe["beats_random_init"] else "does not beat"
        parts.append(f"<p>Probe: the SimCLR encoder {verdict} every random-init encoder at telling treated from "
                     f"control sites on held-out plates.</p>" + html_table(pd.DataFrame(probe["rows"])))
    if findings.get("classifiers"):
        shown = pd.DataFrame(findings["classifiers"]).drop(columns=["unlabelled"], errors="ignore")
        if "roc_auc_interval" in shown:
            shown["roc_auc_interval"] = [interval_summary(interval, positive) for interval, positive
                                         in zip(shown["roc_auc_interval"], shown["positive"])]
            shown = shown.rename(columns={"roc_auc_interval": "roc_auc 95% CI"})
        parts.append("<p>Classifiers on their held-out split (split_by: plate or experiment, or treatment: compounds "
                     "never seen in training):</p>" + html_table(shown))
    if findings.get("split_leaks"):
        parts.append("<p>The same labels split two ways: on held-out plates the test compounds were also in training, "
                     "so a classifier can score by recognising each compound's own phenotype; on held-out compounds "
                     "it must know the mechanism. The difference is the plate split's leak:</p>"
                     + html_table(pd.DataFrame(findings["split_leaks"])))
    return "".join(parts) or '<p class="not-run">no score, probe or classifier output to summarise</p>'


def output_html(output: StepOutput, ctx: Context, render: Callable[[StepOutput, Context], str]) -> str:
    """One step output's block; a broken artifact becomes a visible error, not a missing report."""
    heading = f"<h3>{escape(output.step)}: <code>{escape(output.label)}</code></h3>"
    try:
        body = render(output, ctx)
    except Exception as exc:  # noqa: BLE001 - one unreadable artifact must not hide every other figure
        problem = f"{output.step} at {output.uri}: {type(exc).__name__}: {exc}"
        ctx.problems.append(problem)
        body = f'<p class="problem">could not render: {escape(problem)}</p>'
    return heading + body + provenance_html(output)


def render_page(run: str, outputs: list[StepOutput], ctx: Context) -> str:
    """The whole report page."""
    outputs = sorted(outputs, key=lambda o: (pipeline_position(o.step), o.relative))
    by_step: dict[str, list[StepOutput]] = {}
    for output in outputs:
        by_step.setdefault(output.step, []).append(output)
    sections = report_sections()
    others = [o for o in outputs if o.step not in dict(sections)]
    nav = [("findings", "Findings"), *sections] + ([("other", "Other step outputs")] if others else []) + \
        [("timings", "Step timings")]
    body = [f"<h1>rxray report</h1><p>Run: <code>{escape(run)}</code> &middot; written "
            f"{escape(time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()))} &middot; {len(outputs)} step outputs</p>",
            "<nav>" + "".join(link_html(f"#{key}", title) for key, title in nav) + "</nav>"]
    found = pd.DataFrame([{"step": o.step, "folder": o.label, "created": o.manifest.get("created"),
                           "git": (o.manifest.get("versions") or {}).get("git")} for o in outputs])
    body.append('<h2 id="findings">Findings</h2>')
    try:
        findings = collect_findings(outputs)
        ctx.highlight = [row["treatment"] for row in (findings.get("activity") or {}).get("ranked", [])]
        body.append(findings_html(findings))
    except Exception as exc:  # noqa: BLE001 - as in output_html
        ctx.problems.append(f"findings: {type(exc).__name__}: {exc}")
        body.append(f'<p class="problem">could not summarise the findings: {escape(exc)}</p>')
    body.append("<details><summary>Step outputs found</summary>" + html_table(found) + "</details>")
    for step, title in sections:
        body.append(f'<h2 id="{step}">{escape(title)}</h2>')
        instances = by_step.get(step, [])
        if not instances:
            body.append('<p class="not-run">not run</p>')
        body += [output_html(o, ctx, renderer(step)) for o in instances]
    if others:
        body.append('<h2 id="other">Other step outputs</h2>')
        body += [output_html(o, ctx, other_html) for o in others]
    body.append('<h2 id="timings">Step timings</h2>')
    try:
        body.append(timings_html(outputs, ctx))
    except Exception as exc:  # noqa: BLE001 - as in output_html
        ctx.problems.append(f"timings: {type(exc).__name__}: {exc}")
        body.append(f'<p class="problem">could not render timings: {escape(exc)}</p>')
    if ctx.problems:
        body.append("<h2>Problems</h2><ul>" + "".join(f"<li>{escape(p)}</li>" for p in ctx.problems) + "</ul>")
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>rxray report: {escape(run)}</title>'
            f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>\n")


@step_function("report")
def report(cfg: ReportConfig) -> ReportResult:
    """Find every step output under ``cfg.run`` and write report.html with its figures under ``cfg.out``."""
    timer = Timer()
    if not storage.exists(cfg.run):
        raise ConfigError("report.run", f"not found: {cfg.run}")
    with timer.time("find"):
        outputs = find_step_outputs(cfg.run, exclude=cfg.out)
    if not outputs:
        raise ConfigError("report.run", f"no step output ({MANIFEST_FILE}) within {SEARCH_DEPTH} folder levels of "
                                        f"{cfg.run}")
    ctx = Context(cfg, ReportFolder(cfg.out))
    with timer.time("render"):
        page = render_page(cfg.run, outputs, ctx)
    report_uri = storage.join(cfg.out, REPORT_FILE)
    storage.write_text(report_uri, page)
    found = sorted({o.step for o in outputs}, key=pipeline_position)
    not_run = [step for step, _ in report_sections() if step not in found]
    return ReportResult(counts={"step_outputs": len(outputs), "figures": ctx.folder.figures},
                        timings=timer.seconds, outputs=[{"step": o.step, "uri": o.uri} for o in outputs],
                        report=report_uri, steps=found, not_run=not_run, problems=ctx.problems)
