"""Teachers behind two small interfaces: cross-encoders ``score(images, captions, pairs)``
(CPRD and the other ranking/logit losses) and dual encoders ``encode(images, captions)``
(ConaCLIP), each registered by the LAVIS registry name of its model."""
from lavis_cprd.teachers.base import CrossEncoderTeacher, DualEncoderTeacher, FrozenTeacher
from lavis_cprd.teachers.registry import available_teachers, build_teacher, register_teacher, teacher_class
from lavis_cprd.teachers.blip_itm import BlipITMTeacher  # noqa: F401  (registers the adapter)
from lavis_cprd.teachers.albef import AlbefITMTeacher  # noqa: F401
from lavis_cprd.teachers.blip2_itm import Blip2ITMTeacher  # noqa: F401
from lavis_cprd.teachers.dual import BlipFeatureTeacher, ClipFeatureTeacher, CprdDualTeacher  # noqa: F401
from lavis_cprd.teachers.oracle import ShapesOracleTeacher  # noqa: F401

__all__ = [
    "CrossEncoderTeacher",
    "DualEncoderTeacher",
    "FrozenTeacher",
    "BlipITMTeacher",
    "AlbefITMTeacher",
    "Blip2ITMTeacher",
    "BlipFeatureTeacher",
    "ClipFeatureTeacher",
    "CprdDualTeacher",
    "ShapesOracleTeacher",
    "available_teachers",
    "build_teacher",
    "register_teacher",
    "teacher_class",
]
