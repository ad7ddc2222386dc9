"""Teacher adapters by LAVIS registry name (the ``arch`` of the cross-encoder)."""
from __future__ import annotations

from typing import Callable, Dict, Optional, Type

from lavis_cprd.teachers.base import CrossEncoderTeacher

_TEACHERS: Dict[str, Type[CrossEncoderTeacher]] = {}


def register_teacher(arch: str) -> Callable[[Type[CrossEncoderTeacher]], Type[CrossEncoderTeacher]]:
    def wrap(cls: Type[CrossEncoderTeacher]) -> Type[CrossEncoderTeacher]:
        if arch in _TEACHERS:
            raise KeyError(f"teacher adapter {arch!r} is already registered by {_TEACHERS[arch].__name__}")
        _TEACHERS[arch] = cls
        return cls

    return wrap


def available_teachers() -> list:
    return sorted(_TEACHERS)


def teacher_class(arch: str) -> Type[CrossEncoderTeacher]:
    if arch not in _TEACHERS:
        raise ValueError(
            f"model.distill.teacher.arch={arch!r} has no teacher adapter; available: {available_teachers()}"
        )
    return _TEACHERS[arch]


def build_teacher(cfg, tokenizer_path: Optional[str] = None) -> CrossEncoderTeacher:
    """Build the frozen teacher named by ``cfg.arch`` (a LAVIS model registry name)."""
    return teacher_class(cfg.get("arch", "blip_image_text_matching")).from_config(cfg, tokenizer_path=tokenizer_path)
