"""Dual-encoder teachers (ConaCLIP): BLIP's, CLIP's and our own dual encoders, frozen.

Each embeds student-preprocessed images (resized to its own resolution) and raw captions
(with its own tokenizer) into unit vectors of its ``embed_dim``.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from lavis.models.blip_models.blip_feature_extractor import BlipFeatureExtractor

from lavis_cprd.towers import (
    blip_image_embeds,
    blip_text_embeds,
    build_lavis_clip,
    build_text_encoder,
    build_vision_encoder,
    clip_embed_dim,
    clip_image_size,
)
from lavis_cprd.checkpoints import load_weights, model_from_checkpoint, stored_model_config
from lavis_cprd.teachers.base import TEACHER_CHECKPOINT_KEY, DualEncoderTeacher, match_resolution
from lavis_cprd.teachers.blip_itm import blip_model_config
from lavis_cprd.teachers.registry import register_teacher
from lavis_cprd.tokenization import with_local_tokenizer


class _BlipShapedTeacher(DualEncoderTeacher):
    """Any model with BLIP's dual part: ``visual_encoder`` + ``vision_proj``,
    ``text_encoder.forward_text`` + ``text_proj``, ``tokenizer``, ``max_txt_len``."""

    @property
    def image_size(self) -> int:
        return int(self.model.visual_encoder.patch_embed.img_size[0])

    def _encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return blip_image_embeds(self.model, match_resolution(images, self.image_size))

    def _encode_texts(self, captions: List[str], device: torch.device) -> torch.Tensor:
        return blip_text_embeds(self.model, captions, device)


@register_teacher("blip_feature_extractor")
class BlipFeatureTeacher(_BlipShapedTeacher):
    """BLIP's unimodal (ITC) encoders, LAVIS ``blip_feature_extractor``.

    ``cfg`` as for ``blip_image_text_matching``: ``model_type`` (``base``: BLIP's pre-trained
    checkpoint by URL), ``model`` overrides, ``checkpoint`` (a BLIP retrieval/ITM checkpoint
    works: only its dual part is read; a local LAVIS runner checkpoint brings its tower sizes;
    ``""`` = random init), ``precision``, ``batch_size``.
    """

    @classmethod
    def embed_dim_of(cls, cfg) -> int:
        return int(blip_model_config(BlipFeatureExtractor, "blip_feature_extractor", cfg).get("embed_dim", 256))

    @classmethod
    def from_config(cls, cfg, tokenizer_path: Optional[str] = None) -> "BlipFeatureTeacher":
        mcfg = blip_model_config(BlipFeatureExtractor, "blip_feature_extractor", cfg)
        image_encoder = build_vision_encoder(mcfg)
        # The multimodal (cross-attention) layers are never used by a dual-encoder teacher.
        text_encoder = build_text_encoder(mcfg, cross_attention=False, encoder_width=image_encoder.vision_width)
        model_cls = with_local_tokenizer(BlipFeatureExtractor, mcfg.get("tokenizer_path", None) or tokenizer_path)
        model = model_cls(
            image_encoder=image_encoder,
            text_encoder=text_encoder,
            embed_dim=int(mcfg.get("embed_dim", 256)),
            max_txt_len=int(mcfg.get("max_txt_len", 40)),
        )
        load_weights(model, mcfg, f"teacher {mcfg.get('arch', type(model).__name__)}",
                     key=TEACHER_CHECKPOINT_KEY, random_is_expected=False)  # "": random init, warned
        return cls(model, precision=cfg.get("precision", "fp32"), batch_size=cfg.get("batch_size", 128))


WHERE = "model.distill.teacher.checkpoint"  # the key that names a cprd_dual_encoder teacher
WHAT = "a cprd_dual_encoder teacher is a trained checkpoint written by LAVIS's runner"


@register_teacher("cprd_dual_encoder")
class CprdDualTeacher(_BlipShapedTeacher):
    """A trained ``cprd_dual_encoder`` (a larger student of this library, say) as the teacher.
    ``cfg.checkpoint``: its LAVIS runner checkpoint, which carries its model config."""

    @classmethod
    def embed_dim_of(cls, cfg) -> int:
        return int(stored_model_config(cfg.get("checkpoint", None), WHERE, WHAT).get("embed_dim", 256))

    @classmethod
    def from_config(cls, cfg, tokenizer_path: Optional[str] = None) -> "CprdDualTeacher":
        overrides = {"distill": {"loss": "none"}}  # a teacher never distils
        stored = stored_model_config(cfg.get("checkpoint", None), WHERE, WHAT)  # a clear error for a missing file
        if tokenizer_path and not stored.get("tokenizer_path"):
            overrides["tokenizer_path"] = tokenizer_path
        model = model_from_checkpoint(cfg.get("checkpoint", None), where=WHERE, stored=stored, **overrides)
        return cls(model, precision=cfg.get("precision", "fp32"), batch_size=cfg.get("batch_size", 128))


@register_teacher("clip_feature_extractor")
class ClipFeatureTeacher(DualEncoderTeacher):
    """CLIP (LAVIS ``clip_feature_extractor``, OpenCLIP's model class).

    ``cfg``: ``model_type`` (``ViT-B-32``, ``ViT-B-16``, ``ViT-L-14``, ``RN50``...) and
    ``pretrained`` (``openai``, or a state-dict path; default ``openai``); or ``model``:
    explicit ``{embed_dim, vision_cfg, text_cfg}`` of OpenCLIP's ``CLIP`` (random init unless
    ``pretrained`` is a path). ``precision``, ``batch_size``.
    """

    @classmethod
    def embed_dim_of(cls, cfg) -> int:
        return clip_embed_dim(cfg, "model.distill.teacher")

    @classmethod
    def from_config(cls, cfg, tokenizer_path: Optional[str] = None) -> "ClipFeatureTeacher":
        model = build_lavis_clip(cfg, "model.distill.teacher")
        return cls(model, precision=cfg.get("precision", "fp32"), batch_size=cfg.get("batch_size", 128))

    def _encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(match_resolution(images, clip_image_size(self.model)))

    def _encode_texts(self, captions: List[str], device: torch.device) -> torch.Tensor:
        return self.model.encode_text(self.model.tokenizer(captions, context_length=self.model.context_length).to(device))
