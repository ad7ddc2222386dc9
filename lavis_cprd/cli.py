"""``lavis-cprd`` command: ``lavis-cprd train|evaluate|demo|compare|diagnose|cache-teacher|index|search ...``."""
from __future__ import annotations

import sys
from typing import List, Optional

COMMANDS = {
    "train": "lavis_cprd.train",
    "evaluate": "lavis_cprd.evaluate",
    "demo": "lavis_cprd.demo",
    "compare": "lavis_cprd.compare",
    "diagnose": "lavis_cprd.diagnose",
    "cache-teacher": "lavis_cprd.cache_teacher",
    "index": "lavis_cprd.serving:index_main",
    "search": "lavis_cprd.serving:search_main",
}


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"lavis-cprd: unknown command {argv[0]!r}; choose one of {sorted(COMMANDS)}", file=sys.stderr)
        print("usage: lavis-cprd {" + ",".join(sorted(COMMANDS)) + "} ...  (each takes --help)")
        sys.exit(0 if argv[:1] in ([], ["-h"], ["--help"]) else 2)
    import importlib

    module, _, function = COMMANDS[argv[0]].partition(":")
    getattr(importlib.import_module(module), function or "main")(argv[1:])


if __name__ == "__main__":
    main()
