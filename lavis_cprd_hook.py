"""Registers lavis-cprd into LAVIS whenever a program imports ``lavis``, so that LAVIS's own
``train.py`` and ``evaluate.py`` run lavis-cprd's configs unchanged.

LAVIS 1.0.2 has no plugin mechanism: ``Config`` looks names up in its registry, which only
modules that were imported have filled. ``lavis_cprd.pth``, installed into site-packages with
the package, calls :func:`arm` at every interpreter start. That only puts a finder at the head
of ``sys.meta_path`` and imports nothing. When a program first imports ``lavis`` (``import
lavis.tasks`` in LAVIS's scripts), the finder lets LAVIS load as usual, then imports
``lavis_cprd``, whose import registers the task, models, runner, dataset builder and teachers.

``LAVIS_CPRD_NO_HOOK=1`` in the environment turns it off. A module outside the package, like
``lavis_cprd_cli``, so that arming it costs one small import.
"""
import os
import sys

DISABLE = "LAVIS_CPRD_NO_HOOK"


class _RegisterAfterLavis:
    """A meta-path finder for ``lavis`` only: it finds LAVIS's own spec and wraps its loader.
    A look-up that does not import (``importlib.util.find_spec("lavis")``) leaves it armed."""

    looking = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "lavis" or self.looking:
            return None
        import importlib.util

        self.looking = True  # the look-up below must not come back here
        try:
            spec = importlib.util.find_spec("lavis")
        finally:
            self.looking = False
        if spec is not None and spec.loader is not None:
            spec.loader = _ThenRegister(spec.loader)
        return spec


class _ThenRegister:
    """LAVIS's loader, then ``import lavis_cprd``; the module keeps LAVIS's own loader."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        disarm()  # lavis is being imported: once is enough
        module.__loader__ = module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        try:
            import lavis_cprd  # noqa: F401  (its import registers everything)
        except Exception as e:  # LAVIS itself works; say why ours is missing
            import warnings

            warnings.warn(f"lavis-cprd could not register into LAVIS ({type(e).__name__}: {e}); "
                          f"`import lavis_cprd` shows the whole error", RuntimeWarning, stacklevel=2)

    def __getattr__(self, name):
        return getattr(self.loader, name)


_FINDER = _RegisterAfterLavis()


def arm() -> None:
    """Register lavis-cprd when ``lavis`` is first imported (a no-op if it already was, or if
    ``LAVIS_CPRD_NO_HOOK`` is set)."""
    if os.environ.get(DISABLE) or "lavis" in sys.modules or _FINDER in sys.meta_path:
        return
    sys.meta_path.insert(0, _FINDER)


def disarm() -> None:
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)
