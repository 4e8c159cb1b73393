"""`make demo`'s promise over draws of the screen: with no flags beyond rayjobs/configs/demo.yaml, the run finds what
the generator planted, on most seeds, not on one lucky draw.

It runs the demo as `make demo` does (`rxray pipeline --config rayjobs/configs/demo.yaml`, its own local Ray) once
per seed of the synthetic screen (``synth: {seed: N}``, each in a fresh folder; :func:`rxray.bench.science.run_seed`)
and checks the findings against each dataset's truth.json (:func:`rxray.report.truth_check.truth_check`). Goals that
are rates are asserted as rates over the seeds; fixed cuts that one site can flip (a classifier's F1) are reported,
and their ranking (ROC-AUC) asserted:

- every interferon active (q <= 0.05, headline correction) on every seed; no planted null on most seeds; at least
  85% of the planted treatments active on every seed (11 of 13 in the issue's terms);
- the treatment map recovering same-MoA pairs (p <= 0.05, with enough pairs to test) on most seeds;
- the unannotated compound named by its true mechanism, and the leave-one-compound-out MoA prediction at top-1 >=
  0.6 with p <= 0.01, on most seeds;
- the IFN-beta vs EMPTY classifier at ROC-AUC >= 0.95 on its held-out plate on every seed (F1 in the message);
- the SimCLR encoder ahead of every random-init encoder, and explain ranking IFN-beta's planted stain first, on most.

Three seeds take about 16 minutes on 2 cores, so it is marked ``demo`` and left out of `make test`; run it with
`.venv/bin/python -m pytest -m demo`. `rxray bench science` runs the same checks on any seeds and datasets.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from rxray.bench.science import rates, run_seed

pytestmark = pytest.mark.demo

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "rayjobs" / "configs" / "demo.yaml"
SEEDS = (0, 1, 2)
MOST = 2  # of the 3 seeds
MIN_PLANTED_ACTIVE_SHARE, MIN_ROC_AUC, MIN_MOA_TOP1, MOA_ALPHA, MAP_ALPHA = 0.85, 0.95, 0.6, 0.01, 0.05


@pytest.fixture(scope="module")
def checks(tmp_path_factory) -> list[dict]:
    """The truth check of the demo's run on each seed."""
    work = tmp_path_factory.mktemp("demo")
    return [run_seed(str(DEMO_CONFIG), seed, {}, work / f"seed{seed}") for seed in SEEDS]


def _count(checks: list[dict], condition) -> int:
    return sum(1 for check in checks if condition(check))


def test_interferons_and_most_planted_treatments_are_active_and_nulls_rarely(checks):
    assert all(c["interferons_active"] == c["interferons"] == 4 for c in checks), checks
    assert all(c["planted_active"] >= MIN_PLANTED_ACTIVE_SHARE * c["planted"] for c in checks), \
        [(c["seed"], c["planted_active"], c["planted"]) for c in checks]
    assert _count(checks, lambda c: not c["nulls_called"]) >= MOST, [(c["seed"], c["nulls_called"]) for c in checks]


def test_the_treatment_map_recovers_shared_mechanisms_on_most_seeds(checks):
    found = _count(checks, lambda c: c["map_testable"] and c["map_p"] <= MAP_ALPHA)
    assert found >= MOST, [(c["seed"], c["map_p"], c["map_pairs"]) for c in checks]


def test_the_mechanism_of_the_unannotated_compound_is_found(checks):
    calls = [call for c in checks for call in c["unannotated_calls"]]
    assert calls and sum(call["correct"] for call in calls) >= MOST, calls
    assert _count(checks, lambda c: c["moa_top1"] >= MIN_MOA_TOP1 and c["moa_p"] <= MOA_ALPHA) >= MOST, \
        [(c["seed"], c["moa_top1"], c["moa_p"]) for c in checks]


def test_the_ifn_beta_classifier_ranks_its_held_out_plate(checks):
    assert all(c["ifn_beta_roc_auc"] >= MIN_ROC_AUC for c in checks), \
        [(c["seed"], c["ifn_beta_roc_auc"], c["ifn_beta_f1"]) for c in checks]


def test_the_encoder_and_explain_on_most_seeds(checks):
    assert _count(checks, lambda c: c["probe_beats_random_init"]) >= MOST, checks
    assert _count(checks, lambda c: c.get("explain_ifn_beta_stain")) >= MOST, checks


def test_the_rates_across_seeds_are_what_the_readme_reports(checks):
    summary = rates(checks)
    assert summary["runs"] == len(SEEDS) and summary["all_interferons"] == len(SEEDS)
