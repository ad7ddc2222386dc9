"""``cprd_dual_encoder``: a BLIP-style dual encoder trained with ITC plus distillation."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from lavis.common.registry import registry
from lavis.models.blip_models.blip import BlipBase
from omegaconf import OmegaConf
from torch import nn
from transformers.modeling_outputs import ModelOutput

from lavis_cprd import dist
from lavis_cprd.distill_config import DistillConfig
from lavis_cprd.losses import (
    conaclip_loss,
    cprd_loss_per_query,
    itc_loss,
    kl_distill_loss_per_query,
    listmle_full_loss_per_query,
    margin_mse_loss_per_query,
    positive_mask,
)
from lavis_cprd.mining import all_negatives, first_occurrence_mask, mine_hard_negatives
from lavis_cprd.models.encoders import blip_image_embeds, blip_text_embeds, build_text_encoder, build_vision_encoder
from lavis_cprd.teacher_cache import TeacherScoreCache, TeacherScoreRecord
from lavis_cprd.teachers import FrozenTeacher, build_teacher, teacher_class
from lavis_cprd.tokenization import load_blip_tokenizer

_CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "models")


@dataclass
class CprdOutput(ModelOutput):
    loss: Optional[torch.Tensor] = None
    loss_itc: Optional[torch.Tensor] = None
    loss_distill: Optional[torch.Tensor] = None
    # Mean number of valid (teacher-hard) negatives per query, over both directions.
    valid_negatives: Optional[torch.Tensor] = None
    # Share of this step's teacher pairs found in distill.teacher_cache.
    teacher_cache_hit_rate: Optional[torch.Tensor] = None
    # Share of queries with a distillation term (CPRD: at least one valid negative).
    contributing_queries: Optional[torch.Tensor] = None


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
        self.max_txt_len = max_txt_len
        self._init_training(embed_dim, temp, distill, tokenizer_path)

    def _init_training(self, embed_dim: int, temp: float, distill: Optional[DistillConfig], tokenizer_path) -> None:
        """What every student family shares: learnable temperature, distillation config, the
        lazily built teacher, ConaCLIP's maps into the teacher's space."""
        self.embed_dim = int(embed_dim)
        self.temp = nn.Parameter(temp * torch.ones([]))
        self.distill = distill or DistillConfig()
        self.tokenizer_path = tokenizer_path
        self._teacher: Optional[FrozenTeacher] = None
        self._teacher_cache: Optional[TeacherScoreCache] = None
        self._teacher_record = TeacherScoreRecord() if self.distill.teacher_record else None
        self._cache_hit_rate: Optional[torch.Tensor] = None
        self._contributing_share: Optional[torch.Tensor] = None
        self.epoch = 0  # set by the task each training epoch (distill.start_epoch)
        if self.distill.loss == "conaclip":
            # ConaCLIP's teacher-student edges compare embeddings across the two models: the
            # student's features are mapped into the teacher's space (identity when the sizes
            # agree). Only those edges read it; retrieval uses the student's own space.
            teacher_cfg = OmegaConf.create(self.distill.teacher)
            adapter = teacher_class(teacher_cfg.get("arch", self.distill.default_teacher), "dual")
            self.teacher_embed_dim = dim = adapter.embed_dim_of(teacher_cfg)
            self.conaclip_proj = nn.ModuleDict(
                {m: nn.Identity() if dim == embed_dim else nn.Linear(embed_dim, dim) for m in ("img", "txt")}
            )

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

    # Methods ``model.compile`` replaces by compiled versions: pixels or token ids in, unit
    # embeddings out. Mining, the teacher and the losses stay eager (their pair counts vary
    # from step to step, and they are a small share of the step).
    compiled_methods: Tuple[str, ...] = ("encode_image", "_embed_tokens")

    def compile_encoders(self, spec) -> None:
        """``model.compile``: ``true`` (inductor, default mode) or a mapping of
        ``torch.compile`` arguments ``{backend, mode, dynamic, fullgraph}``. The compiled
        functions live beside the modules, so ``state_dict`` keys (checkpoints) are unchanged."""
        options = compile_options(spec)
        if options is None:
            return
        for name in self.compiled_methods:
            setattr(self, name, torch.compile(getattr(self, name), **options))
        logging.info("model.compile: %s compiled with %s", ", ".join(self.compiled_methods), options)

    # ------------------------------------------------------------------ teacher
    @property
    def teacher(self) -> FrozenTeacher:
        """The frozen teacher (a cross-encoder; a dual encoder for ConaCLIP), built on first
        use (evaluation never builds it)."""
        if self._teacher is None:
            t0 = time.time()
            # Built from its own seed, on a forked RNG: a randomly initialised teacher is the
            # same in every process and after a resume, and building it (lazily, mid-training)
            # never shifts the training RNG streams.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(self.distill.teacher.get("seed", 0)))
                self._teacher = build_teacher(
                    self.distill.teacher, tokenizer_path=self.tokenizer_path, kind=self.distill.teacher_kind
                )
            logging.info("Built teacher %s in %.1fs", self.distill.teacher.get("arch"), time.time() - t0)
        return self._teacher

    @teacher.setter
    def teacher(self, teacher: FrozenTeacher) -> None:
        self._teacher = teacher

    @property
    def teacher_cache(self) -> Optional[TeacherScoreCache]:
        """``distill.teacher_cache``, loaded on first use (None when not configured)."""
        if self._teacher_cache is None and self.distill.teacher_cache:
            self._teacher_cache = TeacherScoreCache.load(self.distill.teacher_cache)
        return self._teacher_cache

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
        text_feat = self.encode_captions(captions, image.device)

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
        if self.distill.loss == "conaclip":
            loss_distill = self._conaclip(image, captions, image_ids, image_feat, text_feat)
            return CprdOutput(loss=loss_itc + self.distill.weight * loss_distill, loss_itc=loss_itc, loss_distill=loss_distill)

        loss_distill, valid = self._distill(image, captions, image_ids, image_ids_all, sim_i2t, sim_t2i)
        return CprdOutput(
            loss=loss_itc + self.distill.weight * loss_distill,
            loss_itc=loss_itc,
            loss_distill=loss_distill,
            valid_negatives=valid,
            teacher_cache_hit_rate=self._cache_hit_rate,
            contributing_queries=self._contributing_share,
        )

    def _conaclip(self, image, captions, image_ids, image_feat, text_feat) -> torch.Tensor:
        """ConaCLIP's graph loss on this rank's batch (DDP averages the ranks' gradients)."""
        t_img, t_txt = self.teacher.encode(image, captions)
        if t_img.shape[1] != self.teacher_embed_dim:
            raise ValueError(
                f"the teacher ({self.distill.teacher.get('arch')}) embeds in {t_img.shape[1]} dimensions, but its config "
                f"said {self.teacher_embed_dim}: check model.distill.teacher"
            )
        student = {"img": image_feat, "txt": text_feat}
        projected = {k: F.normalize(self.conaclip_proj[k](v), dim=-1) for k, v in student.items()}
        total, _ = conaclip_loss(
            student, projected, {"img": t_img, "txt": t_txt}, positive_mask(image_ids, image_ids), self.distill.conaclip
        )
        return total

    def _distill(self, image, captions, image_ids, image_ids_all, sim_i2t, sim_t2i) -> Tuple[torch.Tensor, torch.Tensor]:
        """Pick each query's candidates (K mined hard negatives, or every negative), score
        them and the positive with the teacher in one call, apply ``distill.loss``."""
        cfg = self.distill
        b, offset = image.shape[0], dist.rank_offset(image.shape[0])
        local = torch.arange(b, device=image.device)

        # A batch repeats an image once per caption: each image is one query / one candidate.
        unique_all = first_occurrence_mask(image_ids_all)
        in_scope = torch.ones_like(unique_all)
        if cfg.mining_scope == "local":
            in_scope = torch.zeros_like(unique_all)
            in_scope[offset : offset + b] = True
        image_queries = local[unique_all[offset : offset + b]]
        if cfg.candidates == "hard":
            k = cfg.num_hard_negatives
            neg_texts = mine_hard_negatives(
                sim_i2t[image_queries], image_ids[image_queries], image_ids_all, k, cand_mask=in_scope
            )
            neg_images = mine_hard_negatives(sim_t2i, image_ids, image_ids_all, k, cand_mask=unique_all & in_scope)
            mask_texts, mask_images = torch.ones_like(neg_texts, dtype=torch.bool), torch.ones_like(neg_images, dtype=torch.bool)
        else:
            neg_texts, mask_texts = all_negatives(sim_i2t[image_queries], image_ids[image_queries], image_ids_all, in_scope)
            neg_images, mask_images = all_negatives(sim_t2i, image_ids, image_ids_all, unique_all & in_scope)

        # One teacher call over the gathered batch; pairs are (image, caption) global indices.
        q_i, q_t = image_queries + offset, local + offset
        # Positive pairs are scored only when the loss reads them (a fifth of the pairs at K = 4).
        pos_i = None if cfg.uses_teacher_positive else torch.zeros_like(q_i.view(-1, 1), dtype=torch.bool)
        pos_t = None if cfg.uses_teacher_positive else torch.zeros_like(q_t.view(-1, 1), dtype=torch.bool)
        z_i2t, z_t2i, z_pos_i, z_pos_t = self._teacher_logits(
            dist.gather_no_grad(image),
            dist.gather_strings(captions),
            image_ids_all,
            [
                (q_i.view(-1, 1).expand_as(neg_texts), neg_texts, mask_texts),  # image query, negative text
                (neg_images, q_t.view(-1, 1).expand_as(neg_images), mask_images),  # negative image, text query
                (q_i.view(-1, 1), q_i.view(-1, 1), pos_i),  # each image query with its own caption
                (q_t.view(-1, 1), q_t.view(-1, 1), pos_t),  # each text query with its own image
            ],
        )
        temp = self.distill_temperature
        loss_i2t, used_i2t, share_i2t = self._distill_direction(
            sim_i2t[image_queries, q_i] / temp, sim_i2t[image_queries].gather(1, neg_texts) / temp,
            z_pos_i.view(-1), z_i2t, mask_texts,
        )
        loss_t2i, used_t2i, share_t2i = self._distill_direction(
            sim_t2i[local, q_t] / temp, sim_t2i.gather(1, neg_images) / temp, z_pos_t.view(-1), z_t2i, mask_images
        )
        used = torch.cat([used_i2t.float().sum(1), used_t2i.float().sum(1)]).mean()
        self._contributing_share = (0.5 * (share_i2t + share_t2i)).detach()
        return 0.5 * (loss_i2t + loss_t2i), used.detach()

    @property
    def distill_temperature(self):
        """``tau_d`` of the student logits ``x = s / tau_d`` in the cross-encoder losses:
        ``distill.temperature`` when fixed; with ``itc`` the learnable ITC temperature
        (detached when ``distill.detach_temperature``)."""
        cfg = self.distill
        if cfg.temperature == "itc":
            return self.temp.detach() if cfg.detach_temperature else self.temp
        return float(cfg.temperature)

    def _teacher_logits(self, images_all, captions_all, image_ids_all, blocks) -> List[torch.Tensor]:
        """Teacher logits ``log p1 - log p0`` for blocks of ``(image idx, caption idx, mask)``
        index tensors of one shape each: one teacher call over the masked-in pairs, 0 elsewhere.
        Pairs found in ``distill.teacher_cache`` are read from it; the teacher scores the rest."""
        flat = []
        for i, t, m in blocks:
            m = torch.ones_like(i, dtype=torch.bool) if m is None else m
            flat.append((i.reshape(-1), t.reshape(-1), m.reshape(-1), i.shape))
        pairs = torch.cat([torch.stack([i[m], t[m]], 1) for i, t, m, _ in flat])
        # The two directions share many pairs (all of them when every negative is used).
        unique_pairs, inverse = torch.unique(pairs, dim=0, return_inverse=True)
        logits = self._score_pairs(images_all, captions_all, image_ids_all, unique_pairs)[inverse]
        chunks = logits.split([int(m.sum()) for _, _, m, _ in flat])
        return [logits.new_zeros(m.shape).masked_scatter(m, c).view(shape) for (_, _, m, shape), c in zip(flat, chunks)]

    def _score_pairs(self, images_all, captions_all, image_ids_all, pairs) -> torch.Tensor:
        cache = self.teacher_cache
        if cache is None:
            logits = self.teacher.logit(images_all, captions_all, pairs, image_ids=image_ids_all)
            self._record(image_ids_all, captions_all, pairs, logits)
            return logits
        logits, hit = cache.lookup(image_ids_all[pairs[:, 0]], [captions_all[j] for j in pairs[:, 1].tolist()])
        logits, hit = logits.to(images_all.device), hit.to(images_all.device)
        if not bool(hit.all()):  # the teacher is built only when some pair is missing
            logits[~hit] = self.teacher.logit(images_all, captions_all, pairs[~hit], image_ids=image_ids_all)
            self._record(image_ids_all, captions_all, pairs[~hit], logits[~hit])
        self._cache_hit_rate = hit.float().mean().detach()
        return logits

    def _record(self, image_ids_all, captions_all, pairs, logits) -> None:
        if self._teacher_record is not None:
            self._teacher_record.add(image_ids_all[pairs[:, 0]], [captions_all[j] for j in pairs[:, 1].tolist()], logits)

    def save_teacher_record(self) -> None:
        """``distill.teacher_record``: write the teacher logits computed so far (every rank
        calls this; the task does at each epoch's end)."""
        if self._teacher_record is not None:
            n = self._teacher_record.save(self.distill.teacher_record, {"teacher": dict(self.distill.teacher)})
            logging.info("teacher record %s: %d pairs", self.distill.teacher_record, n)

    def _distill_direction(self, x_pos, x_neg, z_pos, z_neg, mask) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One direction's loss, reduced over all ranks' contributing (or all) queries, the mask
        of the negatives it used (for CPRD: the valid ones) and the share of contributing queries."""
        cfg = self.distill
        used = mask
        if cfg.loss == "cprd":
            # Teacher match probabilities c = softmax(itm)[:, 1] = sigmoid(logit).
            c_pos, c_neg = torch.sigmoid(z_pos), torch.sigmoid(z_neg)
            keep = mask & (c_neg <= c_pos.view(-1, 1)) if cfg.drop_above_positive else mask
            valid = c_neg >= cfg.valid_threshold
            per_query, contributes = cprd_loss_per_query(x_neg, c_neg, valid, keep)
            used = valid & keep
        elif cfg.loss == "listmle_full":
            per_query, contributes = listmle_full_loss_per_query(x_neg, z_neg, mask)
        elif cfg.loss in ("kl", "loopitr"):
            with_pos = lambda pos, neg: torch.cat([pos.view(-1, 1), neg], dim=1)  # noqa: E731
            per_query, contributes = kl_distill_loss_per_query(
                with_pos(x_pos, x_neg), with_pos(z_pos, z_neg), with_pos(torch.ones_like(mask[:, 0]), mask), cfg.teacher_temp
            )
        elif cfg.loss == "margin_mse":
            per_query, contributes = margin_mse_loss_per_query(x_pos, x_neg, z_pos, z_neg, mask)
        else:  # DistillConfig.validate() lists the choices; this guards new entries without a branch
            raise ValueError(f"model.distill.loss={cfg.loss!r} has no implementation")
        # Normalise by the count over all ranks so that DDP's gradient average equals the
        # single-process mean over contributing (distill.normalize: all = every) queries.
        counts = dist.all_reduce_sum(torch.stack([contributes.sum().float(), torch.tensor(float(contributes.numel()), device=contributes.device)]))
        total = counts[0] if cfg.normalize == "contributing" else counts[1]
        loss = (per_query * contributes).sum() * dist.get_world_size() / total.clamp(min=1)
        return loss, used, counts[0] / counts[1].clamp(min=1)

    # ---------------------------------------------------------------- retrieval
    @torch.no_grad()
    def compute_sim_matrix(self, data_loader, task_cfg=None) -> Tuple[np.ndarray, np.ndarray]:
        """Pure dual-encoder retrieval: encode all texts and images, one matrix product.

        Returns LAVIS's pair ``(scores_i2t [n_img, n_txt], scores_t2i [n_txt, n_img])``.
        """
        return dual_encoder_sim_matrix(self, data_loader, int((task_cfg or {}).get("text_batch_size", 256)))

    def encode_captions(self, captions, device) -> torch.Tensor:
        """Unit text embeddings of raw captions (this family's own tokenizer)."""
        return self.encode_text(self.tokenize(captions, device))

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
        if cfg.get("load_finetuned", False) and cfg.get("finetuned"):
            model.load_checkpoint(cfg.finetuned)
        elif cfg.get("pretrained"):
            model.load_from_pretrained(cfg.pretrained)
        else:
            logging.info("cprd_dual_encoder: no checkpoint configured, weights are randomly initialised")
        model.compile_encoders(cfg.get("compile", False))
        return model


COMPILE_OPTIONS = ("backend", "mode", "dynamic", "fullgraph")


def compile_options(spec) -> Optional[Dict[str, Any]]:
    """``torch.compile`` keyword arguments from ``model.compile`` (None: do not compile)."""
    if spec is None or spec is False:
        return None
    if spec is True:
        return {}
    if not hasattr(spec, "items"):
        raise ValueError(f"model.compile must be true, false or a mapping of {list(COMPILE_OPTIONS)}, got {spec!r}")
    options = {str(k): v for k, v in spec.items()}
    unknown = sorted(set(options) - set(COMPILE_OPTIONS))
    if unknown:
        raise ValueError(f"model.compile has unknown keys {unknown}; valid keys: {list(COMPILE_OPTIONS)}")
    backend = options.get("backend", "inductor")
    if not callable(backend) and backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise ValueError(
            f"model.compile.backend={backend!r} is not one of {torch._dynamo.list_backends(exclude_tags=())}"
        )
    return options


@torch.no_grad()
def dual_encoder_sim_matrix(model, data_loader, text_batch_size: int = 256) -> Tuple[np.ndarray, np.ndarray]:
    """ITC retrieval scores of a dual encoder: a student (``encode_captions`` and
    ``encode_image``), or any BLIP-shaped model (``visual_encoder`` + ``vision_proj``,
    ``text_encoder.forward_text`` + ``text_proj``, ``tokenizer``), e.g. a cross-encoder's own
    dual part. Image rows are placed by the dataset's ``index``, so any sampler order works.

    Under ``torch.distributed`` each rank encodes its own share of the captions and images
    (its ``DistributedSampler`` shard, or every W-th image), the features are gathered once,
    and every rank holds the full matrix (LAVIS reports metrics on rank 0).
    Returns ``(i2t [n_img, n_txt], t2i [n_txt, n_img])`` as numpy."""
    t0 = time.time()
    device = model.device
    rank, world = dist.get_rank(), dist.get_world_size()
    if hasattr(model, "encode_captions"):
        encode_texts, encode_images = model.encode_captions, model.encode_image
    else:  # BLIP's dual part
        def encode_texts(captions, device):
            return F.normalize(blip_text_embeds(model, captions, device), dim=-1)

        def encode_images(image):
            return F.normalize(blip_image_embeds(model, image), dim=-1)
    texts = data_loader.dataset.text
    mine = range(rank * text_batch_size, len(texts), world * text_batch_size)  # round-robin text batches
    text_parts = {i: encode_texts(list(texts[i : i + text_batch_size]), device).float().cpu() for i in mine}
    text_parts = dist.gather_objects(text_parts)
    text_feats = torch.cat([text_parts[i] for i in sorted(text_parts)]).to(device)

    image_rows, image_parts = [], []
    for samples in _own_share(data_loader, rank, world):
        image_rows.append(torch.as_tensor(samples["index"]).long())
        image_parts.append(encode_images(samples["image"].to(device)).float().cpu())
    rows = dist.gather_objects({rank: (torch.cat(image_rows) if image_rows else torch.zeros(0, dtype=torch.long),
                                       torch.cat(image_parts) if image_parts else torch.zeros(0, text_feats.shape[1]))})
    image_feats = torch.zeros(len(data_loader.dataset), text_feats.shape[1])
    seen = torch.zeros(len(data_loader.dataset), dtype=torch.bool)
    for index, feats in rows.values():
        image_feats[index] = feats
        seen[index] = True
    image_feats = image_feats.to(device)
    if not bool(seen.all()):
        raise RuntimeError(f"compute_sim_matrix saw {int(seen.sum())} of {len(seen)} images: the loader must cover the split")
    sims = (image_feats @ text_feats.t().to(image_feats.dtype)).float().cpu()
    logging.info("Encoded %d images and %d texts in %.1fs", len(seen), len(texts), time.time() - t0)
    return sims.numpy(), sims.t().contiguous().numpy()


def _own_share(data_loader, rank: int, world: int):
    """This rank's part of an evaluation loader: its ``DistributedSampler`` shard as is, or
    every ``world``-th image of a plain loader (LAVIS's default ``use_dist_eval_sampler: False``)."""
    if world == 1 or isinstance(getattr(data_loader, "sampler", None), torch.utils.data.DistributedSampler):
        return data_loader
    subset = torch.utils.data.Subset(data_loader.dataset, list(range(rank, len(data_loader.dataset), world)))
    return torch.utils.data.DataLoader(
        subset, batch_size=data_loader.batch_size or 1, num_workers=data_loader.num_workers,
        collate_fn=data_loader.collate_fn, pin_memory=data_loader.pin_memory,
    )

