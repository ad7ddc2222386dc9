"""Relevance-aware metrics, cprd_shapes ground truth, and the shapes_oracle teacher."""
import json
import random
import re

import numpy as np
import pytest
import torch

from lavis_cprd.datasets import shapes
from lavis_cprd.datasets.shapes_truth import CaptionParseError, parse_caption, relevance, scenes_by_image_id
from lavis_cprd.relevance import map_at_r, r_precision, recall_at_k, relevance_metrics
from lavis_cprd.teachers import ShapesOracleTeacher, build_teacher

SCORES = np.array([[0.9, 0.5, 0.5, 0.1, 0.7], [0.2, 0.2, 0.2, 0.2, 0.2], [0.1, 0.8, 0.3, 0.6, 0.9]])
RELEVANT = np.array([[1, 0, 1, 0, 1], [0, 0, 1, 1, 0], [1, 1, 0, 0, 0]], dtype=bool)


def test_map_at_r_and_r_precision_by_hand():
    """Ties are broken by item index. Row 0 ranks 0, 4, 1, 2, 3 (R = 3: hits at 1, 2):
    mAP@R = (1 + 1 + 0) / 3, RP = 2/3. Row 1 (all tied) ranks 0..4 (R = 2): no hit in the top 2.
    Row 2 ranks 4, 1, 3, 2, 0 (R = 2: a hit at 2): mAP@R = (1/2) / 2, RP = 1/2."""
    np.testing.assert_allclose(map_at_r(SCORES, RELEVANT), [2 / 3, 0.0, 0.25])
    np.testing.assert_allclose(r_precision(SCORES, RELEVANT), [2 / 3, 0.0, 0.5])
    np.testing.assert_allclose(recall_at_k(SCORES, RELEVANT, 1), [1, 0, 0])
    np.testing.assert_allclose(recall_at_k(SCORES, RELEVANT, 3), [1, 1, 1])


def test_metrics_equal_eccv_caption_reference_code():
    """On random scores with several true matches per query, our mAP@R, R-P and R@1 equal
    ``eccv_caption``'s own ``compute_eccv_metrics`` on the same ranked lists."""
    from eccv_caption._metrics import compute_eccv_metrics

    rng = np.random.default_rng(0)
    scores = rng.random((40, 60))
    relevant = rng.random((40, 60)) < 0.08
    relevant[np.arange(40), rng.integers(0, 60, 40)] = True
    ranked = {q: list(np.argsort(-scores[q], kind="stable")) for q in range(40)}
    gts = {q: list(np.flatnonzero(relevant[q])) for q in range(40)}
    ref = compute_eccv_metrics(ranked, gts)
    assert map_at_r(scores, relevant).mean() == pytest.approx(ref["eccv_map_at_r"], abs=1e-12)
    assert r_precision(scores, relevant).mean() == pytest.approx(ref["eccv_rprecision"], abs=1e-12)
    assert recall_at_k(scores, relevant, 1).mean() == pytest.approx(ref["eccv_r1"], abs=1e-12)
    both = relevance_metrics(scores, relevant)
    assert both["i2t_map_at_r"] == pytest.approx(100 * ref["eccv_map_at_r"])


def test_ranking_correlation_on_hard_negatives():
    """``rank_tau``: Kendall tau between scores and grades on each query's hard negatives; a
    student that orders them as the grades do scores 1, the reverse order -1."""
    grades = np.array([[1.0, 0.8, 0.6, 0.4, 0.2, 0.0]])
    annotated = np.array([[True, False, False, False, False, False]])
    same = relevance_metrics(grades, grades >= 1, annotated, grades, hard_k=4)
    assert same["i2t_tau_hard4"] == pytest.approx(1.0)
    reverse = -grades
    reverse[0, 0] = 5.0  # the positive stays first; negatives in reverse order
    assert relevance_metrics(reverse, grades >= 1, annotated, grades, hard_k=4)["i2t_tau_hard4"] == pytest.approx(-1.0)


