"""What every loss shares: pure functions over tensors.

ITC (the student's own contrastive term), the positive mask and the mean over contributing
queries. Each distillation loss lives in its own file under ``distill/losses/`` with its
formula, its per-step reading and its registry entry. Every formula follows
``shared/method.md``. Student logits are similarities divided by a temperature (``s / tau``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Stands in for -inf when a candidate is removed from a denominator: exp() of it is 0, but
# unlike -inf it keeps logcumsumexp's backward free of NaN (inf - inf).
REMOVED_LOGIT = -1e9


def positive_mask(query_ids: torch.Tensor, cand_ids: torch.Tensor) -> torch.Tensor:
    """``pos[q, c] = (query_ids[q] == cand_ids[c])``: candidates sharing the query's image id."""
    return query_ids.view(-1, 1) == cand_ids.view(1, -1)


def contrastive_loss(logits: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against a target uniform over the positives of each row.

    ``L = mean_q  -sum_c y[q,c] log softmax(logits[q])[c]``,  ``y[q] = pos[q] / |pos[q]|``.
    """
    pos = pos.to(logits.dtype)
    targets = pos / pos.sum(dim=1, keepdim=True).clamp(min=1)
    return -(F.log_softmax(logits, dim=1) * targets).sum(dim=1).mean()


def itc_loss(
    logits_i2t: torch.Tensor,
    logits_t2i: torch.Tensor,
    pos_i2t: torch.Tensor,
    pos_t2i: torch.Tensor,
) -> torch.Tensor:
    """Image-text contrastive loss (BLIP's ITC without momentum encoder).

    ``L_itc = 1/2 (CE(s(I,T)/tau, y) + CE(s(T,I)/tau, y))``, the target of each query uniform
    over its positives (all candidates with the same ``image_id``).
    """
    return 0.5 * (contrastive_loss(logits_i2t, pos_i2t) + contrastive_loss(logits_t2i, pos_t2i))


def masked_mean(per_query: torch.Tensor, contributes: torch.Tensor) -> torch.Tensor:
    """Mean of ``per_query`` over the queries that contribute; 0 (still attached to the graph)
    when none does."""
    n = contributes.sum()
    if n == 0:
        return per_query.sum() * 0.0
    return (per_query * contributes).sum() / n


