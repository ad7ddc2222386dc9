"""Teacher adapter over LAVIS's ``blip_image_text_matching`` (BLIP's ITM head)."""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
from lavis.models.blip_models.blip_image_text_matching import BlipITM
from omegaconf import OmegaConf

from lavis_cprd.checkpoints import load_checkpoint, load_weights
from lavis_cprd.errors import suggest
from lavis_cprd.teachers.base import TEACHER_CHECKPOINT_KEY, CrossEncoderTeacher, chunks
from lavis_cprd.towers import build_text_encoder, build_vision_encoder
from lavis_cprd.teachers.registry import register_teacher
from lavis_cprd.tokenization import with_local_tokenizer


# Model-config keys that fix the shapes of a BLIP model's towers.
ARCHITECTURE_KEYS = (
    "vit_type", "image_size", "vit_patch_size", "vit_width", "vit_depth", "vit_heads", "med_config_path",
    "text_width", "text_depth", "text_heads", "text_intermediate", "text_pretrained", "embed_dim", "max_txt_len",
    "tokenizer_path", "text_fusion_layer", "queue_size",
)


def architecture_from_checkpoint(path: str) -> dict:
    """Tower sizes stored in a LAVIS runner checkpoint's ``config.model`` ({} if none/remote)."""
    if not os.path.isfile(path):
        return {}
    stored = load_checkpoint(path).get("config", {}).get("model", {})  # a damaged file: a clear error
    return {k: stored[k] for k in ARCHITECTURE_KEYS if k in stored}


def blip_model_config(model_cls, arch: str, cfg):
    """The model config of a BLIP teacher: LAVIS's default for ``cfg.model_type``, then the
    ``cfg.model`` overrides, then the tower sizes stored in a local ``cfg.checkpoint`` (the
    weights only fit those). ``checkpoint: null`` keeps the default's weights, ``""`` means
    random init."""
    model_type = cfg.get("model_type", "base")
    if model_type not in model_cls.PRETRAINED_MODEL_CONFIG_DICT:
        types = sorted(model_cls.PRETRAINED_MODEL_CONFIG_DICT)
        raise ValueError(f"model.distill.teacher.model_type={model_type!r} is not one of {types} for {arch}"
                         f"{suggest(model_type, types)}")
    mcfg = OmegaConf.merge(OmegaConf.load(model_cls.default_config_path(model_type)).model, cfg.get("model", None) or {})
    checkpoint = cfg.get("checkpoint", None)
    if checkpoint:
        mcfg = OmegaConf.merge(mcfg, architecture_from_checkpoint(checkpoint))
    if checkpoint is not None:
        mcfg.finetuned = checkpoint
        mcfg.load_finetuned = True
    return mcfg


