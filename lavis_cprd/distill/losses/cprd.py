"""CPRD (Contrastive Partial Ranking Distillation, CVPR 2024): the student learns the teacher's
order among the *valid* hard negatives only, contrastively (``shared/method.md``).

- Formula: :func:`cprd_loss_per_query`, and its mean :func:`cprd_loss`.
- Reading a step (:func:`cprd_per_direction`): teacher probabilities ``c = sigmoid(z)``, the
  valid negatives ``c >= valid_threshold``, and with ``drop_above_positive`` the negatives
  the teacher scores above the positive removed.
- The ``cprd`` registry entry: K mined hard negatives, a cross-encoder teacher, the
  cross-encoder objective.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from lavis_cprd.distill.objective import DistillObjective
from lavis_cprd.distill.registry import TUNED_WEIGHTS, Direction, DistillLoss, register_loss
from lavis_cprd.losses import REMOVED_LOGIT, masked_mean


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

    x_kept = x_sorted.masked_fill(~keep_sorted, REMOVED_LOGIT)
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
    return masked_mean(*cprd_loss_per_query(student_logits, teacher_scores, valid_mask, keep_mask))


def cprd_per_direction(d: Direction, cfg) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CPRD on one direction of a step: ``(L_q, contributes, the valid kept negatives)``."""
    # Teacher match probabilities c = softmax(itm)[:, 1] = sigmoid(logit).
    c_pos, c_neg = torch.sigmoid(d.z_pos), torch.sigmoid(d.z_neg)
    keep = d.mask & (c_neg <= c_pos.view(-1, 1)) if cfg.drop_above_positive else d.mask
    valid = c_neg >= cfg.valid_threshold
    per_query, contributes = cprd_loss_per_query(d.x_neg, c_neg, valid, keep)
    return per_query, contributes, valid & keep


register_loss(DistillLoss(
    "cprd", "CPRD: contrastive partial ranking of the valid hard negatives in the teacher's order",
    objective=DistillObjective, candidates="hard", per_query=cprd_per_direction,
    reads_positive=lambda cfg: bool(cfg.drop_above_positive),
    tune={"weight": TUNED_WEIGHTS, "valid_threshold": (0.05, 0.1, 0.2, 0.3), "normalize": ("contributing", "all"),
          "temperature": (0.02, 0.05, 0.1)}))
