"""Full ranking distillation (``listmle_full``): ListMLE over the teacher's order of every
in-batch negative, the CPRD formula with every position valid (the paper's finding-2
ablation). The teacher's score of the positive is not read."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from lavis_cprd.distill.losses.cprd import cprd_loss_per_query
from lavis_cprd.distill.objective import DistillObjective
from lavis_cprd.distill.registry import TUNED_WEIGHTS, Direction, DistillLoss, register_loss
from lavis_cprd.losses import masked_mean


def listmle_full_loss_per_query(
    student_logits: torch.Tensor,
    teacher_scores: torch.Tensor,
    candidate_mask: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Full ranking distillation (ListMLE over the teacher's order of *every* candidate)::

        L_q = 1/(M_q - 1) sum_{j < M_q} -log( exp(x_pi(j)) / sum_{l >= j} exp(x_pi(l)) )

    the CPRD formula with every position valid; ``candidate_mask`` marks the ``M_q`` real
    candidates of a ragged row (the rest are left out of terms and denominators).
    """
    return cprd_loss_per_query(student_logits, teacher_scores, valid_mask=None, keep_mask=candidate_mask)


def listmle_full_loss(student_logits, teacher_scores, candidate_mask=None) -> torch.Tensor:
    """Mean of :func:`listmle_full_loss_per_query` over queries with at least two candidates."""
    return masked_mean(*listmle_full_loss_per_query(student_logits, teacher_scores, candidate_mask))


def listmle_full_per_direction(d: Direction, cfg) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (*listmle_full_loss_per_query(d.x_neg, d.z_neg, d.mask), d.mask)


register_loss(DistillLoss(
    "listmle_full", "ListMLE over the teacher's order of every in-batch negative", objective=DistillObjective,
    candidates="all", per_query=listmle_full_per_direction, reads_positive=lambda cfg: False,
    tune={"weight": TUNED_WEIGHTS, "temperature": (0.02, 0.05, 0.1)}))
