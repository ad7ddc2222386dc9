"""``cprd_dual_encoder``: a BLIP-style dual encoder trained with ITC plus distillation."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from lavis.common.registry import registry
from lavis.models.blip_models.blip import BlipBase
from torch import nn
from transformers.modeling_outputs import ModelOutput

from lavis_cprd import dist
from lavis_cprd.distill_config import DistillConfig
from lavis_cprd.losses import cprd_loss_per_query, itc_loss, positive_mask
from lavis_cprd.mining import first_occurrence_mask, mine_hard_negatives
from lavis_cprd.models.encoders import build_text_encoder, build_vision_encoder
from lavis_cprd.teachers import CrossEncoderTeacher, build_teacher
from lavis_cprd.tokenization import load_blip_tokenizer

_CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "models")


@dataclass
class CprdOutput(ModelOutput):
    loss: Optional[torch.Tensor] = None
    loss_itc: Optional[torch.Tensor] = None
    loss_distill: Optional[torch.Tensor] = None
    # Mean number of valid (teacher-hard) negatives per query, over both directions.
    valid_negatives: Optional[torch.Tensor] = None


@registry.register_model("cprd_dual_encoder")
class CprdDualEncoder(BlipBase):
    """ViT image tower + BERT text tower (LAVIS's encoders), projections, learnable temperature.

    Model types: ``base`` (BLIP ViT-B/16 + BERT-base, initialised from BLIP's pre-trained
    checkpoint by URL) and ``tiny`` (explicit small sizes, random init, for offline runs).
    """

    PRETRAINED_MODEL_CONFIG_DICT = {
        "base": os.path.join(_CONFIG_DIR, "cprd_dual_base.yaml"),
        "tiny": os.path.join(_CONFIG_DIR, "cprd_dual_tiny.yaml"),
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
        self.temp = nn.Parameter(temp * torch.ones([]))
        self.max_txt_len = max_txt_len
        self.distill = distill or DistillConfig()
        self.tokenizer_path = tokenizer_path
        self._teacher: Optional[CrossEncoderTeacher] = None
        self.epoch = 0  # set by the task each training epoch (distill.start_epoch)

    # ----------------------------------------------------------------- encoders
    def tokenize(self, captions, device) -> "object":
        return self.tokenizer(
            list(captions), padding="longest", truncation=True, max_length=self.max_txt_len, return_tensors="pt"
        ).to(device)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """Unit image embeddings ``v`` ``[N, D]``."""
        embeds = self.visual_encoder.forward_features(image)
        return F.normalize(self.vision_proj(embeds[:, 0, :]), dim=-1)

    def encode_text(self, text) -> torch.Tensor:
        """Unit text embeddings ``t`` ``[N, D]`` from tokenized captions."""
        out = self.text_encoder.forward_text(text)
        return F.normalize(self.text_proj(out.last_hidden_state[:, 0, :]), dim=-1)

    # ------------------------------------------------------------------ teacher
    @property
    def teacher(self) -> CrossEncoderTeacher:
        """The frozen cross-encoder, built on first use (evaluation never builds it)."""
        if self._teacher is None:
            t0 = time.time()
            self._teacher = build_teacher(self.distill.teacher, tokenizer_path=self.tokenizer_path)
            logging.info("Built teacher %s in %.1fs", self.distill.teacher.get("arch"), time.time() - t0)
        return self._teacher

    @teacher.setter
    def teacher(self, teacher: CrossEncoderTeacher) -> None:
        self._teacher = teacher

    # ------------------------------------------------------------------ training
    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def distilling(self) -> bool:
        """Whether this epoch's loss includes the distillation term."""
        return self.distill.needs_teacher and self.epoch >= self.distill.start_epoch

    def forward(self, samples) -> CprdOutput:
        image, captions, image_ids = samples["image"], samples["text_input"], samples["image_id"]
        image_ids = image_ids.to(image.device).view(-1)
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)

        image_feat = self.encode_image(image)
        text_feat = self.encode_text(self.tokenize(captions, image.device))

        # Candidates come from the batch gathered over all ranks; queries stay local.
        image_feat_all = dist.gather_with_grad(image_feat)
        text_feat_all = dist.gather_with_grad(text_feat)
        image_ids_all = dist.gather_no_grad(image_ids)
        sim_i2t = image_feat @ text_feat_all.t()
        sim_t2i = text_feat @ image_feat_all.t()
        pos = positive_mask(image_ids, image_ids_all)
        loss_itc = itc_loss(sim_i2t / self.temp, sim_t2i / self.temp, pos, pos)

        if not self.distilling:
            return CprdOutput(loss=loss_itc, loss_itc=loss_itc)

        loss_distill, valid = self._cprd(image, captions, image_ids, image_ids_all, sim_i2t, sim_t2i)
        return CprdOutput(
            loss=loss_itc + self.distill.weight * loss_distill,
            loss_itc=loss_itc,
            loss_distill=loss_distill,
            valid_negatives=valid,
        )

    def _cprd(self, image, captions, image_ids, image_ids_all, sim_i2t, sim_t2i) -> Tuple[torch.Tensor, torch.Tensor]:
        """Mine K hard negatives per query, score them with the teacher, apply ``cprd_loss``."""
        cfg = self.distill
        b, offset = image.shape[0], dist.rank_offset(image.shape[0])
        local = torch.arange(b, device=image.device)

        # A batch repeats an image once per caption: each image is one query / one candidate.
        unique_all = first_occurrence_mask(image_ids_all)
        image_queries = local[unique_all[offset : offset + b]]
        neg_texts = mine_hard_negatives(sim_i2t[image_queries], image_ids[image_queries], image_ids_all, cfg.num_hard_negatives)
        neg_images = mine_hard_negatives(
            sim_t2i, image_ids, image_ids_all, cfg.num_hard_negatives, cand_mask=unique_all
        )

        # One teacher call over the gathered batch; pairs are (image, caption) global indices.
        images_all = dist.gather_no_grad(image)
        captions_all = dist.gather_strings(captions)
        k = cfg.num_hard_negatives
        q_i, q_t = image_queries + offset, local + offset
        pairs = torch.cat(
            [
                torch.stack([q_i.repeat_interleave(k), neg_texts.reshape(-1)], 1),  # i2t negatives
                torch.stack([neg_images.reshape(-1), q_t.repeat_interleave(k)], 1),  # t2i negatives
                torch.stack([q_i, q_i], 1),  # each image query with its own caption
                torch.stack([q_t, q_t], 1),  # each text query with its own image
            ]
        )
        scores = self.teacher.score(images_all, captions_all, pairs)
        n_i, n_t = len(image_queries) * k, b * k
        t_i2t = scores[:n_i].view(-1, k)
        t_t2i = scores[n_i : n_i + n_t].view(-1, k)
        pos_i2t = scores[n_i + n_t : n_i + n_t + len(image_queries)]
        pos_t2i = scores[n_i + n_t + len(image_queries) :]

        temp = self.temp.detach() if cfg.detach_temperature else self.temp
        x_i2t = sim_i2t[image_queries].gather(1, neg_texts) / temp
        x_t2i = sim_t2i.gather(1, neg_images) / temp
        loss_i2t, valid_i2t = self._cprd_direction(x_i2t, t_i2t, pos_i2t)
        loss_t2i, valid_t2i = self._cprd_direction(x_t2i, t_t2i, pos_t2i)
        valid = torch.cat([valid_i2t, valid_t2i]).float().sum(1).mean()
        return 0.5 * (loss_i2t + loss_t2i), valid.detach()

    def _cprd_direction(self, x, t, t_pos):
        valid = t >= self.distill.valid_threshold
        keep = t <= t_pos.view(-1, 1) if self.distill.drop_above_positive else None
        per_query, contributes = cprd_loss_per_query(x, t, valid, keep)
        # Normalise by the count over all ranks so that DDP's gradient average equals the
        # single-process mean over contributing queries.
        total = dist.all_reduce_sum(contributes.sum().float())
        loss = (per_query * contributes).sum() * dist.get_world_size() / total.clamp(min=1)
        return loss, valid if keep is None else valid & keep

    # ---------------------------------------------------------------- retrieval
    @torch.no_grad()
    def compute_sim_matrix(self, data_loader, task_cfg=None) -> Tuple[np.ndarray, np.ndarray]:
        """Pure dual-encoder retrieval: encode all texts and images, one matrix product.

        Returns LAVIS's pair ``(scores_i2t [n_img, n_txt], scores_t2i [n_txt, n_img])``.
        """
        return dual_encoder_sim_matrix(self, data_loader, int((task_cfg or {}).get("text_batch_size", 256)))

    # ------------------------------------------------------------------- config
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
        if cfg.get("load_finetuned", False) and cfg.get("finetuned"):
            model.load_checkpoint(cfg.finetuned)
        elif cfg.get("pretrained"):
            model.load_from_pretrained(cfg.pretrained)
        else:
            logging.info("cprd_dual_encoder: no checkpoint configured, weights are randomly initialised")
        return model