def test_shapes_truth_matches_generator_keys():
    """Grade 1.0 exactly when the generator's own caption keys say the caption is true of the
    scene (an independent account of truth), over every caption of 60 scenes x 60 scenes."""
    split, _ = shapes.scenes(random.Random(3), 60, 3)
    for a in split:
        for text, key in shapes.caption_pool(a):
            for b in split:
                assert (relevance(text, b) == 1.0) == (key in shapes.caption_keys(b)), (text, b)


def test_graded_relevance_by_hand():
    scene = [{"shape": "circle", "color": "red", "size": "small", "slot": 0},
             {"shape": "square", "color": "blue", "size": "large", "slot": 2}]
    assert relevance("a red circle left of a blue square", scene) == 1.0
    assert relevance("a blue square left of a red circle", scene) == pytest.approx(2 / 3)  # both exist, wrong side
    assert relevance("a red circle right of a green square", scene) == pytest.approx(1 / 3)
    assert relevance("from left to right a small red circle then a large blue square", scene) == 1.0
    assert relevance("from left to right a large blue square then a small red circle", scene) == pytest.approx(1 / 3)
    assert relevance("a large blue square and a small red circle", scene) == 1.0
    assert relevance("a large blue square and a large red circle", scene) == pytest.approx(2 / 3)
    assert parse_caption("a red circle between a blue square and a green triangle") == (
        "between", (("blue", "square"), ("red", "circle"), ("green", "triangle")))
    with pytest.raises(CaptionParseError, match="not 'a color shape'"):
        relevance("a dog left of a cat", scene)


def _train_annotation(tmp_path):
    spec = shapes.ShapesSpec(num_train=12, num_val=6, num_test=6, image_size=24)
    paths = shapes.generate(str(tmp_path), spec)
    return paths["train"], json.load(open(paths["train"]))


def test_oracle_scores_equal_scene_relevance(tmp_path):
    """The oracle's match probability of (image id, caption) is the caption's graded relevance
    to that image's scene (clipped to [eps, 1 - eps]); ids number images as LAVIS does."""
    path, ann = _train_annotation(tmp_path)
    teacher = build_teacher({"arch": "shapes_oracle", "annotations": path, "eps": 0.01})
    assert isinstance(teacher, ShapesOracleTeacher)
    order = list(dict.fromkeys(a["image_id"] for a in ann))
    scene_of = {a["image_id"]: a["scene"] for a in ann}
    captions = [a["caption"] for a in ann[:9]]
    ids = torch.tensor([order.index(a["image_id"]) for a in ann[:9]])
    pairs = torch.tensor([(i, j) for i in range(9) for j in range(9)])
    got = teacher.score(torch.zeros(9, 3, 4, 4), captions, pairs, image_ids=ids)
    want = [min(max(relevance(captions[j], scene_of[ann[i]["image_id"]]), 0.01), 0.99) for i, j in pairs.tolist()]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5)
    assert got.view(9, 9).diagonal().min() == pytest.approx(0.99)  # each caption with its own image


def test_oracle_fails_clearly_off_its_data(tmp_path):
    with pytest.raises(ValueError, match="annotations is not set"):
        build_teacher({"arch": "shapes_oracle"})
    other = tmp_path / "coco.json"
    other.write_text(json.dumps([{"image": "a.jpg", "caption": "a dog", "image_id": 1}]))
    with pytest.raises(ValueError, match="no 'scene' field: only cprd_shapes"):
        build_teacher({"arch": "shapes_oracle", "annotations": str(other)})
    path, ann = _train_annotation(tmp_path / "shapes")
    teacher = build_teacher({"arch": "shapes_oracle", "annotations": path})
    with pytest.raises(ValueError, match="only knows cprd_shapes captions"):
        teacher.score(torch.zeros(1, 3, 4, 4), ["a dog on a mat"], torch.tensor([[0, 0]]), image_ids=torch.tensor([0]))
    with pytest.raises(ValueError, match="pass image_ids"):
        teacher.score(torch.zeros(1, 3, 4, 4), [ann[0]["caption"]], torch.tensor([[0, 0]]))


