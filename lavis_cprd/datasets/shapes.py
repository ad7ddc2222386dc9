"""A synthetic, compositional image-caption dataset written in LAVIS's retrieval format.

Each image holds two or three coloured shapes in left-to-right slots. Captions bind colour,
size and shape to objects and name their left/right relations ("a red circle left of a blue
square"). Scenes come in *minimal-pair families*: a base scene plus variants that swap two
objects' colours, shapes or places, so the same words describe look-alike images and only the
binding tells them apart. Those are the hard negatives where a cross-encoder's joint attention
beats separate encoders. Everything is deterministic in ``ShapesSpec.seed``.
"""
from __future__ import annotations

import collections
import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass
from typing import Dict, List, Tuple

from PIL import Image, ImageDraw
from lavis_cprd.errors import suggest, unknown_keys

COLORS: Dict[str, tuple] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (140, 60, 190),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
NUM_SLOTS = 3  # left-to-right cells of a 3x3 grid; objects sit in the middle row
FORMAT_VERSION = 5
# unique: every caption is true of exactly one image of its split (no false negatives);
# partial: captions mention some objects and attributes, as real captions do, and may be true
# of several images (the relevance-aware metrics count them all; LAVIS's keep the source).
CAPTION_MODES = ("unique", "partial")
# Attribute subsets a partial caption names of an object (at least two of three).
PARTIAL_ATTRS = (("color", "shape"), ("size", "color"), ("size", "shape"), ("size", "color", "shape"))
GENERIC_NOUN = "shape"  # the noun when the caption does not name the shape


