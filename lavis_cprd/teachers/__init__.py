"""Cross-encoder teachers behind one interface: ``score(images, captions, pairs) -> scores``."""
from lavis_cprd.teachers.base import CrossEncoderTeacher
from lavis_cprd.teachers.registry import available_teachers, build_teacher, register_teacher, teacher_class
from lavis_cprd.teachers.blip_itm import BlipITMTeacher  # noqa: F401  (registers the adapter)

__all__ = [
    "CrossEncoderTeacher",
    "BlipITMTeacher",
    "available_teachers",
    "build_teacher",
    "register_teacher",
    "teacher_class",
]
