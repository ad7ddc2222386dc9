"""A synthetic, compositional image-caption dataset written in LAVIS's retrieval format.

Each image holds one or two coloured shapes; captions bind colours, sizes and positions to
shapes ("a red circle left of a blue square"), so many captions share words and differ only in
the binding: in-batch negatives are hard for separate encoders. Deterministic from its seed.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass
from typing import Dict, List

from PIL import Image, ImageDraw

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


@dataclass(frozen=True)
class ShapesSpec:
    seed: int = 0
    num_train: int = 400
    num_val: int = 100
    num_test: int = 100
    captions_per_image: int = 3
    image_size: int = 64

    @property
    def key(self) -> str:
        """Folder name: changes whenever a parameter (or the format version) changes."""
        blob = json.dumps({**asdict(self), "version": 1}, sort_keys=True).encode()
        return hashlib.sha1(blob).hexdigest()[:12]


def _scene(rng: random.Random) -> List[dict]:
    n = rng.choice((1, 2))
    slots = rng.sample(("left", "right"), n) if n == 2 else [rng.choice(("left", "right", "center"))]
    return [
        {"shape": rng.choice(SHAPES), "color": rng.choice(list(COLORS)), "size": rng.choice(SIZES), "position": slot}
        for slot in slots
    ]


def describe(obj: dict, with_size: bool) -> str:
    return " ".join(["a", obj["size"]] if with_size else ["a"]) + f" {obj['color']} {obj['shape']}"


def captions_for(scene: List[dict], rng: random.Random, k: int) -> List[str]:
    """``k`` distinct captions, each true of the scene."""
    options = []
    if len(scene) == 1:
        (o,) = scene
        options += [f"{describe(o, True)}", f"{describe(o, False)} in the {o['position']}", f"{describe(o, True)} on a grey background"]
    else:
        left, right = sorted(scene, key=lambda o: o["position"] != "left")
        options += [
            f"{describe(left, False)} left of {describe(right, False)}",
            f"{describe(right, False)} right of {describe(left, False)}",
            f"{describe(left, True)} and {describe(right, True)}",
            f"{describe(right, True)} and {describe(left, True)}",
        ]
    rng.shuffle(options)
    return [options[i % len(options)] for i in range(k)]


def render(scene: List[dict], size: int, rng: random.Random) -> Image.Image:
    img = Image.new("RGB", (size, size), (128, 128, 128))
    draw = ImageDraw.Draw(img)
    for o in scene:
        r = size * (0.2 if o["size"] == "large" else 0.11)
        cx = {"left": 0.27, "right": 0.73, "center": 0.5}[o["position"]] * size + rng.uniform(-2, 2)
        cy = size * 0.5 + rng.uniform(-size * 0.15, size * 0.15)
        box = [cx - r, cy - r, cx + r, cy + r]
        color = COLORS[o["color"]]
        if o["shape"] == "circle":
            draw.ellipse(box, fill=color)
        elif o["shape"] == "square":
            draw.rectangle(box, fill=color)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
    return img


def generate(root: str, spec: ShapesSpec) -> Dict[str, str]:
    """Write ``images/`` and ``annotations/{train,val,test}.json`` under ``root``.

    Train entries are one per caption ``{image, caption, image_id}``; val/test entries one
    per image ``{image, caption: [...]}`` (LAVIS's retrieval format). Returns split -> path.
    """
    rng = random.Random(spec.seed)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    paths = {}
    counter = 0
    for split, n in (("train", spec.num_train), ("val", spec.num_val), ("test", spec.num_test)):
        entries = []
        for _ in range(n):
            scene = _scene(rng)
            name = f"images/{split}_{counter:06d}.png"
            render(scene, spec.image_size, rng).save(os.path.join(root, name))
            caps = captions_for(scene, rng, spec.captions_per_image)
            if split == "train":
                entries += [{"image": name, "caption": c, "image_id": f"{split}_{counter}"} for c in caps]
            else:
                entries.append({"image": name, "caption": caps, "scene": scene})
            counter += 1
        paths[split] = os.path.join(root, "annotations", f"{split}.json")
        with open(paths[split], "w") as f:
            json.dump(entries, f)
    return paths
