"""Ground truth of ``cprd_shapes``: what a caption claims, and how much of it holds in a scene.

A caption of the generator's grammar (``shapes.caption_pool``) parses into *facts*; its graded
relevance to a scene is the fraction of those facts that hold there. The facts are chosen so
that all of them hold exactly when the caption is true of the scene (its key is among the
scene's caption keys), so grade 1.0 means a true match. Captions:

- ``a C S left of a C S`` / ``a C S right of a C S`` (a pair): both objects exist, and the
  first-named is on the stated side of the other;
- ``from left to right a Z C S then a Z C S ...`` (the sequence): the object count, and
  each position's object;
- ``a Z C S and a Z C S ...`` (the set): the object count, and each named object (as a
  multiset);
- ``a C S between a C S and a C S``: three objects, and each position's kind.

Partial captions (``generator.captions: partial``) name objects by some attributes, ``D`` =
``a [Z] [C] S`` with ``S`` a shape or the word ``shape``:

- ``there is D``: each named attribute is on some object, and one object has them all;
- ``there is D and D``: the facts of each ``D``, and two distinct objects fit them;
- ``there is D to the left of D``: the facts of each ``D``, and an object fitting the first
  is left of one fitting the second.

``C`` is a colour, ``S`` a shape, ``Z`` a size. Used by the ``shapes_oracle`` teacher and by
the relevance-aware evaluation, so both read the same truth.
"""
from __future__ import annotations

import collections
import functools
import itertools
from typing import Dict, List, Sequence, Tuple

import numpy as np

from lavis_cprd.datasets.shapes import COLORS, GENERIC_NOUN, SHAPES, SIZES

Obj = Tuple[str, ...]  # (color, shape) or (size, color, shape)
Descriptor = Tuple[Tuple[str, str], ...]  # named attributes of a partial caption's object


class CaptionParseError(ValueError):
    pass


def _object(group: str, with_size: bool, caption: str) -> Obj:
    """``a [size] color shape`` -> ``([size,] color, shape)``."""
    words = group.split()
    ok = len(words) == (4 if with_size else 3) and words[0] == "a" and words[-1] in SHAPES and words[-2] in COLORS
    if not ok or (with_size and words[1] not in SIZES):
        want = "a size color shape" if with_size else "a color shape"
        raise CaptionParseError(f"cannot parse {caption!r}: {group!r} is not {want!r} (cprd_shapes grammar)")
    return tuple(words[1:])


def _descriptor(group: str, caption: str) -> Descriptor:
    """``a [size] [color] shape-or-'shape'`` -> ``(("size", ...), ("color", ...), ("shape", ...))``."""
    words = group.split()
    if len(words) < 2 or words[0] != "a" or words[-1] not in (*SHAPES, GENERIC_NOUN):
        raise CaptionParseError(f"cannot parse {caption!r}: {group!r} is not 'a [size] [color] shape'")
    attrs, rest = [], words[1:-1]
    if rest and rest[0] in SIZES:
        attrs.append(("size", rest.pop(0)))
    if rest and rest[0] in COLORS:
        attrs.append(("color", rest.pop(0)))
    if rest:
        raise CaptionParseError(f"cannot parse {caption!r}: unexpected {' '.join(rest)!r} in {group!r}")
    if words[-1] != GENERIC_NOUN:
        attrs.append(("shape", words[-1]))
    return tuple(attrs)


def _partial(text: str, caption: str) -> Tuple[str, tuple]:
    body = text[len("there is "):]
    if " to the left of " in body:
        return "some_left", tuple(_descriptor(g, caption) for g in body.split(" to the left of ", 1))
    return "some", tuple(_descriptor(g, caption) for g in body.split(" and "))


@functools.lru_cache(maxsize=65536)  # the oracle and every evaluation re-read the same captions
def parse_caption(caption: str) -> Tuple[str, Tuple[Obj, ...]]:
    """``(form, objects)``: ``pair`` (left object, right object), ``seq``, ``set`` or
    ``between`` (objects left to right); partial captions: ``some`` or ``some_left``
    (descriptors, in the caption's order). Raises :class:`CaptionParseError` off the grammar."""
    text = " ".join(caption.lower().split())
    if text.startswith("there is "):
        return _partial(text, caption)
    if text.startswith("from left to right "):
        groups = text[len("from left to right "):].split(" then ")
        return "seq", tuple(_object(g, True, caption) for g in groups)
    for rel in (" left of ", " right of "):
        if rel in text:
            a, b = (_object(g, False, caption) for g in text.split(rel, 1))
            return "pair", (a, b) if rel == " left of " else (b, a)
    if " between " in text:
        mid, rest = text.split(" between ", 1)
        left, right = (_object(g, False, caption) for g in rest.split(" and ", 1)) if " and " in rest else (None, None)
        if left is None:
            raise CaptionParseError(f"cannot parse {caption!r}: 'between' needs 'X and Y'")
        return "between", (left, _object(mid, False, caption), right)
    return "set", tuple(_object(g, True, caption) for g in text.split(" and "))


def _kind(o: dict) -> Obj:
    return (o["color"], o["shape"])


def _full(o: dict) -> Obj:
    return (o["size"], o["color"], o["shape"])


def _fits(o: dict, d: Descriptor) -> bool:
    return all(o[attr] == value for attr, value in d)


def _descriptor_facts(d: Descriptor, scene: Sequence[dict]) -> List[bool]:
    """Each named attribute is on some object; one object has all of them."""
    return [any(o[a] == v for o in scene) for a, v in d] + [any(_fits(o, d) for o in scene)]


