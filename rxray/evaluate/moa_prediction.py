"""The mechanism of a compound never seen: nearest annotated treatments vote, benchmarked leave-one-compound-out.

Given consensus profiles and their cosine similarities (the treatment map's, from well profiles
sphered on all wells by `rxray score`: :mod:`rxray.evaluate.treatment_map`), every treatment
called active gets a predicted mechanism of action (MoA) from the ``k`` most similar *other*
active treatments that carry an annotation: each votes for its MoA
with its cosine similarity (negative similarities do not vote), the MoA with the most
vote wins, and a tie goes to the MoA of the nearer neighbour. ``confidence`` is the
winner's share of the vote; ``nearest_similarity`` the cosine of the nearest annotated
neighbour. An annotated compound is predicted with itself left out, so its prediction
is what the map would say of it if it were new (leave-one-compound-out: in RxRx2 a
treatment is a compound, all its doses and replicates together); an unannotated active
compound gets a prediction, which is what a screen is run for; an inactive one gets
none ("no phenotype": its profile is noise around the controls).

The benchmark (:func:`leave_one_out_benchmark`) is the top-1 and top-3 accuracy of those
predictions over the annotated active compounds whose MoA has at least one other
annotated active member (no method can name a mechanism it has never seen), against a
null that shuffles the MoA labels over the annotated active compounds (the similarity
ranking fixed, the group sizes kept), with a per-MoA confusion table.

The retrieval form of the same question (:func:`moa_retrieval`) is the field's MoA mAP,
computed with copairs (Kalinin et al. 2025) on one profile per treatment, dose and
experiment: each profile ranks the others, its positives are profiles of *other*
compounds of its MoA (the "not same compound" rule), its negatives those of other MoAs;
and where compounds were imaged in several experiments, the "not same compound or
batch" variant, whose positives also come from another experiment, since plate and
batch confounding inflate nearest-neighbour scores.

Everything here works on treatments x treatments (or treatment x dose x experiment)
matrices: the size of the map, never of the sites.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd

DEFAULT_NEIGHBOURS = 3  # k: a mechanism of three compounds leaves two annotated neighbours when one is held out
TOP_K_ACCURACY = 3  # the benchmark's second accuracy: the true MoA among the three best-voted
NO_PHENOTYPE = "no phenotype"  # status of an inactive treatment: nothing to predict from
NO_NEIGHBOUR = "no similar annotated treatment"  # active, but no other annotated active treatment is similar
PREDICTED = "predicted"
PREDICTION_FILE = "treatment_moa.csv"
PREDICTION_COLUMNS = ["correction", "treatment", "moa", "annotated", "active", "predicted_moa", "confidence",
                      "nearest_similarity", "neighbours", "top_moas", "correct", "status"]
# The tie-breaker's weight: far below any vote (a cosine), so it only orders MoAs whose votes are equal.
_TIE_BREAK = 1e-9


def nearest_candidates(similarity: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k most similar candidates of each query row, nearest first, and their votes (cosine, negatives 0).

    ``similarity`` is (queries, candidates), with -inf where a candidate is the query itself.
    """
    k = min(k, similarity.shape[1])
    order = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    return order, np.clip(np.take_along_axis(similarity, order, axis=1), 0.0, None)


def moa_scores(order: np.ndarray, weights: np.ndarray, codes: np.ndarray, n_moas: int) -> tuple[np.ndarray, np.ndarray]:
    """Per query and MoA code: its vote, and the vote plus a tie-break favouring the MoA of the nearer neighbour."""
    n_queries, k = order.shape
    votes = np.zeros((n_queries, n_moas))
    first = np.full((n_queries, n_moas), k)
    rows = np.arange(n_queries)
    for position in reversed(range(k)):  # nearest last, so `first` ends at each MoA's nearest position
        voted = codes[order[:, position]]
        votes[rows, voted] += weights[:, position]
        first[rows, voted] = position
    return votes + _TIE_BREAK * (k - first), votes


