"""The distillation losses, one entry each: what it reads and its per-query formula.

Adding a loss is one :func:`register_loss` entry here plus its formula in ``losses.py``:
``model.distill.loss`` validation, the objective, ``lavis-cprd compare`` and ``lavis-cprd
list`` all read this table (``list_losses``, as timm's ``list_models``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from lavis_cprd.errors import suggest
from lavis_cprd.losses import (
    cprd_loss_per_query,
    kl_distill_loss_per_query,
    listmle_full_loss_per_query,
    margin_mse_loss_per_query,
)


@dataclass(frozen=True)
class Direction:
    """One retrieval direction of a step, as a cross-encoder loss sees it: student logits
    ``x = s / tau_d`` and teacher logits ``z`` (``log p1 - log p0``) of each query's positive
    ``[Q]`` and candidates ``[Q, C]``; ``mask`` marks the real candidates."""

    x_pos: torch.Tensor
    x_neg: torch.Tensor
    z_pos: torch.Tensor
    z_neg: torch.Tensor
    mask: torch.Tensor


# (per-query loss [Q], whether each query contributes [Q], the candidates it used [Q, C])
PerQuery = Callable[[Direction, Any], Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class DistillLoss:
    """A registered loss. ``candidates``: ``hard`` (the positive and K mined hard negatives),
    ``all`` (every in-batch negative) or ``None`` (no mined candidates: ConaCLIP's graph);
    ``teacher``: ``cross`` (scores pairs), ``dual`` (embeds) or ``None`` (no teacher);
    ``reads_positive(cfg)``: whether the teacher's score of the positive pair is read (else it
    is not computed); ``compare_options``: config overrides ``lavis-cprd compare`` runs it with."""

    name: str
    description: str
    candidates: Optional[str] = None
    teacher: Optional[str] = "cross"
    per_query: Optional[PerQuery] = None
    reads_positive: Callable[[Any], bool] = lambda cfg: True
    compare_options: Tuple[str, ...] = field(default_factory=tuple)


_LOSSES: Dict[str, DistillLoss] = {}


def register_loss(loss: DistillLoss) -> DistillLoss:
    if loss.name in _LOSSES:
        raise KeyError(f"distillation loss {loss.name!r} is already registered")
    _LOSSES[loss.name] = loss
    return loss


def list_losses() -> List[str]:
    """Registered ``model.distill.loss`` names, in registration order."""
    return list(_LOSSES)


def get_loss(name: str) -> DistillLoss:
    if not isinstance(name, str) or name not in _LOSSES:
        raise ValueError(f"model.distill.loss={name!r} is not one of {list_losses()}{suggest(name, list_losses())}")
    return _LOSSES[name]


# ------------------------------------------------------------------------- per-query terms
def _cprd(d: Direction, cfg) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Teacher match probabilities c = softmax(itm)[:, 1] = sigmoid(logit).
    c_pos, c_neg = torch.sigmoid(d.z_pos), torch.sigmoid(d.z_neg)
    keep = d.mask & (c_neg <= c_pos.view(-1, 1)) if cfg.drop_above_positive else d.mask
    valid = c_neg >= cfg.valid_threshold
    per_query, contributes = cprd_loss_per_query(d.x_neg, c_neg, valid, keep)
    return per_query, contributes, valid & keep


def _listmle_full(d: Direction, cfg) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (*listmle_full_loss_per_query(d.x_neg, d.z_neg, d.mask), d.mask)


def _kl(d: Direction, cfg) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    def with_pos(pos, neg):
        return torch.cat([pos.view(-1, 1), neg], dim=1)

    mask = with_pos(torch.ones_like(d.mask[:, 0]), d.mask)
    return (*kl_distill_loss_per_query(with_pos(d.x_pos, d.x_neg), with_pos(d.z_pos, d.z_neg), mask, cfg.teacher_temp),
            d.mask)


def _margin_mse(d: Direction, cfg) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (*margin_mse_loss_per_query(d.x_pos, d.x_neg, d.z_pos, d.z_neg, d.mask), d.mask)


register_loss(DistillLoss("none", "ITC alone: no distillation term", teacher=None))
register_loss(DistillLoss(
    "cprd", "CPRD: contrastive partial ranking of the valid hard negatives in the teacher's order", "hard",
    per_query=_cprd, reads_positive=lambda cfg: bool(cfg.drop_above_positive)))
register_loss(DistillLoss("loopitr", "LoopITR-style KL over the positive and the K hard negatives", "hard", per_query=_kl))
register_loss(DistillLoss("margin_mse", "Margin-MSE of the positive-negative logit margins", "hard", per_query=_margin_mse))
register_loss(DistillLoss("kl", "KL between teacher and student softmax over every in-batch candidate", "all",
                          per_query=_kl))
register_loss(DistillLoss("listmle_full", "ListMLE over the teacher's order of every in-batch negative", "all",
                          per_query=_listmle_full, reads_positive=lambda cfg: False))
register_loss(DistillLoss(
    "conaclip", "ConaCLIP: graph of feature/similarity losses against a dual-encoder teacher", teacher="dual",
    compare_options=("model.distill.teacher.arch=blip_feature_extractor",)))  # the shared teacher's own ITC towers
