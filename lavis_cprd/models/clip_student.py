"""``cprd_clip_dual_encoder``: a CLIP student (LAVIS's ``clip`` model, OpenCLIP's class) trained
by the same task and losses as ``cprd_dual_encoder``."""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F
from lavis.common.registry import registry
from lavis.models.clip_models.model import CLIP

from lavis_cprd.checkpoints import configured_weights, load_weights
from lavis_cprd.distill.config import DistillConfig
from lavis_cprd.models.student import DistillingStudent
from lavis_cprd.towers import build_lavis_clip
from lavis_cprd.paths import MODEL_CONFIGS


@registry.register_model("cprd_clip_dual_encoder")
class CprdClipDualEncoder(DistillingStudent):
    """A CLIP image tower and text transformer as the student. Everything but the encoders is
    ``models.student``'s: ITC, every distillation objective, teachers, retrieval.

    The student's temperature is its own ``temp`` parameter, initialised from CLIP's
    ``logit_scale`` (``temp = exp(-logit_scale)``, 0.01 for OpenAI's weights) unless
    ``temp`` is set; ``logit_scale`` itself is frozen. Captions use CLIP's BPE tokenizer
    (shipped inside LAVIS); teachers keep their own (``distill.teacher.model.tokenizer_path``
    or the student config's ``tokenizer_path`` for BERT-vocabulary teachers).

    Model types: ``ViT-B-16`` (OpenAI weights by URL) and ``tiny`` (random, offline).
    """

    PRETRAINED_MODEL_CONFIG_DICT = {
        "ViT-B-16": os.path.join(MODEL_CONFIGS, "cprd_clip_vit_b16.yaml"),
        "tiny": os.path.join(MODEL_CONFIGS, "cprd_clip_tiny.yaml"),
    }

    def __init__(
        self,
        clip: CLIP,
        temp: Optional[float] = None,
        distill: Optional[DistillConfig] = None,
        tokenizer_path: Optional[str] = None,
    ):
        super().__init__()
        self.clip = clip
        self.clip.logit_scale.requires_grad_(False)
        self.max_txt_len = int(clip.context_length)
        embed_dim = int(clip.text_projection.shape[1])
        if temp is None:
            temp = float(torch.exp(-clip.logit_scale.detach()))
        self._init_student(embed_dim, temp, distill, tokenizer_path)

    @classmethod
    def caption_tokenizer(cls, cfg):
        return None  # CLIP's byte-level BPE: every caption has known tokens

    def tokenize(self, captions, device) -> torch.Tensor:
        return self.clip.tokenizer(list(captions), context_length=self.max_txt_len).to(device)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.clip.encode_image(image), dim=-1)

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.clip.encode_text(text), dim=-1)

    @classmethod
    def from_config(cls, cfg) -> "CprdClipDualEncoder":
        clip_cfg = cfg.get("clip", None)
        if clip_cfg is None:
            raise ValueError("model.clip is required for cprd_clip_dual_encoder: {model_type, pretrained} or {model: ...}")
        clip = build_lavis_clip(clip_cfg, "model.clip")
        temp = cfg.get("temp", None)
        model = cls(
            clip,
            temp=None if temp is None else float(temp),
            distill=DistillConfig.from_cfg(cfg.get("distill", None)),
            tokenizer_path=cfg.get("tokenizer_path", None),
        )
        if configured_weights(cfg) == "finetuned" or not clip_cfg.get("pretrained", "openai"):
            load_weights(model, cfg, "cprd_clip_dual_encoder")  # fine-tuned weights, or says the towers are random
        model.compile_encoders(cfg.get("compile", False))
        return model
