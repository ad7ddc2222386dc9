"""The table of distillation losses (``model.distill.loss``): one :class:`DistillLoss` entry
per loss, holding everything about it.

A loss lives in one file (``distill/losses/<name>.py``): its formula, how it reads a step
(``per_query``) and its :func:`register_loss` entry, which names the objective that computes
it. ``model.distill.loss`` validation, the student (which builds the entry's objective),
``lavis-cprd compare`` and ``lavis-cprd list`` all read this table (``list_losses``, as
timm's ``list_models``). A loss of your own is one ``register_loss`` call, made before the
model is built.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch

from lavis_cprd.errors import suggest


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


# The weight grid of every method's tuning (compare --tune): each weight gets the same number
# of trials. 8 is in it because the first contest's winners sat at its edge (4).
TUNED_WEIGHTS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)

# (per-query loss [Q], whether each query contributes [Q], the candidates it used [Q, C])
PerQuery = Callable[[Direction, Any], Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
# (model.distill as a DistillConfig, tokenizer path) -> the objective a student holds
ObjectiveFactory = Callable[[Any, Optional[str]], Any]


@dataclass(frozen=True)
class DistillLoss:
    """A registered loss.

    - ``objective``: what computes it, called as ``objective(distill_config, tokenizer_path)``
      (``distill.objective.DistillObjective`` for a cross-encoder loss or none).
    - ``candidates``: ``hard`` (the positive and K mined hard negatives), ``all`` (every
      in-batch negative) or ``None`` (no mined candidates: ConaCLIP's graph).
    - ``teacher``: ``cross`` (scores pairs), ``dual`` (embeds) or ``None`` (no teacher).
    - ``per_query``: a cross-encoder loss's reading of one :class:`Direction`.
    - ``reads_positive(cfg)``: whether the teacher's score of the positive pair is read (else
      it is not computed).
    - ``compare_options``: config overrides ``lavis-cprd compare`` runs it with.
    - ``tune``: its knobs (``model.distill`` keys) and the values ``compare --tune`` draws its
      trials from; every method gets the same number of trials.
    """

    name: str
    description: str
    objective: ObjectiveFactory
    candidates: Optional[str] = None
    teacher: Optional[str] = "cross"
    per_query: Optional[PerQuery] = None
    reads_positive: Callable[[Any], bool] = lambda cfg: True
    compare_options: Tuple[str, ...] = field(default_factory=tuple)
    tune: Mapping[str, Tuple[Any, ...]] = field(default_factory=lambda: {"weight": TUNED_WEIGHTS})


_LOSSES: Dict[str, DistillLoss] = {}


def register_loss(loss: DistillLoss) -> DistillLoss:
    """Add ``loss`` to the table (a name is registered once)."""
    if loss.name in _LOSSES:
        raise KeyError(f"distillation loss {loss.name!r} is already registered")
    if loss.teacher == "cross" and loss.per_query is None:
        raise ValueError(f"distillation loss {loss.name!r} has a cross-encoder teacher but no per_query function")
    _LOSSES[loss.name] = loss
    return loss


def list_losses() -> List[str]:
    """Registered ``model.distill.loss`` names, in registration order."""
    return list(_LOSSES)


def get_loss(name: str) -> DistillLoss:
    if not isinstance(name, str) or name not in _LOSSES:
        raise ValueError(f"model.distill.loss={name!r} is not one of {list_losses()}{suggest(name, list_losses())}")
    return _LOSSES[name]
