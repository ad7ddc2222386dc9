"""Everything else is in setup.cfg. This file only ships ``lavis_cprd.pth``: a line Python runs
at start-up that arms ``lavis_cprd_hook``, so LAVIS's own ``train.py``/``evaluate.py`` find our
registrations (see ``lavis_cprd_hook``)."""
import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "lavis_cprd.pth"


class build_py_with_pth(build_py):
    """``build_py`` plus the ``.pth`` at the root of the wheel (site-packages)."""

    def run(self):
        super().run()
        root = self.build_lib
        if getattr(self, "editable_mode", False):
            # An editable wheel ignores build_lib; its root (site-packages) is install_lib.
            root = self.get_finalized_command("install").install_lib
        self.copy_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), PTH), os.path.join(root, PTH),
                       preserve_mode=False)


setup(cmdclass={"build_py": build_py_with_pth})
