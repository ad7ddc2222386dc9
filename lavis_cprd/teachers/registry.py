"""Teacher adapters by LAVIS registry name (the ``arch`` of the teacher model)."""
from __future__ import annotations

from typing import Callable, Dict, Optional, Type

from lavis_cprd.teachers.base import FrozenTeacher

_TEACHERS: Dict[str, Type[FrozenTeacher]] = {}
KINDS = {"cross": "cross-encoder", "dual": "dual-encoder"}
# The adapter a teacher config without ``arch`` gets, by kind.
DEFAULT_TEACHERS = {"cross": "blip_image_text_matching", "dual": "blip_feature_extractor"}


def register_teacher(arch: str) -> Callable[[Type[FrozenTeacher]], Type[FrozenTeacher]]:
    def wrap(cls: Type[FrozenTeacher]) -> Type[FrozenTeacher]:
        if arch in _TEACHERS:
            raise KeyError(f"teacher adapter {arch!r} is already registered by {_TEACHERS[arch].__name__}")
        if cls.kind not in KINDS:
            raise TypeError(f"teacher adapter {cls.__name__} must subclass CrossEncoderTeacher or DualEncoderTeacher")
        _TEACHERS[arch] = cls
        return cls

    return wrap


def available_teachers(kind: Optional[str] = None) -> list:
    """Registered adapter names, all or those of one ``kind`` (``cross`` or ``dual``)."""
    return sorted(a for a, cls in _TEACHERS.items() if kind is None or cls.kind == kind)


def teacher_class(arch: str, kind: Optional[str] = None) -> Type[FrozenTeacher]:
    """The adapter registered as ``arch``; with ``kind``, it must be a teacher of that kind."""
    if arch not in _TEACHERS:
        raise ValueError(
            f"model.distill.teacher.arch={arch!r} has no teacher adapter; available: {available_teachers(kind)}"
        )
    cls = _TEACHERS[arch]
    if kind is not None and cls.kind != kind:
        raise ValueError(
            f"model.distill.teacher.arch={arch!r} is a {KINDS[cls.kind]} teacher, but this loss needs a "
            f"{KINDS[kind]}; available: {available_teachers(kind)}"
        )
    return cls


def build_teacher(cfg, tokenizer_path: Optional[str] = None, kind: Optional[str] = None) -> FrozenTeacher:
    """Build the frozen teacher named by ``cfg.arch`` (a LAVIS model registry name)."""
    default = DEFAULT_TEACHERS[kind or "cross"]
    return teacher_class(cfg.get("arch", default), kind).from_config(cfg, tokenizer_path=tokenizer_path)
