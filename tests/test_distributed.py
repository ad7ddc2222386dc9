"""Two and four gloo processes on CPU: gathered mining, loss and gradients equal one process
on the whole batch; each rank's teacher scores the pairs of its own images only, with the
teacher-score cache and record; sharded evaluation equals single-process evaluation; torchrun
trains end to end."""
import glob
import json
import os
import subprocess
import sys
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

from conftest import REPO, experiment_yaml, tiny_model_cfg

# Per-rank batches of 4 and of 2 captions from one batch of 8 (6 distinct images).
WORLD_SIZES = (2, 4)


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


def run_model(batch, model=None, image_offset=0, **distill):
    """One step: the model, its output, the pairs its teacher scored (global indices: the local
    image row + ``image_offset``), the rows of the images ``teacher.logit`` was handed, the
    images the teacher's image encoder ran on, and the gradients."""
    from lavis_cprd.models.dual_encoder import CprdDualEncoder

    torch.manual_seed(0)
    model = model or CprdDualEncoder.from_config(tiny_model_cfg(num_hard_negatives=3, valid_threshold=0.5, **distill)).eval()
    teacher, pairs, image_rows, encoded = model.teacher, [], [], []
    logit, encode = teacher.logit, teacher._image_features

    def counted_logit(images, captions, p, image_ids=None):
        pairs.append(p + torch.tensor([image_offset, 0]))
        image_rows.append(len(images))
        return logit(images, captions, p)

    teacher.logit = counted_logit
    teacher._image_features = lambda pixels: encoded.append(len(pixels)) or encode(pixels)
    try:
        model.zero_grad(set_to_none=True)
        out = model(batch)
        out.loss.backward()
    finally:
        del teacher.logit, teacher._image_features  # the class's methods again
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    scored = torch.cat(pairs) if pairs else torch.zeros(0, 2, dtype=torch.long)
    return model, out, scored, {"logit_image_rows": max(image_rows, default=0), "encoded": sum(encoded)}, grads


def average_over_ranks(grads, world):
    for g in grads.values():  # what DDP does: average the ranks' gradients
        torch_dist.all_reduce(g)
        g /= world


def _worker(rank, world, init_file, record_dir, results):
    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                  timeout=timedelta(seconds=60))  # a rank left out of a collective fails, not hangs
    try:
        torch.set_num_threads(1)
        batch = make_batch()
        size = len(batch["text_input"]) // world
        local = {k: v[rank * size : (rank + 1) * size] for k, v in batch.items()}
        model, out, pairs, work, grads = run_model(local, image_offset=rank * size, teacher_record=record_dir)
        average_over_ranks(grads, world)
        model.save_teacher_record()  # every rank's scores, merged
        # Rank 0 finds all its pairs in the record just written, the others have no cache: rank 0
        # has nothing to ask the teacher, yet must score the others' pairs of its images.
        model.objective.use_teacher_cache(record_dir if rank == 0 else None)
        _, cached, cached_pairs, cached_work, cached_grads = run_model(local, model, image_offset=rank * size)
        average_over_ranks(cached_grads, world)
        model.objective.use_teacher_cache(record_dir)  # no rank has a pair to score
        _, all_cached, all_cached_pairs, _, _ = run_model(local, model, image_offset=rank * size)
        loader = torch.utils.data.DataLoader(EvalSet(), batch_size=3)
        i2t, t2i = model.compute_sim_matrix(loader)
        results[rank] = {
            "loss": out.loss.item(), "loss_itc": out.loss_itc.item(), "loss_distill": out.loss_distill.item(),
            "pairs": pairs, "work": work, "grads": grads, "i2t": i2t, "t2i": t2i, "local_size": size,
            "cached_loss": cached.loss.item(), "cached_hit_rate": float(cached.teacher_cache_hit_rate or 0),
            "cached_pairs": cached_pairs, "cached_grads": cached_grads, "all_cached_loss": all_cached.loss.item(),
            "all_cached_hit_rate": float(all_cached.teacher_cache_hit_rate), "all_cached_pairs": len(all_cached_pairs),
        }
    finally:
        torch_dist.destroy_process_group()


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process on the whole batch, its teacher scores recorded."""
    record = str(tmp_path_factory.mktemp("single") / "record")
    model, out, pairs, work, grads = run_model(make_batch(), teacher_record=record)
    model.save_teacher_record()
    return {"model": model, "out": out, "pairs": pairs, "work": work, "grads": grads, "record": record}


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda w: f"{w}ranks")
def ranks(request, tmp_path_factory):
    """Each rank's results of one step on ``world`` gloo processes (and a record folder)."""
    world = request.param
    results = mp.Manager().dict()
    folder = tmp_path_factory.mktemp(f"dist{world}")
    record = str(folder / "record")
    # Forked, not spawned: the ranks start with this process's imports (about 6 s a process on
    # 2 cores otherwise); each sets 1 thread first, as DataLoader workers do after a fork.
    mp.start_processes(_worker, args=(world, str(folder / "init"), record, results), nprocs=world, join=True,
                       start_method="fork")
    return world, dict(results), record


