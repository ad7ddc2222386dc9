"""``model.distill``: which distillation loss, its knobs, and the teacher."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional, Tuple

from omegaconf import DictConfig, OmegaConf

from lavis_cprd.distill.registry import get_loss
from lavis_cprd.errors import suggest, unknown_keys

MINING_SCOPES = ("gathered", "local")
NORMALIZATIONS = ("contributing", "all")
# Measured on the embedded default's val split (docs/temperature/): 0.02, 0.05 and 0.1 all
# remove the collapse of "itc"; 0.1 led 0.05 by less than the seed spread, so 0.05 stays.
DEFAULT_DISTILL_TEMPERATURE = 0.05

CONACLIP_NODES = ("S_img", "S_txt", "T_img", "T_txt")
CONACLIP_LOSSES = ("infonce", "fd", "sd", "kl", "sym_sd", "sym_kl")

# ConaCLIP's recipe as we reconstruct it (the paper's ablation table was not readable offline;
# the only public encoding is a third-party "reproduce ConaCLIP" config, see docs): InfoNCE on
# the intra- and inter-modal teacher-student edges, SD on the intra-modal teacher-student and
# on every student-student edge, Sym-SD coupling the two intra-modal teacher-student edges,
# Sym-KL coupling the two inter-modal ones. The S_img-S_txt InfoNCE edge is the student's own
# ITC loss, always on, so it is not repeated here.
DEFAULT_CONACLIP_TERMS: List[Dict[str, Any]] = [
    {"loss": "infonce", "edge": "S_img-T_img"},
    {"loss": "infonce", "edge": "S_txt-T_txt"},
    {"loss": "infonce", "edge": "S_img-T_txt"},
    {"loss": "infonce", "edge": "S_txt-T_img"},
    {"loss": "sd", "edge": "S_img-T_img"},
    {"loss": "sd", "edge": "S_txt-T_txt"},
    {"loss": "sd", "edge": "S_img-S_img"},
    {"loss": "sd", "edge": "S_txt-S_txt"},
    {"loss": "sd", "edge": "S_img-S_txt"},
    {"loss": "sym_sd", "edge": "S_img-T_img", "mirror": "S_txt-T_txt"},
    {"loss": "sym_kl", "edge": "S_txt-T_img", "mirror": "S_img-T_txt", "temp": 0.5},
]


@dataclass
class ConaclipTerm:
    """One weighted edge loss of ConaCLIP's graph (``model.distill.conaclip`` entries).

    ``edge``/``mirror``: ``"A-B"`` over {S_img, S_txt, T_img, T_txt}; ``mirror`` is read by the
    ``sym_*`` losses only and defaults to the edge read the other way (``B-A``).
    """

    loss: str
    edge: Tuple[str, str]
    mirror: Optional[Tuple[str, str]] = None
    weight: float = 1.0
    temp: float = 0.07

    @classmethod
    def parse(cls, raw: Dict[str, Any], where: str) -> "ConaclipTerm":
        known = {"loss", "edge", "mirror", "weight", "temp"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(unknown_keys(where, unknown, sorted(known)))
        loss = raw.get("loss")
        if loss not in CONACLIP_LOSSES:
            raise ValueError(f"{where}.loss={loss!r} is not one of {list(CONACLIP_LOSSES)}")
        edge = _parse_edge(raw.get("edge"), f"{where}.edge")
        mirror = _parse_edge(raw["mirror"], f"{where}.mirror") if raw.get("mirror") else (edge[1], edge[0])
        numbers = {}
        for key, default in (("weight", 1.0), ("temp", 0.07)):
            value = raw.get(key, default)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{where}.{key} must be a number, got {value!r}")
            numbers[key] = float(value)
        term = cls(loss, edge, mirror if loss.startswith("sym") else None, numbers["weight"], numbers["temp"])
        (a, b) = edge
        if loss == "infonce" and a == b:
            raise ValueError(f"{where}: infonce needs two different nodes, got edge {a}-{b}")
        if loss == "fd" and not (a[2:] == b[2:] and {a[0], b[0]} == {"S", "T"}):
            raise ValueError(f"{where}: fd compares features of one modality across teacher and student "
                             f"(S_img-T_img or S_txt-T_txt), got {a}-{b}")
        if term.weight < 0:
            raise ValueError(f"{where}.weight must be >= 0, got {term.weight}")
        if term.temp <= 0:
            raise ValueError(f"{where}.temp must be > 0, got {term.temp}")
        return term


def parse_temperature(value) -> Any:
    """``model.distill.temperature``: ``"itc"`` or a positive float."""
    if isinstance(value, str) and value.strip().lower() == "itc":
        return "itc"
    try:
        t = float(value)
    except (TypeError, ValueError):
        t = None
    if isinstance(value, bool) or t is None or not t > 0 or t != t or t == float("inf"):
        raise ValueError(f"model.distill.temperature must be a positive number or 'itc', got {value!r}")
    return t


def _number(key: str, value, low=None, high=None, integer: bool = False, open_low: bool = False):
    """``model.distill.<key>`` as an int or float in its range, or an error saying what it accepts."""
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise ValueError(f"model.distill.{key} must be {kind}, got {value!r}")
    value = int(value) if integer else float(value)
    if value != value or (low is not None and (value <= low if open_low else value < low)) or (
            high is not None and value > high):
        bounds = f"{'(' if open_low else '['}{low}, {'inf)' if high is None else f'{high}]'}"
        raise ValueError(f"model.distill.{key}={value!r} is out of range: it must be in {bounds}")
    return value


def _mapping(value, where: str) -> Dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a mapping (loss, edge, ...), got {value!r}")
    return dict(value)


def _parse_edge(value, where: str) -> Tuple[str, str]:
    nodes = tuple(str(value).split("-")) if value is not None else ()
    if len(nodes) != 2 or any(n not in CONACLIP_NODES for n in nodes):
        raise ValueError(f"{where}={value!r} is not an edge 'A-B' of nodes {list(CONACLIP_NODES)}")
    if not any(n.startswith("S") for n in nodes):
        raise ValueError(f"{where}={value!r} joins two teacher nodes: nothing to train")
    return nodes  # type: ignore[return-value]


# The numeric fields of model.distill: (low, high, integer, open_low), inclusive bounds unless
# open_low. valid_threshold is a match probability: above 1 no negative is ever valid (the
# CPRD term is 0 on every step).
RANGES: Dict[str, Tuple[Any, Any, bool, bool]] = {
    "weight": (0.0, None, False, False),
    "num_hard_negatives": (1, None, True, False),
    "valid_threshold": (0.0, 1.0, False, False),
    "start_epoch": (0, None, True, False),
    "teacher_temp": (0.0, None, False, True),
}


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
    # Temperature of the student logits x = s / tau_d in every cross-encoder loss (cprd,
    # listmle_full, kl, loopitr, margin_mse): a positive float (fixed), or "itc" (the shared
    # learnable ITC temperature, the formula as first written). ITC drives its temperature to
    # ~0.003 on a student trained from scratch; at that temperature the ranking term overpowers
    # ITC and collapses the embedding, even with a perfect teacher (method.md).
    temperature: Any = DEFAULT_DISTILL_TEMPERATURE
    # With temperature "itc": whether the distillation term leaves the learnable temperature
    # alone (x = s / sg(tau)). When the student cannot yet reproduce the teacher's order, the
    # ranking loss is lowest with flat logits, so it pulls tau up; that weakens ITC.
    detach_temperature: bool = False
    # What the per-query losses are averaged over: "contributing" queries (those with a term,
    # e.g. a valid hard negative for CPRD: the paper's mean) or "all" queries of the batch. With
    # few contributing queries the first gives each of them a large effective weight.
    normalize: str = "contributing"
    # Temperature T_t of the teacher logits in the KL-style losses (kl, loopitr).
    teacher_temp: float = 1.0
    # Where negatives are mined: the batch gathered over all ranks, or this rank's own part.
    mining_scope: str = "gathered"
    # ConaCLIP's graph: one entry per weighted edge loss (see ConaclipTerm).
    conaclip: List[Any] = field(default_factory=lambda: [dict(t) for t in DEFAULT_CONACLIP_TERMS])
    teacher: Dict[str, Any] = field(default_factory=dict)
    # A folder written by `lavis-cprd cache-teacher`: cached teacher logits are used for the
    # pairs it holds, the teacher scores only the rest (cross-encoder losses).
    teacher_cache: Optional[str] = None
    # A folder this run writes every teacher logit it computes to, in teacher_cache's format,
    # at the end of its last epoch: a later run that draws the same batches (same seed, data and
    # batch size) with the same teacher reads it as its teacher_cache and scores nothing twice.
    teacher_record: Optional[str] = None

    @classmethod
    def from_cfg(cls, cfg) -> "DistillConfig":
        if cfg is None:
            return cls()
        raw = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise ValueError(unknown_keys("model.distill", unknown, known))
        out = cls(**raw)
        out.validate()
        return out

    def validate(self) -> None:
        """Types and ranges of every field, each error naming ``model.distill.<key>`` and what it accepts."""
        get_loss(self.loss)  # fails listing the registered losses
        for key, bounds in RANGES.items():
            setattr(self, key, _number(key, getattr(self, key), *bounds))
        for key in ("drop_above_positive", "detach_temperature"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"model.distill.{key} must be true or false, got {getattr(self, key)!r}")
        for key, choices in (("mining_scope", MINING_SCOPES), ("normalize", NORMALIZATIONS)):
            if getattr(self, key) not in choices:
                raise ValueError(f"model.distill.{key}={getattr(self, key)!r} is not one of {list(choices)}"
                                 f"{suggest(getattr(self, key), choices)}")
        self.temperature = parse_temperature(self.temperature)
        if self.teacher is None:
            self.teacher = {}
        if not isinstance(self.teacher, dict):
            raise ValueError(f"model.distill.teacher must be a mapping (arch, checkpoint, ...), got {self.teacher!r}")
        if not isinstance(self.conaclip, (list, tuple)) or not self.conaclip:
            raise ValueError("model.distill.conaclip must be a non-empty list of edge terms")
        self.conaclip = [
            t if isinstance(t, ConaclipTerm) else ConaclipTerm.parse(_mapping(t, f"model.distill.conaclip[{i}]"),
                                                                     f"model.distill.conaclip[{i}]")
            for i, t in enumerate(self.conaclip)
        ]
        for key in ("teacher_cache", "teacher_record"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"model.distill.{key} must be a folder path or null, got {value!r}")
            if value and self.teacher_kind != "cross":
                raise ValueError(
                    f"model.distill.{key} holds cross-encoder scores; loss={self.loss!r} uses a dual-encoder "
                    f"teacher's embeddings: set {key}: null"
                )
        # The teacher's arch is checked against the registered adapters when the objective is
        # built (``distill.objective``): this module stays free of teacher imports.

    @property
    def teacher_kind(self) -> str:
        """``dual`` (ConaCLIP: the teacher embeds) or ``cross`` (the teacher scores pairs)."""
        return get_loss(self.loss).teacher or "cross"

    @property
    def uses_teacher_positive(self) -> bool:
        """Whether the loss reads the teacher's score of the positive pair (CPRD only to drop
        negatives scored above it, ListMLE never); otherwise those pairs are not scored."""
        return get_loss(self.loss).reads_positive(self)

    @property
    def needs_teacher(self) -> bool:
        return get_loss(self.loss).teacher is not None

    @property
    def candidates(self) -> str:
        """``hard`` (positive + K mined negatives) or ``all`` (positive + every negative)."""
        return get_loss(self.loss).candidates or "hard"
