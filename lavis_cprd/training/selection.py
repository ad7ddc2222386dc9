"""``run.select_metric``: the val metric that picks ``checkpoint_best`` (and ``compare
--tune``'s winners): one rule for every run.

``auto`` (the default) is the relevance-aware mAP@R (``rel_map_at_r``) where the dataset
knows its true matches (``datasets.true_matches``), and LAVIS's ``agg_metrics`` (its
image-to-text recall mean) otherwise. Any other value names a val metric the task logs.
"""
from __future__ import annotations

from typing import Mapping

AUTO = "auto"
RELEVANCE_METRIC = "rel_map_at_r"
LAVIS_METRIC = "agg_metrics"
# Where the runner keeps LAVIS's own agg_metrics once it is replaced by the selected metric.
LAVIS_AGG_KEY = "lavis_agg_metrics"


def selected_key(select_metric: str, metrics: Mapping[str, float]) -> str:
    """The key of ``metrics`` that ``select_metric`` names; a clear error listing the logged
    ones when it names none."""
    name = str(select_metric or AUTO)
    if name == AUTO:
        return RELEVANCE_METRIC if RELEVANCE_METRIC in metrics else LAVIS_METRIC
    if name == LAVIS_METRIC:
        return LAVIS_AGG_KEY if LAVIS_AGG_KEY in metrics else LAVIS_METRIC
    if name not in metrics:
        numeric = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)) and k != LAVIS_AGG_KEY)
        raise KeyError(f"run.select_metric={name!r} is not a val metric of this run; it logs {numeric}")
    return name


def with_selection(select_metric: str, metrics: Mapping[str, float]) -> dict:
    """LAVIS's runner keeps the epoch with the highest ``agg_metrics``: the val metrics with
    ``agg_metrics`` set to the selected metric, LAVIS's own kept as ``lavis_agg_metrics``."""
    key = selected_key(select_metric, metrics)
    out = dict(metrics)
    out.setdefault(LAVIS_AGG_KEY, metrics[LAVIS_METRIC])
    out[LAVIS_METRIC] = float(metrics[key])
    return out
