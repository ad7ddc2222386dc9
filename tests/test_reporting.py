"""Reporting helpers against direct computations."""
import numpy as np
import pytest
import torch
from scipy.stats import kendalltau

from lavis_cprd.reporting import (
    family_chance,
    family_pairs,
    kendall_tau_on_hard_negatives,
    markdown_table,
    score_distributions,
    summarize,
    teacher_all_pairs,
    teacher_rerank,
    within_family_accuracy,
)


class TableTeacher:
    """A fake cross-encoder whose scores are a fixed [n_img, n_txt] table."""

    def __init__(self, table):
        self.table = torch.as_tensor(table, dtype=torch.float32)
        self.calls = 0

    def score(self, images, captions, pairs):
        self.calls += 1
        return self.table[pairs[:, 0], pairs[:, 1]]


class Dataset:
    def __init__(self, n_img, per):
        self.img2txt = {i: [per * i + j for j in range(per)] for i in range(n_img)}
        self.text = [f"t{t}" for t in range(n_img * per)]


def test_rerank_reorders_only_the_student_top_k():
    rng = np.random.default_rng(0)
    student = rng.uniform(-1, 1, size=(5, 10)).astype(np.float32)
    table = rng.uniform(0, 1, size=(5, 10))
    i2t, t2i = teacher_rerank(TableTeacher(table), torch.zeros(5, 3, 4, 4), [str(i) for i in range(10)], student, k=3)
    for i in range(5):
        top = np.argsort(-student[i])[:3]
        order = np.argsort(-i2t[i])
        assert set(order[:3]) == set(top)  # the top-k stays on top ...
        assert list(order[:3]) == list(top[np.argsort(-table[i, top])])  # ... in teacher order
        assert list(order[3:]) == list(np.argsort(-student[i])[3:])  # the rest keeps student order
    for t in range(10):
        top = np.argsort(-student[:, t])[:3]
        assert list(np.argsort(-t2i[t])[:3]) == list(top[np.argsort(-table[top, t])])


def test_kendall_tau_on_hard_negatives_excludes_positives():
    data = Dataset(n_img=4, per=2)
    rng = np.random.default_rng(1)
    student = rng.uniform(-1, 1, size=(4, 8))
    for i in range(4):
        student[i, data.img2txt[i]] = 5.0  # positives on top: they must be skipped
    # A teacher agreeing with the student everywhere gives tau = 1; reversed gives -1.
    assert kendall_tau_on_hard_negatives(TableTeacher(student), None, data, student, k=3) == pytest.approx(1.0)
    assert kendall_tau_on_hard_negatives(TableTeacher(-student), None, data, student, k=3) == pytest.approx(-1.0)
    table = rng.uniform(size=(4, 8))
    expected = []
    for i in range(4):
        negs = [t for t in np.argsort(-student[i]) if t not in data.img2txt[i]][:3]
        expected.append(kendalltau(student[i, negs], table[i, negs]).statistic)
    assert kendall_tau_on_hard_negatives(TableTeacher(table), None, data, student, k=3) == pytest.approx(np.mean(expected))


def test_summary_and_table():
    runs = [{m: v for m in ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean")} for v in (10.0, 20.0, 30.0)]
    row = summarize("x", runs)
    assert row["r_mean"] == 20.0 and row["r_mean_std"] == pytest.approx(10.0)
    table = markdown_table([row, summarize("y", runs[:1])])
    assert "| x | 3 | 20.0 ± 10.0 |" in table and "| y | 1 | 10.0 |" in table


def test_within_family_accuracy_by_hand():
    # images 0,1,2 form family "a"; 3,4 family "b"; texts 0..4 belong to images 0..4.
    families = ["a", "a", "a", "b", "b"]
    txt2img = {0: 0, 1: 1, 2: 2, 3: 3, 4: 4}
    pairs = family_pairs(families, txt2img)
    assert sorted(map(tuple, pairs.tolist())) == sorted(
        [(i, t) for t in range(3) for i in range(3)] + [(i, t) for t in (3, 4) for i in (3, 4)]
    )
    assert family_chance(pairs) == pytest.approx((3 * (1 / 3) + 2 * (1 / 2)) / 5)
    sim = np.array([  # rows: images, columns: texts
        [0.9, 0.1, 0.5, 0.0, 0.0],
        [0.2, 0.8, 0.5, 0.0, 0.0],  # text 2: a three-way tie -> miss
        [0.3, 0.9, 0.5, 0.0, 0.0],  # text 1: image 2 beats its own image 1 -> miss
        [0.0, 0.0, 0.0, 0.4, 0.7],  # text 4: image 3 beats its own image 4 -> miss
        [0.0, 0.0, 0.0, 0.3, 0.6],
    ])
    acc = within_family_accuracy(sim[pairs[:, 0], pairs[:, 1]], pairs, txt2img)
    assert acc == pytest.approx(2 / 5)  # texts 0 and 3
    # Scores outside a family never matter: a huge cross-family score changes nothing.
    sim[3, 0] = 10.0
    assert within_family_accuracy(sim[pairs[:, 0], pairs[:, 1]], pairs, txt2img) == pytest.approx(2 / 5)


def test_score_groups_with_true_matches_and_all_pairs_grid():
    """With every true match known, unannotated true matches form their own group and are
    never counted as hard or easy negatives; the all-pairs grid is the teacher's table."""
    data = Dataset(n_img=4, per=2)
    rng = np.random.default_rng(2)
    student = rng.uniform(-1, 1, size=(4, 8))
    table = rng.uniform(size=(4, 8))
    true = np.zeros((4, 8), dtype=bool)
    for i, ts in data.img2txt.items():
        true[i, ts] = True
    true[0, 5] = true[2, 0] = True  # true, but LAVIS does not annotate them
    student[0, 5] = 9.0  # the student's hardest "negative" of image 0 is a true match
    groups = score_distributions(TableTeacher(table), None, data, student, k_hard=2, true=true)
    assert list(groups) == ["positive", "true-match negative", "hard negative", "easy negative"]
    np.testing.assert_allclose(sorted(groups["true-match negative"]["teacher"]), sorted([table[0, 5], table[2, 0]]))
    hard_of_0 = [t for t in np.argsort(-student[0]) if not true[0, t]][:2]
    np.testing.assert_allclose(groups["hard negative"]["student"][:2], student[0, hard_of_0])
    assert groups["hard negative"]["summary"]["pairs"] == 8 and groups["easy negative"]["summary"]["pairs"] == 8
    without = score_distributions(TableTeacher(table), None, data, student, k_hard=2)
    assert "true-match negative" not in without and without["hard negative"]["student"][0] == 9.0
    np.testing.assert_allclose(teacher_all_pairs(TableTeacher(table), torch.zeros(4, 3, 2, 2), data.text, chunk=5), table,
                               rtol=1e-6)
