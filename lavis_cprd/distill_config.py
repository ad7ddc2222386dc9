"""``model.distill``: which distillation loss, its knobs, and the teacher."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Dict

from omegaconf import DictConfig, OmegaConf

# Each loss and the candidates it reads per query: "hard" = the positive and the K mined hard
# negatives, "all" = the positive and every in-batch negative (method.md).
LOSS_CANDIDATES = {"cprd": "hard", "loopitr": "hard", "margin_mse": "hard", "kl": "all", "listmle_full": "all"}
DISTILL_LOSSES = ("none", *LOSS_CANDIDATES)
MINING_SCOPES = ("gathered", "local")


@dataclass
class DistillConfig:
    loss: str = "none"
    weight: float = 1.0
    num_hard_negatives: int = 8
    # Teacher match probability at or above which a mined negative counts as a valid hard
    # negative (method.md). 0.1 is a placeholder until tuned on a val split with a trained teacher.
    valid_threshold: float = 0.1
    drop_above_positive: bool = False
    # Epochs of ITC alone before distillation starts (0 = from the first step). A student
    # trained from scratch first needs embeddings whose hard negatives mean something: the
    # paper distils into pre-trained students.
    start_epoch: int = 0
    # Whether the distillation term leaves the learnable temperature alone (x = s / sg(tau)).
    # When the student cannot yet reproduce the teacher's order, the ranking loss is lowest
    # with flat logits, so it pulls tau up; that weakens ITC, which shares tau.
    detach_temperature: bool = False
    # Temperature T_t of the teacher logits in the KL-style losses (kl, loopitr).
    teacher_temp: float = 1.0
    # Where negatives are mined: the batch gathered over all ranks, or this rank's own part.
    mining_scope: str = "gathered"
    teacher: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_cfg(cls, cfg) -> "DistillConfig":
        if cfg is None:
            return cls()
        raw = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown key(s) model.distill.{unknown}; valid keys: {sorted(known)}")
        out = cls(**raw)
        out.validate()
        return out

    def validate(self) -> None:
        if self.loss not in DISTILL_LOSSES:
            raise ValueError(f"model.distill.loss={self.loss!r} is not one of {list(DISTILL_LOSSES)}")
        if int(self.num_hard_negatives) < 1:
            raise ValueError(f"model.distill.num_hard_negatives must be >= 1, got {self.num_hard_negatives}")
        self.num_hard_negatives = int(self.num_hard_negatives)
        if int(self.start_epoch) < 0:
            raise ValueError(f"model.distill.start_epoch must be >= 0, got {self.start_epoch}")
        self.start_epoch = int(self.start_epoch)
        if not isinstance(self.detach_temperature, bool):
            raise ValueError(f"model.distill.detach_temperature must be true or false, got {self.detach_temperature!r}")
        if float(self.teacher_temp) <= 0:
            raise ValueError(f"model.distill.teacher_temp must be > 0, got {self.teacher_temp}")
        self.teacher_temp = float(self.teacher_temp)
        if self.mining_scope not in MINING_SCOPES:
            raise ValueError(f"model.distill.mining_scope={self.mining_scope!r} is not one of {list(MINING_SCOPES)}")
        self.weight = float(self.weight)
        self.valid_threshold = float(self.valid_threshold)
        if self.loss != "none":
            from lavis_cprd.teachers import teacher_class

            teacher_class(self.teacher.get("arch", "blip_image_text_matching"))  # fails early, listing choices

    @property
    def needs_teacher(self) -> bool:
        return self.loss != "none"

    @property
    def candidates(self) -> str:
        """``hard`` (positive + K mined negatives) or ``all`` (positive + every negative)."""
        return LOSS_CANDIDATES.get(self.loss, "hard")
