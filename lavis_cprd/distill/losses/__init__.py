"""The distillation losses, one file each: its formula, how it reads a step and its registry
entry (``distill.registry``). Importing this package registers them, in this order (the order
of ``lavis-cprd list`` and of ``compare``'s default methods): ITC alone, CPRD, the peers over
hard negatives, the peers over every negative, then ConaCLIP's dual-encoder graph."""
from lavis_cprd.distill.losses import none, cprd, margin_mse, kl, listmle_full, conaclip  # noqa: F401
