"""A clear error for an unknown ``model.model_type`` (LAVIS's is a bare ``AssertionError``,
"Unknown model type bas", raised while its ``Config`` merges the model's default YAML)."""
from __future__ import annotations

from lavis_cprd.errors import suggest


class NamedModelTypes:
    """Mixin for a LAVIS model class: ``default_config_path`` names the key and the valid types."""

    @classmethod
    def default_config_path(cls, model_type):
        types = sorted(cls.PRETRAINED_MODEL_CONFIG_DICT)
        if model_type not in types:
            raise ValueError(f"model.model_type={model_type!r} is not one of {types} for {cls.__name__}"
                             f"{suggest(model_type, types)}")
        return super().default_config_path(model_type)
