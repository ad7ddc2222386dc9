"""The embedded default's teacher chain: ITC-trained towers -> cprd_blip_retrieval (LAVIS's
BLIP retrieval objective) -> a checkpoint the blip_image_text_matching adapter loads."""
import torch
from lavis.common.registry import registry
from lavis.models.blip_models.blip_image_text_matching import BlipITM
from omegaconf import OmegaConf

from conftest import TOKENIZER
from lavis_cprd.models.blip_retrieval import CprdBlipRetrieval
from lavis_cprd.models.dual_encoder import CprdDualEncoder
from lavis_cprd.teachers import build_teacher

SIZES = dict(vit_type="custom", image_size=48, vit_patch_size=16, vit_width=32, vit_depth=1, vit_heads=2,
             text_width=32, text_depth=1, text_heads=2, embed_dim=32, max_txt_len=16, tokenizer_path=TOKENIZER)


def test_registered():
    assert registry.get_model_class("cprd_blip_retrieval") is CprdBlipRetrieval


def test_towers_load_from_a_dual_encoder_checkpoint_with_momentum_copies(tmp_path):
    torch.manual_seed(0)
    towers = CprdDualEncoder.from_config(OmegaConf.create({**SIZES, "distill": {"loss": "none"}}))
    path = tmp_path / "towers.pth"
    torch.save({"model": towers.state_dict()}, path)
    model = CprdBlipRetrieval.from_config(OmegaConf.create({**SIZES, "queue_size": 8, "pretrained": str(path)}))
    mine = model.state_dict()
    for key, value in towers.state_dict().items():
        torch.testing.assert_close(mine[key], value, msg=key)
    for online, momentum in model.model_pairs:
        for p, p_m in zip(online.parameters(), momentum.parameters()):
            torch.testing.assert_close(p, p_m)
    # Cross-attention layers exist only in the cross-encoder and start fresh.
    assert any("crossattention" in k for k in mine) and not any("crossattention" in k for k in towers.state_dict())


def test_blip_itm_adapter_loads_a_trained_teacher_checkpoint(tmp_path):
    torch.manual_seed(1)
    cfg = OmegaConf.create({**SIZES, "queue_size": 8, "arch": "cprd_blip_retrieval"})
    trained = CprdBlipRetrieval.from_config(cfg).eval()
    path = tmp_path / "checkpoint_best.pth"
    # As LAVIS's runner writes it: frozen (momentum) params dropped, the config stored.
    frozen = {n for n, p in trained.named_parameters() if not p.requires_grad}
    torch.save({"model": {k: v for k, v in trained.state_dict().items() if k not in frozen},
                "config": {"model": OmegaConf.to_container(cfg)}}, path)

    teacher = build_teacher(OmegaConf.create({"arch": "blip_image_text_matching", "checkpoint": str(path)}))
    images = torch.randn(3, 3, 48, 48)
    captions = ["a red circle left of a blue square", "a small green triangle", "a white square"]
    pairs = torch.cartesian_prod(torch.arange(3), torch.arange(3))
    samples = {"image": images[pairs[:, 0]], "text_input": [captions[j] for j in pairs[:, 1]]}
    expected = BlipITM.forward(trained, samples, match_head="itm")
    torch.testing.assert_close(teacher.score(images, captions, pairs), expected.softmax(-1)[:, 1], rtol=1e-5, atol=1e-6)


def test_text_tower_from_pretrained_minilm():
    """``text_pretrained``: sizes and weights from the packaged MiniLM, vocabulary grown to BLIP's,
    cross-attention layers added."""
    from transformers import BertModel

    from lavis_cprd.towers import BLIP_VOCAB_SIZE, build_text_encoder
    from lavis_cprd.tokenization import resolve_tokenizer_path

    encoder = build_text_encoder(OmegaConf.create({"text_pretrained": TOKENIZER}), cross_attention=True, encoder_width=32)
    reference = BertModel.from_pretrained(resolve_tokenizer_path(TOKENIZER), add_pooling_layer=False)
    assert encoder.config.hidden_size == 384 and encoder.config.num_hidden_layers == 6
    words = encoder.embeddings.word_embeddings.weight
    assert words.shape == (BLIP_VOCAB_SIZE, 384)
    torch.testing.assert_close(words[: reference.config.vocab_size], reference.embeddings.word_embeddings.weight)
    layer, ref_layer = encoder.encoder.layer[5], reference.encoder.layer[5]
    torch.testing.assert_close(layer.attention.self.query.weight, ref_layer.attention.self.query.weight)
    torch.testing.assert_close(layer.output.dense.weight, ref_layer.output.dense.weight)
    assert layer.crossattention.self.key.weight.shape == (384, 32)


