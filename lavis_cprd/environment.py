"""What lavis-cprd needs around it: a supported Python, and LAVIS 1.0.2 with the dependency
set lavis-cprd declares (``setup.cfg``). ``run_scripts/install.sh`` installs LAVIS without its
own declared dependencies: their exact pins (``transformers<4.27``, whose tokenizers has no
wheel for Python 3.12+; ``opencv-python-headless==4.5.5.64``, built for numpy 1) cannot
install on new Pythons. So a package LAVIS imports can be missing; this says which, and how
to get it, instead of a bare ``ModuleNotFoundError`` from inside LAVIS."""
from __future__ import annotations

import contextlib
import importlib
import sys
import warnings
from types import ModuleType
from typing import Iterator

SUPPORTED_PYTHONS = ((3, 11), (3, 12), (3, 13))
LAVIS_PIN = "salesforce-lavis==1.0.2"
INSTALL = "bash run_scripts/install.sh (or: pip install -e . && pip install --no-deps salesforce-lavis==1.0.2)"
# Import names that differ from the package to install.
PACKAGE_OF = {"cv2": "opencv-python-headless", "skimage": "scikit-image", "PIL": "pillow", "yaml": "pyyaml",
              "lavis": LAVIS_PIN}


def python_problem(version=None) -> str:
    """Why this Python is not supported ("" when it is)."""
    version = tuple((version or sys.version_info)[:2])
    if version in SUPPORTED_PYTHONS:
        return ""
    names = ", ".join(f"{a}.{b}" for a, b in SUPPORTED_PYTHONS)
    return (f"lavis-cprd supports Python {names}; this is {version[0]}.{version[1]}. Install with one of those, "
            f"e.g. PYTHON=python3.12 bash run_scripts/install.sh")


# FutureWarnings that importing LAVIS 1.0.2 prints on every command, none about the user's
# code or ours: timm 1.0 deprecated the module paths LAVIS imports from (timm.models.hub,
# .registry, .layers, .helpers), and transformers 4.36 (pinned for LAVIS) registers every
# ModelOutput class (LAVIS's, and our student's output) through torch's deprecated private
# pytree function. Ignored only while lavis_cprd and LAVIS import (``quiet_lavis_import``).
LAVIS_IMPORT_WARNINGS = (
    (FutureWarning, r"Importing from timm\.models\.\w+ is deprecated"),
    (FutureWarning, r"`torch\.utils\._pytree\._register_pytree_node` is deprecated"),
)


@contextlib.contextmanager
def quiet_lavis_import() -> Iterator[None]:
    """:data:`LAVIS_IMPORT_WARNINGS` ignored inside; every other warning as the user set it."""
    with warnings.catch_warnings():
        for category, message in LAVIS_IMPORT_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
        yield


def import_lavis() -> ModuleType:
    """``import lavis`` (and its runners and lr schedulers, which ``import lavis`` leaves out);
    a missing package is named, with the command that installs it."""
    try:
        with quiet_lavis_import():
            lavis = importlib.import_module("lavis")
            importlib.import_module("lavis.common.optims")
            importlib.import_module("lavis.runners")
    except ModuleNotFoundError as e:
        top = (e.name or "").split(".")[0]
        if not top or top == "lavis_cprd":
            raise
        package = PACKAGE_OF.get(top, top)
        problem = python_problem()
        raise ImportError(f"lavis-cprd cannot import LAVIS: the package {package!r} is not installed. Run {INSTALL}"
                          + (f". Also: {problem}" if problem else "")) from e
    return lavis


if __name__ == "__main__":  # run_scripts/install.sh, before anything is installed
    sys.exit(python_problem() or None)
