"""What the CUDA path does differently, shown on CPU: tensors that arrive on another device
(LAVIS's PrefetchLoader moves whole batches; a checkpoint loaded onto the GPU), every rank's
own RNG streams, one job folder on every rank, SLURM's ranks, the collective timeout."""
import datetime
import os
import tempfile
import types

import numpy as np
import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

from lavis_cprd import checkpoints
from lavis_cprd.training import launch


class Elsewhere(torch.Tensor):
    """A CPU tensor that stands for one on a GPU: an op that mixes it with CPU tensors fails,
    and so does ``.numpy()``, as they would on CUDA; ``.cpu()`` brings it back."""

    @classmethod
    def __torch_function__(cls, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cpu:
            return args[0].as_subclass(torch.Tensor).clone()
        if func is torch.Tensor.numpy:
            raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() first")
        flat = [a for a in list(args) + list(kwargs.values()) for a in (a if isinstance(a, (list, tuple)) else [a])]
        if any(type(a) is torch.Tensor for a in flat) and func not in (torch.Tensor.__repr__, torch.Tensor.__format__):
            raise RuntimeError("Expected all tensors to be on the same device, but found cuda:0 and cpu")
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        return out.as_subclass(cls) if type(out) is torch.Tensor else out


def on_gpu(t: torch.Tensor) -> torch.Tensor:
    return t.clone().as_subclass(Elsewhere)


def test_the_fake_gpu_tensor_fails_like_one():
    with pytest.raises(RuntimeError, match="same device"):
        torch.zeros(4)[on_gpu(torch.tensor([1]))] = torch.ones(1)
    with pytest.raises(TypeError, match="cuda"):
        on_gpu(torch.ones(2)).numpy()


class Loader:
    """An evaluation loader as LAVIS's PrefetchLoader hands it out on CUDA: ``index`` on the GPU."""

    def __init__(self, images):
        self.images = images
        self.dataset = _Dataset(images)

    def __iter__(self):
        for start in (0, 2):
            yield {"image": self.images[start : start + 2], "index": on_gpu(torch.arange(start, start + 2))}


class _Dataset:
    text = ["a red one", "a blue one", "a green one"]

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)


def test_evaluation_places_rows_by_an_index_that_arrived_on_the_gpu():
    """Before: ``image_feats[index] = feats`` indexed a CPU tensor with CUDA indices, so every
    val and test pass on one GPU would crash."""
    from lavis_cprd.models.retrieval import dual_encoder_sim_matrix

    images = torch.randn(4, 5)
    model = types.SimpleNamespace(
        device=torch.device("cpu"),
        encode_captions=lambda caps, device: torch.nn.functional.normalize(
            torch.stack([torch.arange(5.0) + len(c) for c in caps]), dim=-1),
        encode_image=lambda image: torch.nn.functional.normalize(image, dim=-1),
    )
    i2t, t2i = dual_encoder_sim_matrix(model, Loader(images))
    expected = torch.nn.functional.normalize(images, dim=-1) @ model.encode_captions(_Dataset.text, None).t()
    np.testing.assert_allclose(i2t, expected.numpy(), rtol=1e-6)
    np.testing.assert_allclose(t2i, expected.t().numpy(), rtol=1e-6)


def test_rng_state_loaded_onto_the_gpu_restores():
    """Before: ``set_rng_state`` called ``.numpy()`` on numpy's keys, a CUDA tensor when the
    runner loaded the checkpoint with ``map_location=cuda``."""
    np.random.seed(3)
    state = checkpoints.rng_state()
    expected = np.random.rand(3)
    state = {**state, "torch": on_gpu(state["torch"]), "numpy": {**state["numpy"], "keys": on_gpu(state["numpy"]["keys"])}}
    np.random.seed(0)
    checkpoints.set_rng_state(state)
    np.testing.assert_array_equal(np.random.rand(3), expected)


def test_resume_loads_the_checkpoint_on_the_cpu(monkeypatch, tmp_path):
    """The runner loads a resume checkpoint on the CPU whatever its device: weights are copied
    onto each parameter's device by ``load_state_dict``, the RNG states stay CPU tensors."""
    from lavis_cprd.training import runner as runner_module

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    np.random.seed(5)
    saved = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "config": {"run": {"seed": 1}},
             "epoch": 2, "rng": checkpoints.rng_state(), "scaler": None}
    path = str(tmp_path / "checkpoint_latest.pth")
    checkpoints.atomic_save(saved, path)
    real = checkpoints.load_checkpoint

    def load_on(path, map_location="cpu"):  # what torch.load's map_location=cuda gives, faked
        ckpt = real(path)
        if str(map_location) != "cpu":
            ckpt["rng"]["numpy"]["keys"] = on_gpu(ckpt["rng"]["numpy"]["keys"])
        return ckpt

    monkeypatch.setattr(runner_module, "load_checkpoint", load_on)
    fake = types.SimpleNamespace(
        device=torch.device("cuda"), model=model, optimizer=optimizer, scaler=None, output_dir=str(tmp_path),
        config=types.SimpleNamespace(to_dict=lambda: {"run": {"seed": 1}}), unwrap_dist_model=lambda m: m,
    )
    runner_module.CprdRunner._load_checkpoint(fake, path)
    assert fake.start_epoch == 3
    checkpoints.set_rng_state(fake._resume_rng)
    np.random.seed(5)
    expected = np.random.rand(2)
    checkpoints.set_rng_state(fake._resume_rng)
    np.testing.assert_array_equal(np.random.rand(2), expected)


