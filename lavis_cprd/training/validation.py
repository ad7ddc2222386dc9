"""Validation of a whole experiment config, as LAVIS's ``Config`` merged it, against the
tables of ``training/schema.py`` (:data:`CONFIG`): every problem is collected and raised at
once (:class:`ConfigError`), each naming its key.

:func:`validate_config` runs in every lavis-cprd entry point (``launch.prepare_config``, also
from the ``cprd_retrieval`` task's ``setup_task``, so LAVIS's own ``train.py``/``evaluate.py``
check too); :func:`name_problems` first, on the raw experiment file (``launch.check_names``).
"""
from __future__ import annotations

from typing import Any, Dict, List, Union

from lavis.common.registry import registry
from omegaconf import DictConfig, OmegaConf

from lavis_cprd.config_schema import Problem, check_value, kind_ok
from lavis_cprd.errors import ConfigError, suggest
from lavis_cprd.training.schema import CONFIG, TOP_LEVEL


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
    for section in ("run", "model", "datasets"):
        problems += check_value(CONFIG.keys[section], raw.get(section), section)
    return problems + _cross_checks(raw.get("run"), raw.get("model"))


def _cross_checks(run, model) -> List[Problem]:
    distill = model.get("distill") if isinstance(model, dict) else None
    if not isinstance(distill, dict) or not isinstance(run, dict):
        return []
    start, epochs, loss = distill.get("start_epoch", 0), run.get("max_epoch"), distill.get("loss", "none")
    if loss != "none" and kind_ok(int, start) and kind_ok(int, epochs) and 1 <= epochs <= start:
        return [f"model.distill.start_epoch={start} is out of range: with run.max_epoch={epochs} distillation would "
                f"never start; it must be in [0, {epochs - 1}]"]
    return []


def validate_config(config, source: str = "config") -> None:
    """Raise :class:`ConfigError` listing every problem of a merged experiment config."""
    problems = config_problems(config)
    if problems:
        raise ConfigError(problems, source)
