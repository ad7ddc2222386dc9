"""Speed options: ``model.compile``, bf16 autocast (``run.amp_dtype``), ViT gradient
checkpointing. Each must leave the numbers what the plain model computes."""
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from conftest import tiny_model_cfg
from lavis_cprd.models.clip_student import CprdClipDualEncoder
from lavis_cprd.models.dual_encoder import CprdDualEncoder
from lavis_cprd.models.student import compile_options
from lavis_cprd.training.runner import CprdRunner
from lavis_cprd.training.task import CprdRetrievalTask, autocast_dtype


def _build(model_cls=CprdDualEncoder, **model_keys):
    cfg = tiny_model_cfg(model_cls, num_hard_negatives=3, valid_threshold=0.3)
    for key, value in model_keys.items():
        cfg[key] = value
    torch.manual_seed(0)
    return model_cls.from_config(cfg).eval()  # eval: no dropout, two models compute alike


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(batch)
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


class CountingBackend:
    """A ``torch.compile`` backend that runs graphs eagerly and counts those it was given."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


@pytest.mark.parametrize("model_cls", [CprdDualEncoder, CprdClipDualEncoder])
def test_compiled_encoders_compute_what_eager_ones_do(model_cls, batch):
    torch._dynamo.reset()
    eager = _build(model_cls)
    compiled = _build(model_cls, compile={"backend": "aot_eager"})
    assert set(compiled.state_dict()) == set(eager.state_dict())  # checkpoints keep their keys
    out_e, grads_e = _loss_and_grads(eager, batch)
    out_c, grads_c = _loss_and_grads(compiled, batch)
    for term in ("loss", "loss_itc", "loss_distill"):
        torch.testing.assert_close(out_c[term], out_e[term], rtol=1e-5, atol=1e-6)
    assert set(grads_c) == set(grads_e)
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-4, atol=1e-6, msg=name)
    # A different caption length (the tokenizer pads to the longest caption) still matches.
    longer = dict(batch, text_input=[c + " and a small red circle" for c in batch["text_input"]])
    with torch.no_grad():
        torch.testing.assert_close(compiled(longer)["loss"], eager(longer)["loss"], rtol=1e-5, atol=1e-6)


def test_compile_really_compiles_both_towers(batch):
    torch._dynamo.reset()
    model = _build(distill={"loss": "none"})
    backend = CountingBackend()
    model.compile_encoders({"backend": backend})
    with torch.no_grad():
        model(batch)
    assert backend.graphs >= 2  # the image tower's graph and the text tower's (no fallback to eager)


def test_compile_config_errors_name_the_key_and_choices():
    assert compile_options(False) is None and compile_options(None) is None
    assert compile_options(True) == {}
    assert compile_options(OmegaConf.create({"mode": "max-autotune"})) == {"mode": "max-autotune"}
    with pytest.raises(ValueError, match=r"unknown keys \['backnd'\].*'backend'"):
        compile_options(OmegaConf.create({"backnd": "inductor"}))
    with pytest.raises(ValueError, match=r"model.compile.backend='nope' is not one of \[.*'inductor'"):
        compile_options({"backend": "nope"})
    with pytest.raises(ValueError, match="model.compile must be true, false or a mapping"):
        compile_options("inductor")


def test_bf16_autocast_runs_the_student_in_bf16_and_the_teacher_in_its_own_precision(batch):
    model = _build()
    task = CprdRetrievalTask(OmegaConf.create({"amp": True, "amp_dtype": "bf16"}))
    assert task.autocast_dtype is torch.bfloat16
    dtypes = {}

    def record(name):
        def hook(module, args, output):
            dtypes.setdefault(name, output.dtype)
        return hook

    model.vision_proj.register_forward_hook(record("student"))
    model.teacher.model.itm_head.register_forward_hook(record("teacher"))  # precision: fp32
    model.zero_grad()
    loss_bf16 = task.train_step(model, dict(batch))
    assert dtypes == {"student": torch.bfloat16, "teacher": torch.float32}
    loss_bf16.backward()
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())  # fp32 master weights
    loss_fp32 = CprdRetrievalTask(OmegaConf.create({"amp": False})).train_step(model, dict(batch))
    # bf16 keeps 8 bits of mantissa: the loss agrees to a few parts in a hundred.
    torch.testing.assert_close(loss_bf16.float(), loss_fp32, rtol=3e-2, atol=3e-2)


def test_amp_dtype_choices_and_scaler():
    assert autocast_dtype(OmegaConf.create({"amp": False, "amp_dtype": "bf16"})) is None
    assert autocast_dtype(OmegaConf.create({"amp": True})) is None  # fp16: LAVIS's own autocast
    with pytest.raises(ValueError, match=r"run.amp_dtype='fp8' is not one of \['fp16', 'bf16', 'auto'\]"):
        autocast_dtype(OmegaConf.create({"amp": True, "amp_dtype": "fp8"}))
    runner = SimpleNamespace(config=SimpleNamespace(run_cfg=OmegaConf.create({"amp": True, "amp_dtype": "bf16"})))
    assert CprdRunner.scaler.fget(runner) is None  # bf16 needs no loss scaling


def test_vit_gradient_checkpointing_keeps_gradients_and_keys(batch):
    plain = _build()
    checkpointed = _build(vit_grad_ckpt=True, vit_ckpt_layer=2)
    assert set(checkpointed.state_dict()) == set(plain.state_dict())
    checkpointed.train(), plain.train()  # checkpointing acts in training mode only
    calls = {}
    for name, m in (("checkpointed", checkpointed), ("plain", plain)):
        m.text_encoder.eval()  # BERT's dropout would make the two differ
        calls[name] = []
        m.visual_encoder.blocks[0].attn.qkv.register_forward_hook(lambda *a, log=calls[name]: log.append(1))
    out_p, grads_p = _loss_and_grads(plain, batch)
    out_c, grads_c = _loss_and_grads(checkpointed, batch)
    # The checkpointed block's activations were recomputed in the backward pass.
    assert (len(calls["plain"]), len(calls["checkpointed"])) == (1, 2)
    torch.testing.assert_close(out_c["loss"], out_p["loss"])
    for name in grads_p:
        torch.testing.assert_close(grads_c[name], grads_p[name], rtol=1e-5, atol=1e-7, msg=name)


def _runner_with(model, **run_cfg):
    """A ``CprdRunner`` holding ``model`` and a run config, without building datasets."""
    runner = CprdRunner.__new__(CprdRunner)
    cfg = {"init_lr": 1e-3, "weight_decay": 0.05, **run_cfg}
    runner.config = SimpleNamespace(run_cfg=OmegaConf.create(cfg))
    runner._optimizer, runner._wrapped_model, runner._model = None, model, model
    return runner


@pytest.mark.parametrize("impl,flags", [(None, {"fused": True}), ("foreach", {"foreach": True, "fused": None}),
                                        ("loop", {"foreach": False, "fused": None})])
def test_optimizer_is_lavis_adamw_run_by_the_chosen_implementation(impl, flags):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    model[1].weight.requires_grad_(False)
    optimizer = _runner_with(model, **({"adamw_impl": impl} if impl else {})).optimizer
    assert type(optimizer) is torch.optim.AdamW
    for group in optimizer.param_groups:
        assert {k: group[k] for k in flags} == flags
    # LAVIS's groups: matrices decayed; biases and norms not; frozen weights left out.
    decayed, plain = optimizer.param_groups
    assert [p is model[0].weight for p in decayed["params"]] == [True] and decayed["weight_decay"] == 0.05
    assert {id(p) for p in plain["params"]} == {id(model[0].bias), id(model[1].bias)} and plain["weight_decay"] == 0

    # Every implementation takes the same AdamW step (to float rounding): one step by hand.
    x = torch.randn(5, 4)
    model(x).square().sum().backward()
    before = {id(p): p.detach().clone() for p in model.parameters()}
    grads = {id(p): p.grad.clone() for p in model.parameters() if p.grad is not None}
    optimizer.step()
    for group in optimizer.param_groups:
        for p in group["params"]:
            g, lr, wd = grads[id(p)], group["lr"], group["weight_decay"]
            m_hat, v_hat = g, g * g  # first step: bias-corrected moments are g and g^2
            expected = before[id(p)] * (1 - lr * wd) - lr * m_hat / (v_hat.sqrt() + group["eps"])
            torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-7)


def test_adamw_impl_error_lists_choices():
    with pytest.raises(ValueError, match=r"run.adamw_impl='apex' is not one of \['fused', 'foreach', 'loop'\]"):
        _runner_with(torch.nn.Linear(2, 2), adamw_impl="apex").optimizer
