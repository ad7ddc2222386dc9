"""Losses of lavis-cprd: pure functions over tensors.

Every formula follows ``shared/method.md`` (the project's method reference). Shapes:
``Q`` queries, ``K`` hard negatives per query, ``C`` candidates. Student logits are
similarities divided by the learnable temperature (``s / tau``).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

# Stands in for -inf when a candidate is removed from a denominator: exp() of it is 0, but
# unlike -inf it keeps logcumsumexp's backward free of NaN (inf - inf).
_REMOVED = -1e9


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


def cprd_loss_per_query(
    student_logits: torch.Tensor,
    teacher_scores: torch.Tensor,
    valid_mask: Optional[torch.Tensor] = None,
    keep_mask: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-query CPRD loss ``L_q`` and whether query ``q`` contributes (``J_q`` non-empty).

    With ``pi`` the teacher order (descending score, ties kept in mining order) and
    ``x_k = s(q, n_k) / tau``::

        L_q = 1/|J_q| sum_{j in J_q} -log( exp(x_pi(j)) / sum_{l >= j} exp(x_pi(l)) )
        J_q = { j valid : j is not the last position }

    ``keep_mask`` (``drop_above_positive``) removes positions entirely, from terms and
    denominators, before ranking; "last position" then means the last kept one.
    Inputs are ``[Q, K]`` in mining order; computed in float32.
    """
    x = student_logits.float()
    t = teacher_scores.to(x.device).float()
    valid = torch.ones_like(x, dtype=torch.bool) if valid_mask is None else valid_mask.bool()
    keep = torch.ones_like(x, dtype=torch.bool) if keep_mask is None else keep_mask.bool()

    # Removed candidates go to the end of the teacher order, so they never sit above a kept one.
    sort_key = t.masked_fill(~keep, float("-inf"))
    order = torch.sort(sort_key, dim=1, descending=True, stable=True).indices
    x_sorted = x.gather(1, order)
    valid_sorted = valid.gather(1, order)
    keep_sorted = keep.gather(1, order)

    x_kept = x_sorted.masked_fill(~keep_sorted, _REMOVED)
    # log sum_{l >= j} exp(x_pi(l)): a reversed cumulative logsumexp.
    suffix_lse = torch.logcumsumexp(x_kept.flip(1), dim=1).flip(1)
    kept_after = keep_sorted.flip(1).long().cumsum(1).flip(1) - keep_sorted.long()
    in_j = valid_sorted & keep_sorted & (kept_after > 0)

    terms = (suffix_lse - x_sorted) * in_j
    count = in_j.sum(dim=1)
    per_query = terms.sum(dim=1) / count.clamp(min=1)
    return per_query, count > 0


def cprd_loss(
    student_logits: torch.Tensor,
    teacher_scores: torch.Tensor,
    valid_mask: Optional[torch.Tensor] = None,
    keep_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Contrastive partial ranking distillation: mean of ``L_q`` over contributing queries.

    See :func:`cprd_loss_per_query` for ``L_q``. Queries with empty ``J_q`` contribute
    nothing; if no query contributes the loss is 0 (still attached to the graph).
    """
    per_query, contributes = cprd_loss_per_query(student_logits, teacher_scores, valid_mask, keep_mask)
    n = contributes.sum()
    if n == 0:
        return student_logits.sum() * 0.0
    return (per_query * contributes).sum() / n
