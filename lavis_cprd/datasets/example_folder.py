"""An example of "your own data", made offline: a folder of images, a captions table and a
table of extra true matches, as a user would bring them to ``lavis-cprd prepare-data``.

The pictures and partial captions (each true of its own picture and often of others) come
from one of two synthetic domains: ``shapes`` (``cprd_shapes``' generator) or ``signs``
(``datasets.signs``: other objects, attributes, relation and rendering). The extra true
matches are every other picture a caption is true of, by the domain's ground truth. Usage::

    python -m lavis_cprd.datasets.example_folder OUT [--domain shapes|signs] [--images 300] [--captions 3] [--seed 0]
"""
from __future__ import annotations

import argparse
import csv
import os
import random
from typing import Dict, List, Optional

import numpy as np

from lavis_cprd.datasets import shapes, signs
from lavis_cprd.datasets.shapes_truth import relevance_matrix

DOMAINS = ("shapes", "signs")


def _domain(name: str, rng: random.Random, images: int, captions: int, size: int):
    """Per picture its image and caption texts, and the truth matrix over every (picture, text)."""
    pictures, scenes, structures = [], [], {}
    for _ in range(images):
        if name == "shapes":
            scene = shapes.random_scene(rng)
            texts = list(dict.fromkeys(shapes.partial_captions(scene, rng, captions)))
            image = shapes.render(scene, size, rng)
        else:
            scene = signs.random_scene(rng)
            caps = signs.captions(scene, rng, captions)
            texts = [signs.text(c) for c in caps]
            structures.update(zip(texts, caps))
            image = signs.render(scene, size, rng)
        scenes.append(scene)
        pictures.append((image, texts))
    all_texts = list(dict.fromkeys(t for _, texts in pictures for t in texts))
    if name == "shapes":
        true = relevance_matrix(scenes, all_texts) >= 1.0
    else:
        true = signs.truth(scenes, [structures[t] for t in all_texts])
    return pictures, all_texts, np.asarray(true)


def write_example(out: str, images: int = 300, captions: int = 3, seed: int = 0, size: int = 48,
                  domain: str = "shapes") -> Dict[str, str]:
    """Write ``out/images/*.png``, ``out/captions.csv`` (image, caption) and
    ``out/extra_matches.csv`` (image, caption: the caption is also true of that image)."""
    if domain not in DOMAINS:
        raise ValueError(f"domain {domain!r} is not one of {list(DOMAINS)}")
    rng = random.Random(seed)
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    pictures, texts, true = _domain(domain, rng, images, captions, size)
    names = [f"photo_{n:05d}.png" for n in range(images)]
    rows: List[tuple] = []
    for name, (image, own) in zip(names, pictures):
        image.save(os.path.join(out, "images", name))
        rows += [(name, c) for c in own]
    paths = {"images": os.path.join(out, "images"), "captions": os.path.join(out, "captions.csv"),
             "extra_matches": os.path.join(out, "extra_matches.csv")}
    with open(paths["captions"], "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        writer.writerows(rows)
    own = set(rows)
    with open(paths["extra_matches"], "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        for j, text in enumerate(texts):
            writer.writerows((names[i], text) for i in true[:, j].nonzero()[0] if (names[i], text) not in own)
    return paths


def main(argv: Optional[List[str]] = None) -> Dict[str, str]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--captions", type=int, default=3, help="captions per image (distinct ones kept)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--domain", choices=DOMAINS, default="shapes")
    args = p.parse_args(argv)
    paths = write_example(args.out, args.images, args.captions, args.seed, domain=args.domain)
    print("\n".join(f"{k}: {v}" for k, v in paths.items()))
    return paths


if __name__ == "__main__":
    main()
