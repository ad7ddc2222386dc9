"""lavis-cprd: distil cross-encoders into dual encoders (CPRD), as a LAVIS plugin.

Importing this package imports LAVIS (models, tasks, builders, runners, lr schedulers) and
registers lavis-cprd's own entries into LAVIS's registry:

- task ``cprd_retrieval``
- models ``cprd_dual_encoder`` (BLIP-style student), ``cprd_clip_dual_encoder`` (CLIP student) and
  ``cprd_blip_retrieval`` (trains tiny teachers)
- runner ``cprd_runner``
- dataset builder ``cprd_shapes`` (synthetic, generated offline)
- teacher adapters (``lavis_cprd.teachers``): cross-encoders ``blip_image_text_matching``,
  ``blip2_image_text_matching``, ``albef_retrieval``; dual encoders ``blip_feature_extractor``,
  ``clip_feature_extractor``, ``cprd_dual_encoder``

and its own table of distillation losses (``lavis_cprd.distill.losses``: ``none``, ``cprd``,
``margin_mse``, ``loopitr``, ``kl``, ``listmle_full``, ``conaclip``).
"""
from lavis_cprd.environment import import_lavis, quiet_lavis_import

with quiet_lavis_import():  # LAVIS's import-time FutureWarnings (environment.LAVIS_IMPORT_WARNINGS)
    import_lavis()  # registers LAVIS's tasks, models, processors, builders, runners, lr schedulers

    from lavis_cprd import teachers  # noqa: F401,E402
    from lavis_cprd.distill import losses  # noqa: F401,E402  (registers the distillation losses)
    from lavis_cprd.datasets.builders import ShapesBuilder  # noqa: F401,E402
    from lavis_cprd.models.blip_retrieval import CprdBlipRetrieval  # noqa: F401,E402
    from lavis_cprd.models.dual_encoder import CprdDualEncoder  # noqa: F401,E402
    from lavis_cprd.models.clip_student import CprdClipDualEncoder  # noqa: F401,E402
    from lavis_cprd.training.runner import CprdRunner  # noqa: F401,E402
    from lavis_cprd.training.task import CprdRetrievalTask  # noqa: F401,E402

__version__ = "0.1.0"