def _ranks(scores: np.ndarray, votes: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """0-based rank of each row's true MoA among the voted ones (0: predicted); len(MoAs) where it got no vote."""
    rows = np.arange(len(truth))
    rank = (scores > scores[rows, truth][:, None]).sum(axis=1)
    return np.where(votes[rows, truth] > 0, rank, votes.shape[1])


def predict_mechanisms(names: Sequence[str], similarity: np.ndarray, labels: Sequence[Any], active: Sequence[bool],
                       k: int = DEFAULT_NEIGHBOURS) -> pd.DataFrame:
    """One row per treatment: its predicted MoA from its k nearest annotated active neighbours (module docstring).

    ``labels`` holds each treatment's MoA (None: unannotated), ``active`` whether it was
    called active. Columns: treatment, moa, annotated, active, predicted_moa, confidence
    (vote share), nearest_similarity, neighbours ("name (moa, cosine); ..."), top_moas
    (the voted MoAs, best first, at most three), correct (None where unannotated or not
    predicted), status (predicted, no similar annotated treatment, no phenotype).
    """
    names = [str(n) for n in names]
    labels = np.asarray(labels, dtype=object)
    active = np.asarray(active, dtype=bool)
    reference = np.flatnonzero(active & np.array([label is not None for label in labels], dtype=bool))
    moas, codes = np.unique(labels[reference].astype(str), return_inverse=True)
    queries = np.flatnonzero(active)
    sub = np.asarray(similarity, dtype=np.float64)[np.ix_(queries, reference)]
    sub[queries[:, None] == reference[None, :]] = -np.inf  # a compound never votes for itself
    order, weights = nearest_candidates(sub, k)
    scores, votes = moa_scores(order, weights, codes.astype(np.int64), len(moas))

    rows = []
    for row, index in enumerate(queries):
        entry = {"treatment": names[index], "moa": labels[index], "annotated": labels[index] is not None,
                 "active": True, "predicted_moa": None, "confidence": np.nan, "nearest_similarity": np.nan,
                 "neighbours": "", "top_moas": "", "correct": None, "status": NO_NEIGHBOUR}
        if votes[row].sum() > 0:
            voted = [m for m in np.argsort(-scores[row], kind="stable") if votes[row, m] > 0]
            usable = [j for j in order[row] if np.isfinite(sub[row, j])]
            predicted = str(moas[voted[0]])
            entry.update(predicted_moa=predicted, confidence=float(votes[row, voted[0]] / votes[row].sum()),
                         nearest_similarity=float(sub[row, usable[0]]), status=PREDICTED,
                         neighbours="; ".join(f"{names[reference[j]]} ({moas[codes[j]]}, {sub[row, j]:.2f})"
                                              for j in usable),
                         top_moas="; ".join(str(moas[m]) for m in voted[:TOP_K_ACCURACY]),
                         correct=None if labels[index] is None else bool(predicted == labels[index]))
        rows.append(entry)
    inactive = [{"treatment": names[i], "moa": labels[i], "annotated": labels[i] is not None, "active": False,
                 "predicted_moa": None, "confidence": np.nan, "nearest_similarity": np.nan, "neighbours": "",
                 "top_moas": "", "correct": None, "status": NO_PHENOTYPE} for i in np.flatnonzero(~active)]
    columns = [c for c in PREDICTION_COLUMNS if c != "correction"]
    return pd.DataFrame(rows + inactive, columns=columns)


def leave_one_out_benchmark(similarity: np.ndarray, labels: Sequence[Any], k: int = DEFAULT_NEIGHBOURS,
                            permutations: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Leave-one-compound-out top-1 / top-3 accuracy of the MoA vote, a label-shuffle null and a confusion table.

    ``similarity`` and ``labels`` cover the annotated active treatments only (one MoA
    each). A compound is scored when its MoA has another member here (``n_evaluable``);
    the null shuffles the labels over all of them (group sizes kept, so the number scored
    stays the same) and recomputes the top-1 accuracy; p is one-sided.
    """
    labels = np.asarray([str(label) for label in labels], dtype=object)
    n = len(labels)
    moas, codes = np.unique(labels, return_inverse=True) if n else (np.array([], dtype=object), np.zeros(0, int))
    sizes = np.bincount(codes, minlength=len(moas)) if n else np.zeros(0, int)
    result: dict[str, Any] = {"k": k, "n_annotated_active": n, "n_moas": int(len(moas)),
                              "n_evaluable": int((sizes[codes] >= 2).sum()) if n else 0,
                              "permutations": permutations}
    nan = float("nan")
    if result["n_evaluable"] == 0:
        return {**result, "top1": nan, "top3": nan, "null_mean": nan, "null_sd": nan, "p_value": nan,
                "null_top3_mean": nan, "confusion": [], "per_moa": []}
    sub = np.array(similarity, dtype=np.float64)
    np.fill_diagonal(sub, -np.inf)
    order, weights = nearest_candidates(sub, k)  # fixed: shuffling the labels moves no neighbour

    def accuracy(codes_now: np.ndarray) -> tuple[float, float, np.ndarray, np.ndarray]:
        scores, votes = moa_scores(order, weights, codes_now, len(moas))
        evaluable = np.bincount(codes_now, minlength=len(moas))[codes_now] >= 2
        rank = _ranks(scores, votes, codes_now)
        predicted = np.where(votes.sum(axis=1) > 0, np.argmax(scores, axis=1), -1)
        return (float((rank[evaluable] == 0).mean()), float((rank[evaluable] < TOP_K_ACCURACY).mean()),
                predicted, evaluable)

    top1, top3, predicted, evaluable = accuracy(codes)
    rng = np.random.default_rng(seed)
    null = np.array([accuracy(codes[rng.permutation(n)])[:2] for _ in range(permutations)])
    confusion = pd.crosstab(pd.Series(moas[codes[evaluable]], name="moa"),
                            pd.Series(np.where(predicted[evaluable] >= 0, moas[np.maximum(predicted[evaluable], 0)],
                                               "none"), name="predicted"))
    per_moa = pd.DataFrame({"moa": moas[codes[evaluable]], "correct": predicted[evaluable] == codes[evaluable]})
    per_moa = per_moa.groupby("moa")["correct"].agg(n_compounds="size", n_correct="sum").reset_index()
    per_moa["accuracy"] = per_moa["n_correct"] / per_moa["n_compounds"]
    return {**result, "top1": top1, "top3": top3, "null_mean": float(null[:, 0].mean()),
            "null_sd": float(null[:, 0].std()), "null_top3_mean": float(null[:, 1].mean()),
            "p_value": float((1 + (null[:, 0] >= top1 - 1e-12).sum()) / (1 + permutations)),
            "confusion": [{"moa": moa, **{str(c): int(v) for c, v in row.items()}}
                          for moa, row in confusion.iterrows()],
            "per_moa": per_moa.to_dict("records")}


def moa_retrieval(profile_meta: pd.DataFrame, profiles: np.ndarray, labels: dict[str, str], permutations: int = 1000,
                  seed: int = 0, batch: str = "experiment") -> dict[str, Any]:
    """MoA mAP with copairs on treatment x dose x batch profiles, same-compound (and same-batch) positives excluded.

    ``profile_meta`` holds ``treatment`` (and ``batch``, where known) per row of ``profiles``; ``labels``
    maps the treatments to include (annotated, active) to their MoA. Returns, per rule
    ("not_same_compound", and "not_same_compound_or_batch" where the treatments span
    several batches), the mean mAP over MoAs and a per-MoA table (mAP, p and BH q from
    copairs' null of ``permutations`` draws); None for a rule with no positive pair.
    """
    from copairs.map import average_precision, mean_average_precision

    keep = profile_meta["treatment"].astype(str).isin(labels).to_numpy()
    batched = batch in profile_meta.columns
    meta = profile_meta.loc[keep, ["treatment", *([batch] if batched else [])]].astype(str).reset_index(drop=True)
    meta["moa"] = meta["treatment"].map(labels)
    feats = np.asarray(profiles, dtype=np.float64)[keep]
    rules = {"not_same_compound": ["treatment"]}
    if batched and meta.groupby("treatment")[batch].nunique().gt(1).any():
        rules["not_same_compound_or_batch"] = ["treatment", batch]
    result: dict[str, Any] = {}
    for rule, diffby in rules.items():
        try:
            ap = average_precision(meta, feats, pos_sameby=["moa"], pos_diffby=diffby, neg_sameby=[],
                                   neg_diffby=["moa"], progress_bar=False)
        except Exception as exc:  # copairs' UnpairedException: no positive (or negative) pair under the rule
            if type(exc).__name__ != "UnpairedException":
                raise
            result[rule] = None
            continue
        per_moa = mean_average_precision(ap.dropna(subset=["average_precision"]), sameby=["moa"],
                                         null_size=permutations, threshold=0.05, seed=seed, progress_bar=False)
        per_moa = per_moa.rename(columns={"mean_average_precision": "map", "corrected_p_value": "q_value"})
        result[rule] = {"mean_map": float(per_moa["map"].mean()), "n_profiles": int(len(meta)),
                        "positive_pairs": int(ap["n_pos_pairs"].sum()),
                        "per_moa": per_moa[["moa", "map", "p_value", "q_value"]].to_dict("records")}
    return result


__all__ = ["DEFAULT_NEIGHBOURS", "NO_NEIGHBOUR", "NO_PHENOTYPE", "PREDICTION_COLUMNS", "PREDICTION_FILE",
           "leave_one_out_benchmark", "moa_retrieval", "predict_mechanisms"]
