"""``lavis-cprd COMMAND ...``: one entry point for every lavis-cprd application.

A module of its own, outside the ``lavis_cprd`` package: importing that package imports LAVIS
(its registrations need it), which takes seconds. This module imports only the command that
runs, so ``lavis-cprd --help`` answers at once.
"""
from __future__ import annotations

import importlib
import os
import sys
from typing import List, Optional

# command -> (module[:function], one-line description)
COMMANDS = {
    "train": ("lavis_cprd.apps.train", "train with a LAVIS experiment YAML (LAVIS's train.py, our registrations)"),
    "evaluate": ("lavis_cprd.apps.evaluate", "evaluate a checkpoint with a LAVIS experiment YAML"),
    "demo": ("lavis_cprd.apps.demo", "the embedded default end to end, offline: every method, 3 seeds"),
    "compare": ("lavis_cprd.apps.compare", "distillation methods and ablations side by side, same teacher and seeds"),
    "diagnose": ("lavis_cprd.apps.diagnose", "is this cross-encoder a good teacher for this student?"),
    "prepare-data": ("lavis_cprd.apps.prepare_data", "your images and captions table to LAVIS annotations and an experiment"),
    "train-teacher": ("lavis_cprd.apps.train_teacher", "a cross-encoder teacher for any dataset config (two-stage recipe)"),
    "cache-teacher": ("lavis_cprd.apps.cache_command", "precompute teacher scores of a training split"),
    "index": ("lavis_cprd.apps.gallery_index:index_main", "encode an image folder into a FAISS index"),
    "search": ("lavis_cprd.apps.serving:search_main", "search an index with text queries"),
    "list": ("lavis_cprd.apps.cli:list_main", "the registered losses, teachers, students, datasets and tasks"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: lavis-cprd COMMAND [--help] ...", "", "commands:"]
    lines += [f"  {name:<{width}}  {description}" for name, (_, description) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"lavis-cprd: unknown command {argv[0]!r}; choose one of {sorted(COMMANDS)}", file=sys.stderr)
        print(usage())
        sys.exit(0 if argv[:1] in ([], ["-h"], ["--help"]) else 2)
    module, _, function = COMMANDS[argv[0]][0].partition(":")
    try:
        getattr(importlib.import_module(module), function or "main")(argv[1:])
    except Exception as e:  # a config's problems are the whole message: no traceback before it
        if os.environ.get(DEBUG) or not _is_config_error(e):
            raise
        print(f"lavis-cprd {argv[0]}: {e}\n(set {DEBUG}=1 to see the traceback)", file=sys.stderr)
        sys.exit(2)


DEBUG = "LAVIS_CPRD_DEBUG"


def _is_config_error(error: BaseException) -> bool:
    """``lavis_cprd.errors.ConfigError``, by name: importing it here would import LAVIS first."""
    return any(c.__name__ == "ConfigError" and c.__module__ == "lavis_cprd.errors" for c in type(error).__mro__)


if __name__ == "__main__":
    main()
