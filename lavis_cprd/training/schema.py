"""Start-up validation of a whole experiment config, as LAVIS's ``Config`` merged it: every key
under ``run``, ``model`` (lavis-cprd's models) and ``datasets.<name>`` must be known (LAVIS's
own keys included), of the right type and in range. Every problem is collected and raised at
once (:class:`ConfigError`), each naming its key, with "did you mean" suggestions from the
keys valid at that place, or the valid range or choices.

:func:`validate_config` runs in every lavis-cprd entry point (``launch.load_config``) and in
the ``cprd_retrieval`` task's ``setup_task``, so LAVIS's own ``train.py``/``evaluate.py``
check too. ``model.distill`` is checked by its own class (``DistillConfig``), the generator
of ``cprd_shapes`` by ``ShapesSpec``: their rules live with them, this module reports them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from lavis.common.registry import registry
from omegaconf import DictConfig, OmegaConf

from lavis_cprd.errors import ConfigError, suggest, unknown_key

Problem = str


# ------------------------------------------------------------------------- keys
Choices = Union[Sequence[Any], Callable[[], Sequence[Any]]]


@dataclass(frozen=True)
class Key:
    """What one config key may hold. ``kind``: ``int``, ``float``, ``bool``, ``str``, ``list``,
    ``dict`` or ``None`` (anything). Numbers may have a range (``low``/``high``, inclusive unless
    ``open_low``); ``choices`` may be a callable (e.g. a registry's names, read when checked)."""

    kind: Optional[type] = None
    low: Optional[float] = None
    high: Optional[float] = None
    open_low: bool = False
    choices: Optional[Choices] = None
    nullable: bool = False
    keys: Optional[Mapping[str, "Key"]] = None  # a mapping with exactly these keys
    values: Optional["Key"] = None  # a mapping with free keys, each value a ``values``
    check: Optional[Callable[[Any, str], List[Problem]]] = None  # a custom check (value, where)

    @property
    def range_text(self) -> str:
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        return f"{'(' if self.open_low or self.low is None else '['}{low}, {high}{']' if self.high is not None else ')'}"


def num(low=None, high=None, integer=False, open_low=False, nullable=False) -> Key:
    return Key(int if integer else float, low, high, open_low, nullable=nullable)


def count(low: int = 1, nullable: bool = False) -> Key:
    """An integer of at least ``low``."""
    return num(low, integer=True, nullable=nullable)


FLAG, TEXT, ANY = Key(bool), Key(str), Key()
PATH = Key(str, nullable=True)  # a file or folder; null/empty = not set
FREE_MAP = Key(dict, nullable=True)
SPLITS = Key(list, check=lambda v, w: [f"{w} must be a list of split names, got {v!r}"]
             if not all(isinstance(s, str) for s in v) else [])


def choice(*values, nullable: bool = False) -> Key:
    return Key(None, choices=values, nullable=nullable)


def registered(mapping: str) -> Key:
    """A name registered in LAVIS's registry (``mapping``: e.g. ``task_name_mapping``)."""
    return Key(str, choices=lambda: sorted(registry.mapping[mapping]))


def _device(value, where) -> List[Problem]:
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", str(value)):
        return [f"{where}={value!r} is not a device: use auto, cpu, cuda or cuda:N"]
    return []


# ------------------------------------------------------------------------ schema
# ``run``: LAVIS's own keys (its runner validator's, plus those its runner and tasks read),
# then lavis-cprd's.
RUN: Dict[str, Key] = {
    # LAVIS (lavis.common.config.create_runner_config_validator, RunnerBase, tasks)
    "runner": registered("runner_name_mapping"),
    "task": registered("task_name_mapping"),
    "lr_sched": registered("lr_scheduler_name_mapping"),
    "train_dataset_ratios": FREE_MAP,
    "max_iters": num(1, nullable=True),
    "iters_per_inner_epoch": num(1, nullable=True),
    "max_epoch": count(1),
    "init_lr": num(0, open_low=True),
    "min_lr": num(0),
    "warmup_lr": num(),  # LAVIS: -1 starts the warm-up at init_lr
    "warmup_steps": count(0),
    "lr_decay_rate": num(0, nullable=True),
    "weight_decay": num(0),
    "beta2": num(0, 1, open_low=True),
    "batch_size_train": count(1),
    "batch_size_eval": count(1),
    "num_workers": count(0),
    "accum_grad_iters": count(1),
    "seed": num(integer=True),
    "output_dir": TEXT,
    "resume_ckpt_path": PATH,
    "evaluate": FLAG,
    "train_splits": SPLITS,
    "valid_splits": SPLITS,
    "test_splits": SPLITS,
    "device": Key(str, check=_device),
    "world_size": count(1),
    "dist_url": TEXT,
    "distributed": FLAG,
    "dist_backend": TEXT,
    "gpu": count(0),
    "rank": count(0),
    "use_dist_eval_sampler": FLAG,
    "amp": FLAG,
    "log_freq": count(1),
    "k_test": count(1),
    "max_len": count(1),
    "min_len": count(0),
    "num_beams": count(1),
    "num_ans_candidates": count(1),
    "inference_method": TEXT,
    "prompt": TEXT,
    "report_metric": FLAG,
    # read by LAVIS's other tasks (captioning, VQA, PNP-VQA project configs)
    **{k: ANY for k in ("block_num", "cap_max_length", "cap_min_length", "internal_bsz_fid", "num_captions",
                        "num_captions_fid", "num_patches", "repetition_penalty", "top_k", "top_p")},
    # lavis-cprd (training/runner.py, training/task.py, training/launch.py)
    "cache_root": PATH,
    "amp_dtype": choice("fp16", "bf16", "auto"),
    "adamw_impl": choice("fused", "foreach", "loop"),
    "skip_nonfinite_loss": FLAG,
    "dist_timeout_minutes": num(0, open_low=True),
    "group_batches_by": Key(str, nullable=True),
    "text_batch_size": count(1),
    "tensorboard": FLAG,
}

# The towers of BLIP-style models (towers.py): students, teachers and the teacher trainer.
TOWERS: Dict[str, Key] = {
    "vit_type": choice("base", "large", "custom"),
    "image_size": count(1),
    "vit_patch_size": count(1),
    "vit_width": count(1, nullable=True),
    "vit_depth": count(1, nullable=True),
    "vit_heads": count(1, nullable=True),
    "vit_grad_ckpt": FLAG,
    "vit_ckpt_layer": count(0),
    "vit_drop_path_rate": num(0, 1),
    "med_config_path": TEXT,
    "text_width": count(1, nullable=True),
    "text_depth": count(1, nullable=True),
    "text_heads": count(1, nullable=True),
    "text_intermediate": count(1, nullable=True),
    "text_dropout": num(0, 1, nullable=True),
    "text_fusion_layer": count(0, nullable=True),
    "text_pretrained": PATH,
    "vocab_size": count(1),
    "embed_dim": count(1),
    "max_txt_len": count(1),
    "tokenizer_path": PATH,
}

# What LAVIS's load_checkpoint_from_config and Config read of every model.
LAVIS_MODEL: Dict[str, Key] = {
    "arch": TEXT,
    "model_type": TEXT,  # checked against the class's types by LAVIS's Config (default_config_path)
    "load_finetuned": FLAG,
    "load_pretrained": FLAG,
    "pretrained": PATH,
    "finetuned": PATH,
}

# Model-config keys a teacher's ``model:`` may override: it is merged onto LAVIS's default
# config of the teacher's model, so every key LAVIS 1.0.2's default model configs hold (BLIP,
# ALBEF, BLIP-2, ...), the towers' explicit sizes, and CLIP's explicit ``vision_cfg``/``text_cfg``.
TEACHER_MODEL: Dict[str, Key] = {
    **{k: ANY for k in (
        "alpha", "drop_path_rate", "freeze_vit", "image_size", "len_tokenizer", "max_txt_len", "mlm_mask_prob",
        "momentum", "negative_all_rank", "num_classes", "num_query_token", "prompt", "queue_size", "temp",
        "use_distill", "use_grad_checkpoint", "vit_layer_norm_epsilon", "vit_model", "vit_precision",
        "cross_attention_freq", "vit_mlp_ratio", "vision_cfg", "text_cfg", "quick_gelu")},
    **LAVIS_MODEL, **TOWERS,
}


def _teacher_keys(kind: Optional[str] = None) -> Dict[str, Key]:
    """A teacher's keys; ``kind`` (``cross``/``dual``, the loss's) narrows the adapters."""
    from lavis_cprd.teachers import available_teachers
    from lavis_cprd.teachers.base import TEACHER_PRECISIONS

    return {
        "arch": Key(str, choices=lambda: available_teachers(kind)),
        "model_type": TEXT,  # checked by the adapter when the teacher is built, at start-up
        "checkpoint": PATH,
        "precision": choice(*TEACHER_PRECISIONS),
        "batch_size": count(1),
        "seed": num(integer=True),
        "model": Key(dict, nullable=True, keys=TEACHER_MODEL),
        "pretrained": Key(str, nullable=True),  # CLIP teachers: e.g. "openai"
        "annotations": PATH,  # shapes_oracle
        "eps": num(0, 1),  # shapes_oracle
    }


def _distill(value, where: str) -> List[Problem]:
    """``model.distill`` is checked by ``DistillConfig`` (its rules live there) and its
    ``teacher`` mapping here."""
    from lavis_cprd.distill.config import DistillConfig
    from lavis_cprd.distill.registry import list_losses, get_loss

    problems = []
    raw = dict(value)
    teacher = raw.get("teacher")
    loss = raw.get("loss", "none")
    kind = get_loss(loss).teacher if isinstance(loss, str) and loss in list_losses() else "?"
    if teacher is not None and kind is not None:  # a loss without a teacher never reads it
        problems += check_value(Key(dict, keys=_teacher_keys(None if kind == "?" else kind)), teacher, f"{where}.teacher")
    try:
        DistillConfig.from_cfg(raw)
    except (ValueError, TypeError) as e:
        problems.append(str(e))
    return problems


_COMPILE = Key(check=lambda v, w: [] if isinstance(v, (bool, dict)) or v is None
               else [f"{w} must be true, false or a mapping of torch.compile arguments, got {v!r}"])

STUDENT: Dict[str, Key] = {
    "temp": num(0, 0.5, open_low=True, nullable=True),
    "compile": _COMPILE,
    "distill": Key(dict, nullable=True, check=_distill),
}

MODELS: Dict[str, Dict[str, Key]] = {
    "cprd_dual_encoder": {**LAVIS_MODEL, **TOWERS, **STUDENT},
    "cprd_clip_dual_encoder": {
        **LAVIS_MODEL, **STUDENT, "tokenizer_path": PATH, "embed_dim": count(1),
        "clip": Key(dict, nullable=True, keys={"model_type": TEXT, "pretrained": Key(str, nullable=True), "model": FREE_MAP}),
    },
    "cprd_blip_retrieval": {
        **LAVIS_MODEL, **TOWERS,
        "queue_size": count(0), "alpha": num(0, 1), "momentum": num(0, 1), "negative_all_rank": FLAG,
        "itm_negatives": choice("in_batch", "verified"), "itm_targets": choice("hard", "graded"),
        "lookalike_weight": num(0),
    },
}

# The keys LAVIS 1.0.2's processors read (their from_config), by registry name; a processor
# not listed here (a plugin's) may read keys of its own, and only its name is checked.
PROCESSOR_KEYS: Dict[str, Key] = {
    "name": TEXT, "image_size": count(1), "min_scale": num(0, 1, open_low=True), "max_scale": num(0, 1, open_low=True),
    "max_words": count(1), "prompt": TEXT, "mean": Key(list, nullable=True), "std": Key(list, nullable=True),
    "n_frms": count(1),
}
_IMAGE_EVAL = ("image_size", "mean", "std")
_IMAGE_TRAIN = (*_IMAGE_EVAL, "min_scale", "max_scale")
PROCESSORS: Dict[str, Tuple[str, ...]] = {
    **{name: _IMAGE_TRAIN for name in ("blip_image_train", "blip2_image_train", "clip_image_train")},
    **{name: _IMAGE_EVAL for name in ("blip_image_eval", "clip_image_eval")},
    "alpro_video_train": (*_IMAGE_TRAIN, "n_frms"), "alpro_video_eval": (*_IMAGE_EVAL, "n_frms"),
    "blip_caption": ("prompt", "max_words"), "blip_question": ("max_words",),
}


def _processor(value, where: str) -> List[Problem]:
    value = dict(value)
    name = value.get("name")
    names = sorted(registry.mapping["processor_name_mapping"])
    known = isinstance(name, str) and name in names
    problems = [] if known else [
        f"{where}.name={name!r} is not a registered processor{suggest(name, names)}; choose from {names}"]
    if known and name not in PROCESSORS:
        return problems  # another processor's keys are its own
    allowed = ("name", *PROCESSORS[name]) if known else tuple(PROCESSOR_KEYS)
    return problems + check_mapping({k: PROCESSOR_KEYS[k] for k in allowed}, value, where)


PROCESSOR = Key(dict, nullable=True, values=Key(dict, nullable=True, check=_processor))


# Every dataset (LAVIS's BaseDatasetBuilder reads these), then lavis-cprd's own.
DATASET: Dict[str, Key] = {
    "data_type": choice("images", "videos", "features"),
    "type": TEXT,
    "dataset_card": PATH,
    "build_info": Key(dict, keys={
        "annotations": Key(dict, values=Key(dict, keys={
            "url": Key(nullable=True), "storage": Key(nullable=True), "md5": Key(nullable=True)})),
        "images": Key(dict, nullable=True, keys={"storage": PATH}),
        "storage": PATH, "instance_id_key": TEXT, "splits": Key(list, nullable=True),
        "videos": Key(dict, nullable=True, keys={"storage": PATH}),
        "features": Key(dict, nullable=True, keys={"storage": PATH}),
    }),
    "vis_processor": PROCESSOR,
    "text_processor": PROCESSOR,
    # lavis-cprd: bad-data checks (datasets/checks.py) and COCO's ECCV Caption positives
    "skip_bad": FLAG,
    "check_images": FLAG,
    "coco_captions": PATH,
}


def _generator(value, where: str) -> List[Problem]:
    from lavis_cprd.datasets.shapes import ShapesSpec

    try:
        ShapesSpec.from_config(value)
    except (ValueError, TypeError) as e:
        return [str(e)]
    return []


DATASETS: Dict[str, Dict[str, Key]] = {
    "cprd_shapes": {
        **DATASET,
        "generator": Key(dict, nullable=True, check=_generator),
        "lookalike_negatives": FLAG,
        "verified_negatives": FLAG,
    },
}

TOP_LEVEL = ("run", "model", "datasets", "preprocess")


# ------------------------------------------------------------------------- check
def _kind_ok(kind: Optional[type], value) -> bool:
    if kind is None:
        return True
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def check_value(key: Key, value, where: str) -> List[Problem]:
    """The problems of ``value`` at ``where`` (a dotted path) against ``key``."""
    if value is None or (value == "" and key.nullable):
        return [] if key.nullable or key.kind is None else [f"{where} must be set (a {key.kind.__name__}), got null"]
    if key.kind is float and isinstance(value, str):  # LAVIS casts with float(): "5e-4" works
        try:
            value = float(value)
        except ValueError:
            pass
    if not _kind_ok(key.kind, value):
        return [f"{where} must be a {'number' if key.kind is float else key.kind.__name__}, got {value!r}"]
    if key.low is not None or key.high is not None:
        low_bad = key.low is not None and (value <= key.low if key.open_low else value < key.low)
        if low_bad or (key.high is not None and value > key.high):
            return [f"{where}={value!r} is out of range: it must be in {key.range_text}"]
    if key.choices is not None:
        choices = list(key.choices() if callable(key.choices) else key.choices)
        if value not in choices:
            return [f"{where}={value!r} is not one of {choices}{suggest(value, [str(c) for c in choices])}"]
    problems: List[Problem] = []
    if key.keys is not None:
        problems += check_mapping(key.keys, value, where)
    if key.values is not None:
        for name, item in value.items():
            problems += check_value(key.values, item, f"{where}.{name}")
    if key.check is not None and not problems:
        problems += key.check(value, where)
    return problems


def check_mapping(schema: Mapping[str, Key], value: Mapping, where: str) -> List[Problem]:
    problems = [unknown_key(where, k, list(schema)) for k in value if k not in schema]
    for name, key in schema.items():
        if name in value:
            problems += check_value(key, value[name], f"{where}.{name}")
    return problems


def name_problems(raw: Dict[str, Any]) -> List[Problem]:
    """What LAVIS's ``Config`` asserts on before anything can be validated: the top-level
    sections, a registered ``model.arch`` and ``model_type``, registered dataset names (it
    fails there with a bare ``AssertionError`` or ``AttributeError``)."""
    problems = [f"unknown top-level key {k!r}{suggest(k, TOP_LEVEL)}; valid keys: {list(TOP_LEVEL)}"
                for k in raw if k not in TOP_LEVEL]
    problems += [f"the config has no {k!r} section" for k in ("model", "datasets", "run") if not raw.get(k)]
    model = raw.get("model") or {}
    models = sorted(registry.mapping["model_name_mapping"])
    arch = model.get("arch")
    if model and (not isinstance(arch, str) or arch not in models):
        problems.append(f"model.arch={arch!r} is not a registered model{suggest(arch, models)}; choose from {models}")
    elif model and "model_type" in model:
        types = sorted(getattr(registry.get_model_class(arch), "PRETRAINED_MODEL_CONFIG_DICT", {}))
        model_type = model["model_type"]
        if types and (not isinstance(model_type, str) or model_type not in types):
            problems.append(f"model.model_type={model_type!r} is not one of {types} for {arch}{suggest(model_type, types)}")
    builders = sorted(registry.mapping["builder_name_mapping"])
    problems += [f"datasets.{name}: no dataset builder {name!r} is registered{suggest(name, builders)}; "
                 f"choose from {builders}" for name in (raw.get("datasets") or {}) if name not in builders]
    return problems


def config_problems(config: Union[DictConfig, Dict[str, Any]]) -> List[Problem]:
    """Every problem of a merged experiment config (``Config.config``), or []."""
    raw = OmegaConf.to_container(config, resolve=True) if isinstance(config, DictConfig) else dict(config)
    problems = name_problems(raw)
    run = raw.get("run") or {}
    problems += check_mapping(RUN, run, "run")
    model = raw.get("model") or {}
    arch = model.get("arch")
    schema = MODELS.get(arch) if isinstance(arch, str) else None
    if schema is not None:  # LAVIS's own models read keys of their own
        problems += check_mapping(schema, model, "model")
    elif not isinstance(arch, str) or arch not in registry.mapping["model_name_mapping"]:  # typos, at least
        every = {k for keys in MODELS.values() for k in keys}
        problems += [unknown_key("model", k, sorted(every)) for k in model if k not in every]
    for name, dataset in (raw.get("datasets") or {}).items():
        problems += check_mapping(DATASETS.get(name, DATASET), dataset or {}, f"datasets.{name}")
    problems += _cross_checks(run, model)
    return problems


def _cross_checks(run: Dict[str, Any], model: Dict[str, Any]) -> List[Problem]:
    distill = model.get("distill") or {}
    if not isinstance(distill, dict):
        return []
    start, epochs, loss = distill.get("start_epoch", 0), run.get("max_epoch"), distill.get("loss", "none")
    if loss != "none" and _kind_ok(int, start) and _kind_ok(int, epochs) and 1 <= epochs <= start:
        return [f"model.distill.start_epoch={start} is out of range: with run.max_epoch={epochs} distillation would "
                f"never start; it must be in [0, {epochs - 1}]"]
    return []


def key_at(path: str, arch: str = "cprd_dual_encoder") -> Optional[Key]:
    """The :class:`Key` that checks the dotted ``path`` (``run.init_lr``,
    ``datasets.cprd_shapes.build_info.images.storage``, ...), or None where a key's own class
    checks it (``model.distill`` but its ``teacher``, a ``generator``) or nothing does."""
    parts = path.split(".")
    if parts[0] == "run":
        node: Mapping[str, Key] = RUN
    elif parts[0] == "model":
        node = MODELS.get(arch, {})
    elif parts[0] == "datasets" and len(parts) > 2:
        node, parts = DATASETS.get(parts[1], DATASET), parts[1:]
    else:
        return None
    if parts[:2] == ["model", "distill"] and len(parts) == 3:
        from lavis_cprd.distill.config import RANGES

        if parts[2] not in RANGES:
            return None
        low, high, integer, open_low = RANGES[parts[2]]
        return num(low, high, integer=integer, open_low=open_low)
    key = None
    for i, part in enumerate(parts[1:]):
        if parts[i] == "distill" and part == "teacher":
            key = Key(dict, keys=_teacher_keys())
        elif key is not None and key.values is not None:
            key = key.values
        else:
            key = node.get(part) if node is not None else None
        if key is None:
            return None
        node = key.keys if key.keys is not None else PROCESSOR_KEYS if key.check is _processor else None
    return key


def validate_config(config, source: str = "config") -> None:
    """Raise :class:`ConfigError` listing every problem of a merged experiment config."""
    problems = config_problems(config)
    if problems:
        raise ConfigError(problems, source)


DEFAULT_RUNNER = "cprd_runner"


def prepare_config(cfg, source: str = "config") -> None:
    """What every entry point does to LAVIS's merged ``Config`` before anything is built (ours
    in ``launch.load_config``; LAVIS's train.py/evaluate.py through ``cprd_retrieval``'s
    ``setup_task``): fill in what LAVIS 1.0.2 gets wrong off Salesforce's machines, then
    :func:`validate_config`. Idempotent.

    - ``run.output_dir``: LAVIS joins a relative one onto its own package folder; users mean
      their working directory.
    - ``run.runner``: ``cprd_runner`` unless set (LAVIS's default runner needs CUDA).
    - ``run.device: auto``: CUDA when present, else CPU (LAVIS's runner takes a device name).
    - LAVIS's cache root (its default is Salesforce's ``/export/home``): ``run.cache_root``,
      else ``$LAVIS_CACHE_ROOT``, else ``~/.cache/lavis``.
    """
    import os

    from lavis_cprd.distributed import resolve_device
    from lavis_cprd.training import lavis_patches

    validate_config(cfg.config, source)
    run = cfg.run_cfg
    run.output_dir = os.path.abspath(os.path.expanduser(run.get("output_dir", "output")))
    run.runner = run.get("runner", None) or DEFAULT_RUNNER
    if str(run.get("device", "auto")) == "auto":
        run.device = str(resolve_device("auto"))
    lavis_patches.set_cache_root(run.get("cache_root", None) or os.environ.get("LAVIS_CACHE_ROOT") or "~/.cache/lavis")
