"""``lavis-cprd train-teacher --data-cfg FILE``: a cross-encoder teacher for any dataset config,
by the embedded default's two-stage recipe.

1. ITC-trains teacher-size towers (``teacher_itc_tiny_shapes.yaml``);
2. fine-tunes them with LAVIS's BLIP retrieval objective, ITC + ITM
   (``teacher_blip_tiny_shapes.yaml``), as BLIP fine-tunes from its pre-trained model;
3. exports the best checkpoint in fp16 (``teacher/teacher_fp16.pth``), the packaged teacher's
   format, for ``model.distill.teacher.checkpoint``.

Each stage reads the ``datasets`` of ``--data-cfg`` (an experiment YAML, such as the one
``prepare-data`` writes). ITM learns from BLIP's in-batch negatives, which any data has;
``--itm-negatives verified`` (the packaged teacher's) needs ``cprd_shapes``' generator. A
finished stage is reused when asked again with the same request; an interrupted one resumes.
"""
from __future__ import annotations

import argparse
import logging
import os
from typing import List, Optional, Tuple

from lavis.common.registry import registry
from omegaconf import OmegaConf

from lavis_cprd.apps.runs import TEACHER_CFG, TEACHER_EXPORT, TEACHER_ITC_CFG, train_teacher
from lavis_cprd.errors import ConfigError

ITM_NEGATIVES = ("in_batch", "verified")


def recipe_for(data_cfg: str, out: str, itm_negatives: str = "in_batch") -> Tuple[str, str]:
    """The two stages' experiment YAMLs with the ``datasets`` of ``data_cfg``, written into
    ``out/recipe``; returns their paths."""
    data = OmegaConf.load(data_cfg)
    datasets = data.get("datasets")
    if not datasets:
        raise ConfigError([f"{data_cfg}: no datasets block (an experiment YAML, e.g. prepare-data's experiment.yaml)"])
    if itm_negatives == "verified" and set(datasets) != {"cprd_shapes"}:
        raise ConfigError([f"--itm-negatives verified needs cprd_shapes' generator (its verified captions); "
                           f"{data_cfg} has {sorted(datasets)}: use in_batch"])
    size = OmegaConf.load(registry.get_model_class("cprd_blip_retrieval").default_config_path("tiny")).model.image_size
    for name, dcfg in datasets.items():
        for split, proc in (dcfg.get("vis_processor") or {}).items():
            if proc is not None and proc.get("image_size", size) != size:
                raise ConfigError([f"datasets.{name}.vis_processor.{split}.image_size={proc.image_size} in {data_cfg}: "
                                   f"the recipe's teacher reads {size}-pixel images (prepare-data --student tiny)"])
    paths = []
    os.makedirs(os.path.join(out, "recipe"), exist_ok=True)
    for stage, packaged in (("teacher_itc", TEACHER_ITC_CFG), ("teacher_blip", TEACHER_CFG)):
        cfg = OmegaConf.load(packaged)
        if itm_negatives == "verified":  # the packaged recipe's own datasets flags (lookalike, verified)
            cfg.datasets = OmegaConf.merge(datasets, {k: v for k, v in cfg.datasets.items() if k in datasets})
        else:
            cfg.datasets = datasets
        if stage == "teacher_blip":
            cfg.model.itm_negatives = itm_negatives
        run = data.get("run") or {}
        if run.get("k_test") is not None:  # the data's: at most its smallest evaluation split
            cfg.run.k_test = min(int(cfg.run.k_test), int(run.k_test))
        if run.get("warmup_steps") is not None and stage == "teacher_itc":  # stage 1 warms up over one epoch of the data
            cfg.run.warmup_steps = int(run.warmup_steps)
        path = os.path.join(out, "recipe", f"{stage}.yaml")
        OmegaConf.save(cfg, path)
        paths.append(path)
    return paths[0], paths[1]


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lavis-cprd train-teacher", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-cfg", required=True, help="an experiment YAML whose datasets the teacher learns")
    p.add_argument("--output", default=None, help="folder of the two runs and the export "
                   "(default: the folder of --data-cfg, where prepare-data's experiment.yaml looks for it)")
    p.add_argument("--itm-negatives", choices=ITM_NEGATIVES, default="in_batch",
                   help="ITM's negatives: BLIP's in-batch ones (any data), or verified (cprd_shapes only)")
    p.add_argument("--options", nargs="+", default=[], help="overrides for both stages (e.g. run.max_epoch=4)")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> str:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    if not os.path.isfile(args.data_cfg):
        raise FileNotFoundError(f"--data-cfg {args.data_cfg!r} does not exist")
    out = os.path.abspath(args.output or os.path.dirname(os.path.abspath(args.data_cfg)))
    stage1, stage2 = recipe_for(args.data_cfg, out, args.itm_negatives)
    export = train_teacher(stage1, stage2, out, args.options)
    print(f"teacher: {export}\n(model.distill.teacher.checkpoint; prepare-data's experiment.yaml already names "
          f"{os.path.join(out, 'teacher', TEACHER_EXPORT)})")
    return export


if __name__ == "__main__":
    main()
