"""Two gloo processes on CPU: gathered mining, loss and gradients equal one process on the
whole batch; sharded evaluation equals single-process evaluation; torchrun trains end to end."""
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

from conftest import REPO, experiment_yaml, tiny_model_cfg

WORLD = 2


def make_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.tensor([0, 0, 1, 2, 3, 3, 4, 5])
    images = torch.randn(6, 3, 48, 48, generator=g)[ids]
    words = ["red", "green", "blue", "square", "circle", "left", "right", "top"]
    captions = [f"a {words[i]} {words[(3 * i + 1) % 8]} at the {words[(5 * i + 2) % 8]}" for i in range(8)]
    return {"image": images, "text_input": captions, "image_id": ids}


class EvalSet(torch.utils.data.Dataset):
    def __init__(self, n_images=7, n_texts=13):
        g = torch.Generator().manual_seed(2)
        self.images = torch.randn(n_images, 3, 48, 48, generator=g)
        self.text = [f"caption number {i} of the {'red blue green'.split()[i % 3]} shape" for i in range(n_texts)]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "index": i}


def run_model(batch, model=None):
    """Loss terms, the teacher's pairs (global indices) and the gradients of one step."""
    from lavis_cprd.models.dual_encoder import CprdDualEncoder

    torch.manual_seed(0)
    model = model or CprdDualEncoder.from_config(tiny_model_cfg(num_hard_negatives=3, valid_threshold=0.5)).eval()
    pairs = []
    logit = model.teacher.logit
    model.teacher.logit = lambda images, captions, p, image_ids=None: pairs.append(p.clone()) or logit(images, captions, p)
    out = model(batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return model, out, torch.cat(pairs), grads


def _worker(rank, init_file, results):
    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        batch = make_batch()
        half = len(batch["text_input"]) // WORLD
        local = {k: v[rank * half : (rank + 1) * half] for k, v in batch.items()}
        model, out, pairs, grads = run_model(local)
        for g in grads.values():  # what DDP does: average the ranks' gradients
            torch_dist.all_reduce(g)
            g /= WORLD
        loader = torch.utils.data.DataLoader(EvalSet(), batch_size=3)
        i2t, t2i = model.compute_sim_matrix(loader)
        results[rank] = {"loss": out.loss.item(), "loss_itc": out.loss_itc.item(),
                         "loss_distill": out.loss_distill.item(), "pairs": pairs, "grads": grads, "i2t": i2t, "t2i": t2i}
    finally:
        torch_dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    results = mp.Manager().dict()
    init = tmp_path_factory.mktemp("dist") / "init"
    mp.spawn(_worker, args=(str(init), results), nprocs=WORLD, join=True)
    return dict(results)


def test_gathered_mining_on_two_ranks_equals_one_process(two_ranks):
    model, single, pairs, grads = run_model(make_batch())
    r = two_ranks
    # every rank's loss is its share: their mean is the single-process loss (DDP averages)
    for term in ("loss", "loss_itc", "loss_distill"):
        assert np.mean([r[k][term] for k in range(WORLD)]) == pytest.approx(getattr(single, term).item(), rel=1e-5)
    # the teacher saw exactly the single process's pairs, split between the ranks
    as_set = lambda p: {tuple(x) for x in p.tolist()}  # noqa: E731
    assert as_set(torch.cat([r[k]["pairs"] for k in range(WORLD)])) == as_set(pairs)
    assert sum(len(as_set(r[k]["pairs"])) for k in range(WORLD)) < 2 * len(as_set(pairs))
    # gradients through all_gather_with_grad, averaged over ranks, equal the single-process ones
    assert set(r[0]["grads"]) == set(grads)
    for name, g in grads.items():
        # float32 sums in another order (1 thread per rank vs several): the tolerance scales
        # with the tensor's largest gradient; a wrong gather or average is off by O(1) of it
        torch.testing.assert_close(r[0]["grads"][name], g, rtol=1e-4, atol=1e-6 + 1e-4 * float(g.abs().max()),
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_sharded_evaluation_equals_single_process(two_ranks):
    from lavis_cprd.models.dual_encoder import CprdDualEncoder

    torch.manual_seed(0)
    model = CprdDualEncoder.from_config(tiny_model_cfg(num_hard_negatives=3, valid_threshold=0.5)).eval()
    i2t, t2i = model.compute_sim_matrix(torch.utils.data.DataLoader(EvalSet(), batch_size=3))
    for k in range(WORLD):
        np.testing.assert_allclose(two_ranks[k]["i2t"], i2t, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(two_ranks[k]["t2i"], t2i, rtol=1e-5, atol=1e-6)
        assert (two_ranks[k]["i2t"].argsort(1) == i2t.argsort(1)).all()  # same rankings, same metrics


def test_torchrun_two_processes_train_and_report_lavis_metrics(retrieval_data, tmp_path):
    root, splits = retrieval_data
    cfg = experiment_yaml(tmp_path / "ddp.yaml", root, splits, tmp_path / "out", **{"run.max_epoch": 2})
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
         "-m", "lavis_cprd.apps.train", "--cfg-path", cfg],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (job,) = glob.glob(str(tmp_path / "out" / "*"))
    evaluations = [json.loads(line) for line in open(os.path.join(job, "evaluate.txt"))]
    keys = {"txt_r1", "txt_r5", "txt_r10", "txt_r_mean", "img_r1", "img_r5", "img_r10", "img_r_mean", "r_mean",
            "agg_metrics"}
    assert len(evaluations) == 3 and all(set(e) == keys for e in evaluations)
    log = [json.loads(line) for line in open(os.path.join(job, "log.txt")) if line.startswith('{"train_')]
    assert len(log) == 2 and all("train_loss_distill" in e for e in log)
    config = open(os.path.join(job, "log.txt")).read()
    assert "\"world_size\": 2" in config and "\"dist_backend\": \"gloo\"" in config


def test_shutdown_leaves_the_process_group(tmp_path):
    from lavis_cprd.training.launch import shutdown_distributed

    shutdown_distributed(completed=True)  # no group: nothing to do
    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    assert torch.distributed.is_initialized()
    shutdown_distributed(completed=True)
    assert not torch.distributed.is_initialized()
