"""``run.select_metric``: checkpoint_best is the epoch with the highest val value of the named
metric (``auto``: relevance-aware mAP@R where the data knows its true matches, LAVIS's
agg_metrics otherwise)."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, experiment_yaml
from lavis_cprd.checkpoints import load_checkpoint
from lavis_cprd.training.selection import selected_key, with_selection


def test_the_rule():
    shapes = {"agg_metrics": 30.0, "rel_map_at_r": 12.0, "txt_r1": 5.0}
    assert selected_key("auto", shapes) == "rel_map_at_r" and selected_key("auto", {"agg_metrics": 1.0}) == "agg_metrics"
    chosen = with_selection("txt_r1", shapes)
    assert chosen["agg_metrics"] == 5.0 and chosen["lavis_agg_metrics"] == 30.0
    assert with_selection("agg_metrics", chosen)["agg_metrics"] == 30.0  # LAVIS's own, even after a replacement
    with pytest.raises(KeyError, match=r"run.select_metric='map' is not a val metric of this run; it logs \['agg_metrics', 'rel_map_at_r', 'txt_r1'\]"):
        selected_key("map", shapes)


def _val_epochs(job):
    rows = [json.loads(line) for line in open(os.path.join(job, "log.txt")) if line.startswith('{"')]
    return [r for r in rows if "val_agg_metrics" in r]


@pytest.mark.parametrize("metric", ["img_r1", "txt_r_mean", "auto"])
def test_the_best_checkpoint_is_the_epoch_of_the_highest_named_metric(retrieval_data, tmp_path, metric):
    root, splits = retrieval_data
    cfg = experiment_yaml(tmp_path / "c.yaml", root, splits, tmp_path / "out", **{
        "run.max_epoch": 4, "model.distill.loss": "none", "run.select_metric": metric, "run.init_lr": 3e-3})
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "lavis_cprd.apps.train", "--cfg-path", cfg], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (job,) = [os.path.join(tmp_path / "out", d) for d in os.listdir(tmp_path / "out")]
    epochs = _val_epochs(job)
    assert len(epochs) == 4
    key = "val_lavis_agg_metrics" if metric == "auto" else f"val_{metric}"  # no true matches here: agg_metrics
    values = [float(e[key]) for e in epochs]
    assert [float(e["val_agg_metrics"]) for e in epochs] == values  # what LAVIS's runner compared
    assert load_checkpoint(os.path.join(job, "checkpoint_best.pth"))["epoch"] == values.index(max(values))
