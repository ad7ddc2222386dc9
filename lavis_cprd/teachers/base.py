"""The one interface every cross-encoder teacher implements."""
from __future__ import annotations

import abc
from typing import Dict, List, Sequence

import torch

PRECISIONS: Dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class CrossEncoderTeacher(abc.ABC):
    """A frozen cross-encoder that scores (image, caption) pairs.

    Deliberately *not* an ``nn.Module``: held by the student as a plain attribute, its weights
    never enter the student's ``state_dict`` (checkpoints), ``parameters()`` (optimizer) or
    DDP's gradient buckets, and the runner's ``model.train()`` never reaches it.
    """

    model: torch.nn.Module

    def __init__(self, model: torch.nn.Module, precision: str = "fp32", batch_size: int = 128):
        if precision not in PRECISIONS:
            raise ValueError(f"teacher precision={precision!r} is not one of {sorted(PRECISIONS)}")
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.precision = precision
        self.batch_size = int(batch_size)

    def to(self, device: torch.device) -> "CrossEncoderTeacher":
        self.model.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @abc.abstractmethod
    def _match_logits(self, images: torch.Tensor, captions: Sequence[str], pairs: torch.Tensor) -> torch.Tensor:
        """ITM logits ``[P, 2]`` (no-match, match) for ``pairs[p] = (image index, caption index)``."""

    @torch.no_grad()
    def match_logits(self, images: torch.Tensor, captions: Sequence[str], pairs: torch.Tensor) -> torch.Tensor:
        """ITM logits ``[P, 2]`` in float32, computed in eval mode under ``no_grad``."""
        if self.device != images.device:
            self.to(images.device)
        self.model.eval()
        pairs = pairs.to(images.device).long().view(-1, 2)
        if pairs.numel() == 0:
            return images.new_zeros(0, 2, dtype=torch.float32)
        dtype = PRECISIONS[self.precision]
        with torch.autocast(device_type=images.device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = self._match_logits(images, list(captions), pairs)
        return logits.float()

    def score(self, images: torch.Tensor, captions: Sequence[str], pairs: torch.Tensor) -> torch.Tensor:
        """Match probability ``c(i, j) = softmax(itm_logits)[:, 1]`` for each pair, ``[P]``."""
        return self.match_logits(images, captions, pairs).softmax(dim=-1)[:, 1]

    def logit(self, images: torch.Tensor, captions: Sequence[str], pairs: torch.Tensor) -> torch.Tensor:
        """Teacher logit ``log p1 - log p0`` for each pair (used by KL-style losses), ``[P]``."""
        logits = self.match_logits(images, captions, pairs)
        return logits[:, 1] - logits[:, 0]


def chunks(n: int, size: int) -> List[slice]:
    return [slice(i, min(n, i + size)) for i in range(0, n, size)]