def caption_facts(caption: str, scene: Sequence[dict]) -> List[bool]:
    """Whether each fact of ``caption`` holds in ``scene`` (objects sorted left to right)."""
    form, objs = parse_caption(caption)
    scene = sorted(scene, key=lambda o: o["slot"])
    if form in ("some", "some_left"):
        facts = [f for d in objs for f in _descriptor_facts(d, scene)]
        if len(objs) == 1:
            return facts
        n = len(scene)
        fits = [[i for i in range(n) if _fits(scene[i], d)] for d in objs]
        if form == "some_left":
            return facts + [any(i < j for i in fits[0] for j in fits[1])]
        return facts + [_distinct(fits)]
    if form == "pair":
        left, right = objs
        lefts = [i for i, o in enumerate(scene) if _kind(o) == left]
        rights = [i for i, o in enumerate(scene) if _kind(o) == right]
        return [bool(lefts), bool(rights), any(i < j for i in lefts for j in rights)]
    if form in ("seq", "between"):
        key = _full if form == "seq" else _kind
        return [len(scene) == len(objs)] + [i < len(scene) and key(scene[i]) == o for i, o in enumerate(objs)]
    # set: each named object matched once in the scene's multiset
    have = collections.Counter(_full(o) for o in scene)
    facts = [len(scene) == len(objs)]
    for o in objs:
        facts.append(have[o] > 0)
        have[o] -= 1
    return facts


def _distinct(fits: List[List[int]]) -> bool:
    """Distinct objects for every descriptor (a matching over the candidate lists)."""
    return any(len(set(choice)) == len(choice) for choice in itertools.product(*fits))


def relevance(caption: str, scene: Sequence[dict]) -> float:
    """Graded relevance in [0, 1]: the fraction of the caption's facts that hold in the scene."""
    facts = caption_facts(caption, scene)
    return float(sum(facts)) / len(facts)


def relevance_matrix(scenes: Sequence[Sequence[dict]], captions: Sequence[str]) -> np.ndarray:
    """``[n_scenes, n_captions]`` graded relevance."""
    out = np.zeros((len(scenes), len(captions)), dtype=np.float32)
    for j, caption in enumerate(captions):
        for i, scene in enumerate(scenes):
            out[i, j] = relevance(caption, scene)
    return out


def scenes_by_image_id(annotation: Sequence[dict]) -> Dict:
    """Scene spec of each image of a LAVIS annotation list: train entries keyed by their
    integer id as LAVIS's ``RetrievalDataset`` numbers them (order of first appearance of
    ``image_id``), eval entries by their position (``RetrievalEvalDataset``'s image index)."""
    if not annotation or "scene" not in annotation[0]:
        raise ValueError("these annotations carry no 'scene' field: only cprd_shapes data has scene specs")
    if "image_id" in annotation[0]:
        out, numbers = {}, {}
        for ann in annotation:
            n = numbers.setdefault(ann["image_id"], len(numbers))
            out[n] = ann["scene"]
        return out
    return {i: ann["scene"] for i, ann in enumerate(annotation)}


_VOCAB = {**{c: tuple(COLORS) for c in COLORS}, **{s: SHAPES for s in SHAPES}, **{z: SIZES for z in SIZES}}
_SWAPS = {"left": "right", "right": "left"}


def lookalike_caption(caption: str, scene: Sequence[dict], rng) -> "str | None":
    """A minimal edit of ``caption`` that is false of ``scene``: one colour, shape or size word
    replaced by another of its kind, or (``left``/``right`` and ``to the left of``) the two
    objects' order swapped. ``None`` when no tried edit is false (``rng``: ``random.Random``).
    The look-alike ITM negatives a cross-encoder needs to learn attribute binding."""
    words = caption.split()
    edits = [(i, alt) for i, w in enumerate(words) for alt in _VOCAB.get(w, ()) if alt != w]
    edits += [(i, _SWAPS[w]) for i, w in enumerate(words) if w in _SWAPS]
    if " to the left of " in caption:
        a, b = caption[len("there is "):].split(" to the left of ", 1)
        edits.append((-1, f"there is {b} to the left of {a}"))
    rng.shuffle(edits)
    for i, alt in edits:
        text = alt if i < 0 else " ".join([*words[:i], alt, *words[i + 1:]])
        try:
            if relevance(text, scene) < 1.0:
                return text
        except CaptionParseError:
            continue
    return None


def hard_false_caption(captions: Sequence[str], scene: Sequence[dict],
                       grades: "Sequence[float] | None" = None) -> "str | None":
    """The caption of ``captions`` most relevant to ``scene`` among those false of it (graded
    relevance < 1; the first on ties), or ``None`` if all are true: a hard ITM negative that is
    verified false, where an in-batch one may be a true match. ``grades``: their relevances,
    if already computed."""
    best, best_rel = None, -1.0
    for caption, rel in zip(captions, grades or [relevance(c, scene) for c in captions]):
        if best_rel < rel < 1.0:
            best, best_rel = caption, rel
    return best


def other_true_caption(captions: Sequence[str], scene: Sequence[dict], own: str,
                       grades: "Sequence[float] | None" = None) -> "str | None":
    """The first caption of ``captions`` other than ``own`` that is true of ``scene`` (graded
    relevance 1), or ``None``: a verified positive that another image's annotation holds.
    ``grades``: their relevances, if already computed."""
    grades = grades or [relevance(c, scene) for c in captions]
    return next((c for c, rel in zip(captions, grades) if c != own and rel == 1.0), None)