def test_lookalike_term_is_itm_cross_entropy_on_the_edited_captions():
    """With ``lookalike_text`` the loss grows by ``lookalike_weight * mean softplus(l)``, ``l``
    the ITM match logit of (image, look-alike) read through BLIP's own ITM forward (the
    2-class cross-entropy with label "no match"); samples whose look-alike equals the caption
    (none found) are left out, and without the key the loss is BLIP's."""
    import torch.nn.functional as F

    torch.manual_seed(2)
    model = CprdBlipRetrieval.from_config(OmegaConf.create({**SIZES, "queue_size": 9, "lookalike_weight": 0.5}))
    model.eval()  # attention dropout would draw differently in each forward
    images = torch.randn(3, 3, 48, 48)
    captions = ["there is a red circle", "there is a small shape", "there is a blue square"]
    lookalikes = ["there is a green circle", "there is a small shape", "there is a blue triangle"]
    base = {"image": images, "text_input": captions, "image_id": torch.arange(3), "epoch": 0, "iters": 0,
            "num_iters_per_epoch": 10}
    state = {k: v.clone() for k, v in model.state_dict().items()}  # the ITC queues move on each call
    torch.manual_seed(3)
    plain = model(base).loss
    model.load_state_dict(state)
    torch.manual_seed(3)
    out = model({**base, "lookalike_text": lookalikes})
    kept = [0, 2]
    itm = BlipITM.forward(model, {"image": images[kept], "text_input": [lookalikes[i] for i in kept]}, match_head="itm")
    expected = F.softplus(itm[:, 1] - itm[:, 0]).mean()
    torch.testing.assert_close(out.loss_lookalike, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, plain + 0.5 * expected, rtol=1e-5, atol=1e-6)
    with __import__("pytest").raises(ValueError, match="lookalike_weight must be >= 0"):
        CprdBlipRetrieval.from_config(OmegaConf.create({**SIZES, "lookalike_weight": -1}))


def test_verified_itm_negatives_replace_blips_in_batch_ones():
    """``itm_negatives: verified``: the ITM term is one cross-entropy over BLIP's positive pairs
    and the samples' ``positive_text`` (label 1) and their look-alike, ``negative_text`` and
    ``random_negative_text`` captions (label 0), entries equal to their own caption left out;
    the ITC term is LAVIS's."""
    import pytest
    import torch.nn.functional as F

    torch.manual_seed(4)
    model = CprdBlipRetrieval.from_config(OmegaConf.create({**SIZES, "queue_size": 9, "itm_negatives": "verified"}))
    model.eval()
    images = torch.randn(3, 3, 48, 48)
    captions = ["there is a red circle", "there is a small shape", "there is a blue square"]
    samples = {"image": images, "text_input": captions, "image_id": torch.arange(3), "epoch": 0, "iters": 0,
               "num_iters_per_epoch": 10,
               "lookalike_text": ["there is a green circle", "there is a small shape", "there is a blue triangle"],
               "negative_text": ["there is a large shape", "there is a red square", "there is a blue square"],
               "positive_text": ["there is a red circle", "there is a shape", "there is a square"],
               "random_negative_text": ["there is a green triangle"] * 3}
    out = model(samples)
    itm = lambda idx, texts: BlipITM.forward(model, {"image": images[idx], "text_input": texts}, match_head="itm")
    logits = torch.cat([itm([0, 1, 2], captions), itm([1, 2], samples["positive_text"][1:]),
                        itm([0, 2], [samples["lookalike_text"][i] for i in (0, 2)]),
                        itm([0, 1], samples["negative_text"][:2]), itm([0, 1, 2], samples["random_negative_text"])])
    expected = F.cross_entropy(logits, torch.tensor([1, 1, 1, 1, 1] + [0] * 7))
    torch.testing.assert_close(out.loss_itm, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, out.loss_itc + expected)
    with pytest.raises(ValueError, match="verified_negatives and lookalike_negatives"):
        model({k: v for k, v in samples.items() if k != "negative_text"})
    with pytest.raises(ValueError, match="'in_batch' or 'verified', got 'all'"):
        CprdBlipRetrieval.from_config(OmegaConf.create({**SIZES, "itm_negatives": "all"}))


