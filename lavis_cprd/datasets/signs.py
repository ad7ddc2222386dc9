"""``signs``: a second synthetic domain, unlike ``cprd_shapes`` in every part, so a conclusion
drawn on one can be checked on the other.

- Objects: star, ring, cross, diamond, bar (``cprd_shapes``: circle, square, triangle).
- Attributes: six colours of their own and a fill pattern (solid, striped, hollow) instead of
  size.
- Relation: vertical (``above``) in a column of three slots, instead of left-to-right.
- Rendering: a noisy, textured background instead of a flat grey one.
- Captions: partial, like ``there is a striped teal star above a ring``, each true of its
  picture and often of others; each caption keeps its structure, so its true matches over
  every picture follow exactly (:func:`truth`).
"""
from __future__ import annotations

import random
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

KINDS = ("star", "ring", "cross", "diamond", "bar")
COLORS = {"orange": (240, 140, 20), "teal": (0, 150, 140), "pink": (240, 110, 180),
          "navy": (30, 40, 130), "lime": (150, 220, 40), "brown": (120, 70, 30)}
PATTERNS = ("solid", "striped", "hollow")
SLOTS = 3  # vertical positions, top to bottom
Obj = dict  # {kind, color, pattern, slot}
Descriptor = Tuple[str, Optional[str], Optional[str]]  # (kind, color or None, pattern or None)
Caption = Tuple[str, Descriptor, Optional[Descriptor]]  # (form: one | and | above, first, second)


def random_scene(rng: random.Random) -> List[Obj]:
    """Two or three objects in distinct slots, top to bottom."""
    slots = sorted(rng.sample(range(SLOTS), rng.choice((2, 3))))
    return [{"kind": rng.choice(KINDS), "color": rng.choice(list(COLORS)), "pattern": rng.choice(PATTERNS), "slot": s}
            for s in slots]


def _descriptor(o: Obj, rng: random.Random) -> Descriptor:
    """The object named by its kind and one or two of colour and pattern."""
    which = rng.choice(("color", "pattern", "both"))
    return (o["kind"], o["color"] if which in ("color", "both") else None,
            o["pattern"] if which in ("pattern", "both") else None)


def words(d: Descriptor) -> str:
    kind, color, pattern = d
    text = " ".join(w for w in (pattern, color, kind) if w)
    return ("an " if text[0] in "aeiou" else "a ") + text


def text(c: Caption) -> str:
    form, a, b = c
    if form == "one":
        return f"there is {words(a)}"
    return f"there is {words(a)} {'and' if form == 'and' else 'above'} {words(b)}"


def captions(scene: Sequence[Obj], rng: random.Random, k: int) -> List[Caption]:
    """``k`` distinct partial captions of the scene (fewer when it has fewer)."""
    out: List[Caption] = []
    for _ in range(20 * k):
        if len(out) == k:
            break
        i, j = sorted(rng.sample(range(len(scene)), 2))
        form = rng.choice(("one", "and", "above"))
        c = (form, _descriptor(scene[i], rng), None if form == "one" else _descriptor(scene[j], rng))
        if text(c) not in map(text, out):
            out.append(c)
    return out


def _fits(o: Obj, d: Descriptor) -> bool:
    kind, color, pattern = d
    return o["kind"] == kind and color in (None, o["color"]) and pattern in (None, o["pattern"])


def holds(c: Caption, scene: Sequence[Obj]) -> bool:
    """Whether the caption is true of the scene: its objects exist (distinct ones for two),
    and for ``above`` the first stands higher than the second."""
    form, a, b = c
    if form == "one":
        return any(_fits(o, a) for o in scene)
    pairs = [(p, q) for p in scene for q in scene if p is not q and _fits(p, a) and _fits(q, b)]
    return any(p["slot"] < q["slot"] for p, q in pairs) if form == "above" else bool(pairs)


def truth(scenes: Sequence[Sequence[Obj]], caps: Sequence[Caption]) -> np.ndarray:
    """``[n_scenes, n_captions]``: which caption is true of which picture."""
    return np.array([[holds(c, s) for c in caps] for s in scenes], dtype=bool)


def render(scene: Sequence[Obj], size: int, rng: random.Random) -> Image.Image:
    """A noisy textured background, each object centred in its slot of a vertical column."""
    base = rng.randint(60, 200)
    noise = np.clip(base + np.random.default_rng(rng.randint(0, 2**31)).normal(0, 18, (size, size, 1)), 0, 255)
    img = Image.fromarray(np.repeat(noise, 3, axis=2).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    cell = size / SLOTS
    for o in scene:
        r = cell * 0.42
        cx = size / 2 + rng.uniform(-cell, cell)
        cy = (o["slot"] + 0.5) * cell + rng.uniform(-1, 1)
        color = COLORS[o["color"]]
        fill, outline = (None, color) if o["pattern"] == "hollow" else (color, color)
        box = [cx - r, cy - r, cx + r, cy + r]
        if o["kind"] == "ring":
            draw.ellipse(box, outline=color, width=3)
            if fill:
                draw.ellipse([cx - r / 2, cy - r / 2, cx + r / 2, cy + r / 2], fill=fill)
        elif o["kind"] == "bar":
            draw.rectangle([cx - r, cy - r / 3, cx + r, cy + r / 3], fill=fill, outline=outline, width=2)
        elif o["kind"] == "cross":
            draw.rectangle([cx - r, cy - r / 4, cx + r, cy + r / 4], fill=fill, outline=outline, width=2)
            draw.rectangle([cx - r / 4, cy - r, cx + r / 4, cy + r], fill=fill, outline=outline, width=2)
        elif o["kind"] == "diamond":
            draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill, outline=outline)
        else:  # star
            pts = [(cx + (r if i % 2 == 0 else r / 2.5) * np.sin(i * np.pi / 5),
                    cy - (r if i % 2 == 0 else r / 2.5) * np.cos(i * np.pi / 5)) for i in range(10)]
            draw.polygon(pts, fill=fill, outline=outline)
        if o["pattern"] == "striped":  # background-coloured stripes across the object
            for y in range(int(cy - r), int(cy + r), 4):
                draw.line([(cx - r, y), (cx + r, y)], fill=(base, base, base), width=1)
    return img
