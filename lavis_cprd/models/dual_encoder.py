"""``cprd_dual_encoder``: a BLIP-style dual encoder (LAVIS's ViT and BERT towers) trained with
ITC plus distillation (``models.student``)."""
from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from lavis.common.registry import registry
from torch import nn

from lavis_cprd.checkpoints import load_weights
from lavis_cprd.distill.config import DistillConfig
from lavis_cprd.models.student import DistillingStudent
from lavis_cprd.towers import blip_image_embeds, build_text_encoder, build_vision_encoder
from lavis_cprd.paths import MODEL_CONFIGS
from lavis_cprd.tokenization import load_blip_tokenizer


@registry.register_model("cprd_dual_encoder")
class CprdDualEncoder(DistillingStudent):
    """ViT image tower + BERT text tower (LAVIS's encoders), projections, learnable temperature.

    Model types: ``base`` (BLIP ViT-B/16 + BERT-base, initialised from BLIP's pre-trained
    checkpoint by URL) and ``tiny`` (explicit small sizes, random init, for offline runs).
    """

    PRETRAINED_MODEL_CONFIG_DICT = {
        "base": os.path.join(MODEL_CONFIGS, "cprd_dual_base.yaml"),
        "tiny": os.path.join(MODEL_CONFIGS, "cprd_dual_tiny.yaml"),
    }

    def __init__(
        self,
        image_encoder: nn.Module,
        text_encoder: nn.Module,
        tokenizer,
        embed_dim: int = 256,
        max_txt_len: int = 35,
        temp: float = 0.07,
        distill: Optional[DistillConfig] = None,
        tokenizer_path: Optional[str] = None,
    ):
        super().__init__()
        self.tokenizer = tokenizer
        self.visual_encoder = image_encoder
        self.text_encoder = text_encoder
        self.vision_proj = nn.Linear(image_encoder.vision_width, embed_dim)
        self.text_proj = nn.Linear(text_encoder.config.hidden_size, embed_dim)
        self.max_txt_len = max_txt_len
        self._init_student(embed_dim, temp, distill, tokenizer_path)

    # ----------------------------------------------------------------- encoders
    def tokenize(self, captions, device) -> "object":
        return self.tokenizer(
            list(captions), padding="longest", truncation=True, max_length=self.max_txt_len, return_tensors="pt"
        ).to(device)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """Unit image embeddings ``v`` ``[N, D]``."""
        return F.normalize(blip_image_embeds(self, image), dim=-1)

    def encode_text(self, text) -> torch.Tensor:
        """Unit text embeddings ``t`` ``[N, D]`` from tokenized captions."""
        return self._embed_tokens(text.input_ids, text.attention_mask)

    def _embed_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # Tensors in, tensor out: what ``model.compile`` compiles (a tokenizer's BatchEncoding
        # would break the graph).
        out = self.text_encoder.forward_text(SimpleNamespace(input_ids=input_ids, attention_mask=attention_mask))
        return F.normalize(self.text_proj(out.last_hidden_state[:, 0, :]), dim=-1)

    compiled_methods: Tuple[str, ...] = ("encode_image", "_embed_tokens")

    # ------------------------------------------------------------------- config
    @classmethod
    def caption_tokenizer(cls, cfg):
        """The tokenizer ``from_config`` would give this model (data checks use it)."""
        return load_blip_tokenizer(cfg.get("tokenizer_path", None))

    @classmethod
    def from_config(cls, cfg) -> "CprdDualEncoder":
        tokenizer_path = cfg.get("tokenizer_path", None)
        distill = DistillConfig.from_cfg(cfg.get("distill", None))
        image_encoder = build_vision_encoder(cfg)
        text_encoder = build_text_encoder(cfg, cross_attention=False, encoder_width=image_encoder.vision_width)
        model = cls(
            image_encoder=image_encoder,
            text_encoder=text_encoder,
            tokenizer=load_blip_tokenizer(tokenizer_path),
            embed_dim=int(cfg.get("embed_dim", 256)),
            max_txt_len=int(cfg.get("max_txt_len", 35)),
            temp=float(cfg.get("temp", 0.07)),
            distill=distill,
            tokenizer_path=tokenizer_path,
        )
        load_weights(model, cfg, "cprd_dual_encoder")
        model.compile_encoders(cfg.get("compile", False))
        return model