def test_eval_scene_ids_are_positions():
    ann = [{"image": "x", "caption": ["c"], "scene": [1]}, {"image": "y", "caption": ["d"], "scene": [2]}]
    assert scenes_by_image_id(ann) == {0: [1], 1: [2]}


# ------------------------------------------------------------- partial captions
_DESC = re.compile(r"a (?:(small|large) )?(?:(red|green|blue|yellow|purple|white) )?(circle|square|triangle|shape)$")


def _fits_by_regex(group, obj):
    size, color, shape = _DESC.match(group).groups()
    return (size in (None, obj["size"]) and color in (None, obj["color"])
            and shape in ("shape", obj["shape"]))


def _true_by_regex(caption, scene):
    """Truth of a partial caption read independently of ``shapes_truth``: by regex, and by
    brute force over the scene's objects."""
    body = caption[len("there is "):]
    objs = sorted(scene, key=lambda o: o["slot"])
    if " to the left of " in body:
        a, b = body.split(" to the left of ")
        return any(_fits_by_regex(a, o) and _fits_by_regex(b, p) for i, o in enumerate(objs) for p in objs[i + 1:])
    groups = body.split(" and ")
    if len(groups) == 1:
        return any(_fits_by_regex(groups[0], o) for o in objs)
    a, b = groups
    return any(_fits_by_regex(a, o) and _fits_by_regex(b, p) for o in objs for p in objs if o is not p)


def test_partial_mode_records_exactly_the_true_matches(tmp_path):
    """Partial captions are true of several images; the recorded true matches of every val
    and test pair (what the relevance-aware metrics count) are exactly those an independent
    parse of the scene finds, and LAVIS still annotates one source image per caption."""
    from types import SimpleNamespace

    from lavis_cprd.datasets.true_matches import dataset_relevance

    spec = shapes.ShapesSpec(seed=5, num_train=12, num_val=30, num_test=30, image_size=24, captions="partial")
    paths = shapes.generate(str(tmp_path), spec)
    several = 0
    for split in ("val", "test"):
        ann = json.load(open(paths[split]))
        text = [c for a in ann for c in a["caption"]]
        img2txt, t = {}, 0
        for i, a in enumerate(ann):
            img2txt[i] = list(range(t, t + len(a["caption"])))
            t += len(a["caption"])
        ds = SimpleNamespace(annotation=ann, image=[a["image"] for a in ann], text=text, img2txt=img2txt)
        truth = dataset_relevance(ds)
        expected = np.array([[_true_by_regex(c, a["scene"]) for c in text] for a in ann])
        assert expected[truth["annotated"]].all()  # every caption is true of its own image
        np.testing.assert_array_equal(truth["true"], expected)
        assert ((truth["grades"] >= 1.0) == expected).all()
        several += int((expected.sum(axis=0) > 1).sum())
    assert several > 30  # many captions are true of more than one image
    assert spec.key != shapes.ShapesSpec(seed=5, num_train=12, num_val=30, num_test=30, image_size=24).key


