"""``model.distill``: which distillation loss, its knobs, and the teacher. Its keys are
:data:`DISTILL_KEYS` (:mod:`lavis_cprd.config_schema`), the one table of their types and
ranges: ``training/schema.py`` checks a whole config with it (adding the teacher's keys),
:class:`DistillConfig` checks and reads ``model.distill`` with it.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional, Tuple

from omegaconf import DictConfig, OmegaConf

from lavis_cprd.config_schema import FLAG, Key, check_value, count, num, read
from lavis_cprd.distill.registry import get_loss, list_losses

WHERE = "model.distill"

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


def _problems(problems: List[str]) -> None:
    if problems:
        raise ValueError("; ".join(problems))


def _nodes(value) -> Tuple[str, ...]:
    return tuple(str(value).split("-")) if value is not None else ()


def _edge(value, where: str) -> List[str]:
    """An edge ``"A-B"`` of ConaCLIP's graph, one end at least a student node."""
    nodes = _nodes(value)
    if len(nodes) != 2 or any(n not in CONACLIP_NODES for n in nodes):
        return [f"{where}={value!r} is not an edge 'A-B' of nodes {list(CONACLIP_NODES)}"]
    if not any(n.startswith("S") for n in nodes):
        return [f"{where}={value!r} joins two teacher nodes: nothing to train"]
    return []


def _term_rules(raw: Dict[str, Any], where: str) -> List[str]:
    a, b = _nodes(raw["edge"])
    if raw["loss"] == "infonce" and a == b:
        return [f"{where}: infonce needs two different nodes, got edge {a}-{b}"]
    if raw["loss"] == "fd" and not (a[2:] == b[2:] and {a[0], b[0]} == {"S", "T"}):
        return [f"{where}: fd compares features of one modality across teacher and student "
                f"(S_img-T_img or S_txt-T_txt), got {a}-{b}"]
    return []


# One entry of model.distill.conaclip: ``edge``/``mirror`` are ``"A-B"`` over {S_img, S_txt,
# T_img, T_txt}; ``mirror`` is read by the ``sym_*`` losses only.
CONACLIP_TERM = Key(dict, what="a mapping (loss, edge, ...)", keys={
    "loss": Key(str, choices=CONACLIP_LOSSES, required=True),
    "edge": Key(check=_edge, required=True),
    "mirror": Key(nullable=True, check=_edge),
    "weight": num(0, text=False),
    "temp": num(0, open_low=True, text=False),
}, check=_term_rules)


@dataclass
class ConaclipTerm:
    """One weighted edge loss of ConaCLIP's graph (``model.distill.conaclip`` entries, checked
    by :data:`CONACLIP_TERM`); ``mirror`` defaults to the edge read the other way (``B-A``)."""

    loss: str
    edge: Tuple[str, str]
    mirror: Optional[Tuple[str, str]] = None
    weight: float = 1.0
    temp: float = 0.07

    @classmethod
    def parse(cls, raw: Dict[str, Any], where: str) -> "ConaclipTerm":
        _problems(check_value(CONACLIP_TERM, raw, where))
        return cls.read(raw)

    @classmethod
    def read(cls, raw: Dict[str, Any]) -> "ConaclipTerm":
        """A checked entry as a term."""
        edge = _nodes(raw["edge"])
        mirror = _nodes(raw["mirror"]) if raw.get("mirror") else (edge[1], edge[0])
        return cls(raw["loss"], edge, mirror if raw["loss"].startswith("sym") else None,  # type: ignore[arg-type]
                   float(raw.get("weight", cls.weight)), float(raw.get("temp", cls.temp)))


def read_temperature(value) -> Any:
    """``model.distill.temperature``: ``"itc"`` or a positive finite float; None if neither."""
    if isinstance(value, str) and value.strip().lower() == "itc":
        return "itc"
    try:
        t = float(value)
    except (TypeError, ValueError):
        return None
    return None if isinstance(value, bool) or not 0 < t < float("inf") else t


def _temperature(value, where: str) -> List[str]:
    if read_temperature(value) is None:
        return [f"{where} must be a positive number or 'itc', got {value!r}"]
    return []


