"""Reporting helpers against direct computations."""
import numpy as np
import pytest
import torch
from scipy.stats import kendalltau

from lavis_cprd.apps.reporting import (
    kendall_tau_on_hard_negatives,
    markdown_table,
    score_distributions,
    summarize,
    teacher_all_pairs,
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
