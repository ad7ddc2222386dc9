"""Numerical safety: a non-finite loss stops training naming its term, or skips the step."""
import logging
import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from lavis.common.optims import LinearWarmupCosineLRScheduler
from lavis.datasets.datasets.dataloader_utils import IterLoader
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, default_collate

from conftest import tiny_model_cfg
from lavis_cprd.models.dual_encoder import CprdDualEncoder
from lavis_cprd.training import lavis_patches
from lavis_cprd.training.task import CprdRetrievalTask


def samples(n=16):
    torch.manual_seed(0)
    return [{"image": torch.randn(3, 48, 48), "text_input": f"a {c} thing number {i}", "image_id": i}
            for i, c in zip(range(n), ["red", "blue", "green", "black"] * (n // 4))]


class NanAtStep:
    """The model's forward, with ``term`` turned NaN on the given calls."""

    def __init__(self, model, steps, term="loss_distill"):
        self.model, self.steps, self.term, self.calls = model, set(steps), term, 0
        self.forward = model.forward

    def __call__(self, batch):
        out = self.forward(batch)
        if self.calls in self.steps:
            out[self.term] = out[self.term] * float("nan")
            out["loss"] = out["loss"] * float("nan")
        self.calls += 1
        return out


def run_epoch(model, skip, nan_steps, items=None, accum=1, ddp=False):
    task = CprdRetrievalTask(OmegaConf.create({"skip_nonfinite_loss": skip, "k_test": 4}))
    model.forward = NanAtStep(model, nan_steps)
    trained = DDP(model) if ddp else model  # DDP calls the model's (NaN-making) forward
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.05)
    loader = IterLoader(DataLoader(items or samples(), batch_size=8, collate_fn=default_collate))
    sched = LinearWarmupCosineLRScheduler(optimizer, max_epoch=1, min_lr=1e-4, init_lr=1e-3)
    snapshots = []
    original_zero = optimizer.zero_grad

    def zero_grad(*a, **k):  # called after every (possibly skipped) step, once per window: snapshot the weights
        snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()})
        return original_zero(*a, **k)

    optimizer.zero_grad = zero_grad
    stats = task.train_epoch(epoch=0, model=trained, data_loader=loader, optimizer=optimizer, scaler=None,
                             lr_scheduler=sched, cuda_enabled=False, log_freq=100, accum_grad_iters=accum)
    return task, stats, snapshots


@pytest.fixture
def model():
    torch.manual_seed(0)
    return CprdDualEncoder.from_config(tiny_model_cfg(num_hard_negatives=3)).eval()


def test_nonfinite_loss_stops_with_the_term_named(model):
    with pytest.raises(FloatingPointError, match=r"non-finite loss at epoch 0, step 1: \['loss_distill'\] \(loss=nan, "
                                                 r"loss_itc=[\d.]+, loss_distill=nan\).*run.skip_nonfinite_loss: true"):
        run_epoch(model, skip=False, nan_steps=[1])


def test_nonfinite_step_is_skipped_without_touching_the_weights(model):
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    task, stats, snapshots = run_epoch(model, skip=True, nan_steps=[0])
    assert task.skipped_steps == 1 and stats["skipped_nonfinite_steps"] == "1"
    first, second = snapshots
    assert all(torch.equal(first[n], before[n]) for n in before)  # the skipped step changed nothing
    assert any(not torch.equal(second[n], first[n]) for n in before)  # the next one trained
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # as if the bad batch never was: one step on the second batch alone, from the same weights
    # and a fresh AdamW, lands on the same weights (no moment or weight-decay update leaked)
    torch.manual_seed(0)
    fresh = CprdDualEncoder.from_config(tiny_model_cfg(num_hard_negatives=3)).eval()
    _, _, (ref,) = run_epoch(fresh, skip=True, nan_steps=[], items=samples()[8:])
    assert all(torch.allclose(ref[n], second[n], atol=1e-6) for n in before)


