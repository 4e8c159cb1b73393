"""`rxray compare`: when the score step's tables stand for the trained encoder's row, and how the board reads.

The leaderboard itself, on every representation of a tiny run, is tests/test_pipeline.py's (the science run).
"""

from __future__ import annotations

from rxray.batch.compare import scored_alike
from rxray.config import CompareConfig, ScoreConfig, config_to_dict, load_config
from rxray.outputs import write_manifest
from rxray.report.leaderboard import leaderboard_findings, leaderboard_lines
from rxray.results import ScoreResult


def _score_output(tmp_path, **settings) -> str:
    out = str(tmp_path / "score")
    cfg = load_config(ScoreConfig, values=dict(embeddings=str(tmp_path / "embed"), out=out, **settings))
    write_manifest(out, "score", config_to_dict(cfg), ScoreResult())
    return out


def _compare(tmp_path, **settings) -> CompareConfig:
    return load_config(CompareConfig, values=dict(out=str(tmp_path / "compare"), embeddings=str(tmp_path / "embed"),
                                                  **settings))


def test_the_score_steps_tables_stand_only_when_every_setting_matches(tmp_path):
    score = _score_output(tmp_path, correct=["center", "tvn"], trees=50, permutations=200)
    # Each correction is scored on its own, so a score of more corrections holds the compare's rows.
    assert scored_alike(score, _compare(tmp_path, correct=["tvn"], trees=50, permutations=200))
    assert not scored_alike(score, _compare(tmp_path, correct=["tvn"], trees=100, permutations=200))
    assert not scored_alike(score, _compare(tmp_path, correct=["none"], trees=50, permutations=200))
    other = load_config(CompareConfig, values=dict(out=str(tmp_path / "compare"), embeddings=str(tmp_path / "other"),
                                                   correct=["tvn"], trees=50, permutations=200))
    assert not scored_alike(score, other)


def test_the_findings_name_who_finds_the_most_actives_and_who_names_mechanisms_best():
    # Random init calls only 5 annotated compounds active and names all 5: top-1 1.0 on the easy ones. Mechanism
    # recovery ranks by compounds named right, so it comes last, not first.
    rows = [{"representation": "simclr", "active_treatments": 19, "treatments_scored": 24, "moa_top1": 0.6,
             "moa_compounds": 15, "moa_p_value": 0.001},
            {"representation": "random-init-0", "active_treatments": 6, "treatments_scored": 24, "moa_top1": 1.0,
             "moa_compounds": 5, "moa_p_value": 0.001},
            {"representation": "cellprofiler", "active_treatments": 21, "treatments_scored": 24, "moa_top1": 0.84,
             "moa_compounds": 19, "moa_p_value": 0.001},
            {"representation": "random-init-1", "active_treatments": 1, "treatments_scored": 24, "moa_top1": None,
             "moa_compounds": 0, "moa_p_value": None}]
    lines = leaderboard_lines(leaderboard_findings(rows, "tvn"))
    assert lines[0] == ("most active treatments found by: cellprofiler 21 of 24, simclr 19 of 24, "
                        "random-init-0 6 of 24, random-init-1 1 of 24 (tvn correction)")
    assert lines[1].endswith("cellprofiler 16 of 19 right (top-1 0.84, p = 0.001), simclr 9 of 15 right (top-1 "
                             "0.60, p = 0.001), random-init-0 5 of 5 right (top-1 1.00, p = 0.001)")
    older = [{k: v for k, v in row.items() if k != "moa_compounds"} for row in rows]  # a board before the column
    assert leaderboard_lines(leaderboard_findings(older, "tvn"))[1].endswith(
        "random-init-0 1.00 (p = 0.001), cellprofiler 0.84 (p = 0.001), simclr 0.60 (p = 0.001)")
    assert leaderboard_lines(leaderboard_findings([], "tvn")) == []
