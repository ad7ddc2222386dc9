"""Config errors that name the key and the way out: "did you mean" suggestions from the valid
keys, and one exception that lists every problem of a config at once."""
from __future__ import annotations

import difflib
import http.client
import socket
import urllib.error
from typing import Sequence

# What a download that cannot reach its server raises (a missing local file is not one).
NETWORK_ERRORS = (urllib.error.URLError, ConnectionError, TimeoutError, socket.gaierror, http.client.HTTPException)


class ConfigError(ValueError):
    """A config with problems; ``problems`` lists them, each naming its key."""

    def __init__(self, problems: Sequence[str], source: str = "config"):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{source}: {len(self.problems)} problem(s), nothing was started:\n{lines}")


def first_line(error: BaseException) -> str:
    """An exception's first line, or its type's name when it says nothing."""
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def suggest(key, valid: Sequence) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``valid`` to ``key``, or ``""``."""
    close = difflib.get_close_matches(str(key), [str(v) for v in valid], n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def unknown_key(where: str, key, valid: Sequence) -> str:
    """The problem of ``where.key`` not being one of ``valid``."""
    return f"unknown key {where}.{key}{suggest(key, valid)}; valid keys: {sorted(map(str, valid))}"


def unknown_keys(where: str, keys: Sequence, valid: Sequence) -> str:
    """One message for several unknown keys under ``where``."""
    return "; ".join(unknown_key(where, k, valid) for k in sorted(map(str, keys)))


def existing_file(flag: str):
    """An ``argparse`` type for ``flag``: a path that must name an existing file."""
    import argparse
    import os

    def check(path: str) -> str:
        if not os.path.isfile(path):
            raise argparse.ArgumentTypeError(f"{path!r} does not exist (expected a checkpoint file)")
        return path

    check.__name__ = flag
    return check