@pytest.mark.parametrize("nan_steps,skipped", [([1], 1), ([0, 1], 1), ([1, 2], 2)])
def test_a_nonfinite_micro_batch_skips_its_whole_accumulation_window(model, nan_steps, skipped):
    """run.accum_grad_iters: 2, four micro-batches of 8, so two windows. Any NaN micro-batch
    discards its window's update (its good micro-batch's gradients too), counted once per
    window; the next window starts from zeroed gradients. Before, only accum_grad_iters 1 was
    guarded: the window stepped on micro-batch 0's gradients, and AdamW's weight decay."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    items = samples(32)
    task, stats, snapshots = run_epoch(model, skip=True, nan_steps=nan_steps, items=items, accum=2)
    assert task.skipped_steps == skipped and stats["skipped_nonfinite_steps"] == str(skipped)
    first, second = snapshots  # zero_grad once per window
    assert all(torch.equal(first[n], before[n]) for n in before)  # window 1 changed nothing
    if skipped == 2:
        assert all(torch.equal(second[n], before[n]) for n in before)  # nor did window 2
        return
    # Window 2 by hand: LAVIS sums (does not average) the micro-batches' gradients; one step of
    # a fresh AdamW from the untouched weights, as if window 1 had never been.
    torch.manual_seed(0)
    ref = CprdDualEncoder.from_config(tiny_model_cfg(num_hard_negatives=3)).eval()
    ref.set_epoch(0)
    params = [p for p in ref.parameters() if p.requires_grad]
    assert all(torch.equal(p, before[n]) for n, p in ref.named_parameters())
    for part in (items[16:24], items[24:32]):
        ref(default_collate(part)).loss.backward()
    torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05).step()
    moved = [n for n, p in ref.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert len(moved) > 10  # a real step, not an empty comparison
    assert all(torch.allclose(p, second[n], atol=1e-6) for n, p in ref.named_parameters())


def _ddp_worker(rank, world, init_file, results):
    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                  timeout=timedelta(seconds=60))  # a rank left out of a collective fails, not hangs
    try:
        torch.set_num_threads(1)
        torch.manual_seed(0)
        model = CprdDualEncoder.from_config(tiny_model_cfg(num_hard_negatives=3)).eval()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        warnings = []
        handler = logging.Handler()
        handler.emit = lambda record: warnings.append(record.getMessage())
        logging.getLogger().addHandler(handler)
        items = samples(64)[rank * 32:(rank + 1) * 32]  # two windows of two micro-batches of 8 a rank
        with lavis_patches.metric_sync_on(torch.device("cpu")):  # as CprdRunner.train does off CUDA
            task, stats, snapshots = run_epoch(model, skip=True, nan_steps=[1] if rank == 1 else [], items=items,
                                               accum=2, ddp=True)
        first, second = snapshots
        results[rank] = {"skipped": task.skipped_steps, "stats": stats["skipped_nonfinite_steps"], "warnings": warnings,
                         "window1_unchanged": all(torch.equal(first[n], before[n]) for n in before),
                         "window2": second}
    finally:
        torch_dist.destroy_process_group()


def test_a_nonfinite_micro_batch_on_one_rank_skips_the_window_on_every_rank(tmp_path):
    """Two gloo ranks under DDP, run.accum_grad_iters: 2; rank 1's micro-batch 1 is NaN, rank 0's
    are all finite: both ranks skip window 1 (one all-reduce per micro-batch tells rank 0), count
    it once, and step window 2 to the same weights."""
    results = mp.Manager().dict()
    mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "init"), results), nprocs=2, join=True,
                       start_method="fork")
    r0, r1 = results[0], results[1]
    assert r0["skipped"] == r1["skipped"] == 1 and r0["stats"] == r1["stats"] == "1"
    assert r0["window1_unchanged"] and r1["window1_unchanged"]
    assert any("step 1 (the whole run.accum_grad_iters=2 window's update): non-finite loss on another rank" in w
               for w in r0["warnings"])
    assert any("non-finite ['loss_distill']" in w for w in r1["warnings"])
    torch.manual_seed(0)
    start = CprdDualEncoder.from_config(tiny_model_cfg(num_hard_negatives=3)).state_dict()
    assert any(not torch.equal(r0["window2"][n], start[n]) for n in r0["window2"])  # window 2 trained
    assert all(torch.equal(r0["window2"][n], r1["window2"][n]) for n in r0["window2"])  # alike on both ranks


# ---------------------------------------------------------------- bad data
def build_splits(tmp_path, edit, **overrides):
    """The generated dataset, ``edit(root, annotations)`` applied, then built by the task."""
    import json as _json

    import lavis.tasks as tasks

    from conftest import experiment_yaml, write_retrieval_dataset
    from lavis_cprd.training.launch import load_config

    root = str(tmp_path / "data")
    splits = write_retrieval_dataset(root, n_train=12, n_val=4, n_test=4)
    anns = {s: _json.load(open(p)) for s, p in splits.items()}
    edit(root, anns)
    for s, p in splits.items():
        _json.dump(anns[s], open(p, "w"))
    cfg_path = experiment_yaml(tmp_path / "x.yaml", root, splits, tmp_path / "o", **overrides)
    cfg = load_config(type("Args", (), {"cfg_path": cfg_path, "options": []})())
    return tasks.setup_task(cfg).build_datasets(cfg)["flickr30k"]


def unreadable(root, anns):
    open(f"{root}/{anns['train'][6]['image']}", "wb").write(b"this is not a png")  # items 6, 7 share it


def empty_caption(root, anns):
    anns["train"][2]["caption"] = " ... "  # BLIP's caption processor strips it to nothing
    anns["val"][1]["caption"][0] = ""


def invisible_caption(root, anns):
    anns["train"][3]["caption"] = "\u200b\u200b \u200b"  # zero-width spaces: prints as nothing
    anns["val"][2]["caption"][0] = "\u0301\u0301"  # combining accents: the uncased tokenizer strips them all


def unknown_tokens(root, anns):
    anns["train"][4]["caption"] = "ⵣⵣⵣ ꙮꙮ"


def duplicated_id(root, anns):
    anns["train"][9]["image_id"] = anns["train"][0]["image_id"]  # two different images, one id


def duplicated_val_image(root, anns):
    anns["val"][3]["image"] = anns["val"][0]["image"]


CASES = {
    "unreadable": (unreadable, r"split 'train': 2 bad entries: 2 unreadable image; e.g. entry 6: unreadable image "
                   r".*train_3.png"),
    "empty caption": (empty_caption, r"split 'train': 1 bad entries: 1 empty caption; e.g. entry 2: empty caption ' ... '"),
    "invisible caption": (invisible_caption, r"split 'train': 1 bad entries: 1 empty caption; e.g. entry 3: empty "
                          r"caption '\\u200b\\u200b \\u200b'"),
    "unknown tokens": (unknown_tokens, r"split 'train': 1 bad entries: 1 caption of only unknown tokens; e.g. entry 4"),
    "duplicated id": (duplicated_id, r"split 'train': 3 bad entries: 3 duplicated image id; e.g. entry 0: "
                      r"duplicated image id 0 names"),
    "duplicated val image": (duplicated_val_image, r"split 'val': 1 bad entries: 1 image listed twice; e.g. entry 3: "
                             r"image listed twice .* \(also entry 0\)"),
}
# items removed from (train, val) with skip_bad, and captions removed from val
SKIPPED = {"unreadable": (2, 0, 0), "empty caption": (1, 0, 1), "invisible caption": (1, 0, 1), "unknown tokens": (1, 0, 0),
           "duplicated id": (3, 0, 0), "duplicated val image": (0, 1, 0)}


@pytest.mark.parametrize("case", CASES)
def test_bad_data_is_a_clear_error(case, tmp_path):
    edit, message = CASES[case]
    with pytest.raises(ValueError, match=message + r".*set datasets.flickr30k.skip_bad: true"):
        build_splits(tmp_path, edit)


@pytest.mark.parametrize("case", CASES)
def test_bad_data_is_skipped_and_counted(case, tmp_path, caplog):
    edit, _ = CASES[case]
    clean = build_splits(tmp_path / "clean", lambda root, anns: None)
    with caplog.at_level("WARNING"):
        splits = build_splits(tmp_path / "bad", edit, **{"datasets.flickr30k.skip_bad": True})
    items, val_items, val_captions = SKIPPED[case]
    assert len(splits["train"]) == len(clean["train"]) - items
    assert len(splits["val"]) == len(clean["val"]) - val_items
    assert len(splits["val"].text) == len(clean["val"].text) - val_captions - 2 * val_items
    assert "skipping" in caplog.text and "(skip_bad: true)" in caplog.text
    sample = splits["train"][len(splits["train"]) - 1]  # the rebuilt split loads like LAVIS's own
    assert sample["image"].shape == (3, 48, 48) and sample["text_input"]


# ------------------------------------------------------------- annotation structure
def no_image_id(root, anns):
    del anns["train"][5]["image_id"]


def string_val_caption(root, anns):
    anns["val"][2]["caption"] = anns["val"][2]["caption"][0]  # a string, not a list


@pytest.mark.parametrize("edit,message,skipped", [
    (no_image_id, r"annotations.train: .*train.json: 1 of 24 entries are malformed: entry 5: no 'image_id' field", (1, 0)),
    (string_val_caption, r"annotations.val: .*val.json: 1 of 4 entries are malformed: entry 2: 'caption' is a string; "
                         r"an evaluation entry holds a list of captions", (0, 1)),
])
def test_malformed_entries_name_the_entry_and_field_or_are_skipped_and_counted(edit, message, skipped, tmp_path, caplog):
    with pytest.raises(ValueError, match=message + r".*set datasets.flickr30k.skip_bad: true"):
        build_splits(tmp_path / "bad", edit)
    clean = build_splits(tmp_path / "clean", lambda root, anns: None)
    with caplog.at_level("WARNING"):
        splits = build_splits(tmp_path / "skip", edit, **{"datasets.flickr30k.skip_bad": True})
    assert "skipping 1 of" in caplog.text and "malformed entries (skip_bad: true)" in caplog.text
    assert (len(clean["train"]) - len(splits["train"]), len(clean["val"]) - len(splits["val"])) == skipped
    assert all(isinstance(c, str) and len(c) > 1 for c in splits["val"].text)  # no caption split into characters


def _build_with_file(tmp_path, text):
    import json as _json

    import lavis.tasks as tasks

    from conftest import experiment_yaml, write_retrieval_dataset
    from lavis_cprd.training.launch import load_config

    root = str(tmp_path / "data")
    splits = write_retrieval_dataset(root, n_train=4, n_val=2, n_test=2)
    with open(splits["val"], "w") as f:
        f.write(text(_json.load(open(splits["train"]))))
    cfg = load_config(type("Args", (), {"cfg_path": experiment_yaml(tmp_path / "x.yaml", root, splits, tmp_path / "o"),
                                        "options": []})())
    return tasks.setup_task(cfg).build_datasets(cfg)


def test_malformed_json_names_the_file_line_and_column(tmp_path):
    with pytest.raises(ValueError, match=r"annotations.val: .*val.json is not valid JSON: Expecting ':' delimiter "
                                         r"at line 2, column 12"):
        _build_with_file(tmp_path, lambda train: '[{"image": "a.png",\n "caption" ["x"]}]')


def test_a_list_wrapped_in_an_object_is_a_clear_error(tmp_path):
    import json as _json

    with pytest.raises(ValueError, match=r"val.json holds a JSON object \(keys \['annotations'\]\); LAVIS expects a list"):
        _build_with_file(tmp_path, lambda train: _json.dumps({"annotations": train}))


# ------------------------------------------------ splits that cannot feed the run, at start-up
def empty(split):
    def edit(root, anns):
        anns[split] = []
    return edit


@pytest.mark.parametrize("edit,overrides,message", [
    (empty("val"), {}, r"split 'val' \(run.valid_splits\) of datasets.flickr30k \(.*val.json\) is empty"),
    (empty("test"), {}, r"split 'test' \(run.test_splits\) of datasets.flickr30k \(.*test.json\) is empty"),
    (empty("train"), {}, r"split 'train' \(run.train_splits\) of datasets.flickr30k \(.*train.json\) is empty"),
    (None, {"run.batch_size_train": 32}, r"split 'train' .* has 24 items, fewer than one batch "
                                         r"\(run.batch_size_train=32 x world size 1\)"),
    (None, {"run.batch_size_train": 1}, r"run.batch_size_train=1 \(x world size 1\): ITC contrasts each pair with the "
                                        r"other pairs of its batch; with one pair per batch there are none"),
    (None, {"run.valid_splits": ["dev"]}, r"run.valid_splits lists 'dev', but no dataset has that split"),
], ids=["empty val", "empty test", "empty train", "train below one batch", "ITC batch 1", "unknown split"])
def test_splits_that_cannot_feed_the_run_fail_at_build(edit, overrides, message, tmp_path):
    """Before: an empty val split trained a whole epoch, then failed with LAVIS's 'data_loader
    for split val is None'; an empty train split failed in torch (num_samples=0); batch 1 trained
    on an ITC loss of exactly 0."""
    with pytest.raises(ValueError, match=message):
        build_splits(tmp_path, edit or (lambda root, anns: None), **overrides)


def test_more_hard_negatives_than_training_images_fail_at_build(tmp_path):
    """12 training images (24 captions): K=12 fits a batch of 16, but no query can ever have
    12 negative images."""
    import lavis.tasks as tasks

    from conftest import experiment_yaml, write_retrieval_dataset
    from lavis_cprd.training.launch import load_config

    root = str(tmp_path / "data")
    splits = write_retrieval_dataset(root, n_train=12, n_val=4, n_test=4)
    options = {"run.batch_size_train": 16, "model.distill.num_hard_negatives": 12}
    cfg = load_config(type("Args", (), {"cfg_path": experiment_yaml(tmp_path / "x.yaml", root, splits, tmp_path / "o",
                                                                     **options), "options": []})())
    task = tasks.setup_task(cfg)
    task.build_datasets(cfg)
    with pytest.raises(ValueError, match=r"num_hard_negatives \(K=12\) must be smaller than the training split's "
                                         r"number of distinct images \(12\)"):
        task.build_model(cfg)
    cfg.model_cfg.distill.num_hard_negatives = 11
    assert task.build_model(cfg).distill.num_hard_negatives == 11


# ----------------------------------------------------------- weights never silently random
def test_evaluate_and_index_refuse_random_weights_unless_asked(tmp_path, capsys):
    """Without a checkpoint (and a config naming no weights) ``evaluate`` and ``index`` stop and
    say how to give one; ``--random-init`` is the explicit way out, and its weights are seeded,
    so an index and the searches over it see the same model."""
    from conftest import REPO
    from lavis_cprd.apps import evaluate, gallery_index, student_loading

    cfg = os.path.join(REPO, "configs", "cprd_tiny_shapes.yaml")
    with pytest.raises(SystemExit) as done:
        evaluate.main(["--cfg-path", cfg])
    assert done.value.code == 2 and "give --ckpt PATH" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        gallery_index.index_main(["--cfg-path", cfg, "--images", str(tmp_path), "--output", str(tmp_path / "i")])
    assert done.value.code == 2 and "or --random-init" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="--ckpt 'nope.pth' does not exist"):
        student_loading.load_student(cfg, "nope.pth")
    a, _ = student_loading.load_student(cfg, None)
    b, _ = student_loading.load_student(cfg, None)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
