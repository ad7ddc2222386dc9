"""Hard-negative mining over a (gathered) batch."""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def first_occurrence_mask(ids: torch.Tensor) -> torch.Tensor:
    """True at the first position of each distinct id (a batch repeats an image per caption)."""
    ids = ids.view(-1)
    same = ids.view(-1, 1) == ids.view(1, -1)
    earlier = torch.ones_like(same).tril(diagonal=-1)
    return ~(same & earlier).any(dim=1)


@torch.no_grad()
def mine_hard_negatives(
    sim: torch.Tensor,
    query_ids: torch.Tensor,
    cand_ids: torch.Tensor,
    k: int,
    cand_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Indices ``[Q, k]`` of the ``k`` most similar candidates that are not positives.

    ``sim[q, c]`` is the student similarity; candidate ``c`` is a positive of query ``q`` when
    ``cand_ids[c] == query_ids[q]`` (same ``image_id``) and is never returned. ``cand_mask``
    excludes further candidates (e.g. repeated copies of one image). Each row is sorted by
    similarity, descending. Raises ``ValueError`` when ``k`` is not smaller than the number of
    candidates or when some query has fewer than ``k`` eligible negatives.
    """
    num_cands = sim.shape[1]
    if k < 1:
        raise ValueError(f"num_hard_negatives must be >= 1, got {k}")
    if k >= num_cands:
        raise ValueError(
            f"num_hard_negatives (K={k}) must be smaller than the batch size ({num_cands} "
            "candidates, gathered over all ranks): lower distill.num_hard_negatives or raise "
            "run.batch_size_train"
        )
    eligible = query_ids.view(-1, 1) != cand_ids.view(1, -1)
    if cand_mask is not None:
        eligible = eligible & cand_mask.view(1, -1)
    fewest = int(eligible.sum(dim=1).min()) if eligible.shape[0] else k
    if fewest < k:
        raise ValueError(
            f"a query has only {fewest} candidates with a different image_id in this batch, "
            f"fewer than num_hard_negatives (K={k}): lower distill.num_hard_negatives or raise "
            "run.batch_size_train"
        )
    masked = sim.float().masked_fill(~eligible, float("-inf"))
    return masked.topk(k, dim=1, sorted=True).indices


@torch.no_grad()
def all_negatives(
    sim: torch.Tensor,
    query_ids: torch.Tensor,
    cand_ids: torch.Tensor,
    cand_mask: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Every non-positive candidate of each query, for losses over the whole batch.

    Returns ``(indices [Q, M], mask [Q, M])``: each row sorted by similarity, descending,
    ``M`` the largest number of eligible candidates of any query, and ``mask`` False on the
    padding of rows that have fewer.
    """
    eligible = query_ids.view(-1, 1) != cand_ids.view(1, -1)
    if cand_mask is not None:
        eligible = eligible & cand_mask.view(1, -1)
    width = int(eligible.sum(dim=1).max()) if eligible.shape[0] else 0
    order = sim.float().masked_fill(~eligible, float("-inf")).argsort(dim=1, descending=True, stable=True)[:, :width]
    return order, eligible.gather(1, order)
