"""Logit distillation by KL divergence, over two candidate sets: ``loopitr`` (the positive and
the K mined hard negatives, LoopITR-style) and ``kl`` (the positive and every in-batch
negative). One formula (:func:`kl_distill_loss_per_query`), ``distill.teacher_temp`` on the
teacher's side."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from lavis_cprd.distill.objective import DistillObjective
from lavis_cprd.distill.registry import TUNED_WEIGHTS, Direction, DistillLoss, register_loss
from lavis_cprd.losses import REMOVED_LOGIT, masked_mean


def kl_distill_loss_per_query(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    candidate_mask: Optional[torch.Tensor] = None,
    teacher_temp: float = 1.0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Logit distillation over one candidate list per query (positive and negatives)::

        L_q = KL( softmax(z_q / T_t) || softmax(x_q) ) = sum_c p_c (log p_c - log softmax(x_q)_c)

    ``z`` are teacher logits ``log p1 - log p0``, ``x`` student logits ``s / tau``, ``T_t`` the
    teacher temperature. Masked-out candidates take part in neither softmax. Vanilla ``kl``
    uses every in-batch candidate, ``loopitr`` the positive and the K mined hard negatives.
    """
    x = student_logits.float()
    z = teacher_logits.to(x.device).float()
    mask = torch.ones_like(x, dtype=torch.bool) if candidate_mask is None else candidate_mask.bool()
    log_q = F.log_softmax(x.masked_fill(~mask, REMOVED_LOGIT), dim=1)
    log_p = F.log_softmax((z / teacher_temp).masked_fill(~mask, REMOVED_LOGIT), dim=1)
    terms = (log_p.exp() * (log_p - log_q)).masked_fill(~mask, 0.0)
    return terms.sum(dim=1), mask.sum(dim=1) > 0


def kl_distill_loss(student_logits, teacher_logits, candidate_mask=None, teacher_temp: float = 1.0) -> torch.Tensor:
    """Mean of :func:`kl_distill_loss_per_query` over queries (``kl`` and ``loopitr``)."""
    return masked_mean(*kl_distill_loss_per_query(student_logits, teacher_logits, candidate_mask, teacher_temp))


def kl_per_direction(d: Direction, cfg) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KL over the positive (first) and the direction's candidates."""

    def with_pos(pos, neg):
        return torch.cat([pos.view(-1, 1), neg], dim=1)

    mask = with_pos(torch.ones_like(d.mask[:, 0]), d.mask)
    return (*kl_distill_loss_per_query(with_pos(d.x_pos, d.x_neg), with_pos(d.z_pos, d.z_neg), mask, cfg.teacher_temp),
            d.mask)


KL_KNOBS = {"weight": TUNED_WEIGHTS, "teacher_temp": (0.5, 1.0, 2.0)}
register_loss(DistillLoss(
    "loopitr", "LoopITR-style KL over the positive and the K hard negatives", objective=DistillObjective,
    candidates="hard", per_query=kl_per_direction, tune=KL_KNOBS))
register_loss(DistillLoss(
    "kl", "KL between teacher and student softmax over every in-batch candidate", objective=DistillObjective,
    candidates="all", per_query=kl_per_direction, tune=KL_KNOBS))