@register_teacher("blip_image_text_matching")
class BlipITMTeacher(CrossEncoderTeacher):
    """Scores pairs with BLIP's cross-encoder: ``softmax(itm_head(text_encoder(T, I)))[:, 1]``.

    Each distinct image is encoded once per call and its patch features are reused for every
    caption it is paired with; each distinct caption is tokenized once. The cross-attention
    keys and values, which depend on the image only, are projected once per distinct image of
    a chunk and gathered for its pairs: at BLIP-base sizes those projections of 577 patch
    features would otherwise cost eight times the rest of a pair. Each chunk runs only as many
    text positions as its longest caption needs.
    """

    model: BlipITM
    arch = "blip_image_text_matching"
    model_class = BlipITM

    def __init__(self, model, precision: str = "fp32", batch_size: int = 128):
        super().__init__(model, precision=precision, batch_size=batch_size)
        self._image_of_pair: Optional[torch.Tensor] = None  # set while a chunk runs
        self.shares_image_projections = False
        for name, module in model.text_encoder.named_modules():
            if name.endswith(("crossattention.self.key", "crossattention.self.value")):
                module.register_forward_hook(self._gather_per_pair)
                self.shares_image_projections = True

    def _gather_per_pair(self, module, inputs, output):
        """Forward hook on a cross-attention key/value projection: rows per distinct image in,
        rows per pair out."""
        return output if self._image_of_pair is None else output[self._image_of_pair]

    @classmethod
    def from_config(cls, cfg, tokenizer_path: Optional[str] = None) -> "BlipITMTeacher":
        """``cfg``: ``model_type`` (LAVIS default config to start from), ``model`` (overrides of
        that config: sizes, ``vit_type: custom``...), ``checkpoint`` (path or URL of fine-tuned
        ITM weights; ``null`` keeps the default's, ``""`` means random init), ``precision``,
        ``batch_size`` (pairs per forward chunk).

        A local checkpoint written by LAVIS's runner (e.g. a ``cprd_blip_retrieval`` teacher
        trained here) carries its model config. Its tower sizes win over ``model`` overrides
        (the weights only fit them), so ``checkpoint: path/to/checkpoint_best.pth`` is enough."""
        mcfg = blip_model_config(cls.model_class, cls.arch, cfg)
        image_encoder = build_vision_encoder(mcfg)
        text_encoder = build_text_encoder(mcfg, cross_attention=True, encoder_width=image_encoder.vision_width)
        model = cls._build(mcfg, image_encoder, text_encoder, mcfg.get("tokenizer_path", None) or tokenizer_path)
        load_weights(model, mcfg, f"teacher {cls.arch}",
                     key=TEACHER_CHECKPOINT_KEY, random_is_expected=False)  # "": random init, warned
        return cls(model, precision=cfg.get("precision", "fp32"), batch_size=cfg.get("batch_size", 128))

    @classmethod
    def _build(cls, mcfg, image_encoder, text_encoder, tokenizer_path):
        model_cls = with_local_tokenizer(BlipITM, tokenizer_path)
        return model_cls(
            image_encoder=image_encoder,
            text_encoder=text_encoder,
            embed_dim=mcfg.get("embed_dim", 256),
            max_txt_len=mcfg.get("max_txt_len", 35),
        )

    @property
    def image_size(self) -> int:
        return int(self.model.visual_encoder.patch_embed.img_size[0])

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.visual_encoder.forward_features(pixels)

    def _match_logits(self, images: torch.Tensor, captions: Sequence[str], pairs: torch.Tensor) -> torch.Tensor:
        model = self.model
        image_embeds, image_of_pair, text, text_of_pair = self._distinct_inputs(images, captions, pairs)
        input_ids = text.input_ids.clone()
        if hasattr(model.tokenizer, "enc_token_id"):  # BLIP marks ITM inputs with [ENC]; ALBEF keeps [CLS]
            input_ids[:, 0] = model.tokenizer.enc_token_id

        # Each chunk is cut to its longest caption: padding is masked, so the cut changes no
        # logit. Where an image has no more tokens than a caption (the embedded default's tiny
        # teacher: 10 against up to 17), pairs are sorted by caption length first, so chunks
        # hold captions of like length: a third fewer tokens on its captions of mixed length.
        # Otherwise (BLIP-base: 577 patches) pairs of one image stay side by side, so that a
        # chunk projects few distinct images' keys and values.
        lengths = text.attention_mask.sum(dim=1)[text_of_pair]
        by_length = image_embeds.shape[1] <= text.attention_mask.shape[1]
        if by_length:
            order = torch.argsort(lengths * len(image_embeds) + image_of_pair, stable=True)
        else:
            order = torch.argsort(image_of_pair * (int(lengths.max()) + 1) + lengths, stable=True)
        logits = []
        for s in chunks(len(pairs), self.batch_size):
            rows = order[s]
            width = int(lengths[rows].max())
            if self.shares_image_projections:
                images_here, self._image_of_pair = image_of_pair[rows].unique(return_inverse=True)
            else:
                images_here = image_of_pair[rows]
            embeds = image_embeds[images_here]
            atts = torch.ones((len(rows), embeds.shape[1]), dtype=torch.long, device=embeds.device)
            try:
                out = model.text_encoder(
                    input_ids[text_of_pair[rows], :width],
                    attention_mask=text.attention_mask[text_of_pair[rows], :width],
                    encoder_hidden_states=embeds,
                    encoder_attention_mask=atts,
                    return_dict=True,
                )
            finally:
                self._image_of_pair = None
            logits.append(model.itm_head(out.last_hidden_state[:, 0, :]))
        return torch.cat(logits)[torch.argsort(order)]  # back to the callers' pair order