@dataclass(frozen=True)
class ShapesSpec:
    seed: int = 0
    num_train: int = 1200
    num_val: int = 150
    num_test: int = 150
    captions_per_image: int = 3
    image_size: int = 48
    family_size: int = 3  # images per minimal-pair family (1 = independent scenes)
    captions: str = "unique"  # CAPTION_MODES: "unique" (true of one image) or "partial"
    # Extra training images after the test split (a teacher's larger pre-training set): val,
    # test and the first num_train images stay those of extra_train=0, and no extra scene
    # repeats a val or test scene.
    extra_train: int = 0

    def __post_init__(self):
        where = "datasets.cprd_shapes.generator"
        if self.captions not in CAPTION_MODES:
            raise ValueError(f"{where}.captions={self.captions!r} is not one of {list(CAPTION_MODES)}"
                             f"{suggest(self.captions, CAPTION_MODES)}")
        # the smallest values the generator works with (a family needs a few images; the
        # ITC and retrieval metrics need more than one image per split)
        lows = {"num_train": 2, "num_val": 2, "num_test": 2, "captions_per_image": 1, "image_size": 16,
                "family_size": 1, "extra_train": 0}
        for key, low in lows.items():
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{where}.{key} must be an integer, got {value!r}")
            if value < low:
                raise ValueError(f"{where}.{key}={value!r} is out of range: it must be in [{low}, inf)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"{where}.seed must be an integer, got {self.seed!r}")

    @classmethod
    def from_config(cls, params) -> "ShapesSpec":
        """``datasets.cprd_shapes.generator`` (a mapping; null: the defaults)."""
        params = dict(params or {})
        valid = list(cls.__dataclass_fields__)
        unknown = sorted(set(params) - set(valid))
        if unknown:
            raise ValueError(unknown_keys("datasets.cprd_shapes.generator", unknown, valid))
        return cls(**params)

    @property
    def key(self) -> str:
        """Folder name: changes whenever a parameter (or the format version) changes. The
        default caption mode and ``extra_train=0`` are left out, so earlier folders keep their names."""
        params = asdict(self)
        if params["captions"] == "unique":
            del params["captions"]
        if params["extra_train"] == 0:
            del params["extra_train"]
        blob = json.dumps({**params, "version": FORMAT_VERSION}, sort_keys=True).encode()
        return hashlib.sha1(blob).hexdigest()[:12]


def random_scene(rng: random.Random) -> List[dict]:
    """Objects sorted left to right; each ``{shape, color, size, slot}``."""
    n = rng.choice((2, 3))
    slots = sorted(rng.sample(range(NUM_SLOTS), n))
    return [
        {"shape": rng.choice(SHAPES), "color": rng.choice(list(COLORS)), "size": rng.choice(SIZES), "slot": s}
        for s in slots
    ]


def variant(scene: List[dict], rng: random.Random) -> List[dict]:
    """A minimal-pair twin: two objects swap colour, shape, or colour and size."""
    i, j = rng.sample(range(len(scene)), 2)
    attrs = rng.choice((("color",), ("shape",), ("color", "size"), ("shape", "color")))
    twin = [dict(o) for o in scene]
    for a in attrs:
        twin[i][a], twin[j][a] = twin[j][a], twin[i][a]
    return twin


def name(obj: dict, with_size: bool = False) -> str:
    return (f"{obj['size']} " if with_size else "") + f"{obj['color']} {obj['shape']}"


def describe_all(scene: List[dict]) -> str:
    return ", ".join(name(o, True) for o in scene)


def caption_pool(scene: List[dict]) -> List[Tuple[str, tuple]]:
    """Captions true of the scene, each with a key: two scenes share the key iff the caption
    is true of both. Every caption binds attributes to objects."""
    kind = lambda o: (o["color"], o["shape"])  # noqa: E731
    full = lambda o: (o["size"], o["color"], o["shape"])  # noqa: E731
    pool = []
    for i, a in enumerate(scene):
        for b in scene[i + 1 :]:  # a is left of b
            key = ("pair", kind(a), kind(b))
            pool += [(f"a {name(a)} left of a {name(b)}", key), (f"a {name(b)} right of a {name(a)}", key)]
    pool.append(("from left to right " + " then ".join(f"a {name(o, True)}" for o in scene), ("seq", tuple(map(full, scene)))))
    pool.append((" and ".join(f"a {name(o, True)}" for o in scene), ("set", tuple(sorted(map(full, scene))))))
    if len(scene) == 3:
        pool.append((f"a {name(scene[1])} between a {name(scene[0])} and a {name(scene[2])}", ("between", tuple(map(kind, scene)))))
    return pool


def caption_keys(scene: List[dict]) -> set:
    """Every key of a caption that is true of the scene (a pair key for each ordered pair)."""
    return {key for _, key in caption_pool(scene)}


def captions_for(scene: List[dict], rng: random.Random, k: int, key_counts: Dict[tuple, int]) -> List[str]:
    """``k`` captions of the scene, only ones true of no other scene in its split
    (``key_counts``: how many scenes of the split each caption key is true of), repeated when
    fewer than ``k`` exist. Partial captions true of other images would be false negatives for
    contrastive and ITM losses, and for the evaluation. The full left-to-right description is
    always unique, since the scenes of a split are distinct."""
    pool = list(dict.fromkeys(text for text, key in caption_pool(scene) if key_counts[key] == 1))
    rng.shuffle(pool)
    return [pool[i % len(pool)] for i in range(k)]


def describe(obj: dict, attrs: Tuple[str, ...]) -> str:
    """``a [size] [color] shape-or-'shape'``: the object named by some of its attributes."""
    words = [obj[a] for a in ("size", "color") if a in attrs]
    return "a " + " ".join([*words, obj["shape"] if "shape" in attrs else GENERIC_NOUN])


def partial_captions(scene: List[dict], rng: random.Random, k: int) -> List[str]:
    """``k`` captions (distinct while possible) that each mention part of the scene, in one of
    three forms chosen in turn at random: ``there is D``, ``there is D and D`` (two objects)
    and ``there is D to the left of D``, ``D`` naming an object by two or three attributes.
    They are true of the scene and may be true of others."""
    out: List[str] = []
    for _ in range(20 * k):
        if len(out) == k:
            break
        form = rng.choice(("one", "and", "left"))
        i, j = sorted(rng.sample(range(len(scene)), 2))
        a = describe(scene[i], rng.choice(PARTIAL_ATTRS))
        b = describe(scene[j], rng.choice(PARTIAL_ATTRS))
        text = {"one": f"there is {a}", "and": f"there is {a} and {b}", "left": f"there is {a} to the left of {b}"}[form]
        if text not in out:
            out.append(text)
    return [out[i % len(out)] for i in range(k)]


def render(scene: List[dict], size: int, rng: random.Random) -> Image.Image:
    """Draw the scene; records each object's drawn centre and radius (``x, y, r``) in it.

    Each object lies inside one cell of a 3x3 grid (a 16-pixel ViT patch at 48 px), so shape,
    colour and size are local to a patch and the hard part is binding and relations."""
    shade = rng.randint(100, 150)
    img = Image.new("RGB", (size, size), (shade, shade, shade))
    draw = ImageDraw.Draw(img)
    cell = size / NUM_SLOTS
    for o in scene:
        r = cell * (0.42 if o["size"] == "large" else 0.25)
        slack = cell / 2 - r - 0.5
        cx = (o["slot"] + 0.5) * cell + rng.uniform(-slack, slack)
        cy = 1.5 * cell + rng.uniform(-slack, slack)
        o.update(x=round(cx, 2), y=round(cy, 2), r=round(r, 2))
        box = [cx - r, cy - r, cx + r, cy + r]
        color = COLORS[o["color"]]
        if o["shape"] == "circle":
            draw.ellipse(box, fill=color)
        elif o["shape"] == "square":
            draw.rectangle(box, fill=color)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
    return img


def scenes(rng: random.Random, n: int, family_size: int, exclude: frozenset = frozenset()) -> Tuple[List[List[dict]], List[int]]:
    """``n`` distinct scenes, in families of a base scene and its minimal-pair twins, and the
    family index of each scene; none is in ``exclude`` (``describe_all`` strings)."""
    out: List[List[dict]] = []
    families: List[int] = []
    seen = set(exclude)
    while len(out) < n:
        family = [random_scene(rng)]
        if describe_all(family[0]) in seen:
            continue
        seen.add(describe_all(family[0]))
        for _ in range(10 * family_size):
            if len(family) == family_size:
                break
            twin = variant(rng.choice(family), rng)
            if describe_all(twin) not in seen:
                seen.add(describe_all(twin))
                family.append(twin)
        out.extend(family)
        families.extend([len(set(families))] * len(family))
    return out[:n], families[:n]


def generate(root: str, spec: ShapesSpec) -> Dict[str, str]:
    """Write ``images/`` and ``annotations/{train,val,test}.json`` under ``root``.

    Train entries are one per caption ``{image, caption, image_id, family, scene}``; val/test
    entries one per image ``{image, caption: [...], family, scene}`` (LAVIS's retrieval format;
    ``scene`` is the spec the image was drawn from). Returns split -> annotation path.
    """
    rng = random.Random(spec.seed)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    paths, counter = {}, 0
    held_out = set()  # val and test scenes, which the extra training images never repeat
    for split, n in (("train", spec.num_train), ("val", spec.num_val), ("test", spec.num_test), ("extra", spec.extra_train)):
        if split == "extra" and n == 0:
            break
        split_scenes, families = scenes(rng, n, spec.family_size, exclude=frozenset(held_out) if split == "extra" else frozenset())
        if split in ("val", "test"):
            held_out.update(describe_all(sc) for sc in split_scenes)
        name_split = "train" if split == "extra" else split
        key_counts: Dict[tuple, int] = collections.Counter(k for sc in split_scenes for k in caption_keys(sc))
        entries = []
        for scene, family in zip(split_scenes, families):
            image = f"images/{name_split}_{counter:06d}.png"
            render(scene, spec.image_size, rng).save(os.path.join(root, image))
            if spec.captions == "partial":
                caps = partial_captions(scene, rng, spec.captions_per_image)
            else:
                caps = captions_for(scene, rng, spec.captions_per_image, key_counts)
            if name_split == "train":
                entries += [
                    {"image": image, "caption": c, "image_id": f"train_{counter}", "family": f"{split}_{family}", "scene": scene}
                    for c in caps
                ]
            else:
                entries.append({"image": image, "caption": caps, "family": f"{split}_{family}", "scene": scene})
            counter += 1
        if split == "train":
            train_entries = entries
        elif split == "extra":  # appended to train, after the first num_train images
            entries = train_entries + entries
        paths[name_split] = os.path.join(root, "annotations", f"{name_split}.json")
        with open(paths[name_split], "w") as f:
            json.dump(entries, f)
    return paths
