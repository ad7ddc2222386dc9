"""Teacher adapter over LAVIS's ``albef_retrieval`` (ALBEF's ITM head)."""
from __future__ import annotations

from lavis.models.albef_models.albef_retrieval import AlbefRetrieval

from lavis_cprd.teachers.blip_itm import BlipITMTeacher
from lavis_cprd.teachers.registry import register_teacher
from lavis_cprd.tokenization import with_local_tokenizer


@register_teacher("albef_retrieval")
class AlbefITMTeacher(BlipITMTeacher):
    """Scores pairs with ALBEF's fusion encoder: ``softmax(itm_head(text_encoder(T, I)))[:, 1]``,
    the head LAVIS's ALBEF re-ranks its top-k with. Text layers below ``fusion_layer`` are
    text-only, the rest cross-attend to the image; captions keep ``[CLS]`` (plain BERT
    tokenizer, no BLIP ``[ENC]``).

    ``cfg`` as for ``blip_image_text_matching``; ``model_type``: ``flickr`` or ``coco``
    (fine-tuned retrieval checkpoints by URL). Tiny configs set ``model.text_fusion_layer``.
    """

    arch = "albef_retrieval"
    model_class = AlbefRetrieval

    @classmethod
    def from_config(cls, cfg, tokenizer_path=None) -> "AlbefITMTeacher":
        cfg = dict(cfg)
        cfg.setdefault("model_type", "flickr")
        return super().from_config(cfg, tokenizer_path=tokenizer_path)

    @classmethod
    def _build(cls, mcfg, image_encoder, text_encoder, tokenizer_path):
        model_cls = with_local_tokenizer(AlbefRetrieval, tokenizer_path, bos=False, enc=False)
        return model_cls(
            image_encoder=image_encoder,
            text_encoder=text_encoder,
            queue_size=int(mcfg.get("queue_size", 0)),  # a checkpoint's queues must fit to load
            embed_dim=int(mcfg.get("embed_dim", 256)),
            max_txt_len=int(mcfg.get("max_txt_len", 30)),
        )
