"""``model.distill`` as an object the student holds: the frozen teacher (built lazily), the
score cache and record, the choice of candidates, one teacher call per step, the per-query
loss of the registry entry in each direction, and the normalisation that makes DDP's
gradient average equal the single-process mean.

A student's ``forward`` computes its ITC term and hands the step (:class:`Step`, with the
distillation temperature as a value) to ``objective.loss(step)``, which returns what it
computed (:class:`DistillResult`) and keeps nothing of the step. Which objective a loss needs
is its registry entry's ``objective``: this one for the cross-encoder losses, ConaCLIP's
(``distill/losses/conaclip.py``) for a dual-encoder teacher.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from lavis_cprd import distributed
from lavis_cprd.distill.cache_integrity import check_teacher_identity, teacher_identity
from lavis_cprd.distill.config import DistillConfig
from lavis_cprd.distill.mining import all_negatives, first_occurrence_mask, mine_hard_negatives
from lavis_cprd.distill.registry import Direction, get_loss
from lavis_cprd.distill.sharded_scoring import score_where_images_live
from lavis_cprd.distill.teacher_cache import TeacherScoreCache, TeacherScoreRecord
from lavis_cprd.teachers import FrozenTeacher, build_teacher, teacher_class
from lavis_cprd.teachers.registry import DEFAULT_TEACHERS


@dataclass
class Step:
    """What the objective reads of one training step: this rank's batch (images, raw captions,
    image ids), the candidates' image ids gathered over all ranks, the student's unit features
    and its similarities of the local queries to the gathered candidates."""

    image: torch.Tensor
    captions: Sequence[str]
    image_ids: torch.Tensor
    image_ids_all: torch.Tensor
    image_feat: torch.Tensor
    text_feat: torch.Tensor
    sim_i2t: torch.Tensor
    sim_t2i: torch.Tensor
    temperature: Union[float, torch.Tensor] = 1.0
    modules: Mapping[str, nn.Module] = field(default_factory=dict)


@dataclass
class DistillResult:
    """What one step's distillation computed: the loss, and (detached, for the logs) the mean
    number of negatives used per query (for CPRD: the valid ones), the share of queries with a
    distillation term and the share of teacher pairs found in ``distill.teacher_cache`` (None
    where the objective has no such notion, or no cache is used)."""

    loss: torch.Tensor
    valid_negatives: Optional[torch.Tensor] = None
    contributing_share: Optional[torch.Tensor] = None
    cache_hit_rate: Optional[torch.Tensor] = None


class DistillObjective:
    """The cross-encoder objective: per query, the teacher's logits of its candidates (the K
    mined hard negatives, or every negative) and of its positive, and the registered loss."""

    def __init__(self, cfg: DistillConfig, tokenizer_path: Optional[str] = None):
        self.cfg = cfg
        self.tokenizer_path = tokenizer_path
        self.spec = get_loss(cfg.loss)  # the registry entry of cfg.loss
        self.teacher_cls = None
        if self.spec.teacher is not None:  # fails at model build, listing the adapters of this kind
            self.teacher_cls = teacher_class(self.teacher_arch, cfg.teacher_kind)
        self._teacher: Optional[FrozenTeacher] = None
        self._cache: Optional[TeacherScoreCache] = None
        self._record = TeacherScoreRecord() if cfg.teacher_record else None
        # The training device, set at start-up (the task's ``build_teacher_now``), else by the
        # first teacher call: the teacher precision ``auto`` of the cache's identity resolves on it.
        self.device: Optional[torch.device] = None

    def student_modules(self, embed_dim: int) -> Dict[str, nn.Module]:
        """Learnable modules the student must own for this objective (trained and saved with
        it; handed back in :attr:`Step.modules`): none for the cross-encoder losses."""
        return {}

    @property
    def teacher_arch(self) -> str:
        return self.cfg.teacher.get("arch", DEFAULT_TEACHERS[self.cfg.teacher_kind])

    def active(self, epoch: int) -> bool:
        """Whether an epoch's loss includes the distillation term (``distill.start_epoch``)."""
        return self.cfg.needs_teacher and epoch >= self.cfg.start_epoch

    # ------------------------------------------------------------------ teacher
    @property
    def teacher(self) -> FrozenTeacher:
        """The frozen teacher, built on first use (evaluation never builds it)."""
        if self._teacher is None:
            t0 = time.time()
            # Built from its own seed, on a forked RNG: a randomly initialised teacher is the
            # same in every process and after a resume, and building it (lazily, mid-training)
            # never shifts the training RNG streams.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(self.cfg.teacher.get("seed", 0)))
                self._teacher = build_teacher(self.cfg.teacher, tokenizer_path=self.tokenizer_path, kind=self.cfg.teacher_kind)
            logging.info("Built teacher %s in %.1fs", self.cfg.teacher.get("arch"), time.time() - t0)
        return self._teacher

    @teacher.setter
    def teacher(self, teacher: FrozenTeacher) -> None:
        self._teacher = teacher

    @property
    def teacher_built(self) -> bool:
        """Whether the teacher has been built (it is, on the first distilling step)."""
        return self._teacher is not None

    def teacher_identity(self, device: Union[str, torch.device]) -> Dict[str, Any]:
        """The configured teacher's identity on ``device`` (``cache_integrity.teacher_identity``):
        what a teacher cache's manifest must record for this run to read it."""
        return teacher_identity(self.cfg.teacher, self.teacher_arch, device)

    @property
    def teacher_cache(self) -> Optional[TeacherScoreCache]:
        """``distill.teacher_cache``, loaded on first use, every file verified against its
        checksum (None when not configured)."""
        if self._cache is None and self.cfg.teacher_cache:
            self._cache = TeacherScoreCache.load(self.cfg.teacher_cache)
        return self._cache

    @property
    def teacher_cache_loaded(self) -> bool:
        """Whether ``distill.teacher_cache`` has been loaded (and verified)."""
        return self._cache is not None

    def verify_teacher_cache(self, device: Union[str, torch.device]) -> Optional[TeacherScoreCache]:
        """Start-up: load ``distill.teacher_cache`` now (a damaged file fails here, naming it,
        not at the first distilled step) and refuse it unless the teacher that scored it is the
        configured one on the training ``device``."""
        self.device = torch.device(device)
        cache = self.teacher_cache
        if cache is not None and cache.manifest is not None:  # an in-memory cache has no manifest
            check_teacher_identity(cache.manifest, self.teacher_identity(self.device), cache.root)
        return cache

    def use_teacher_cache(self, cache: Union[str, TeacherScoreCache, None]) -> None:
        """Read teacher logits from ``cache`` from now on: a folder (``distill.teacher_cache``)
        or a loaded :class:`TeacherScoreCache`; None: the teacher scores every pair."""
        if isinstance(cache, TeacherScoreCache):
            self.cfg.teacher_cache, self._cache = cache.root or "in-memory", cache
        else:
            self.cfg.teacher_cache, self._cache = cache, None

    def save_teacher_record(self) -> None:
        """``distill.teacher_record``: write the teacher logits computed so far (every rank
        calls this; the task does at the end of the last epoch)."""
        if self._record is not None:
            device = self.device or distributed.resolve_device("auto")
            n = self._record.save(self.cfg.teacher_record, {"teacher": dict(self.cfg.teacher)},
                                  teacher_identity=self.teacher_identity(device))
            logging.info("teacher record %s: %d pairs", self.cfg.teacher_record, n)

    # --------------------------------------------------------------------- loss
    def loss(self, step: Step) -> DistillResult:
        """The step's distillation loss and its statistics. Candidates come
        from the gathered batch, queries are this rank's; each query's candidates (K mined
        hard negatives, or every negative) and its positive are scored by the teachers of the
        ranks that hold their images (``sharded_scoring``), one teacher call a rank."""
        cfg = self.cfg
        image_ids, image_ids_all = step.image_ids, step.image_ids_all
        b, offset = step.image.shape[0], distributed.rank_offset(step.image.shape[0])
        local = torch.arange(b, device=step.image.device)

        # A batch repeats an image once per caption: each image is one query / one candidate.
        unique_all = first_occurrence_mask(image_ids_all)
        in_scope = torch.ones_like(unique_all)
        if cfg.mining_scope == "local":
            in_scope = torch.zeros_like(unique_all)
            in_scope[offset : offset + b] = True
        image_queries = local[unique_all[offset : offset + b]]
        sim_i2t, sim_t2i = step.sim_i2t, step.sim_t2i
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

        # Pairs are (image, caption) global indices; each is scored on the rank holding its image.
        q_i, q_t = image_queries + offset, local + offset
        # Positive pairs are scored only when the loss reads them (a fifth of the pairs at K = 4).
        pos_i = None if cfg.uses_teacher_positive else torch.zeros_like(q_i.view(-1, 1), dtype=torch.bool)
        pos_t = None if cfg.uses_teacher_positive else torch.zeros_like(q_t.view(-1, 1), dtype=torch.bool)
        (z_i2t, z_t2i, z_pos_i, z_pos_t), hit_rate = self._teacher_logits(
            step,
            distributed.gather_strings(step.captions),
            [
                (q_i.view(-1, 1).expand_as(neg_texts), neg_texts, mask_texts),  # image query, negative text
                (neg_images, q_t.view(-1, 1).expand_as(neg_images), mask_images),  # negative image, text query
                (q_i.view(-1, 1), q_i.view(-1, 1), pos_i),  # each image query with its own caption
                (q_t.view(-1, 1), q_t.view(-1, 1), pos_t),  # each text query with its own image
            ],
        )
        temp = step.temperature
        loss_i2t, used_i2t, share_i2t = self._direction(Direction(
            sim_i2t[image_queries, q_i] / temp, sim_i2t[image_queries].gather(1, neg_texts) / temp,
            z_pos_i.view(-1), z_i2t, mask_texts,
        ))
        loss_t2i, used_t2i, share_t2i = self._direction(Direction(
            sim_t2i[local, q_t] / temp, sim_t2i.gather(1, neg_images) / temp, z_pos_t.view(-1), z_t2i, mask_images
        ))
        used = torch.cat([used_i2t.float().sum(1), used_t2i.float().sum(1)]).mean()
        return DistillResult(0.5 * (loss_i2t + loss_t2i), used.detach(), (0.5 * (share_i2t + share_t2i)).detach(), hit_rate)

    def _direction(self, d: Direction) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One direction's loss, reduced over all ranks' contributing (or all) queries, the mask
        of the negatives it used (for CPRD: the valid ones) and the share of contributing queries."""
        per_query, contributes, used = self.spec.per_query(d, self.cfg)
        # Normalise by the count over all ranks so that DDP's gradient average equals the
        # single-process mean over contributing (distill.normalize: all = every) queries.
        counts = distributed.all_reduce_sum(torch.stack([contributes.sum().float(), torch.tensor(float(contributes.numel()), device=contributes.device)]))
        total = counts[0] if self.cfg.normalize == "contributing" else counts[1]
        loss = (per_query * contributes).sum() * distributed.get_world_size() / total.clamp(min=1)
        return loss, used, counts[0] / counts[1].clamp(min=1)

    # ------------------------------------------------------------- pair scoring
    def _teacher_logits(self, step: Step, captions_all: List[str], blocks) -> Tuple[List[torch.Tensor], Optional[torch.Tensor]]:
        """Teacher logits ``log p1 - log p0`` for blocks of ``(image idx, caption idx, mask)``
        global index tensors of one shape each: the masked-in pairs scored once, 0 elsewhere.
        Pairs found in ``distill.teacher_cache`` are read from it; the teacher scores the rest.
        Also the share of pairs the cache held (None without a cache)."""
        flat = []
        for i, t, m in blocks:
            m = torch.ones_like(i, dtype=torch.bool) if m is None else m
            flat.append((i.reshape(-1), t.reshape(-1), m.reshape(-1), i.shape))
        pairs = torch.cat([torch.stack([i[m], t[m]], 1) for i, t, m, _ in flat])
        # The two directions share many pairs (all of them when every negative is used).
        unique_pairs, inverse = torch.unique(pairs, dim=0, return_inverse=True)
        logits, hit_rate = self._score_pairs(step, captions_all, unique_pairs)
        chunks = logits[inverse].split([int(m.sum()) for _, _, m, _ in flat])
        blocks = [logits.new_zeros(m.shape).masked_scatter(m, c).view(shape) for (_, _, m, shape), c in zip(flat, chunks)]
        return blocks, hit_rate

    def _score_pairs(self, step: Step, captions_all: List[str], pairs: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The logits of ``pairs``, and the share found in the cache (None without one)."""
        if self.device is None:  # built outside the task (no start-up): the teacher runs where the batch is
            self.device = step.image.device
        cache = self.teacher_cache
        if cache is None:
            return self._score_on_image_ranks(step, captions_all, pairs), None
        logits, hit = cache.lookup(step.image_ids_all[pairs[:, 0]], [captions_all[j] for j in pairs[:, 1].tolist()])
        logits, hit = logits.to(step.image.device), hit.to(step.image.device)
        # Called with no miss too: another rank's misses may need this rank's images.
        logits[~hit] = self._score_on_image_ranks(step, captions_all, pairs[~hit])
        return logits, hit.float().mean().detach()

    def _score_on_image_ranks(self, step: Step, captions_all: List[str], pairs: torch.Tensor) -> torch.Tensor:
        """The teacher's logits of ``pairs`` (global indices), each computed on the rank that
        holds its image (``sharded_scoring``): the teacher sees this rank's images only."""

        def score_local(local_pairs: torch.Tensor) -> torch.Tensor:
            teacher = self.teacher  # built when any rank has a pair: on all ranks in the same step
            if len(local_pairs) == 0:
                return torch.zeros(0, dtype=torch.float32, device=step.image.device)
            logits = teacher.logit(step.image, captions_all, local_pairs, image_ids=step.image_ids)
            self._remember(step.image_ids, captions_all, local_pairs, logits)  # each pair on one rank
            return logits

        return score_where_images_live(pairs, step.image.shape[0], score_local)

    def _remember(self, image_ids, captions_all, pairs, logits) -> None:
        if self._record is not None:
            self._record.add(image_ids[pairs[:, 0]], [captions_all[j] for j in pairs[:, 1].tolist()], logits)
