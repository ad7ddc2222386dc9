"""Every shipped experiment YAML loads through LAVIS's Config and names registered parts."""
import glob
import os
from argparse import Namespace

import pytest
from lavis.common.config import Config
from lavis.common.registry import registry

from conftest import REPO
from lavis_cprd.distill.config import DistillConfig
from lavis_cprd.teachers import teacher_class

CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml")))


def test_configs_exist():
    names = {os.path.basename(p) for p in CONFIGS}
    assert {"cprd_tiny_shapes.yaml", "cprd_flickr30k_blip_base.yaml", "cprd_coco_blip_base.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_loads_and_is_consistent(path):
    cfg = Config(Namespace(cfg_path=path, options=None))
    assert registry.get_model_class(cfg.model_cfg.arch) is not None
    assert registry.get_task_class(cfg.run_cfg.task) is not None
    assert registry.get_runner_class(cfg.run_cfg.runner) is not None
    for name in cfg.datasets_cfg:
        assert registry.get_builder_class(name) is not None
    if cfg.model_cfg.arch == "cprd_blip_retrieval":  # the embedded default's teacher recipe
        assert cfg.run_cfg.task == "retrieval" and cfg.run_cfg.batch_size_train > 0
        assert cfg.model_cfg.queue_size % cfg.run_cfg.batch_size_train == 0  # BLIP's queue needs it
        return
    distill = DistillConfig.from_cfg(cfg.model_cfg.distill)
    assert distill.num_hard_negatives < cfg.run_cfg.batch_size_train
    teacher_class(distill.teacher["arch"])
    # Splits the runner evaluates must be ones the retrieval task can report on.
    assert list(cfg.run_cfg.valid_splits) == ["val"] and list(cfg.run_cfg.test_splits) == ["test"]
    if cfg.model_cfg.get("model_type") == "tiny":  # offline configs build as they are (sizes valid)
        model = registry.get_model_class(cfg.model_cfg.arch).from_config(cfg.model_cfg)
        assert model.embed_dim == cfg.model_cfg.get("embed_dim", cfg.model_cfg.get("clip", {}).get("model", {}).get("embed_dim"))


@pytest.mark.parametrize("name", ["flickr30k", "coco"])
def test_real_configs_use_paper_scale_settings(name):
    cfg = Config(Namespace(cfg_path=os.path.join(REPO, "configs", f"cprd_{name}_blip_base.yaml"), options=None))
    model = cfg.model_cfg
    assert model.vit_type == "base" and model.image_size == 384
    assert model.pretrained.endswith("model_base_capfilt_large.pth")  # BLIP's pre-trained weights by URL
    assert model.distill.loss == "cprd" and model.distill.teacher.arch == "blip_image_text_matching"
    assert cfg.run_cfg.batch_size_train == 32 and cfg.run_cfg.max_epoch == 6
