"""The second synthetic domain (``signs``): its captions' truth on hand-made scenes, and the
example folder's extra matches are exactly the other pictures each caption is true of."""
import csv
import random

from lavis_cprd.datasets import signs
from lavis_cprd.datasets.example_folder import write_example

STAR = {"kind": "star", "color": "teal", "pattern": "striped", "slot": 0}
RING = {"kind": "ring", "color": "pink", "pattern": "solid", "slot": 2}
RING_TOP = {**RING, "slot": 0}
STAR_LOW = {**STAR, "slot": 1}


def test_truth_by_hand():
    star_above_ring = ("above", ("star", "teal", None), ("ring", None, "solid"))
    assert signs.text(star_above_ring) == "there is a teal star above a solid ring"
    assert signs.holds(star_above_ring, [STAR, RING]) and not signs.holds(star_above_ring, [RING_TOP, STAR_LOW])
    assert signs.holds(("and", ("star", None, None), ("ring", None, None)), [RING_TOP, STAR_LOW])
    assert not signs.holds(("one", ("star", "pink", None), None), [STAR, RING])  # the colour of another object
    assert not signs.holds(("and", ("star", None, None), ("star", None, None)), [STAR, RING])  # two distinct objects
    assert signs.text(("one", ("ring", None, "hollow"), None)) == "there is a hollow ring"
    truth = signs.truth([[STAR, RING], [RING_TOP, STAR_LOW]], [star_above_ring, ("one", ("ring", "pink", None), None)])
    assert truth.tolist() == [[True, True], [False, True]]


def test_generated_captions_are_true_of_their_own_picture():
    rng = random.Random(3)
    for _ in range(200):
        scene = signs.random_scene(rng)
        caps = signs.captions(scene, rng, 3)
        assert caps and len({signs.text(c) for c in caps}) == len(caps)
        assert all(signs.holds(c, scene) for c in caps)


def test_the_example_folders_extra_matches_are_other_true_pictures(tmp_path):
    paths = write_example(str(tmp_path), images=25, captions=3, seed=4, domain="signs")
    own = {(r["image"], r["caption"]) for r in csv.DictReader(open(paths["captions"]))}
    extra = {(r["image"], r["caption"]) for r in csv.DictReader(open(paths["extra_matches"]))}
    assert extra and not extra & own
    # every caption names something the domain can draw: kinds, colours and patterns of signs
    words = set(signs.KINDS) | set(signs.COLORS) | set(signs.PATTERNS) | {"there", "is", "a", "an", "and", "above"}
    assert all(set(c.split()) <= words for _, c in own | extra)
