"""``none``: ITC alone, the baseline every result stands beside. No teacher is built."""
from lavis_cprd.distill.objective import DistillObjective
from lavis_cprd.distill.registry import DistillLoss, register_loss

register_loss(DistillLoss("none", "ITC alone: no distillation term", objective=DistillObjective, teacher=None))