def test_relevance_is_computed_once_per_split_and_again_for_new_annotations(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from lavis_cprd.datasets import true_matches as rel

    spec = shapes.ShapesSpec(seed=5, num_train=12, num_val=6, num_test=6, image_size=24, captions="partial")
    ann = json.load(open(shapes.generate(str(tmp_path), spec)["val"]))
    text = [c for a in ann for c in a["caption"]]
    img2txt = {i: [3 * i, 3 * i + 1, 3 * i + 2] for i in range(len(ann))}
    ds = SimpleNamespace(annotation=ann, image=[a["image"] for a in ann], text=text, img2txt=img2txt)
    calls = []
    compute = rel._relevance
    monkeypatch.setattr(rel, "_relevance", lambda d: calls.append(1) or compute(d))
    first = rel.dataset_relevance(ds)
    assert rel.dataset_relevance(ds) is first and len(calls) == 1  # every epoch's evaluation reads the same
    ds.annotation = ann[:3]
    ds.image, ds.text, ds.img2txt = ds.image[:3], text[:9], {i: img2txt[i] for i in range(3)}
    again = rel.dataset_relevance(ds)
    assert len(calls) == 2 and again["true"].shape == (3, 9)
    np.testing.assert_array_equal(again["true"], first["true"][:3, :9])


def test_partial_grades_by_hand_and_unique_keys_unchanged():
    scene = [{"shape": "circle", "color": "red", "size": "small", "slot": 0},
             {"shape": "square", "color": "blue", "size": "large", "slot": 2}]
    assert relevance("there is a red circle", scene) == 1.0
    assert relevance("there is a red square", scene) == pytest.approx(2 / 3)  # red and square, not together
    assert relevance("there is a large red shape", scene) == pytest.approx(2 / 3)
    assert relevance("there is a blue square to the left of a red circle", scene) == pytest.approx(6 / 7)
    assert relevance("there is a red shape and a red circle", scene) == pytest.approx(5 / 6)  # one red object only
    assert relevance("there is a small circle and a large shape", scene) == 1.0
    with pytest.raises(CaptionParseError, match="unexpected 'huge red'"):
        relevance("there is a huge red circle", scene)
    with pytest.raises(ValueError, match=r"generator.captions='some' is not one of \['unique', 'partial'\]"):
        shapes.ShapesSpec(captions="some")
    # the default (unique) mode keeps its folder names, hence its recorded results
    assert shapes.ShapesSpec().key == shapes.ShapesSpec(captions="unique").key
    assert "captions" not in json.dumps(shapes.ShapesSpec().key)


def test_lookalike_captions_are_minimal_edits_false_of_their_scene(tmp_path):
    """Every look-alike ITM negative differs from its caption by one attribute word (or the
    two objects' order) and is false of the caption's own scene by the independent parse."""
    import random

    from lavis_cprd.datasets.shapes_truth import lookalike_caption

    spec = shapes.ShapesSpec(seed=3, num_train=60, num_val=4, num_test=4, image_size=24, captions="partial")
    ann = json.load(open(shapes.generate(str(tmp_path), spec)["train"]))
    rng, swapped = random.Random(0), 0
    for a in ann:
        for _ in range(3):
            text = lookalike_caption(a["caption"], a["scene"], rng)
            assert _true_by_regex(a["caption"], a["scene"]) and not _true_by_regex(text, a["scene"])
            old, new = a["caption"].split(), text.split()
            if len(old) == len(new) and sum(x != y for x, y in zip(old, new)) == 1:
                continue
            swapped += 1  # "A to the left of B" -> "B to the left of A"
            x, y = a["caption"][len("there is "):].split(" to the left of ")
            assert text == f"there is {y} to the left of {x}"
    assert 0 < swapped < len(ann)
    # no false edit exists: every word of the vocabulary is true of this scene
    scene = [{"shape": s, "color": c, "size": z, "slot": 0} for s in shapes.SHAPES for c in shapes.COLORS for z in shapes.SIZES]
    assert lookalike_caption("there is a red circle", scene, rng) is None


def test_extra_train_keeps_the_splits_and_never_repeats_a_held_out_scene(tmp_path):
    """``extra_train`` (a teacher's larger pre-training set) appends images after the test
    split: val, test and the first ``num_train`` images are those of ``extra_train=0``, byte
    for byte, and no extra scene is a val or test scene."""
    base = shapes.ShapesSpec(seed=2, num_train=30, num_val=20, num_test=20, image_size=24, captions="partial")
    more = shapes.ShapesSpec(**{**base.__dict__, "extra_train": 200})
    a, b = shapes.generate(str(tmp_path / "a"), base), shapes.generate(str(tmp_path / "b"), more)
    for split in ("val", "test"):
        assert open(a[split]).read() == open(b[split]).read()
    train_a, train_b = json.load(open(a["train"])), json.load(open(b["train"]))
    assert train_b[: len(train_a)] == train_a and len(train_b) == len(train_a) + 200 * 3
    extra = train_b[len(train_a):]
    held_out = {shapes.describe_all(e["scene"]) for s in ("val", "test") for e in json.load(open(a[s]))}
    assert not {shapes.describe_all(e["scene"]) for e in extra} & held_out
    assert len({e["image_id"] for e in train_b}) == 230
    first = train_a[0]["image"]
    assert open(tmp_path / "a" / first, "rb").read() == open(tmp_path / "b" / first, "rb").read()
    assert base.key != more.key
    # extra_train=0 is left out of the folder name, so earlier folders (and results) keep theirs
    import hashlib
    params = {k: v for k, v in base.__dict__.items() if k != "extra_train"}
    blob = json.dumps({**params, "version": shapes.FORMAT_VERSION}, sort_keys=True).encode()
    assert base.key == hashlib.sha1(blob).hexdigest()[:12]
    with pytest.raises(ValueError, match=r"extra_train=-1 is out of range: it must be in \[0, inf\)"):
        shapes.ShapesSpec(extra_train=-1)


def test_hard_false_caption_is_the_most_relevant_false_one():
    from lavis_cprd.datasets.shapes_truth import hard_false_caption

    scene = [{"shape": "circle", "color": "red", "size": "small", "slot": 0},
             {"shape": "square", "color": "blue", "size": "large", "slot": 2}]
    captions = ["there is a red circle",  # true: never a negative
                "there is a green triangle",  # 0
                "there is a large red shape",  # 2/3
                "there is a blue square to the left of a red circle",  # 6/7: the hardest false one
                "there is a blue square to the left of a red circle"]
    assert hard_false_caption(captions, scene) == captions[3]
    assert hard_false_caption(captions[:3], scene) == captions[2]
    assert hard_false_caption(["there is a red square", "there is a large red shape"], scene) == "there is a red square"  # tie: first
    assert hard_false_caption(captions[:1], scene) is None
    from lavis_cprd.datasets.shapes_truth import other_true_caption

    assert other_true_caption(captions, scene, own="there is a red circle") is None
    assert other_true_caption(["there is a green triangle", "there is a large shape", "there is a red circle"], scene,
                              own="there is a red circle") == "there is a large shape"


def test_verified_train_samples_are_checked_against_their_scene():
    """``verified_negatives``: each sample's ``negative_text`` and ``random_negative_text`` are
    false of its scene, its ``positive_text`` true, by the independent regex parse (or equal to
    its own caption: none found among the draws)."""
    from lavis_cprd.apps.runs import STUDENT_CFG, eval_split

    options = ["datasets.cprd_shapes.generator.num_train=40", "datasets.cprd_shapes.generator.num_val=4",
               "datasets.cprd_shapes.generator.num_test=4", "datasets.cprd_shapes.verified_negatives=true"]
    train, _ = eval_split(STUDENT_CFG, options, "train")
    random.seed(0)
    found = {"negative_text": 0, "random_negative_text": 0, "positive_text": 0}
    for index in range(len(train)):
        sample, ann = train[index], train.annotation[index]
        assert "lookalike_text" not in sample  # only with lookalike_negatives
        for key, truth in (("negative_text", False), ("random_negative_text", False), ("positive_text", True)):
            if sample[key] != sample["text_input"]:
                found[key] += 1
                assert _true_by_regex(sample[key], ann["scene"]) is truth, (key, sample[key], ann["scene"])
    assert min(found.values()) > len(train) // 4, found