def as_set(pairs):
    return {tuple(x) for x in pairs.tolist()}


def assert_grads_equal(got, want):
    assert set(got) == set(want)
    for name, g in want.items():
        # float32 sums in another order (1 thread per rank vs several): the tolerance scales
        # with the tensor's largest gradient; a wrong gather or average is off by O(1) of it
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-6 + 1e-4 * float(g.abs().max()),
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_gathered_mining_on_several_ranks_equals_one_process(ranks, single):
    world, r, _ = ranks
    # every rank's loss is its share: their mean is the single-process loss (DDP averages)
    for term in ("loss", "loss_itc", "loss_distill"):
        assert np.mean([r[k][term] for k in range(world)]) == pytest.approx(getattr(single["out"], term).item(), rel=1e-5)
    # the teachers scored exactly the single process's pairs, each pair on one rank only
    assert as_set(torch.cat([r[k]["pairs"] for k in range(world)])) == as_set(single["pairs"])
    assert sum(len(r[k]["pairs"]) for k in range(world)) == len(as_set(single["pairs"]))
    # gradients through all_gather_with_grad, averaged over ranks, equal the single-process ones
    assert_grads_equal(r[0]["grads"], single["grads"])


def test_each_rank_teacher_encodes_only_its_own_images(ranks, single):
    world, r, _ = ranks
    ids = make_batch()["image_id"]
    for k in range(world):
        size = r[k]["local_size"]
        own_rows = range(k * size, (k + 1) * size)
        # the teacher is handed the rank's own images, not the gathered batch, and encodes each
        # of its distinct images once (every one is an image query here): the count does not
        # grow with the world size
        assert r[k]["work"]["logit_image_rows"] == size
        assert r[k]["work"]["encoded"] == len(set(ids[k * size : (k + 1) * size].tolist()))
        # ... which are exactly its images that the single process's pairs need
        needed = {i for i, _ in as_set(single["pairs"]) if i in own_rows}
        assert r[k]["work"]["encoded"] == len(needed)
        assert set(r[k]["pairs"][:, 0].tolist()) <= set(own_rows)


def test_teacher_cache_and_record_across_ranks(ranks, single):
    from lavis_cprd.distill.teacher_cache import TeacherScoreCache

    world, r, record = ranks

    def scores(root):
        cache = TeacherScoreCache.load(root)
        captions = list(cache.caption_index)
        keys = zip((cache.keys // cache.num_captions).tolist(), (cache.keys % cache.num_captions).tolist())
        return {(image, captions[c]): z for (image, c), z in zip(keys, cache.logits.tolist())}

    # the ranks' records, merged, hold the single process's pairs with its logits
    got, want = scores(record), scores(single["record"])
    assert set(got) == set(want)
    np.testing.assert_allclose([got[key] for key in want], list(want.values()), rtol=1e-5, atol=1e-5)
    # rank 0 read every pair from the cache and still scored the other ranks' pairs of its images
    assert r[0]["cached_hit_rate"] == 1.0 and len(r[0]["cached_pairs"]) > 0
    assert as_set(torch.cat([r[k]["cached_pairs"] for k in range(world)])) <= as_set(single["pairs"])
    assert np.mean([r[k]["cached_loss"] for k in range(world)]) == pytest.approx(single["out"].loss.item(), rel=1e-5)
    assert_grads_equal(r[0]["cached_grads"], single["grads"])
    # every rank reads every pair from the cache: no teacher call, the same loss
    assert all(r[k]["all_cached_hit_rate"] == 1.0 and r[k]["all_cached_pairs"] == 0 for k in range(world))
    assert np.mean([r[k]["all_cached_loss"] for k in range(world)]) == pytest.approx(single["out"].loss.item(), rel=1e-5)


def test_sharded_evaluation_equals_single_process(ranks):
    from lavis_cprd.models.dual_encoder import CprdDualEncoder

    world, r, _ = ranks
    torch.manual_seed(0)
    model = CprdDualEncoder.from_config(tiny_model_cfg(num_hard_negatives=3, valid_threshold=0.5)).eval()
    i2t, t2i = model.compute_sim_matrix(torch.utils.data.DataLoader(EvalSet(), batch_size=3))
    for k in range(world):
        np.testing.assert_allclose(r[k]["i2t"], i2t, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(r[k]["t2i"], t2i, rtol=1e-5, atol=1e-6)
        assert (r[k]["i2t"].argsort(1) == i2t.argsort(1)).all()  # same rankings, same metrics


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
