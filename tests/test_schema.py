"""One schema, one place per rule: the checking engine (``config_schema``) and the tables that
it reads (``training/schema.py``, ``model.distill``'s in ``distill/config.py``)."""
from dataclasses import fields

import pytest

import lavis_cprd  # noqa: F401  (LAVIS's registry, the losses and the teachers)
from lavis_cprd.config_schema import Key, check_value, count, key_at, num
from lavis_cprd.distill.config import DISTILL, DISTILL_KEYS, DistillConfig
from lavis_cprd.training.schema import CONFIG

MODEL = CONFIG.keys["model"]


def model(**distill):
    return {"arch": "cprd_dual_encoder", "distill": distill}


def test_the_engine_says_what_a_key_accepts():
    assert check_value(num(0, 1), float("nan"), "x") == ["x=nan is out of range: it must be in [0.0, 1.0]"]
    assert check_value(num(0, open_low=True), -1, "x") == ["x=-1.0 is out of range: it must be in (0.0, inf)"]
    assert check_value(count(1), 0, "k") == ["k=0 is out of range: it must be in [1, inf)"]
    assert check_value(count(1), 2.0, "k") == ["k must be an integer, got 2.0"]
    assert check_value(count(1), None, "k") == ["k must be set (an integer), got null"]
    assert check_value(Key(bool), "yes", "f") == ["f must be true or false, got 'yes'"]
    # a float written as text ("5e-4": YAML reads it so) is read where its reader casts it
    assert check_value(num(0), "5e-4", "run.init_lr") == []
    assert check_value(num(0, text=False), "5e-4", "w") == ["w must be a number, got '5e-4'"]
    required = Key(dict, keys={"edge": Key(check=lambda v, w: [] if v else [f"{w}={v!r} is no edge"], required=True)})
    assert check_value(required, {}, "t") == ["t.edge=None is no edge"]


def test_model_distill_keys_are_the_fields_of_distill_config():
    assert list(DISTILL_KEYS) == [f.name for f in fields(DistillConfig)]


@pytest.mark.parametrize("distill, message", [
    ({"num_hard_negatives": 0}, "model.distill.num_hard_negatives=0 is out of range: it must be in [1, inf)"),
    ({"num_hard_negatives": 2.5}, "model.distill.num_hard_negatives must be an integer, got 2.5"),
    ({"weight": "0.5"}, "model.distill.weight must be a number, got '0.5'"),
    ({"temperature": None}, "model.distill.temperature must be a positive number or 'itc', got None"),
    ({"conaclip": []}, "model.distill.conaclip must be a non-empty list of edge terms"),
    ({"conaclip": [{"edge": "S_img-T_img"}]}, "model.distill.conaclip[0].loss must be set (a string), got null"),
])
def test_one_rule_one_message_from_the_config_check_and_from_distill_config(distill, message):
    assert check_value(MODEL, model(loss="none", **distill), "model") == [message]
    with pytest.raises(ValueError) as error:
        DistillConfig.from_cfg({"loss": "none", **distill})
    assert str(error.value) == message


def test_every_problem_of_model_distill_at_once():
    problems = check_value(DISTILL, {"weight": -1, "mining_scope": "global", "wieght": 1}, "model.distill")
    assert len(problems) == 3 and problems[0].startswith("unknown key model.distill.wieght (did you mean 'weight'")


def test_the_teacher_keys_are_the_losss():
    teacher = {"arch": "blip_feature_extractor", "chekpoint": "t.pth"}
    assert check_value(MODEL, model(loss="none", teacher=teacher), "model") == []  # never read
    problems = check_value(MODEL, model(loss="cprd", teacher=teacher), "model")
    assert problems[0].startswith("unknown key model.distill.teacher.chekpoint (did you mean 'checkpoint'")
    assert problems[1].startswith("model.distill.teacher.arch='blip_feature_extractor' is not one of")


def test_key_at_reads_the_tree_that_checks():
    config = {"model": model(loss="cprd")}
    assert key_at(CONFIG, "model.distill.num_hard_negatives", config) is DISTILL_KEYS["num_hard_negatives"]
    arch = key_at(CONFIG, "model.distill.teacher.arch", config)
    assert "blip_image_text_matching" in arch.choices() and "blip_feature_extractor" not in arch.choices()
    assert key_at(CONFIG, "model.distill.teacher.arch", {"model": model(loss="none")}) is None  # not read
    assert key_at(CONFIG, "run.init_lr").range_text == "(0.0, inf)"
    processor = {"datasets": {"cprd_shapes": {"vis_processor": {"train": {"name": "blip_image_train"}}}}}
    assert key_at(CONFIG, "datasets.cprd_shapes.vis_processor.train.image_size", processor).low == 1
    assert key_at(CONFIG, "datasets.cprd_shapes.generator.num_train", {}) is None  # ShapesSpec checks it