# ------------------------------------------------------------------- two gloo ranks
def _rank(rank, init_file, out_dir, results):
    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        from lavis_cprd.checkpoints import own_rng_state, rank_rng_states, set_rng_state
        from lavis_cprd.training import job_folder

        if rank == 1:  # a rank whose clock is a minute ahead never names the folder itself
            job_folder.time.strftime = lambda fmt: "20991231235959"
        folder = job_folder.shared_job_folder(out_dir)
        torch.manual_seed(100 + rank)
        np.random.seed(100 + rank)
        states = rank_rng_states()
        ahead = (torch.rand(3), np.random.rand(3))
        torch.manual_seed(0)
        np.random.seed(0)
        set_rng_state(own_rng_state({"rng": states[0], "rng_per_rank": states}, rank, 2))
        again = (torch.rand(3), np.random.rand(3))
        results[rank] = (str(folder), len(states), torch.equal(ahead[0], again[0]) and bool((ahead[1] == again[1]).all()),
                         ahead[0].tolist())
    finally:
        torch_dist.destroy_process_group()


def test_two_ranks_share_one_job_folder_and_resume_their_own_rng_streams(tmp_path):
    """Before: each rank named the folder from its own clock (LAVIS's job_id), and only rank 0's
    RNG was saved, so every rank resumed with rank 0's streams."""
    results = mp.Manager().dict()
    init_file = tempfile.mktemp(dir=str(tmp_path))
    mp.spawn(_rank, args=(init_file, str(tmp_path / "out"), results), nprocs=2, join=True)
    (folder0, n0, same0, draws0), (folder1, n1, same1, draws1) = results[0], results[1]
    assert folder0 == folder1 and os.listdir(tmp_path / "out") == [folder0]
    assert n0 == n1 == 2 and same0 and same1  # each rank continued its own streams
    assert draws0 != draws1


def test_a_resume_with_another_number_of_ranks_falls_back_to_rank_0s_streams(caplog):
    states = [{"torch": torch.ones(1)}, {"torch": torch.zeros(1)}]
    ckpt = {"rng": states[0], "rng_per_rank": states}
    assert checkpoints.own_rng_state(ckpt, 1, 2) is states[1]
    assert checkpoints.own_rng_state(ckpt, 2, 4) is states[0] and "every rank starts from rank 0's" in caplog.text
    assert checkpoints.own_rng_state({"rng": states[0]}, 0, 1) is states[0]


# ------------------------------------------------------------------- launching
def test_srun_without_torchrun_gives_each_task_its_rank():
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_LAUNCH_NODE_IPADDR": "10.0.0.7"}
    assert launch.ranks_from_slurm(env)
    assert {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")} == {
        "RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "29500"}
    torchrun = {"RANK": "0", "WORLD_SIZE": "2", "SLURM_PROCID": "5", "SLURM_NTASKS": "8"}
    assert not launch.ranks_from_slurm(torchrun) and torchrun["RANK"] == "0"  # torchrun's ranks win
    assert not launch.ranks_from_slurm({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"})  # one task: one process
    with pytest.raises(RuntimeError, match="set MASTER_ADDR"):
        launch.ranks_from_slurm({"SLURM_PROCID": "1", "SLURM_NTASKS": "2"})


@pytest.mark.parametrize("configured,minutes", [(None, launch.DIST_TIMEOUT_MINUTES), (300, 300)])
def test_init_distributed_under_srun_uses_its_ranks_and_the_configured_timeout(configured, minutes, monkeypatch):
    from omegaconf import OmegaConf

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "")  # so that monkeypatch removes what init_distributed sets
        monkeypatch.delenv(key)
    for key, value in {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1",
                       "SLURM_LAUNCH_NODE_IPADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(key, value)
    seen = {}
    monkeypatch.setattr(torch_dist, "init_process_group", lambda **kw: seen.update(kw))
    monkeypatch.setattr(torch_dist, "barrier", lambda: None)
    monkeypatch.setattr(launch, "setup_for_distributed", lambda is_master: None)
    run_cfg = OmegaConf.create({"device": "cpu", **({"dist_timeout_minutes": configured} if configured else {})})
    launch.init_distributed(run_cfg)
    assert (seen["rank"], seen["world_size"], seen["backend"]) == (1, 2, "gloo")
    assert seen["timeout"] == datetime.timedelta(minutes=minutes) and run_cfg.gpu == 1
