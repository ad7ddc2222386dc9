"""The tables of every key of an experiment config, as LAVIS's ``Config`` merged it: under
``run``, ``model`` (lavis-cprd's models) and ``datasets.<name>`` every key must be known
(LAVIS's own keys included), of the right type and in range. :data:`CONFIG` is the tree, read
by :mod:`lavis_cprd.config_schema` (the checking engine) and ``training/validation.py`` (a
whole config, every problem at once). ``model.distill``'s keys are ``distill/config.py``'s
(:data:`DISTILL_KEYS`), the ``cprd_shapes`` generator's ``ShapesSpec``'s: they live with them.
"""
from __future__ import annotations

import re
from dataclasses import replace
from typing import Dict, List, Mapping, Optional, Tuple

from lavis.common.registry import registry

from lavis_cprd.config_schema import ANY, FLAG, FREE_MAP, PATH, TEXT, Key, Problem, choice, count, num
from lavis_cprd.datasets.shapes import ShapesSpec
from lavis_cprd.distill.config import DISTILL, DISTILL_KEYS
from lavis_cprd.distill.registry import get_loss, list_losses
from lavis_cprd.errors import suggest
from lavis_cprd.teachers import available_teachers
from lavis_cprd.teachers.base import TEACHER_PRECISIONS

SPLITS = Key(list, check=lambda v, w: [f"{w} must be a list of split names, got {v!r}"]
             if not all(isinstance(s, str) for s in v) else [])


def registered(mapping: str) -> Key:
    """A name registered in LAVIS's registry (``mapping``: e.g. ``task_name_mapping``)."""
    return Key(str, choices=lambda: sorted(registry.mapping[mapping]))


def _device(value, where) -> List[Problem]:
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", str(value)):
        return [f"{where}={value!r} is not a device: use auto, cpu, cuda or cuda:N"]
    return []


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
    "select_metric": TEXT,  # training/selection.py: which val metric picks checkpoint_best
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


def _teacher_keys(kind: Optional[str]) -> Dict[str, Key]:
    """A teacher's keys; ``kind`` (``cross``/``dual``, the loss's) narrows the adapters."""
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


def _distill_keys(distill: Mapping) -> Dict[str, Key]:
    """``model.distill``'s keys, its teacher's those of the loss's teacher kind: any adapter
    for an unknown loss; a loss without a teacher never reads them."""
    loss = distill.get("loss", "none")
    kind = get_loss(loss).teacher if isinstance(loss, str) and loss in list_losses() else "any"
    teacher = DISTILL_KEYS["teacher"]
    if kind is not None:
        teacher = replace(teacher, keys=_teacher_keys(None if kind == "any" else kind))
    return {**DISTILL_KEYS, "teacher": teacher}


_COMPILE = Key(check=lambda v, w: [] if isinstance(v, (bool, dict)) or v is None
               else [f"{w} must be true, false or a mapping of torch.compile arguments, got {v!r}"])

STUDENT: Dict[str, Key] = {
    "temp": num(0, 0.5, open_low=True, nullable=True),
    "compile": _COMPILE,
    "distill": replace(DISTILL, keys=_distill_keys),
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
    "image_size": count(1), "min_scale": num(0, 1, open_low=True), "max_scale": num(0, 1, open_low=True),
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


def _processor_name(value, where: str) -> List[Problem]:
    names = sorted(registry.mapping["processor_name_mapping"])
    if isinstance(value, str) and value in names:
        return []
    return [f"{where}={value!r} is not a registered processor{suggest(value, names)}; choose from {names}"]


def _processor_keys(processor: Mapping) -> Optional[Dict[str, Key]]:
    """The keys a processor reads: LAVIS's, listed above; another registered processor's are
    its own (None: any key); an unknown name, every key of any (its name is the problem)."""
    name = processor.get("name")
    if isinstance(name, str) and name in registry.mapping["processor_name_mapping"] and name not in PROCESSORS:
        return None
    reads = PROCESSORS[name] if isinstance(name, str) and name in PROCESSORS else tuple(PROCESSOR_KEYS)
    return {"name": Key(check=_processor_name, required=True), **{k: PROCESSOR_KEYS[k] for k in reads}}


PROCESSOR = Key(dict, nullable=True, values=Key(dict, nullable=True, keys=_processor_keys))


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


def _model_keys(model: Mapping) -> Optional[Dict[str, Key]]:
    """The keys of ``model.arch``'s model; LAVIS's own models read keys of their own (None);
    an unknown arch (``validation.name_problems`` names it), every key of ours: typos, at least."""
    arch = model.get("arch")
    if isinstance(arch, str) and arch in MODELS:
        return MODELS[arch]
    if isinstance(arch, str) and arch in registry.mapping["model_name_mapping"]:
        return None
    return {k: ANY for keys in MODELS.values() for k in keys}


# The whole config: every section, as LAVIS's Config merged it.
CONFIG = Key(dict, keys={
    "run": Key(dict, nullable=True, keys=RUN),
    "model": Key(dict, nullable=True, keys=_model_keys),
    "datasets": Key(dict, nullable=True, keys=lambda datasets: {
        name: Key(dict, nullable=True, keys=DATASETS.get(name, DATASET)) for name in datasets}),
    "preprocess": ANY,
})
TOP_LEVEL = tuple(CONFIG.keys)
