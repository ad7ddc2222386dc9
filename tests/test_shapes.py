"""The embedded cprd_shapes dataset: deterministic, captions true of the images, LAVIS-valid."""
import hashlib
import json
import os
import re
from argparse import Namespace

import numpy as np
import pytest
from PIL import Image

from lavis_cprd.datasets.shapes import COLORS, ShapesSpec, generate

SPEC = ShapesSpec(seed=3, num_train=24, num_val=9, num_test=9, captions_per_image=3, image_size=48)


def digest(root):
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(root)):
        for f in sorted(files):
            h.update(f.encode())
            h.update(open(os.path.join(dirpath, f), "rb").read())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    generate(str(tmp_path / "a"), SPEC)
    generate(str(tmp_path / "b"), SPEC)
    generate(str(tmp_path / "c"), ShapesSpec(**{**SPEC.__dict__, "seed": 4}))
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert digest(tmp_path / "a") != digest(tmp_path / "c")
    assert SPEC.key != ShapesSpec(**{**SPEC.__dict__, "seed": 4}).key


# An independent reading of the caption grammar: each caption becomes constraints on the scene.
OBJ = r"(?:(small|large) )?(\w+) (circle|square|triangle)"


def matches(obj, size, color, shape):
    return obj["color"] == color and obj["shape"] == shape and (size is None or obj["size"] == size)


def caption_holds(caption, scene):
    objs = sorted(scene, key=lambda o: o["slot"])
    m = re.fullmatch(rf"a {OBJ} (left|right) of a {OBJ}", caption)
    if m:
        s1, c1, h1, rel, s2, c2, h2 = m.groups()
        return any(
            matches(a, s1, c1, h1) and matches(b, s2, c2, h2) and (a["slot"] < b["slot"]) == (rel == "left")
            for a in objs for b in objs if a is not b
        )
    m = re.fullmatch(rf"a {OBJ} between a {OBJ} and a {OBJ}", caption)
    if m:
        g = m.groups()
        return len(objs) == 3 and matches(objs[1], *g[0:3]) and matches(objs[0], *g[3:6]) and matches(objs[2], *g[6:9])
    if caption.startswith("from left to right "):
        parts = caption[len("from left to right "):].split(" then ")
        return len(parts) == len(objs) and all(
            matches(o, *re.fullmatch(rf"a {OBJ}", p).groups()) for o, p in zip(objs, parts)
        )
    parts = caption.split(" and ")
    wanted = [re.fullmatch(rf"a {OBJ}", p).groups() for p in parts]
    return len(parts) == len(objs) and sorted(map(str, wanted)) == sorted(str((o["size"], o["color"], o["shape"])) for o in objs)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return str(root), generate(str(root), SPEC)


def test_captions_match_scene_and_pixels_match_scene(generated):
    root, paths = generated
    checked = 0
    for split, path in paths.items():
        for entry in json.load(open(path)):
            captions = [entry["caption"]] if split == "train" else entry["caption"]
            for caption in captions:
                assert caption_holds(caption, entry["scene"]), (caption, entry["scene"])
                checked += 1
            pixels = np.asarray(Image.open(os.path.join(root, entry["image"])).convert("RGB"))
            for obj in entry["scene"]:
                centre = pixels[int(obj["y"]), int(obj["x"])]
                assert tuple(centre) == COLORS[obj["color"]], (entry["image"], obj)
    assert checked == (24 + 9 + 9) * 3


def test_families_hold_minimal_pairs(generated):
    """Scenes are distinct; images of a family share their words but not their binding."""
    _, paths = generated
    binding = lambda s: [(o["size"], o["color"], o["shape"]) for o in s]  # noqa: E731
    words = lambda s: sorted(w for o in s for w in (o["size"], o["color"], o["shape"]))  # noqa: E731
    for path in paths.values():
        entries = json.load(open(path))
        scenes = {str(binding(e["scene"])): e for e in entries}
        assert len(scenes) == len({e["image"] for e in entries})  # no scene drawn twice
    test = json.load(open(paths["test"]))
    for family in (test[0:3], test[3:6], test[6:9]):
        assert all(words(f["scene"]) == words(family[0]["scene"]) for f in family)
        assert len({str(binding(f["scene"])) for f in family}) == 3


def test_builder_makes_lavis_retrieval_datasets(tmp_path):
    from lavis.common.config import Config
    from lavis.common.registry import registry
    from lavis.datasets.datasets.retrieval_datasets import RetrievalDataset, RetrievalEvalDataset

    from conftest import REPO

    registry.mapping["paths"]["cache_root"] = str(tmp_path)
    cfg = Config(Namespace(cfg_path=os.path.join(REPO, "configs", "cprd_tiny_shapes.yaml"), options=[
        "datasets.cprd_shapes.generator.num_train=12", "datasets.cprd_shapes.generator.num_val=6",
        "datasets.cprd_shapes.generator.num_test=6",
    ]))
    builder = registry.get_builder_class("cprd_shapes")(cfg.datasets_cfg.cprd_shapes)
    datasets = builder.build_datasets()
    assert isinstance(datasets["train"], RetrievalDataset) and len(datasets["train"]) == 12 * 3
    for split in ("val", "test"):
        ds = datasets[split]
        assert isinstance(ds, RetrievalEvalDataset) and len(ds) == 6 and len(ds.text) == 18
        assert all(len(ds.img2txt[i]) == 3 for i in range(6)) and ds.txt2img[17] == 5
        item = ds[0]
        assert tuple(item["image"].shape) == (3, 48, 48) and item["index"] == 0
    sample = datasets["train"][0]
    assert set(sample) == {"image", "text_input", "image_id", "instance_id"}
    # Generated once: a second build reuses the folder (its marker file is untouched).
    marker = os.path.join(str(tmp_path), "cprd_shapes", builder.spec().key, "DONE")
    mtime = os.path.getmtime(marker)
    registry.get_builder_class("cprd_shapes")(cfg.datasets_cfg.cprd_shapes).build_datasets()
    assert os.path.getmtime(marker) == mtime
    with pytest.raises(ValueError, match=r"unknown key datasets.cprd_shapes.generator.num_imgs \(did you mean"):
        cfg.datasets_cfg.cprd_shapes.generator.num_imgs = 3
        registry.get_builder_class("cprd_shapes")(cfg.datasets_cfg.cprd_shapes).spec()


def test_each_object_inside_one_patch_cell(generated):
    """At 48 px each object lies within its own 16-px cell (one ViT patch), middle row."""
    root, paths = generated
    for entry in json.load(open(paths["test"])):
        for o in entry["scene"]:
            cell = 16
            assert o["slot"] * cell <= o["x"] - o["r"] and o["x"] + o["r"] <= (o["slot"] + 1) * cell
            assert cell <= o["y"] - o["r"] and o["y"] + o["r"] <= 2 * cell


def test_every_caption_is_true_of_exactly_one_scene_in_its_split(generated):
    """No false negatives: a caption never also describes another image of its split."""
    _, paths = generated
    for split, path in paths.items():
        entries = json.load(open(path))
        scenes = {e["image"]: e["scene"] for e in entries}
        captions = {(c, e["image"]) for e in entries for c in ([e["caption"]] if split == "train" else e["caption"])}
        for caption, image in captions:
            holders = [img for img, scene in scenes.items() if caption_holds(caption, scene)]
            assert holders == [image], (split, caption, holders)
