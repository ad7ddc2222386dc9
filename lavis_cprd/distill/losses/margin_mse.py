"""Margin-MSE (``margin_mse``): the student's positive-negative logit margins regress on the
teacher's, over the K mined hard negatives."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from lavis_cprd.distill.objective import DistillObjective
from lavis_cprd.distill.registry import TUNED_WEIGHTS, Direction, DistillLoss, register_loss
from lavis_cprd.losses import masked_mean


def margin_mse_loss_per_query(
    student_pos: torch.Tensor,
    student_neg: torch.Tensor,
    teacher_pos: torch.Tensor,
    teacher_neg: torch.Tensor,
    candidate_mask: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Margin-MSE (Hofstätter et al.; sentence-transformers' ``MarginMSELoss``)::

        L_q = 1/|N_q| sum_{n in N_q} ( (x_pos - x_n) - (z_pos - z_n) )^2

    with student logits ``x`` (``s / tau``) and teacher logits ``z`` of the query's positive
    ``[Q]`` and its hard negatives ``[Q, K]``.
    """
    xp, xn = student_pos.float(), student_neg.float()
    zp, zn = teacher_pos.to(xp.device).float(), teacher_neg.to(xp.device).float()
    mask = torch.ones_like(xn, dtype=torch.bool) if candidate_mask is None else candidate_mask.bool()
    sq = ((xp.view(-1, 1) - xn) - (zp.view(-1, 1) - zn)).pow(2).masked_fill(~mask, 0.0)
    count = mask.sum(dim=1)
    return sq.sum(dim=1) / count.clamp(min=1), count > 0


def margin_mse_loss(student_pos, student_neg, teacher_pos, teacher_neg, candidate_mask=None) -> torch.Tensor:
    """Mean of :func:`margin_mse_loss_per_query` over queries."""
    return masked_mean(*margin_mse_loss_per_query(student_pos, student_neg, teacher_pos, teacher_neg, candidate_mask))


def margin_mse_per_direction(d: Direction, cfg) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (*margin_mse_loss_per_query(d.x_pos, d.x_neg, d.z_pos, d.z_neg, d.mask), d.mask)


register_loss(DistillLoss(
    "margin_mse", "Margin-MSE of the positive-negative logit margins", objective=DistillObjective,
    candidates="hard", per_query=margin_mse_per_direction,
    # its regression target's scale: student logits s / tau_d (tau_d = distill.temperature)
    tune={"weight": TUNED_WEIGHTS, "temperature": (0.05, 0.1, 0.2, 1.0)}))
