"""Relevance-aware retrieval metrics (``method.md``, "Relevance-aware evaluation").

LAVIS's recall counts only the annotated pairs. These metrics count every *true match* of a
query, ``Rel(q)`` with ``R = |Rel(q)|``, ranking items by descending score (ties broken by
item index, as a stable sort does):

- R-Precision ``RP(q) = 1/R sum_{i<=R} rel(i)``;
- mAP@R (Musgrave et al. 2020) ``mAP@R(q) = 1/R sum_{i<=R} rel(i) P(i)``, ``P(i)`` the
  precision of the top ``i``;
- R@k over true matches: 1 when any true match is in the top ``k``;
- with a graded relevance: the mean over queries of Kendall's tau-b between the student's
  scores and the grades of the query's ``hard_k`` highest-scored non-annotated items (the
  hard negatives a ranking distillation teaches), and Spearman's rho over all items.

All are means over queries, in percent (the correlations as they are), per direction
(``i2t``: image queries, ``t2i``: text queries).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np

RECALL_KS = (1, 5, 10)


def ranked(scores: np.ndarray) -> np.ndarray:
    """Item indices of each row by descending score (stable: ties keep index order)."""
    return np.argsort(-np.asarray(scores, dtype=np.float64), axis=1, kind="stable")


def map_at_r(scores: np.ndarray, relevant: np.ndarray, r: Optional[np.ndarray] = None) -> np.ndarray:
    """Per-query mAP@R ``[Q]`` for ``[Q, N]`` scores and a boolean ``[Q, N]`` relevance.
    ``r``: each query's R when it also counts true matches missing from the gallery (as
    ECCV Caption's reference code does); default, the true matches in ``relevant``."""
    rel = np.take_along_axis(np.asarray(relevant, dtype=bool), ranked(scores), axis=1)
    r = rel.sum(axis=1) if r is None else np.asarray(r)
    hits = np.cumsum(rel, axis=1)
    precision = hits / np.arange(1, rel.shape[1] + 1)
    within = np.arange(rel.shape[1])[None, :] < r[:, None]
    return (precision * rel * within).sum(axis=1) / np.maximum(r, 1)


def r_precision(scores: np.ndarray, relevant: np.ndarray, r: Optional[np.ndarray] = None) -> np.ndarray:
    """Per-query R-Precision ``[Q]`` (``r`` as in ``map_at_r``)."""
    rel = np.take_along_axis(np.asarray(relevant, dtype=bool), ranked(scores), axis=1)
    r = rel.sum(axis=1) if r is None else np.asarray(r)
    within = np.arange(rel.shape[1])[None, :] < r[:, None]
    return (rel & within).sum(axis=1) / np.maximum(r, 1)


def recall_at_k(scores: np.ndarray, relevant: np.ndarray, k: int) -> np.ndarray:
    """Per-query 1/0: any true match among the top ``k``."""
    rel = np.take_along_axis(np.asarray(relevant, dtype=bool), ranked(scores)[:, :k], axis=1)
    return rel.any(axis=1).astype(np.float64)


def hard_negative_tau(scores: np.ndarray, grades: np.ndarray, annotated: np.ndarray, k: int = 8) -> np.ndarray:
    """Per-query Kendall tau-b between scores and grades on the ``k`` highest-scored items
    that are not annotated positives (NaN where either side is constant)."""
    from scipy.stats import kendalltau

    order = ranked(scores)
    out = np.full(len(scores), np.nan)
    for q, row in enumerate(order):
        negs = [j for j in row if not annotated[q, j]][:k]
        if len(negs) >= 2:
            out[q] = kendalltau(scores[q, negs], grades[q, negs]).statistic
    return out


def spearman_all(scores: np.ndarray, grades: np.ndarray) -> np.ndarray:
    """Per-query Spearman's rho between scores and grades over every item."""
    from scipy.stats import spearmanr

    return np.array([spearmanr(s, g).statistic if np.ptp(g) > 0 else np.nan for s, g in zip(scores, grades)])


