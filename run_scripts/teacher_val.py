"""A teacher checkpoint's ITM on every pair of a split (default val): LAVIS's metrics and the
relevance-aware ones, as JSON. Used to choose the teacher on val (issue 16).

    python run_scripts/teacher_val.py TEACHER.pth [--split val] [--options key=value ...]
"""
import argparse
import json
import os
import tempfile

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lavis_cprd.apps.compare import teacher_metrics  # noqa: E402
from lavis_cprd.apps.runs import STUDENT_CFG, eval_split, load_trained  # noqa: E402
from lavis_cprd.datasets.true_matches import dataset_relevance  # noqa: E402
from lavis_cprd.teachers import BlipITMTeacher  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("ckpt")
p.add_argument("--split", default="val")
p.add_argument("--cfg", default=STUDENT_CFG, help="the config whose dataset is evaluated")
p.add_argument("--options", nargs="+", default=[])
args = p.parse_args()
dataset, _ = eval_split(args.cfg, args.options, args.split)
from lavis.common.registry import registry  # noqa: E402

registry.mapping["paths"]["output_dir"] = tempfile.mkdtemp()  # LAVIS's _report_metrics appends evaluate.txt there
images = torch.cat([b["image"] for b in torch.utils.data.DataLoader(dataset, batch_size=64)])
teacher = BlipITMTeacher(load_trained(args.ckpt, torch.device("cpu")))
m = teacher_metrics(teacher, images, dataset, dataset_relevance(dataset))
keys = ("r_mean", "rel_map_at_r", "i2t_map_at_r", "t2i_map_at_r", "rank_tau", "i2t_true_r1", "t2i_true_r1")
print(json.dumps({k: round(float(m[k]), 3) for k in keys if k in m}))
