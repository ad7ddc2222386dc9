"""``compare --tune``: every method gets the same number of trials, its weights gridded and its
other knobs drawn, and the winner is the trial with the best mean val score."""
import argparse
import json
import os

import pytest
import torch

from conftest import REPO
from lavis_cprd.apps import tuning
from lavis_cprd.distill.registry import get_loss

METHODS = ["none", "cprd", "margin_mse", "loopitr", "kl", "listmle_full", "conaclip"]


def _values(opts, base):
    return dict(o.split("model.distill.", 1)[1].split("=") for o in opts[base:])


def test_every_method_gets_the_same_trials_per_weight_from_its_own_knobs():
    plan = tuning.trial_runs(METHODS[:-1], 12, seed=0)  # conaclip's only knob is its weight: 6 settings
    assert list(plan) == METHODS[1:-1]  # ITC alone has nothing to tune
    assert [o[-1] for _, _, o in tuning.trial_runs(["conaclip"], 6)["conaclip"]] == [
        f"model.distill.weight={w}" for w in get_loss("conaclip").tune["weight"]]
    for method, runs in plan.items():
        base = [f"model.distill.loss={method}", *get_loss(method).compare_options]
        space = get_loss(method).tune
        assert len(runs) == 12 and len({tuple(o) for _, _, o in runs}) == 12, method  # distinct settings
        values = [_values(opts, len(base)) for _, _, opts in runs]
        assert all(opts[:len(base)] == base for _, _, opts in runs)
        assert all(set(v) == set(space) for v in values), method  # every one of its knobs, no other
        # the weight is a grid: each of the 6 weights exactly twice, every other knob from its own values
        weights = [float(v["weight"]) for v in values]
        assert sorted(weights) == sorted(2 * [float(w) for w in space["weight"]]), method
        for v in values:
            for k, x in v.items():
                assert any(str(c) == x for c in space[k]), (method, k, x)
    # a method's draw does not depend on the others; another seed draws other knobs
    alone = tuning.trial_runs(["cprd"], 12, seed=0)["cprd"]
    assert alone == plan["cprd"] and tuning.trial_runs(["cprd"], 12, seed=1)["cprd"] != alone
    with pytest.raises(ValueError, match="conaclip has only 6 distinct settings"):
        tuning.trial_runs(["conaclip"], 12)
    with pytest.raises(ValueError, match="multiple of 6"):
        tuning.trial_runs(["kl"], 7)


def _fake_run(run_dir, score):
    """A finished run as train_run leaves it: checkpoint_best.pth (epoch 2) and its job's metrics."""
    os.makedirs(os.path.join(run_dir, "jobs", "20260101000000"))
    torch.save({"epoch": 2}, os.path.join(run_dir, "checkpoint_best.pth"))
    with open(os.path.join(run_dir, "jobs", "20260101000000", "metrics.json"), "w") as f:
        json.dump({"val/2": {"rel_map_at_r": score, "agg_metrics": 100 - score}, "val/1": {"rel_map_at_r": 99.0}}, f)
    return os.path.join(run_dir, "checkpoint_best.pth")


def test_tune_trains_every_trial_on_every_tuning_seed_and_picks_on_val(tmp_path):
    args = argparse.Namespace(student_cfg=os.path.join(REPO, "configs", "cprd_tiny_shapes.yaml"), options=[],
                              student_options=[], methods=["none", "cprd", "kl", "conaclip"], tune=6,
                              tune_seeds=[0, 1], tune_seed=0, seeds=[0, 1, 2], oracle=[])
    asked = []

    def fake_train(targs, out, teacher, runs, decisions):
        asked.append((list(targs.seeds), targs.oracle, [name for name, _, _ in runs]))
        scores = {}
        for i, (name, _, _) in enumerate(runs):
            trial = int(name.rsplit("_t", 1)[1])
            scores[name] = {s: _fake_run(str(tmp_path / f"{name}_seed{s}"), 10.0 + (trial == 1) * 5 + s + i * 0.01)
                            for s in targs.seeds}
        return scores

    report, winners, trained = tuning.tune(args, str(tmp_path), "teacher.pth", [], fake_train)
    ((seeds, oracle, names),) = asked
    assert seeds == [0, 1] and oracle is None
    assert sorted(names) == sorted(f"tune_{m}_t{k}" for m in ("cprd", "kl", "conaclip") for k in range(6))
    for method in ("cprd", "kl", "conaclip"):
        rows = report[method]["trials"]
        assert len(rows) == 6 and all(len(r["val"]) == 2 for r in rows)
        assert rows[1]["val"] == [pytest.approx(15.0 + rows[1]["val"][0] - 15.0), pytest.approx(rows[1]["val"][0] + 1)]
        assert report[method]["winner"] == 1 and winners[method][0] == f"tune_{method}_t1"  # the best mean val rel mAP@R
        assert winners[method][1] == method  # the table row keeps the method's name
    table = tuning.tuning_table(report, [0, 1])
    assert table.count("**") == 3 * 4 and "conaclip (weight=0.5)" in table


def test_the_winners_tuning_seeds_are_taken_from_the_trials_not_trained_again(monkeypatch, tmp_path):
    """compare --tune's second phase trains only what tuning did not: sent through the plan
    again, a winner's request could name another run as its seed's score recorder and retrain
    for identical results (as the second contest did, ten runs)."""
    from lavis_cprd.apps import compare

    calls = []

    def fake_train_run(cfg, opts, run_dir, threads, decisions):
        calls.append((os.path.basename(run_dir), [o for o in opts if "teacher_cache=" in o or "teacher_record=" in o]))
        return os.path.join(run_dir, "checkpoint_best.pth")

    monkeypatch.setattr(compare, "train_run", fake_train_run)
    monkeypatch.setattr(compare, "eval_split", lambda *a, **k: None)
    args = compare.parse_args(["--methods", "none", "kl", "cprd", "--weights", "--ks", "--tune", "6", "--jobs", "1"])
    out = str(tmp_path)
    trials = [(f"tune_{m}_t{k}", m, [f"model.distill.loss={m}", f"model.distill.weight={w}"])
              for m in ("kl", "cprd") for k, w in enumerate((1.0, 4.0))]
    tune_args = argparse.Namespace(**{**vars(args), "seeds": [0, 1]})
    trained = compare.train_students(tune_args, out, "teacher.pth", trials, [])
    assert len(calls) == 8 and calls[0] == ("tune_kl_t0_seed0", [f"model.distill.teacher_record={out}/tune_kl_t0_seed0/teacher_scores"])
    calls.clear()
    winners = [("none", "ITC", ["model.distill.loss=none"]), trials[1], trials[3]]  # kl_t1 records nothing in tuning
    ckpts = compare.train_students(args, out, "teacher.pth", winners, [], trained=trained)
    assert sorted(name for name, _ in calls) == ["none_seed0", "none_seed1", "none_seed2", "tune_cprd_t1_seed2", "tune_kl_t1_seed2"]
    for name in ("tune_kl_t1", "tune_cprd_t1"):
        assert ckpts[name] == {0: trained[name][0], 1: trained[name][1], 2: f"{out}/{name}_seed2/checkpoint_best.pth"}
    assert list(ckpts["none"]) == [0, 1, 2]
