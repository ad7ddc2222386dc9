"""The BLIP ITM teacher adapter against LAVIS's own BlipITM."""
import pytest
import torch.nn.functional as F
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


def test_cross_attention_keys_and_values_projected_once_per_image_in_a_chunk(teacher, batch):
    layers = [m for n, m in teacher.model.text_encoder.named_modules() if n.endswith("crossattention.self.key")]
    assert len(layers) == teacher.model.text_encoder.config.num_hidden_layers and teacher.shares_image_projections
    rows = []
    handle = layers[0].register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    images, captions = batch["image"], batch["text_input"]
    pairs = torch.cartesian_prod(torch.tensor([0, 2, 4]), torch.arange(8))  # 3 images x 8 captions
    pairs = pairs[torch.randperm(len(pairs), generator=torch.Generator().manual_seed(0))]
    teacher.batch_size = 8
    try:
        got = teacher.logit(images, captions, pairs)
    finally:
        teacher.batch_size, _ = 256, handle.remove()
    assert rows == [1, 1, 1]  # pairs grouped by image: one image per chunk of 8, projected once
    itm = BlipITM.forward(
        teacher.model, {"image": images[pairs[:, 0]], "text_input": [captions[j] for j in pairs[:, 1]]}, match_head="itm"
    )
    torch.testing.assert_close(got, itm[:, 1] - itm[:, 0], rtol=1e-4, atol=1e-5)  # in the callers' pair order


def test_teacher_is_frozen_and_in_eval_mode(teacher, batch):
    teacher.model.train()
    teacher.score(batch["image"], batch["text_input"], torch.tensor([[0, 0]]))
    assert not teacher.model.training
    assert not any(p.requires_grad for p in teacher.model.parameters())


def test_chunks_run_only_the_text_positions_their_longest_caption_needs(teacher, batch):
    images = batch["image"][:4]
    captions = ["red circle", "a big red circle on the left and a small blue square on the right",
                "blue square", "a small green star at the top next to a big yellow triangle at the bottom"]
    pairs = torch.cartesian_prod(torch.arange(4), torch.arange(4))
    pairs = pairs[torch.randperm(len(pairs), generator=torch.Generator().manual_seed(1))]
    widths = []
    handle = teacher.model.text_encoder.register_forward_pre_hook(lambda module, args: widths.append(args[0].shape[1]))
    teacher.batch_size = 8
    try:
        got = teacher.logit(images, captions, pairs)
    finally:
        teacher.batch_size, _ = 256, handle.remove()
    longest = len(teacher.model.tokenizer(captions[3]).input_ids)
    assert widths == [len(teacher.model.tokenizer(captions[0]).input_ids), longest]  # short captions, then long ones
    itm = BlipITM.forward(  # LAVIS pads every pair to the longest caption
        teacher.model, {"image": images[pairs[:, 0]], "text_input": [captions[j] for j in pairs[:, 1]]}, match_head="itm"
    )
    torch.testing.assert_close(got, itm[:, 1] - itm[:, 0], rtol=1e-4, atol=1e-5)


def test_the_memo_tokenizer_gives_bert_tokenizers_ids_and_tokenizes_a_text_once(monkeypatch):
    from transformers import BertTokenizer

    from lavis_cprd.tokenization import MemoBertTokenizer, load_blip_tokenizer, resolve_tokenizer_path

    memo = load_blip_tokenizer(TOKENIZER)
    assert isinstance(memo, MemoBertTokenizer)
    plain = BertTokenizer.from_pretrained(resolve_tokenizer_path(TOKENIZER))
    plain.add_special_tokens({"bos_token": "[DEC]"})
    plain.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    captions = ["a red circle on the left", "A BIG blue Square, top-right!", "[ENC] a star", "",
                " ".join(["green triangle"] * 30)]  # the last is cut to max_length
    want = plain(captions, padding="longest", truncation=True, max_length=35, return_tensors="pt")
    calls = []
    original = BertTokenizer._tokenize
    monkeypatch.setattr(BertTokenizer, "_tokenize", lambda self, text, *a, **k: calls.append(text) or original(self, text, *a, **k))
    counts = []
    for _ in range(2):
        got = memo(captions, padding="longest", truncation=True, max_length=35, return_tensors="pt")
        counts.append(len(calls))
        assert set(got) == set(want)
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
    assert counts[0] > 0 and counts[1] == counts[0]  # the second time, every text was remembered


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
    choices = r"\['albef_retrieval', 'blip2_image_text_matching', 'blip_image_text_matching', 'shapes_oracle'\]"
    with pytest.raises(ValueError, match=r"arch='blip_itm_typo' has no teacher adapter; available: " + choices):
        build_teacher(OmegaConf.create({"arch": "blip_itm_typo"}), kind="cross")
    assert available_teachers("cross") == ["albef_retrieval", "blip2_image_text_matching", "blip_image_text_matching", "shapes_oracle"]
    assert available_teachers("dual") == ["blip_feature_extractor", "clip_feature_extractor", "cprd_dual_encoder"]


def test_unknown_model_type_and_precision():
    with pytest.raises(ValueError, match="model_type='huge' is not one of"):
        BlipITMTeacher.from_config(OmegaConf.create({"model_type": "huge"}))
    cfg = tiny_model_cfg().distill.teacher
    cfg.precision = "fp8"
    with pytest.raises(ValueError, match="precision='fp8' is not one of"):
        BlipITMTeacher.from_config(cfg, tokenizer_path=TOKENIZER)


ALBEF_TINY = {"vit_type": "custom", "image_size": 48, "vit_patch_size": 16, "vit_width": 32, "vit_depth": 1,
              "vit_heads": 2, "text_width": 32, "text_depth": 2, "text_heads": 2, "text_fusion_layer": 1,
              "embed_dim": 16, "queue_size": 8}


