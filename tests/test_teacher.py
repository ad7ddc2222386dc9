"""The BLIP ITM teacher adapter against LAVIS's own BlipITM."""
import pytest
import torch
from lavis.models.blip_models.blip_image_text_matching import BlipITM
from omegaconf import OmegaConf

from conftest import TOKENIZER, tiny_model_cfg
from lavis_cprd.teachers import BlipITMTeacher, available_teachers, build_teacher


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return build_teacher(tiny_model_cfg().distill.teacher, tokenizer_path=TOKENIZER)


def test_scores_equal_lavis_blip_itm_forward(teacher, batch):
    images, captions = batch["image"], batch["text_input"]
    pairs = torch.tensor([[0, 1], [1, 3], [2, 2], [5, 0], [7, 7], [3, 6]])
    got = teacher.score(images, captions, pairs)
    # LAVIS's documented call: model({"image", "text_input"}, match_head="itm") -> ITM logits.
    itm = BlipITM.forward(
        teacher.model, {"image": images[pairs[:, 0]], "text_input": [captions[j] for j in pairs[:, 1]]}, match_head="itm"
    )
    torch.testing.assert_close(got, itm.softmax(dim=-1)[:, 1], rtol=1e-5, atol=1e-6)
    logits = teacher.logit(images, captions, pairs)
    torch.testing.assert_close(logits, itm[:, 1] - itm[:, 0], rtol=1e-4, atol=1e-5)


def test_chunking_does_not_change_scores(teacher, batch):
    pairs = torch.cartesian_prod(torch.arange(8), torch.arange(8))
    full = teacher.score(batch["image"], batch["text_input"], pairs)
    teacher.batch_size = 5
    try:
        chunked = teacher.score(batch["image"], batch["text_input"], pairs)
    finally:
        teacher.batch_size = 256
    torch.testing.assert_close(full, chunked, rtol=1e-5, atol=1e-6)


def test_each_image_encoded_once(teacher, batch, monkeypatch):
    calls = []
    original = teacher.model.visual_encoder.forward_features
    monkeypatch.setattr(teacher.model.visual_encoder, "forward_features", lambda x: calls.append(len(x)) or original(x))
    pairs = torch.cartesian_prod(torch.tensor([0, 2, 4]), torch.arange(8))  # 3 images x 8 captions
    teacher.score(batch["image"], batch["text_input"], pairs)
    assert sum(calls) == 3


def test_teacher_is_frozen_and_in_eval_mode(teacher, batch):
    teacher.model.train()
    teacher.score(batch["image"], batch["text_input"], torch.tensor([[0, 0]]))
    assert not teacher.model.training
    assert not any(p.requires_grad for p in teacher.model.parameters())


def test_bf16_scores_close_to_fp32(teacher, batch):
    pairs = torch.cartesian_prod(torch.arange(4), torch.arange(4))
    fp32 = teacher.score(batch["image"], batch["text_input"], pairs)
    teacher.precision = "bf16"
    try:
        bf16 = teacher.score(batch["image"], batch["text_input"], pairs)
    finally:
        teacher.precision = "fp32"
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, fp32, atol=3e-2, rtol=0)


def test_unknown_teacher_lists_choices():
    with pytest.raises(ValueError, match=r"arch='blip_itm_typo' has no teacher adapter; available: \['blip_image_text_matching'\]"):
        build_teacher(OmegaConf.create({"arch": "blip_itm_typo"}), kind="cross")
    assert available_teachers("cross") == ["blip_image_text_matching"]
    assert available_teachers("dual") == ["blip_feature_extractor", "clip_feature_extractor", "cprd_dual_encoder"]


def test_unknown_model_type_and_precision():
    with pytest.raises(ValueError, match="model_type='huge' is not one of"):
        BlipITMTeacher.from_config(OmegaConf.create({"model_type": "huge"}))
    cfg = tiny_model_cfg().distill.teacher
    cfg.precision = "fp8"
    with pytest.raises(ValueError, match="precision='fp8' is not one of"):
        BlipITMTeacher.from_config(cfg, tokenizer_path=TOKENIZER)