def test_graded_itm_targets_are_a_soft_cross_entropy_towards_graded_relevance():
    """``itm_targets: graded``: positives keep target 1, each false caption's target is its
    ``*_grade`` (skipped entries keep theirs out), in ``-(g log p1 + (1 - g) log p0)``."""
    import pytest
    import torch.nn.functional as F

    torch.manual_seed(5)
    model = CprdBlipRetrieval.from_config(OmegaConf.create(
        {**SIZES, "queue_size": 8, "itm_negatives": "verified", "itm_targets": "graded"}))
    model.eval()
    images = torch.randn(2, 3, 48, 48)
    captions = ["there is a red circle", "there is a small shape"]
    samples = {"image": images, "text_input": captions, "image_id": torch.arange(2), "epoch": 0, "iters": 0,
               "num_iters_per_epoch": 10,
               "positive_text": ["there is a circle", "there is a small shape"],
               "lookalike_text": ["there is a green circle", "there is a large shape"],
               "lookalike_grade": torch.tensor([0.5, 0.75]),
               "negative_text": ["there is a red square", "there is a small shape"],
               "negative_grade": torch.tensor([0.6, 1.0]),
               "random_negative_text": ["there is a blue triangle", "there is a green square"],
               "random_negative_grade": torch.tensor([0.0, 0.25])}
    out = model(samples)
    itm = lambda idx, texts: BlipITM.forward(model, {"image": images[idx], "text_input": texts}, match_head="itm")
    logits = torch.cat([itm([0, 1], captions), itm([0], samples["positive_text"][:1]),
                        itm([0, 1], samples["lookalike_text"]), itm([0], samples["negative_text"][:1]),
                        itm([0, 1], samples["random_negative_text"])])
    g = torch.tensor([1.0, 1.0, 1.0, 0.5, 0.75, 0.6, 0.0, 0.25])
    p1 = F.softmax(logits, dim=-1)[:, 1]
    expected = -(g * torch.log(p1) + (1 - g) * torch.log(1 - p1)).mean()
    torch.testing.assert_close(out.loss_itm, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="'graded' with itm_negatives: verified"):
        CprdBlipRetrieval.from_config(OmegaConf.create({**SIZES, "itm_targets": "graded"}))


def test_packaged_teacher_loads_in_the_itm_adapter_and_beats_a_random_one_on_val(tmp_path):
    """The cross-encoder shipped with the package (the demo's teacher) loads through the
    blip_image_text_matching adapter and ranks the val split (every pair, partial captions) far
    above a randomly initialised teacher of the same architecture."""
    from lavis.common.registry import registry as lavis_registry

    from lavis_cprd.apps.compare import teacher_metrics
    from lavis_cprd.apps.runs import PACKAGED_TEACHER, STUDENT_CFG, eval_split
    from lavis_cprd.datasets.true_matches import dataset_relevance
    from lavis_cprd.teachers.blip_itm import architecture_from_checkpoint

    dataset, _ = eval_split(STUDENT_CFG, [], "val")
    lavis_registry.mapping["paths"]["output_dir"] = str(tmp_path)  # LAVIS's _report_metrics writes here
    images = torch.cat([b["image"] for b in torch.utils.data.DataLoader(dataset, batch_size=64)])
    truth = dataset_relevance(dataset)
    trained = build_teacher(OmegaConf.create({"arch": "blip_image_text_matching", "checkpoint": PACKAGED_TEACHER}))
    torch.manual_seed(0)
    random_teacher = build_teacher(OmegaConf.create({"arch": "blip_image_text_matching", "checkpoint": "",
                                                     "model": architecture_from_checkpoint(PACKAGED_TEACHER)}))
    ours, chance = (teacher_metrics(t, images, dataset, truth) for t in (trained, random_teacher))
    assert ours["rel_map_at_r"] > chance["rel_map_at_r"] + 5, (ours["rel_map_at_r"], chance["rel_map_at_r"])
    assert ours["r_mean"] > chance["r_mean"] + 5
