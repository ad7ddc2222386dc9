"""The interfaces every teacher implements: a cross-encoder scores (image, caption) pairs, a
dual encoder embeds images and captions separately (ConaCLIP's teacher)."""
from __future__ import annotations

import abc
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from lavis_cprd.errors import suggest
from lavis_cprd.precision import AUTO, resolve

# Where a teacher's weights are configured (errors name it).
TEACHER_CHECKPOINT_KEY = "model.distill.teacher.checkpoint"
PRECISIONS: Dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# ``auto``: bf16 where the device runs it natively, fp32 elsewhere (``lavis_cprd.precision``).
TEACHER_PRECISIONS = (*PRECISIONS, AUTO)


class FrozenTeacher(abc.ABC):
    """A frozen model in eval mode.

    Deliberately *not* an ``nn.Module``: held by the student as a plain attribute, its weights
    never enter the student's ``state_dict`` (checkpoints), ``parameters()`` (optimizer) or
    DDP's gradient buckets, and the runner's ``model.train()`` never reaches it.
    """

    # "cross" (scores pairs: CPRD and the other ranking/logit losses) or "dual" (embeds: ConaCLIP).
    kind: str = ""
    model: torch.nn.Module

    def __init__(self, model: torch.nn.Module, precision: str = "fp32", batch_size: int = 128):
        if precision not in TEACHER_PRECISIONS:
            raise ValueError(f"model.distill.teacher.precision={precision!r} is not one of {list(TEACHER_PRECISIONS)}"
                             f"{suggest(precision, TEACHER_PRECISIONS)}")
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.precision = precision  # as configured: ``auto`` is resolved per device
        self.batch_size = int(batch_size)

    def to(self, device: torch.device) -> "FrozenTeacher":
        self.model.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _prepare(self, device: torch.device) -> torch.autocast:
        """Move to ``device``, enter eval mode; the autocast context of ``precision``."""
        if self.device != device:
            self.to(device)
        self.model.eval()
        dtype = PRECISIONS[resolve(self.precision, device, "model.distill.teacher.precision")]
        return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)


class CrossEncoderTeacher(FrozenTeacher):
    """A frozen cross-encoder that scores (image, caption) pairs."""

    kind = "cross"

    @abc.abstractmethod
    def _match_logits(self, images: torch.Tensor, captions: Sequence[str], pairs: torch.Tensor) -> torch.Tensor:
        """ITM logits ``[P, 2]`` (no-match, match) for ``pairs[p] = (image index, caption index)``."""

    # Whether ``match_logits`` needs ``image_ids`` (which image of the dataset each row of
    # ``images`` is): a teacher that reads ground truth instead of pixels (``shapes_oracle``).
    needs_image_ids: bool = False

    @torch.no_grad()
    def match_logits(self, images: torch.Tensor, captions: Sequence[str], pairs: torch.Tensor,
                     image_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """ITM logits ``[P, 2]`` in float32, computed in eval mode under ``no_grad``.
        ``image_ids`` (the dataset's id of each image row) is read only by teachers that
        declare ``needs_image_ids``."""
        if self.needs_image_ids:
            return self._match_logits_by_id(images, list(captions), pairs.long().view(-1, 2), image_ids)
        autocast = self._prepare(images.device)
        pairs = pairs.to(images.device).long().view(-1, 2)
        if pairs.numel() == 0:
            return images.new_zeros(0, 2, dtype=torch.float32)
        with autocast:
            logits = self._match_logits(images, list(captions), pairs)
        return logits.float()

    def _distinct_inputs(self, images: torch.Tensor, captions: Sequence[str], pairs: torch.Tensor):
        """For LAVIS's BERT-tokenized cross-encoders: each distinct image resized to the
        teacher's ``image_size`` and encoded once (``_image_features``), each distinct caption
        tokenized once. Returns ``(image features, image index of each pair, tokens, caption
        index of each pair)``."""
        image_rows, image_of_pair = pairs[:, 0].unique(return_inverse=True)
        text_rows, text_of_pair = pairs[:, 1].unique(return_inverse=True)
        pixels = match_resolution(images[image_rows], self.image_size)
        features = torch.cat([self._image_features(pixels[s]) for s in chunks(len(pixels), self.batch_size)])
        text = self.model.tokenizer(
            [captions[i] for i in text_rows.tolist()],
            padding="longest",
            truncation=True,
            max_length=self.model.max_txt_len,
            return_tensors="pt",
        ).to(images.device)
        return features, image_of_pair, text, text_of_pair

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not use _distinct_inputs")

    def _match_logits_by_id(self, images, captions: List[str], pairs: torch.Tensor, image_ids) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} declares needs_image_ids but does not score by id")

    def score(self, images: torch.Tensor, captions: Sequence[str], pairs: torch.Tensor,
              image_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Match probability ``c(i, j) = softmax(itm_logits)[:, 1]`` for each pair, ``[P]``."""
        return self.match_logits(images, captions, pairs, image_ids).softmax(dim=-1)[:, 1]

    def logit(self, images: torch.Tensor, captions: Sequence[str], pairs: torch.Tensor,
              image_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Teacher logit ``log p1 - log p0`` for each pair (used by KL-style losses), ``[P]``."""
        logits = self.match_logits(images, captions, pairs, image_ids)
        return logits[:, 1] - logits[:, 0]


class DualEncoderTeacher(FrozenTeacher):
    """A frozen dual encoder: unit image and text embeddings in one space of ``embed_dim``."""

    kind = "dual"

    @classmethod
    @abc.abstractmethod
    def embed_dim_of(cls, cfg) -> int:
        """The embedding size the teacher config ``cfg`` builds, without building it (the
        student sizes its projection into the teacher's space at construction)."""

    @abc.abstractmethod
    def _encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Image embeddings ``[N, D]`` (any norm) of a chunk of student-preprocessed images."""

    @abc.abstractmethod
    def _encode_texts(self, captions: List[str], device: torch.device) -> torch.Tensor:
        """Text embeddings ``[N, D]`` (any norm) of a chunk of captions."""

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Unit image embeddings ``[N, D]`` in float32, eval mode, no grad."""
        with self._prepare(images.device):
            feat = torch.cat([self._encode_images(images[s]) for s in chunks(len(images), self.batch_size)])
        return F.normalize(feat.float(), dim=-1)

    @torch.no_grad()
    def encode_texts(self, captions: Sequence[str], device: torch.device) -> torch.Tensor:
        """Unit caption embeddings ``[M, D]`` in float32, eval mode, no grad."""
        captions = list(captions)
        with self._prepare(device):
            feat = torch.cat([self._encode_texts(captions[s], device) for s in chunks(len(captions), self.batch_size)])
        return F.normalize(feat.float(), dim=-1)

    def encode(self, images: torch.Tensor, captions: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Unit embeddings ``(images [N, D], captions [M, D])`` in float32, eval mode, no grad."""
        return self.encode_images(images), self.encode_texts(captions, images.device)


def match_resolution(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """Resize student-preprocessed images to the teacher's resolution. BLIP and CLIP share the
    same normalization constants, so only the size can differ."""
    if pixels.shape[-1] == size and pixels.shape[-2] == size:
        return pixels
    return F.interpolate(pixels, size=(size, size), mode="bicubic", align_corners=False)


def chunks(n: int, size: int) -> List[slice]:
    return [slice(i, min(n, i + size)) for i in range(0, n, size)]
