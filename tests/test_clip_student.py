"""cprd_clip_dual_encoder: a CLIP student (LAVIS's clip model) trained by the same losses."""
import pytest
import torch
from lavis.common.registry import registry
from lavis.models.clip_models.model import CLIP
from omegaconf import OmegaConf

from conftest import tiny_model_cfg
from lavis_cprd.models.clip_student import CprdClipDualEncoder
from test_model import assert_forward_is_itc_plus_cprd


def clip_cfg(**distill):
    return tiny_model_cfg(CprdClipDualEncoder, **distill)


@pytest.fixture(scope="module")
def clip_student():
    torch.manual_seed(0)
    return CprdClipDualEncoder.from_config(clip_cfg(num_hard_negatives=3, valid_threshold=0.5)).eval()


def test_registered_and_features_are_lavis_clips(clip_student, batch):
    assert registry.get_model_class("cprd_clip_dual_encoder") is CprdClipDualEncoder
    assert isinstance(clip_student.clip, CLIP)
    # LAVIS's documented call for clip_feature_extractor: extract_features -> *_embeds_proj.
    with torch.no_grad():
        feats = CLIP.extract_features(clip_student.clip, {"image": batch["image"], "text_input": batch["text_input"]})
        torch.testing.assert_close(clip_student.encode_image(batch["image"]), feats.image_embeds_proj)
        torch.testing.assert_close(clip_student.encode_captions(batch["text_input"], "cpu"), feats.text_embeds_proj)


def test_forward_equals_itc_plus_cprd_with_a_blip_teacher(clip_student, batch):
    assert_forward_is_itc_plus_cprd(clip_student, batch, K=3)


def test_teacher_gets_raw_captions_and_its_own_tokenizer(clip_student, batch, monkeypatch):
    seen = []
    original = clip_student.teacher.logit
    def spy(images, captions, pairs, image_ids=None):
        seen.append(list(captions))
        return original(images, captions, pairs)

    monkeypatch.setattr(clip_student.teacher, "logit", spy)
    clip_student(batch)
    assert seen == [batch["text_input"]]
    assert clip_student.teacher.model.tokenizer.vocab_size == 30522  # BERT's WordPiece, not CLIP's BPE
    assert clip_student.clip.vocab_size == 49408


def test_gradients_reach_clip_but_not_logit_scale_or_teacher(clip_student, batch):
    clip_student.zero_grad()
    clip_student(batch).loss.backward()
    params = dict(clip_student.named_parameters())
    for name in ("clip.visual.conv1.weight", "clip.token_embedding.weight", "clip.text_projection", "temp"):
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name
    assert not params["clip.logit_scale"].requires_grad  # the student's temperature is `temp`
    assert not {id(p) for p in clip_student.teacher.model.parameters()} & {id(p) for p in clip_student.parameters()}
    assert not any("teacher" in k or "itm_head" in k for k in clip_student.state_dict())


def test_temperature_defaults_to_clips_logit_scale_and_config_errors():
    cfg = clip_cfg()
    cfg.temp = None
    model = CprdClipDualEncoder.from_config(cfg)
    assert model.temp.item() == pytest.approx(0.07, rel=1e-5)  # CLIP's init: logit_scale = log(1/0.07)
    del cfg.clip.model["text_cfg"]
    with pytest.raises(ValueError, match=r"model.clip.model \(an explicit OpenCLIP CLIP\) needs \['text_cfg'\]"):
        CprdClipDualEncoder.from_config(cfg)
    with pytest.raises(ValueError, match=r"model.clip.model_type='ViT-Z-99' is not one of \[.*'ViT-B-16'"):
        CprdClipDualEncoder.from_config(OmegaConf.create({"clip": {"model_type": "ViT-Z-99"}}))