@torch.no_grad()
def dual_encoder_sim_matrix(model, data_loader, text_batch_size: int = 256) -> Tuple[np.ndarray, np.ndarray]:
    """ITC retrieval scores of any BLIP-shaped model (``visual_encoder`` + ``vision_proj``,
    ``text_encoder.forward_text`` + ``text_proj``, ``tokenizer``): a student, or a
    cross-encoder's own dual part. Image rows are placed by the dataset's ``index``, so any
    sampler order works. Returns ``(i2t [n_img, n_txt], t2i [n_txt, n_img])`` as numpy."""
    t0 = time.time()
    device = model.device
    texts = data_loader.dataset.text
    text_feats = []
    for i in range(0, len(texts), text_batch_size):
        tokens = model.tokenizer(
            list(texts[i : i + text_batch_size]), padding="longest", truncation=True,
            max_length=model.max_txt_len, return_tensors="pt",
        ).to(device)
        hidden = model.text_encoder.forward_text(tokens).last_hidden_state
        text_feats.append(F.normalize(model.text_proj(hidden[:, 0, :]), dim=-1))
    text_feats = torch.cat(text_feats)
    image_feats = torch.zeros(len(data_loader.dataset), text_feats.shape[1], device=device)
    seen = torch.zeros(len(data_loader.dataset), dtype=torch.bool)
    for samples in data_loader:
        index = torch.as_tensor(samples["index"]).long()
        embeds = model.visual_encoder.forward_features(samples["image"].to(device))
        image_feats[index.to(device)] = F.normalize(model.vision_proj(embeds[:, 0, :]), dim=-1)
        seen[index] = True
    if not bool(seen.all()):
        raise RuntimeError(f"compute_sim_matrix saw {int(seen.sum())} of {len(seen)} images: the loader must cover the split")
    sims = (image_feats @ text_feats.t()).float().cpu()
    logging.info("Encoded %d images and %d texts in %.1fs", len(seen), len(texts), time.time() - t0)
    return sims.numpy(), sims.t().contiguous().numpy()
