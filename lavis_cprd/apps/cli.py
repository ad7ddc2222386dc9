"""``lavis-cprd list`` (the command table and dispatch are ``lavis_cprd_cli``'s, which imports
no LAVIS); ``python -m lavis_cprd.apps.cli COMMAND`` runs any command."""
from __future__ import annotations

from typing import List, Optional

from lavis_cprd_cli import COMMANDS, main, usage  # noqa: F401  (python -m lavis_cprd.apps.cli)


def list_main(argv: Optional[List[str]] = None) -> None:
    """Print what ``import lavis_cprd`` registers, each entry with its one-line description."""
    import lavis_cprd  # noqa: F401  (the registrations)
    from lavis.common.registry import registry

    from lavis_cprd.distill.registry import get_loss, list_losses
    from lavis_cprd.teachers import available_teachers, teacher_class

    def first_line(obj) -> str:  # the docstring's first sentence
        paragraph = " ".join((obj.__doc__ or "").strip().split("\n\n")[0].split())
        sentence = paragraph.split(". ")[0].rstrip(".")
        return sentence if len(sentence) <= 100 else sentence[:97] + "..."

    def ours(mapping: str):
        return sorted((n, c) for n, c in registry.mapping[mapping].items() if c.__module__.startswith("lavis_cprd"))

    sections = [
        ("losses (model.distill.loss)", [(n, get_loss(n).description) for n in list_losses()]),
        ("teachers (model.distill.teacher.arch)",
         [(n, f"[{teacher_class(n).kind}] {first_line(teacher_class(n))}") for n in available_teachers()]),
        ("students and models (model.arch)", [(n, first_line(c)) for n, c in ours("model_name_mapping")]),
        ("datasets", [(n, first_line(c)) for n, c in ours("builder_name_mapping")]),
        ("tasks (run.task)", [(n, first_line(c)) for n, c in ours("task_name_mapping")]),
        ("runners (run.runner)", [(n, first_line(c)) for n, c in ours("runner_name_mapping")]),
    ]
    for title, rows in sections:
        print(f"{title}:")
        width = max((len(n) for n, _ in rows), default=0)
        for name, description in rows:
            print(f"  {name:<{width}}  {description}")


if __name__ == "__main__":
    main()
