"""What every student shares, whatever its towers: the learnable ITC temperature, the
distillation objective it holds (``distill.objective``), ``forward`` (ITC + the objective's
term), ``model.compile`` and dual-encoder retrieval (``compute_sim_matrix``).

A student family subclasses :class:`DistillingStudent`, builds its towers and then calls
``_init_student``; it provides ``tokenize``, ``encode_image`` and ``encode_text``.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from lavis.common.utils import is_url
from lavis.models.blip_models.blip import BlipBase
from torch import nn
from transformers.modeling_outputs import ModelOutput

from lavis_cprd import distributed
from lavis_cprd.distill.config import DistillConfig
from lavis_cprd.distill.objective import DistillObjective, Step
from lavis_cprd.distill.registry import get_loss
from lavis_cprd.losses import itc_loss, positive_mask
from lavis_cprd.models.model_types import NamedModelTypes
from lavis_cprd.models.retrieval import dual_encoder_sim_matrix
from lavis_cprd.teachers import FrozenTeacher


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


class DistillingStudent(NamedModelTypes, BlipBase):
    """A dual encoder trained with ITC plus the distillation objective of ``distill``."""

    # Methods ``model.compile`` replaces by compiled versions: pixels or token ids in, unit
    # embeddings out. Mining, the teacher and the losses stay eager (their pair counts vary
    # from step to step, and they are a small share of the step).
    compiled_methods: Tuple[str, ...] = ("encode_image", "encode_text")

    def _init_student(self, embed_dim: int, temp: float, distill: Optional[DistillConfig], tokenizer_path) -> None:
        """After the towers: learnable temperature, the objective that the registry entry of
        ``distill.loss`` names, and the modules that objective asks the student to own
        (ConaCLIP's maps into the teacher's space; registered last, so checkpoint keys keep
        their order)."""
        self.embed_dim = int(embed_dim)
        self.temp = nn.Parameter(temp * torch.ones([]))
        self.distill = distill or DistillConfig()
        self.tokenizer_path = tokenizer_path
        self.objective: DistillObjective = get_loss(self.distill.loss).objective(self.distill, tokenizer_path)
        self.epoch = 0  # set by the task each training epoch (distill.start_epoch)
        modules = self.objective.student_modules(self.embed_dim)
        for name, module in modules.items():
            self.add_module(name, module)
        self.objective_module_names: Tuple[str, ...] = tuple(modules)

    # ------------------------------------------------------------------ encoders
    def encode_captions(self, captions, device) -> torch.Tensor:
        """Unit text embeddings of raw captions (this family's own tokenizer)."""
        return self.encode_text(self.tokenize(captions, device))

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
        """The objective's frozen teacher (a cross-encoder; a dual encoder for ConaCLIP), built
        on first use (evaluation never builds it)."""
        return self.objective.teacher

    @teacher.setter
    def teacher(self, teacher: FrozenTeacher) -> None:
        self.objective.teacher = teacher

    def save_teacher_record(self) -> None:
        self.objective.save_teacher_record()

    # ------------------------------------------------------------------ training
    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def distilling(self) -> bool:
        """Whether this epoch's loss includes the distillation term."""
        return self.objective.active(self.epoch)

    @property
    def distill_temperature(self):
        """``tau_d`` of the student logits ``x = s / tau_d`` in the cross-encoder losses:
        ``distill.temperature`` when fixed; with ``itc`` the learnable ITC temperature
        (detached when ``distill.detach_temperature``)."""
        cfg = self.distill
        if cfg.temperature == "itc":
            return self.temp.detach() if cfg.detach_temperature else self.temp
        return float(cfg.temperature)

    def forward(self, samples) -> CprdOutput:
        image, captions, image_ids = samples["image"], samples["text_input"], samples["image_id"]
        image_ids = image_ids.to(image.device).view(-1)
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)

        image_feat = self.encode_image(image)
        text_feat = self.encode_captions(captions, image.device)

        # Candidates come from the batch gathered over all ranks; queries stay local.
        image_feat_all = distributed.gather_with_grad(image_feat)
        text_feat_all = distributed.gather_with_grad(text_feat)
        image_ids_all = distributed.gather_no_grad(image_ids)
        sim_i2t = image_feat @ text_feat_all.t()
        sim_t2i = text_feat @ image_feat_all.t()
        pos = positive_mask(image_ids, image_ids_all)
        loss_itc = itc_loss(sim_i2t / self.temp, sim_t2i / self.temp, pos, pos)

        if not self.distilling:
            return CprdOutput(loss=loss_itc, loss_itc=loss_itc)
        step = Step(image, captions, image_ids, image_ids_all, image_feat, text_feat, sim_i2t, sim_t2i,
                    temperature=self.distill_temperature,
                    modules={name: getattr(self, name) for name in self.objective_module_names})
        result = self.objective.loss(step)
        return CprdOutput(
            loss=loss_itc + self.distill.weight * result.loss,
            loss_itc=loss_itc,
            loss_distill=result.loss,
            valid_negatives=result.valid_negatives,
            teacher_cache_hit_rate=result.cache_hit_rate,
            contributing_queries=result.contributing_share,
        )

    # ---------------------------------------------------------------- retrieval
    @torch.no_grad()
    def compute_sim_matrix(self, data_loader, task_cfg=None) -> Tuple[np.ndarray, np.ndarray]:
        """Pure dual-encoder retrieval: encode all texts and images, one matrix product.

        Returns LAVIS's pair ``(scores_i2t [n_img, n_txt], scores_t2i [n_txt, n_img])``.
        """
        return dual_encoder_sim_matrix(self, data_loader, int((task_cfg or {}).get("text_batch_size", 256)))


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


def build_teacher_now(model, device: torch.device) -> None:
    """Build the student's teacher before the first epoch, whatever ``distill.start_epoch``:
    a missing or unreadable checkpoint, an unknown type or precision fail at start-up, not
    when distillation starts (the objective would build it then). With a ``teacher_cache``
    the teacher scores only the pairs the cache lacks (often none), so it stays lazy; its
    checkpoint file is checked, and the cache is loaded here: every file is verified against
    the checksum its manifest recorded, and the teacher that scored it must be the configured
    one on the training ``device`` (arch, checkpoint bytes, precision as resolved there)."""
    teacher = model.distill.teacher
    model.objective.device = device  # teacher precision "auto" resolves here for a recorded cache's identity
    if model.distill.teacher_cache:
        path = teacher.get("checkpoint")
        if path and not is_url(str(path)) and not os.path.isfile(path):
            raise FileNotFoundError(f"model.distill.teacher.checkpoint={path!r} does not exist")
        model.objective.verify_teacher_cache(device)
        return
    try:
        model.teacher  # noqa: B018  (the objective builds it on first access)
    except (ValueError, OSError, RuntimeError) as e:  # same type where it can be, the teacher named
        named = {k: teacher.get(k) for k in ("arch", "checkpoint", "precision")}
        message = f"the teacher (model.distill.teacher: {named}) could not be built: {e}"
        try:
            wrapped = type(e)(message)
        except TypeError:  # an exception whose constructor takes other arguments
            wrapped = RuntimeError(message)
        raise wrapped from e
