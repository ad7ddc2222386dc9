"""ViT gradient checkpointing under bf16 autocast, on the device given: lavis-cprd's
(``towers.checkpoint_vit_blocks``, torch's non-reentrant checkpoint) against LAVIS's stock
fairscale wrapper, each compared with the same ViT without checkpointing.

    python bench/gpu/grad_ckpt_check.py --device cuda --json out.json

Records the dtype the checkpointed block's fc1 ran in during the backward's recompute
(fairscale: fp16 on CUDA, fp32 on CPU; ours: bf16, as the forward) and the largest gradient
difference from the plain ViT. Passes when ours recomputes in bf16 and its gradients equal the
plain ones (to 1e-6 of their scale; bit for bit where kernels are deterministic).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from lavis.models.vit import VisionTransformerEncoder  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from lavis_cprd.towers import build_vision_encoder  # noqa: E402

SIZE = dict(img_size=64, patch_size=16, embed_dim=256, depth=4, num_heads=4)


def ours(ckpt: bool):
    torch.manual_seed(0)
    return build_vision_encoder(OmegaConf.create({
        "vit_type": "custom", "image_size": SIZE["img_size"], "vit_patch_size": SIZE["patch_size"],
        "vit_width": SIZE["embed_dim"], "vit_depth": SIZE["depth"], "vit_heads": SIZE["num_heads"],
        "vit_grad_ckpt": ckpt, "vit_ckpt_layer": 2}))


def fairscale():
    torch.manual_seed(0)
    return VisionTransformerEncoder(**SIZE, use_grad_checkpointing=True, ckpt_layer=2)


def run(vit, pixels, device):
    vit = vit.to(device).train()
    seen = []
    vit.blocks[-1].mlp.fc1.register_forward_hook(lambda m, i, o: seen.append(str(o.dtype).replace("torch.", "")))
    with torch.autocast(device.type, dtype=torch.bfloat16):
        features = vit(pixels)
    features.float().square().mean().backward()
    return {n: p.grad.detach().float().cpu() for n, p in vit.named_parameters()}, seen


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    pixels = torch.randn(4, 3, SIZE["img_size"], SIZE["img_size"], generator=torch.Generator().manual_seed(1)).to(device)
    plain, plain_seen = run(ours(False), pixels, device)
    scale = max(float(g.abs().max()) for g in plain.values())
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "plain_fc1_dtypes": plain_seen, "gradient_scale": scale}
    for name, build in (("lavis_cprd", lambda: ours(True)), ("lavis_fairscale", fairscale)):
        grads, seen = run(build(), pixels, device)
        diff = max(float((grads[k] - plain[k]).abs().max()) for k in plain)
        result[name] = {"fc1_dtypes_forward_then_recompute": seen, "max_grad_diff": diff,
                        "bit_equal": all(torch.equal(grads[k], plain[k]) for k in plain)}
    ok = result["lavis_cprd"]
    result["passed"] = ok["fc1_dtypes_forward_then_recompute"] == ["bfloat16", "bfloat16"] and \
        ok["max_grad_diff"] <= 1e-6 * scale
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["passed"] else 1)
