"""``cprd_clip_dual_encoder``: a CLIP student (LAVIS's ``clip`` model, OpenCLIP's class) trained
by the same task and losses as ``cprd_dual_encoder``."""
from __future__ import annotations

import logging
import os
from typing import Optional

import torch
import torch.nn.functional as F
from lavis.common.registry import registry
from lavis.models.clip_models.model import CLIP
from omegaconf import OmegaConf

from lavis_cprd.distill_config import DistillConfig
from lavis_cprd.models.dual_encoder import CprdDualEncoder

_CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "models")
CLIP_KEYS = ("embed_dim", "vision_cfg", "text_cfg")


def _explicit_clip(cfg, where: str) -> Optional[dict]:
    explicit = cfg.get("model", None)
    if explicit is None:
        return None
    explicit = OmegaConf.to_container(explicit, resolve=True) if OmegaConf.is_config(explicit) else dict(explicit)
    missing = [k for k in CLIP_KEYS if k not in explicit]
    if missing:
        raise ValueError(f"{where}.model (an explicit OpenCLIP CLIP) needs {missing}")
    return explicit


def clip_embed_dim(cfg, where: str) -> int:
    """The embedding size a CLIP config builds, without building it."""
    explicit = _explicit_clip(cfg, where)
    if explicit is not None:
        return int(explicit["embed_dim"])
    from lavis.models.clip_models.model import _MODEL_CONFIGS

    model_type = str(cfg.get("model_type", "ViT-B-32")).replace("/", "-")
    if model_type not in _MODEL_CONFIGS:
        raise ValueError(f"{where}.model_type={model_type!r} is not one of {sorted(_MODEL_CONFIGS)}")
    return int(_MODEL_CONFIGS[model_type]["embed_dim"])


def build_lavis_clip(cfg, where: str) -> CLIP:
    """LAVIS's CLIP from ``cfg``: ``model_type`` (``ViT-B-16``, ``ViT-L-14``, ``RN50``...) with
    ``pretrained`` (``openai``, an OpenCLIP tag or state-dict path; ``""`` random), or
    ``model``: an explicit ``{embed_dim, vision_cfg, text_cfg}`` (random unless ``pretrained``
    is a state-dict path). Always float32 (mixed precision is autocast's job)."""
    from lavis.models.clip_models.model import create_model

    explicit = _explicit_clip(cfg, where)
    pretrained = cfg.get("pretrained", "openai") or ""
    if explicit is None:
        clip_embed_dim(cfg, where)  # validates model_type with the list of choices
        model = create_model(str(cfg.get("model_type", "ViT-B-32")).replace("/", "-"), pretrained=pretrained)
    else:
        model = CLIP(**explicit)
        if pretrained:
            model.load_state_dict(torch.load(pretrained, map_location="cpu", weights_only=True))
    return model.float()


def clip_image_size(clip: CLIP) -> int:
    size = clip.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


@registry.register_model("cprd_clip_dual_encoder")
class CprdClipDualEncoder(CprdDualEncoder):
    """A CLIP image tower and text transformer as the student. Everything but the encoders is
    ``cprd_dual_encoder``'s: ITC, mining, every distillation loss, teachers, retrieval.

    The student's temperature is its own ``temp`` parameter, initialised from CLIP's
    ``logit_scale`` (``temp = exp(-logit_scale)``, 0.01 for OpenAI's weights) unless
    ``temp`` is set; ``logit_scale`` itself is frozen. Captions use CLIP's BPE tokenizer
    (shipped inside LAVIS); teachers keep their own (``distill.teacher.model.tokenizer_path``
    or the student config's ``tokenizer_path`` for BERT-vocabulary teachers).

    Model types: ``ViT-B-16`` (OpenAI weights by URL) and ``tiny`` (random, offline).
    """

    PRETRAINED_MODEL_CONFIG_DICT = {
        "ViT-B-16": os.path.join(_CONFIG_DIR, "cprd_clip_vit_b16.yaml"),
        "tiny": os.path.join(_CONFIG_DIR, "cprd_clip_tiny.yaml"),
    }

    def __init__(
        self,
        clip: CLIP,
        temp: Optional[float] = None,
        distill: Optional[DistillConfig] = None,
        tokenizer_path: Optional[str] = None,
    ):
        super(CprdDualEncoder, self).__init__()  # the towers are CLIP's, not BLIP's
        self.clip = clip
        self.clip.logit_scale.requires_grad_(False)
        self.max_txt_len = int(clip.context_length)
        embed_dim = int(clip.text_projection.shape[1])
        if temp is None:
            temp = float(torch.exp(-clip.logit_scale.detach()))
        self._init_training(embed_dim, temp, distill, tokenizer_path)

    compiled_methods = ("encode_image", "encode_text")  # CLIP's text tower takes token ids already

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
        if cfg.get("load_finetuned", False) and cfg.get("finetuned"):
            model.load_checkpoint(cfg.finetuned)
        elif not clip_cfg.get("pretrained", "openai"):
            logging.info("cprd_clip_dual_encoder: no CLIP weights configured, randomly initialised")
        model.compile_encoders(cfg.get("compile", False))
        return model
