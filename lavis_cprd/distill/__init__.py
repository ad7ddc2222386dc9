"""Distillation: the losses' registry, ``model.distill``'s config, the objective a student holds, hard-negative mining, the teacher-score cache."""
