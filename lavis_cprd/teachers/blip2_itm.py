"""Teacher adapter over LAVIS's ``blip2_image_text_matching`` (BLIP-2's Q-Former ITM head)."""
from __future__ import annotations

from functools import partial
from typing import Optional, Sequence

import torch
from lavis.models.blip2_models.blip2 import LayerNorm
from lavis.models.blip2_models.blip2_image_text_matching import Blip2ITM
from lavis.models.blip2_models.Qformer import BertConfig, BertLMHeadModel
from lavis.models.eva_vit import VisionTransformer

from lavis_cprd.towers import resize_bert
from lavis_cprd.checkpoints import load_weights
from lavis_cprd.teachers.base import TEACHER_CHECKPOINT_KEY, CrossEncoderTeacher, chunks
from lavis_cprd.teachers.blip_itm import blip_model_config
from lavis_cprd.teachers.registry import register_teacher
from lavis_cprd.tokenization import load_bert_tokenizer

LAVIS_VITS = ("eva_clip_g", "clip_L")


def _qformer_config(mcfg, vision_width: int, num_query_token: int) -> BertConfig:
    """The Q-Former's BERT config: bert-base-uncased's (``BertConfig()`` defaults are exactly
    that), resized by ``qformer_width/qformer_depth/qformer_heads`` for tiny configs."""
    config = resize_bert(BertConfig(), mcfg, "qformer")
    config.encoder_width = vision_width
    config.add_cross_attention = True
    config.cross_attention_freq = int(mcfg.get("cross_attention_freq", 2))
    config.query_length = num_query_token
    return config


def _blip2_class(mcfg, tokenizer_path: Optional[str]) -> type:
    """``Blip2ITM`` with three construction hooks that need no hub: the Q-Former is built from
    its config (LAVIS starts it from bert-base-uncased weights, which every BLIP-2 checkpoint
    overwrites), the tokenizer may come from a local folder, and ``vit_model: custom`` builds
    LAVIS's EVA ViT class at explicit sizes. Forward and checkpoint keys stay LAVIS's own."""

    class _Blip2ITM(Blip2ITM):
        @classmethod
        def init_tokenizer(cls, *args, **kwargs):
            if tokenizer_path is None:
                return Blip2ITM.init_tokenizer(*args, **kwargs)
            return load_bert_tokenizer(tokenizer_path, bos=True)  # BLIP-2 adds [DEC] only

        @classmethod
        def init_Qformer(cls, num_query_token, vision_width, cross_attention_freq=2):
            config = _qformer_config(mcfg, vision_width, num_query_token)
            qformer = BertLMHeadModel(config)
            query_tokens = torch.nn.Parameter(torch.zeros(1, num_query_token, config.hidden_size))
            query_tokens.data.normal_(mean=0.0, std=config.initializer_range)
            return qformer, query_tokens

        @classmethod
        def init_vision_encoder(cls, model_name, img_size, drop_path_rate, use_grad_checkpoint, precision):
            if model_name in LAVIS_VITS:
                return Blip2ITM.init_vision_encoder(model_name, img_size, drop_path_rate, use_grad_checkpoint, precision)
            if model_name != "custom":
                raise ValueError(f"teacher model.vit_model={model_name!r} is not one of {[*LAVIS_VITS, 'custom']}")
            missing = [k for k in ("vit_width", "vit_depth", "vit_heads") if mcfg.get(k) is None]
            if missing:
                raise ValueError(f"teacher model.vit_model=custom needs {missing}")
            encoder = VisionTransformer(  # create_eva_vit_g's layer recipe at the configured sizes
                img_size=img_size, patch_size=int(mcfg.get("vit_patch_size", 14)), use_mean_pooling=False,
                embed_dim=int(mcfg.vit_width), depth=int(mcfg.vit_depth), num_heads=int(mcfg.vit_heads),
                mlp_ratio=float(mcfg.get("vit_mlp_ratio", 4.3637)), qkv_bias=True, drop_path_rate=drop_path_rate,
                norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_checkpoint=use_grad_checkpoint,
            )
            return encoder, LayerNorm(encoder.num_features)

    _Blip2ITM.__name__ = _Blip2ITM.__qualname__ = Blip2ITM.__name__
    return _Blip2ITM