def direction_metrics(
    scores: np.ndarray,
    true: np.ndarray,
    ks: Sequence[int] = RECALL_KS,
    prefix: str = "",
    missing: Optional[np.ndarray] = None,
) -> Dict[str, float]:
    """One direction's ``map_at_r``, ``r_precision``, ``true_r{k}`` (percent) and
    ``true_per_query`` from ``[Q, N]`` scores and true matches; queries without any true
    match are left out (as ECCV Caption scores only its annotated queries). ``missing``:
    per query, true matches that are not in the gallery (they count in R, never retrieved)."""
    has = np.asarray(true, dtype=bool).any(axis=1)
    s, t = np.asarray(scores)[has], np.asarray(true, dtype=bool)[has]
    r = t.sum(axis=1) + (0 if missing is None else np.asarray(missing)[has])
    out = {
        f"{prefix}map_at_r": 100.0 * float(map_at_r(s, t, r).mean()),
        f"{prefix}r_precision": 100.0 * float(r_precision(s, t, r).mean()),
    }
    for k in ks:
        out[f"{prefix}true_r{k}"] = 100.0 * float(recall_at_k(s, t, k).mean())
    out[f"{prefix}true_per_query"] = float(r.mean())
    return out


def relevance_metrics(
    scores_i2t: np.ndarray,
    true_i2t: np.ndarray,
    annotated_i2t: Optional[np.ndarray] = None,
    grades_i2t: Optional[np.ndarray] = None,
    scores_t2i: Optional[np.ndarray] = None,
    ks: Sequence[int] = RECALL_KS,
    hard_k: int = 8,
) -> Dict[str, float]:
    """Metrics of both directions from ``[n_img, n_txt]`` matrices: scores, true matches,
    annotated (LAVIS) pairs and graded relevance. Keys: ``{i2t,t2i}_map_at_r``,
    ``_r_precision``, ``_true_r{k}``, ``rel_map_at_r`` (mean of the two directions) and, with
    grades, ``{i2t,t2i}_tau_hard{hard_k}``, ``_spearman``, ``rank_tau`` (their mean)."""
    true_i2t = np.asarray(true_i2t, dtype=bool)
    annotated_i2t = true_i2t if annotated_i2t is None else np.asarray(annotated_i2t, dtype=bool)
    scores_t2i = np.asarray(scores_i2t).T if scores_t2i is None else np.asarray(scores_t2i)
    out: Dict[str, float] = {}
    views = {
        "i2t": (np.asarray(scores_i2t), true_i2t, annotated_i2t, grades_i2t),
        "t2i": (scores_t2i, true_i2t.T, annotated_i2t.T, None if grades_i2t is None else np.asarray(grades_i2t).T),
    }
    for name, (scores, true, annotated, grades) in views.items():
        out.update(direction_metrics(scores, true, ks, prefix=f"{name}_"))
        if grades is not None:
            out[f"{name}_tau_hard{hard_k}"] = float(np.nanmean(hard_negative_tau(scores, grades, annotated, hard_k)))
            out[f"{name}_spearman"] = float(np.nanmean(spearman_all(scores, grades)))
    out["rel_map_at_r"] = 0.5 * (out["i2t_map_at_r"] + out["t2i_map_at_r"])
    if grades_i2t is not None:
        out["rank_tau"] = 0.5 * (out[f"i2t_tau_hard{hard_k}"] + out[f"t2i_tau_hard{hard_k}"])
    return out


def annotated_matrix(img2txt: Dict[int, Sequence[int]], n_img: int, n_txt: int) -> np.ndarray:
    """``[n_img, n_txt]`` boolean of LAVIS's annotated pairs (``dataset.img2txt``)."""
    out = np.zeros((n_img, n_txt), dtype=bool)
    for i, texts in img2txt.items():
        out[i, list(texts)] = True
    return out
