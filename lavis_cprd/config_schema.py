"""The checking engine of configs: a :class:`Key` says what one key may hold, and
:func:`check_value` lists every problem of a value against it, each naming its dotted key,
with the valid range or choices and "did you mean" suggestions. The tables of keys live with
what reads them (``training/schema.py``: the whole experiment config; ``distill/config.py``:
``model.distill``); this module knows no table and imports nothing of the project but
``errors``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Mapping, Optional, Sequence, Union

from lavis_cprd.errors import suggest, unknown_key

Problem = str
Choices = Union[Sequence[Any], Callable[[], Sequence[Any]]]
# A mapping's keys: fixed, or chosen by the mapping itself (None: any key, its reader's own).
Keys = Union[Mapping[str, "Key"], Callable[[Mapping], Optional[Mapping[str, "Key"]]]]

_NOUNS = {float: "a number", int: "an integer", bool: "true or false", str: "a string", list: "a list",
          dict: "a mapping"}


@dataclass(frozen=True)
class Key:
    """What one config key may hold.

    - ``kind``: ``int``, ``float``, ``bool``, ``str``, ``list``, ``dict``, or ``None`` (anything,
      null included, unless ``check`` says otherwise: it is then called with null too).
    - ``low``/``high``: a number's range, inclusive unless ``open_low``; NaN is never in one.
    - ``text``: a float may be written as text (``"5e-4"``, which YAML reads as a string), as
      LAVIS reads it with ``float()``.
    - ``choices``: the values allowed; a callable is read when checked (e.g. a registry's names).
    - ``nullable``: null (or ``""``) means "not set"; ``required``: checked even when absent.
    - ``keys``: a mapping with exactly these keys; ``values``: a mapping of free keys, each
      value a ``values``.
    - ``check(value, where)``: a rule of its own; on a mapping, run once its keys are fine.
    - ``what``: what it holds, in messages (default: its kind's name, e.g. "an integer").
    """

    kind: Optional[type] = None
    low: Optional[float] = None
    high: Optional[float] = None
    open_low: bool = False
    text: bool = True
    choices: Optional[Choices] = None
    nullable: bool = False
    required: bool = False
    keys: Optional[Keys] = None
    values: Optional["Key"] = None
    check: Optional[Callable[[Any, str], List[Problem]]] = None
    what: Optional[str] = None

    @property
    def noun(self) -> str:
        return self.what or _NOUNS.get(self.kind, f"a {getattr(self.kind, '__name__', 'value')}")

    def _bound(self, bound) -> str:
        return repr(float(bound)) if self.kind is float else f"{bound:g}"

    @property
    def range_text(self) -> str:
        low = "-inf" if self.low is None else self._bound(self.low)
        high = "inf" if self.high is None else self._bound(self.high)
        return f"{'(' if self.open_low or self.low is None else '['}{low}, {high}{']' if self.high is not None else ')'}"

    def keys_of(self, value: Mapping) -> Optional[Mapping[str, "Key"]]:
        """The keys of the mapping ``value`` (they may depend on it)."""
        return self.keys(value) if callable(self.keys) else self.keys


def num(low=None, high=None, integer=False, open_low=False, nullable=False, text=True) -> Key:
    return Key(int if integer else float, low, high, open_low, text, nullable=nullable)


def count(low: int = 1, nullable: bool = False) -> Key:
    """An integer of at least ``low``."""
    return num(low, integer=True, nullable=nullable)


def choice(*values, nullable: bool = False) -> Key:
    return Key(None, choices=values, nullable=nullable)


FLAG, TEXT, ANY = Key(bool), Key(str), Key()
PATH = Key(str, nullable=True)  # a file or folder; null/empty = not set
FREE_MAP = Key(dict, nullable=True)


def kind_ok(kind: Optional[type], value) -> bool:
    """Whether ``value`` is of ``kind`` (a bool is no number; an int is a float)."""
    if kind is None:
        return True
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def read(key: Key, value):
    """``value`` as its reader takes it, once checked: a float key's number (or text) as a float."""
    return float(value) if key.kind is float and value is not None else value


def check_value(key: Key, value, where: str) -> List[Problem]:
    """The problems of ``value`` at ``where`` (a dotted path) against ``key``."""
    if value is None or (value == "" and key.nullable):
        if key.nullable or (key.kind is None and key.check is None):
            return []
        if key.kind is not None:
            return [f"{where} must be set ({key.noun}), got null"]
        return key.check(value, where)
    if key.kind is float and key.text and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if not kind_ok(key.kind, value):
        return [f"{where} must be {key.noun}, got {value!r}"]
    value = read(key, value)
    if key.low is not None or key.high is not None:
        low_ok = key.low is None or (value > key.low if key.open_low else value >= key.low)
        if not (low_ok and (key.high is None or value <= key.high)):
            return [f"{where}={value!r} is out of range: it must be in {key.range_text}"]
    if key.choices is not None:
        choices = list(key.choices() if callable(key.choices) else key.choices)
        if value not in choices:
            return [f"{where}={value!r} is not one of {choices}{suggest(value, [str(c) for c in choices])}"]
    problems: List[Problem] = []
    schema = key.keys_of(value) if key.keys is not None and isinstance(value, Mapping) else None
    if schema is not None:
        problems += check_mapping(schema, value, where)
    if key.values is not None and isinstance(value, Mapping):
        for name, item in value.items():
            problems += check_value(key.values, item, f"{where}.{name}")
    if key.check is not None and not problems:
        problems += key.check(value, where)
    return problems


def check_mapping(schema: Mapping[str, Key], value: Mapping, where: str) -> List[Problem]:
    """The problems of the mapping ``value``: unknown keys, then each key's own."""
    problems = [unknown_key(where, k, list(schema)) for k in value if k not in schema]
    for name, key in schema.items():
        if name in value or key.required:
            problems += check_value(key, value.get(name), f"{where}.{name}")
    return problems


def key_at(key: Key, path: str, value: Any = None) -> Optional[Key]:
    """The :class:`Key` under ``key`` that checks the dotted ``path`` of ``value`` (the config
    being read: a mapping's keys may depend on it), or None where the tree leaves it to its
    reader (any key, or a class that checks it)."""
    for part in path.split("."):
        node = value if isinstance(value, Mapping) else {}
        schema = key.keys_of(node) if key.keys is not None else None
        key, value = (schema.get(part) if schema is not None else key.values), node.get(part)
        if key is None:
            return None
    return key
