"""Writes ``spacy-0.0.0+lavis.cprd.standin-py3-none-any.whl`` into the folder given: a stand-in
module named ``spacy``, NOT spaCy, for the GPU kit (``build_wheels.sh``).

LAVIS 1.0.2 imports spacy at import (``lavis/models/img2prompt_models/img2prompt_vqa.py``) and
uses it only in Img2Prompt-VQA and BLIP-2 T5's lemmatizer, which lavis-cprd never runs. The
real spaCy with what the GPU image lacks for it (blis, thinc, pydantic, srsly...) is about
57 MB of wheels, more than a device call can carry beside the rest. Any use of the stand-in
(an attribute, a submodule) fails with a message naming it.

    python bench/gpu/spacy_standin.py bench/gpu/wheels
"""
import base64
import hashlib
import os
import sys
import zipfile

VERSION = "0.0.0+lavis.cprd.standin"
DIST = f"spacy-{VERSION}.dist-info"
MODULE = f'''"""Not spaCy: lavis-cprd's GPU-kit stand-in (bench/gpu/spacy_standin.py). LAVIS 1.0.2 imports
spacy at import but uses it only in Img2Prompt-VQA and BLIP-2 T5's lemmatizer."""
__version__ = "{VERSION}"


def __getattr__(name):
    raise AttributeError(f"spacy.{{name}}: this is lavis-cprd's GPU-kit stand-in for spaCy, which LAVIS only "
                         "imports; install the real spacy to use it")
'''


def _digest(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def build(folder: str) -> str:
    files = {
        "spacy/__init__.py": MODULE,
        f"{DIST}/METADATA": f"Metadata-Version: 2.1\nName: spacy\nVersion: {VERSION}\n"
                            "Summary: stand-in so that `import lavis` works without spaCy (lavis-cprd GPU kit)\n",
        f"{DIST}/WHEEL": "Wheel-Version: 1.0\nGenerator: lavis-cprd spacy_standin.py\nRoot-Is-Purelib: true\n"
                         "Tag: py3-none-any\n",
    }
    record = "".join(f"{name},{_digest(text.encode())},{len(text.encode())}\n" for name, text in files.items())
    files[f"{DIST}/RECORD"] = record + f"{DIST}/RECORD,,\n"
    path = os.path.join(folder, f"spacy-{VERSION}-py3-none-any.whl")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, text in files.items():
            z.writestr(name, text)
    return path


if __name__ == "__main__":
    print(f"built {build(sys.argv[1])}")