def _terms(value, where: str) -> List[str]:
    if not isinstance(value, (list, tuple)) or not value:
        return [f"{where} must be a non-empty list of edge terms"]
    return [p for i, t in enumerate(value) if not isinstance(t, ConaclipTerm)
            for p in check_value(CONACLIP_TERM, t, f"{where}[{i}]")]


def _mapping(value, where: str) -> List[str]:
    """The teacher: a mapping (its keys are checked with the loss's, ``training/schema.py``) or null."""
    if value is None or isinstance(value, dict):
        return []
    return [f"{where} must be a mapping (arch, checkpoint, ...), got {value!r}"]


def _teacher_kind(loss: str) -> str:
    return get_loss(loss).teacher or "cross"


def _distill_rules(raw: Dict[str, Any], where: str) -> List[str]:
    """What one key's value allows of another's: a teacher cache holds a cross-encoder's
    scores; only the learnable temperature (``itc``) can be detached."""
    problems = []
    temperature = read_temperature(raw.get("temperature", DEFAULT_DISTILL_TEMPERATURE))
    if raw.get("detach_temperature") is True and temperature is not None and temperature != "itc":
        problems.append(f"{where}.detach_temperature: true acts only with temperature: itc; the temperature is "
                        f"{temperature!r}, a fixed number with no gradient to detach: remove the key")
    loss = raw.get("loss", "none")
    if _teacher_kind(loss) == "cross":
        return problems
    return problems + [f"{where}.{key} holds cross-encoder scores; loss={loss!r} uses a dual-encoder teacher's "
                       f"embeddings: set {key}: null" for key in ("teacher_cache", "teacher_record") if raw.get(key)]


# Every key of model.distill (the fields of DistillConfig, which say what each does); its
# numbers are never read from text. valid_threshold is a match probability: above 1 no negative
# is ever valid (the CPRD term is 0 on every step). The teacher's own keys depend on the loss:
# training/schema.py adds them.
FOLDER = Key(str, nullable=True, what="a folder path or null")
DISTILL_KEYS: Dict[str, Key] = {
    "loss": Key(str, choices=list_losses),
    "weight": num(0, text=False),
    "num_hard_negatives": count(1),  # K; that a batch and the training split can feed K: datasets/split_sizes.py
    "valid_threshold": num(0, 1, text=False),
    "drop_above_positive": FLAG,
    "start_epoch": count(0),
    "temperature": Key(check=_temperature),
    "detach_temperature": FLAG,
    "normalize": Key(str, choices=NORMALIZATIONS),
    "teacher_temp": num(0, open_low=True, text=False),
    "mining_scope": Key(str, choices=MINING_SCOPES),
    "conaclip": Key(check=_terms),
    "teacher": Key(check=_mapping),
    "teacher_cache": FOLDER,
    "teacher_record": FOLDER,
}
DISTILL = Key(dict, nullable=True, keys=DISTILL_KEYS, check=_distill_rules)


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
        """``model.distill`` checked against :data:`DISTILL` (every problem, each naming its key)."""
        if cfg is None:
            return cls()
        raw = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
        _problems(check_value(DISTILL, raw, WHERE))
        return cls(**raw)._read()

    def validate(self) -> None:
        """This config's fields checked against :data:`DISTILL`, and read."""
        _problems(check_value(DISTILL, {f.name: getattr(self, f.name) for f in fields(self)}, WHERE))
        self._read()

    def _read(self) -> "DistillConfig":
        # The teacher's arch is checked against the registered adapters when the objective is
        # built (``distill.objective``): this module stays free of teacher imports.
        for name, key in DISTILL_KEYS.items():
            setattr(self, name, read(key, getattr(self, name)))
        self.temperature = read_temperature(self.temperature)
        self.teacher = self.teacher or {}
        self.conaclip = [t if isinstance(t, ConaclipTerm) else ConaclipTerm.read(t) for t in self.conaclip]
        return self

    @property
    def teacher_kind(self) -> str:
        """``dual`` (ConaCLIP: the teacher embeds) or ``cross`` (the teacher scores pairs)."""
        return _teacher_kind(self.loss)

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