@register_teacher("blip2_image_text_matching")
class Blip2ITMTeacher(CrossEncoderTeacher):
    """Scores pairs with BLIP-2's Q-Former ITM head: the learned queries and the caption go
    through the Q-Former together (queries cross-attend to the frozen ViT's patch features),
    ``itm_head`` scores each query output and the logits are averaged over queries;
    ``c = softmax(mean_q itm_head(h_q))[:, 1]``.

    ``cfg``: ``model_type`` (``pretrain``: 224 px EVA ViT-g, ``coco``: 364 px fine-tuned,
    ``pretrain_vitL``), ``model`` overrides (tiny: ``vit_model: custom`` with ``vit_width``,
    ``vit_depth``, ``vit_heads``, ``vit_patch_size``; ``qformer_width``, ``qformer_depth``,
    ``qformer_heads``, ``num_query_token``), ``checkpoint`` (``null`` keeps the type's
    weights, ``""`` random init), ``precision``, ``batch_size``.

    The ViT is kept in float32 whatever the type's ``vit_precision`` (LAVIS casts it to fp16,
    which CPUs cannot run); ``precision: bf16`` autocasts the whole teacher instead. Each
    distinct image goes through the ViT once per call.
    """

    model: Blip2ITM
    arch = "blip2_image_text_matching"

    @classmethod
    def from_config(cls, cfg, tokenizer_path: Optional[str] = None) -> "Blip2ITMTeacher":
        cfg = dict(cfg)
        cfg.setdefault("model_type", "pretrain")
        mcfg = blip_model_config(Blip2ITM, cls.arch, cfg)
        model_cls = _blip2_class(mcfg, mcfg.get("tokenizer_path", None) or tokenizer_path)
        model = model_cls(
            vit_model=mcfg.get("vit_model", "eva_clip_g"),
            img_size=int(mcfg.get("image_size", 224)),
            drop_path_rate=0.0,
            use_grad_checkpoint=False,
            vit_precision="fp32",
            freeze_vit=True,
            num_query_token=int(mcfg.get("num_query_token", 32)),
            cross_attention_freq=int(mcfg.get("cross_attention_freq", 2)),
            embed_dim=int(mcfg.get("embed_dim", 256)),
            max_txt_len=int(mcfg.get("max_txt_len", 32)),
        )
        load_weights(model, mcfg, f"teacher {mcfg.get('arch', type(model).__name__)}",
                     key=TEACHER_CHECKPOINT_KEY, random_is_expected=False)  # "": random init, warned
        return cls(model, precision=cfg.get("precision", "fp32"), batch_size=cfg.get("batch_size", 128))

    @property
    def image_size(self) -> int:
        return int(self.model.visual_encoder.image_size)

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.ln_vision(self.model.visual_encoder(pixels))

    def _match_logits(self, images: torch.Tensor, captions: Sequence[str], pairs: torch.Tensor) -> torch.Tensor:
        model = self.model
        image_embeds, image_of_pair, text, text_of_pair = self._distinct_inputs(images, captions, pairs)

        num_query = model.query_tokens.shape[1]
        logits = []
        for s in chunks(len(pairs), self.batch_size):
            embeds = image_embeds[image_of_pair[s]]
            queries = model.query_tokens.expand(embeds.shape[0], -1, -1)
            query_atts = torch.ones(queries.shape[:-1], dtype=torch.long, device=embeds.device)
            out = model.Qformer.bert(
                text.input_ids[text_of_pair[s]],
                query_embeds=queries,
                attention_mask=torch.cat([query_atts, text.attention_mask[text_of_pair[s]]], dim=1),
                encoder_hidden_states=embeds,
                encoder_attention_mask=torch.ones(embeds.shape[:-1], dtype=torch.long, device=embeds.device),
                return_dict=True,
            )
            logits.append(model.itm_head(out.last_hidden_state[:, :num_query, :]).mean(dim=1))
        return torch.cat(logits)