class _Images(torch.utils.data.Dataset):
    """What LAVIS's ``compute_sim_matrix`` reads: ``dataset.text``, ``dataset.image``, samples."""

    def __init__(self, images, texts):
        self.image, self.text = images, texts

    def __len__(self):
        return len(self.image)

    def __getitem__(self, i):
        return {"image": self.image[i]}


def test_albef_scores_equal_lavis_albef_rerank_head(batch):
    from lavis.models.albef_models import compute_sim_matrix

    torch.manual_seed(0)
    cfg = OmegaConf.create({"arch": "albef_retrieval", "checkpoint": "", "model": ALBEF_TINY})
    teacher = build_teacher(cfg, tokenizer_path=TOKENIZER, kind="cross")
    assert teacher.model.text_encoder.config.fusion_layer == 1
    assert not hasattr(teacher.model.tokenizer, "enc_token_id")  # ALBEF keeps [CLS]
    images, texts = batch["image"][2:7], batch["text_input"][:5]
    pairs = torch.cartesian_prod(torch.arange(5), torch.arange(5))
    got = teacher.match_logits(images, texts, pairs)[:, 1].view(5, 5)
    # LAVIS's ALBEF evaluation re-ranks its top-k with score = itm_logit[:, 1] + ITC similarity;
    # with k = every text, subtracting the similarity leaves the ITM logit of every pair.
    model = teacher.model
    loader = torch.utils.data.DataLoader(_Images(images, texts), batch_size=5)
    i2t, t2i = compute_sim_matrix(model, loader, k_test=5)
    with torch.no_grad():
        v = F.normalize(model.vision_proj(model.visual_encoder.forward_features(images)[:, 0]), dim=-1)
        tokens = model.tokenizer(texts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        t = F.normalize(model.text_proj(model.text_encoder.forward_text(tokens).last_hidden_state[:, 0]), dim=-1)
    torch.testing.assert_close(got, torch.as_tensor(i2t) - v @ t.t(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.t(), torch.as_tensor(t2i) - t @ v.t(), rtol=1e-4, atol=1e-5)


def test_albef_fusion_layer_must_leave_a_cross_attention_layer():
    cfg = OmegaConf.create({"arch": "albef_retrieval", "checkpoint": "", "model": {**ALBEF_TINY, "text_fusion_layer": 2}})
    with pytest.raises(ValueError, match=r"model.text_fusion_layer=2 must be in \[0, text_depth=2\)"):
        build_teacher(cfg, tokenizer_path=TOKENIZER, kind="cross")


BLIP2_TINY = {"vit_model": "custom", "image_size": 28, "vit_patch_size": 14, "vit_width": 32, "vit_depth": 1,
              "vit_heads": 2, "qformer_width": 32, "qformer_depth": 2, "qformer_heads": 2, "num_query_token": 4,
              "embed_dim": 16}


@pytest.fixture(scope="module")
def blip2_teacher():
    torch.manual_seed(0)
    cfg = OmegaConf.create({"arch": "blip2_image_text_matching", "checkpoint": "", "model": BLIP2_TINY})
    return build_teacher(cfg, tokenizer_path=TOKENIZER, kind="cross")


def test_blip2_scores_equal_lavis_blip2_itm_forward(blip2_teacher, batch):
    from lavis.models.blip2_models.blip2_image_text_matching import Blip2ITM

    model = blip2_teacher.model
    assert len(model.tokenizer) == 30523  # bert-base-uncased + [DEC], as LAVIS's BLIP-2 checkpoints
    assert model.Qformer.config.hidden_size == 32 and model.query_tokens.shape == (1, 4, 32)
    # Student images are 48 px; the teacher resizes them to its own 28 px.
    images, captions = batch["image"], batch["text_input"]
    pairs = torch.tensor([[0, 1], [1, 3], [2, 2], [5, 0], [7, 7], [3, 6], [0, 6]])
    got = blip2_teacher.match_logits(images, captions, pairs)
    teacher_pixels = F.interpolate(images, size=(28, 28), mode="bicubic", align_corners=False)
    # LAVIS's documented call, model({"image", "text_input"}, match_head="itm"), one pair at a
    # time: it tokenizes without padding, so a batch must share one caption length.
    with torch.no_grad():
        want = torch.cat([
            Blip2ITM.forward(model, {"image": teacher_pixels[i : i + 1], "text_input": [captions[j]]}, match_head="itm")
            for i, j in pairs.tolist()
        ])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert want.std(0).min() > 1e-3  # pairs really differ: a constant head would not test the indexing


def test_blip2_encodes_each_image_once_and_checks_its_vit(blip2_teacher, batch, monkeypatch):
    calls = []
    original = blip2_teacher.model.visual_encoder.forward
    monkeypatch.setattr(blip2_teacher.model.visual_encoder, "forward", lambda x: calls.append(len(x)) or original(x))
    pairs = torch.cartesian_prod(torch.tensor([1, 5]), torch.arange(8))
    blip2_teacher.score(batch["image"], batch["text_input"], pairs)
    assert sum(calls) == 2
    bad = OmegaConf.create({"arch": "blip2_image_text_matching", "checkpoint": "", "model": {**BLIP2_TINY, "vit_model": "vit_h"}})
    with pytest.raises(ValueError, match=r"vit_model='vit_h' is not one of \['eva_clip_g', 'clip_L', 'custom'\]"):
        build_teacher(bad, tokenizer_path=TOKENIZER, kind="cross")
    with pytest.raises(ValueError, match=r"model_type='large' is not one of \['coco', 'pretrain', 'pretrain_vitL'\]"):
        build_teacher(OmegaConf.create({"arch": "blip2_image_text_matching", "model_type": "large"}), kind="cross")
