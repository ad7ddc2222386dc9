"""ViT gradient checkpointing (``vit_grad_ckpt``) under mixed precision: the recomputed blocks
must run as the forward ran them. LAVIS's fairscale ``checkpoint_wrapper`` records only CUDA's
fp16 autocast flag, so under CPU bf16 autocast it recomputed in fp32 (and on CUDA under bf16 in
fp16): gradients differed from a run without checkpointing (issue 31, item 3)."""
import copy

import pytest
import torch
from omegaconf import OmegaConf

from lavis_cprd.towers import build_vision_encoder, checkpoint_vit_blocks

TINY = {"vit_type": "custom", "image_size": 32, "vit_patch_size": 8, "vit_width": 32, "vit_depth": 3, "vit_heads": 2}


def _vit(**over):
    torch.manual_seed(0)
    return build_vision_encoder(OmegaConf.create({**TINY, **over})).train()


def _run(vit, pixels, dtype):
    """Gradients of a loss on ``vit``'s features under CPU autocast (``dtype``), and the dtype
    of every output of the last block's fc1, in the order they ran (forward, then any recompute)."""
    seen = []
    handle = vit.blocks[-1].mlp.fc1.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        features = vit(pixels)
    features.float().square().mean().backward()  # backward outside autocast, as a training step does
    handle.remove()
    return {n: p.grad.clone() for n, p in vit.named_parameters()}, seen


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_checkpointed_vit_recomputes_in_the_forward_precision_with_equal_gradients(dtype):
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    plain_grads, plain_seen = _run(_vit(), pixels, dtype)
    ckpt_grads, ckpt_seen = _run(_vit(vit_grad_ckpt=True, vit_ckpt_layer=2), pixels, dtype)
    assert plain_seen == [dtype]
    assert ckpt_seen == [dtype, dtype]  # the recompute, in backward, ran in the forward's precision
    assert set(ckpt_grads) == set(plain_grads)
    for name in plain_grads:  # the same operations on the same inputs: the same gradients
        torch.testing.assert_close(ckpt_grads[name], plain_grads[name], rtol=0, atol=0, msg=name)


def test_only_the_last_ckpt_layer_blocks_recompute_and_keys_stay():
    plain, ckpt = _vit(), _vit(vit_grad_ckpt=True, vit_ckpt_layer=2)
    assert list(ckpt.state_dict()) == list(plain.state_dict())
    calls = [0] * len(ckpt.blocks)
    for i, block in enumerate(ckpt.blocks):
        block.attn.qkv.register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
    ckpt(torch.randn(1, 3, 32, 32)).sum().backward()
    assert calls == [1, 2, 2]
    with torch.no_grad():  # no recompute (and no checkpoint) without gradients
        ckpt(torch.randn(1, 3, 32, 32))
    assert calls == [2, 3, 3]


def test_base_vit_is_checkpointed_by_torch_not_fairscale():
    # LAVIS's from_config path (vit_type base), at a small image size to stay cheap.
    vit = build_vision_encoder(OmegaConf.create({"vit_type": "base", "image_size": 32, "vit_grad_ckpt": True,
                                                 "vit_ckpt_layer": 4}))
    wrapped = [i for i, b in enumerate(vit.blocks) if "forward" in vars(b.attn) and "forward" in vars(b.mlp)]
    assert wrapped == [8, 9, 10, 11]
    assert all(type(vars(b.attn)["forward"]).__module__ == "lavis_cprd.towers" for b in vit.blocks[8:])
    with pytest.raises(ValueError, match="already wrapped"):
        checkpoint_vit_blocks(vit, 4)


def test_a_deep_copy_recomputes_with_its_own_weights():
    """BLIP's momentum encoders are deep copies of the online ones: a copy's checkpointed blocks
    must run on the copy's weights (fairscale's wrapper kept running the original's)."""
    vit = _vit(vit_grad_ckpt=True, vit_ckpt_layer=2)
    copied = copy.deepcopy(vit)
    with torch.no_grad():
        for p in copied.parameters():
            p.mul_(0.5)
    reference = _vit()  # the same weights, halved, without checkpointing
    reference.load_state_dict(copied.state_dict())
    pixels = torch.randn(2, 3, 32, 32)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            torch.testing.assert_close(copied(pixels), reference(pixels))
    grads, _ = _run(copied, pixels, torch.float32)
    expected, _ = _run(reference, pixels, torch.float32)
    for name in expected:
        torch.testing.assert_close(grads[name], expected[name], msg=name)
    assert vit.blocks[-1].attn.qkv.weight.grad is None  # the original took no part
