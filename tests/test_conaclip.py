"""ConaCLIP (dual-to-dual distillation): each edge loss against a slow loop (values and
gradients), the graph's choice of features and targets, its config, the dual-encoder teachers
and the loss through the model."""
import math

import pytest
import torch
import torch.nn.functional as F
from lavis.models.clip_models.model import CLIP
from omegaconf import OmegaConf

from conftest import tiny_model_cfg
from lavis_cprd.distill.config import DEFAULT_CONACLIP_TERMS, ConaclipTerm, DistillConfig
from lavis_cprd.distill.losses.conaclip import (
    conaclip_loss,
    feature_distill_loss,
    infonce_edge_loss,
    similarity_distill_loss,
    similarity_kl_loss,
    sym_similarity_kl_loss,
)
from lavis_cprd.models.blip_retrieval import CprdBlipRetrieval
from lavis_cprd.models.dual_encoder import CprdDualEncoder
from lavis_cprd.teachers import BlipFeatureTeacher, ClipFeatureTeacher, CprdDualTeacher, build_teacher


# ------------------------------------------------------------------ slow references (loops)
def infonce_reference(a, b, ids, temp):
    n, total = len(a), 0.0
    for x, y in ((a, b), (b, a)):
        for i in range(n):
            logits = [(x[i] * y[j]).sum() / temp for j in range(n)]
            log_z = torch.logsumexp(torch.stack(logits), 0)
            positives = [j for j in range(n) if ids[j] == ids[i]]
            total = total + sum(log_z - logits[j] for j in positives) / len(positives) / n
    return total / 2


def fd_reference(s, t):
    return sum(sum((s[i, d] - t[i, d]) ** 2 for d in range(s.shape[1])) for i in range(len(s))) / len(s)


def sd_reference(sa, sb, ta, tb):
    n = len(sa)
    return sum(((sa[i] * sb[j]).sum() - (ta[i] * tb[j]).sum()) ** 2 for i in range(n) for j in range(n)) / n**2


def row_kl_reference(p_logits, q_logits):
    """1/n sum_i KL(softmax(p_i) || softmax(q_i)), written out with exp and log."""
    n, total = len(p_logits), 0.0
    for i in range(n):
        zp = sum(torch.exp(v) for v in p_logits[i])
        zq = sum(torch.exp(v) for v in q_logits[i])
        for j in range(len(p_logits[i])):
            p, q = torch.exp(p_logits[i][j]) / zp, torch.exp(q_logits[i][j]) / zq
            total = total + p * (torch.log(p) - torch.log(q))
    return total / n


def sims(a, b, temp=1.0):
    return [[(a[i] * b[j]).sum() / temp for j in range(len(b))] for i in range(len(a))]


def unit(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1).requires_grad_(True)


def grads(fn, *inputs):
    value = fn(*inputs)
    return value, torch.autograd.grad(value, inputs)


IDS = torch.tensor([0, 0, 1, 2, 3])


@pytest.mark.parametrize("seed", range(3))
def test_edge_losses_match_slow_loops_values_and_gradients(seed):
    a, b, c, d = (unit(5, 4, seed=10 * seed + k) for k in range(4))
    pos = IDS.view(-1, 1) == IDS.view(1, -1)
    cases = [
        (lambda a, b: infonce_edge_loss(a, b, pos, 0.2), lambda a, b: infonce_reference(a, b, IDS, 0.2), (a, b)),
        (feature_distill_loss, fd_reference, (a, b)),
        (lambda a, b, c, d: similarity_distill_loss(a @ b.t(), c @ d.t()), sd_reference, (a, b, c, d)),
        (lambda a, b, c, d: similarity_kl_loss(a @ b.t(), c @ d.t(), 0.5),
         lambda a, b, c, d: row_kl_reference(sims(c, d, 0.5), sims(a, b, 0.5)), (a, b, c, d)),
        (lambda a, b, c, d: similarity_distill_loss(a @ b.t(), c @ d.t()), sd_reference, (a, b, c, d)),
        (lambda a, b, c, d: sym_similarity_kl_loss(a @ b.t(), c @ d.t(), 0.3),
         lambda a, b, c, d: row_kl_reference(sims(a, b, 0.3), sims(c, d, 0.3))
         + row_kl_reference(sims(c, d, 0.3), sims(a, b, 0.3)),
         (a, b, c, d)),
    ]
    for fast, slow, inputs in cases:
        got, got_grads = grads(fast, *inputs)
        want, want_grads = grads(slow, *inputs)
        assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-7)
        for g, w in zip(got_grads, want_grads):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_edge_losses_hand_computed():
    e1, e2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    a, b = torch.cat([e1, e2]), torch.cat([e1, e2])
    # InfoNCE on a perfect pair of bases at temp 1: -log(e / (e + 1)) per row.
    assert infonce_edge_loss(a, b, torch.eye(2, dtype=torch.bool), 1.0).item() == pytest.approx(math.log(1 + math.e) - 1)
    # FD: the two rows are orthogonal unit vectors apart, ||e1 - e2||^2 = 2.
    assert feature_distill_loss(a, b.flip(0)).item() == pytest.approx(2.0)
    # SD: identity vs all-zero 2x2 similarity: two ones over four entries.
    assert similarity_distill_loss(torch.eye(2), torch.zeros(2, 2)).item() == pytest.approx(0.5)
    # KL of a uniform student against a teacher row (ln 2 - 0 ... ) : KL(p || u) = sum p log(2 p).
    p = torch.tensor([[math.log(3.0), 0.0]])  # softmax -> (3/4, 1/4)
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert similarity_kl_loss(torch.zeros(1, 2), p, 1.0).item() == pytest.approx(kl, rel=1e-6)
    assert sym_similarity_kl_loss(p, p, 0.7).item() == pytest.approx(0.0, abs=1e-7)
    # Duplicated image ids share the target: two identical rows, each with both positives.
    dup = infonce_edge_loss(torch.cat([e1, e1]), torch.cat([e1, e1]), torch.ones(2, 2, dtype=torch.bool), 1.0)
    assert dup.item() == pytest.approx(math.log(2))


def test_graph_uses_teacher_space_on_teacher_edges_and_teacher_targets():
    torch.manual_seed(0)
    s = {"img": unit(5, 3, seed=1), "txt": unit(5, 3, seed=2)}
    p = {"img": unit(5, 4, seed=3), "txt": unit(5, 4, seed=4)}  # student in the teacher's space
    t = {"img": unit(5, 4, seed=5), "txt": unit(5, 4, seed=6)}
    pos = IDS.view(-1, 1) == IDS.view(1, -1)
    raw = [
        {"loss": "infonce", "edge": "S_txt-T_img", "temp": 0.3, "weight": 0.5},
        {"loss": "fd", "edge": "T_txt-S_txt"},
        {"loss": "sd", "edge": "S_img-S_txt", "weight": 2.0},
        {"loss": "sd", "edge": "S_img-T_txt"},
        {"loss": "kl", "edge": "S_txt-S_txt", "temp": 0.5},
        {"loss": "sym_sd", "edge": "S_img-T_img", "mirror": "S_txt-T_txt"},
        {"loss": "sym_kl", "edge": "S_img-T_txt", "temp": 0.4},  # mirror: the edge read the other way
    ]
    terms = [ConaclipTerm.parse(r, f"t[{i}]") for i, r in enumerate(raw)]
    total, values = conaclip_loss(s, p, t, pos, terms)
    want = {
        "infonce:S_txt-T_img": infonce_reference(p["txt"], t["img"], IDS, 0.3),
        "fd:T_txt-S_txt": fd_reference(t["txt"], p["txt"]),
        "sd:S_img-S_txt": sd_reference(s["img"], s["txt"], t["img"], t["txt"]),
        "sd:S_img-T_txt": sd_reference(p["img"], t["txt"], t["img"], t["txt"]),
        "kl:S_txt-S_txt": row_kl_reference(sims(t["txt"], t["txt"], 0.5), sims(s["txt"], s["txt"], 0.5)),
        "sym_sd:S_img-T_img~S_txt-T_txt": sd_reference(p["img"], t["img"], p["txt"], t["txt"]),
        "sym_kl:S_img-T_txt~T_txt-S_img": row_kl_reference(sims(p["img"], t["txt"], 0.4), sims(t["txt"], p["img"], 0.4))
        + row_kl_reference(sims(t["txt"], p["img"], 0.4), sims(p["img"], t["txt"], 0.4)),
    }
    assert list(values) == list(want)
    for key in want:
        assert values[key].item() == pytest.approx(want[key].item(), rel=1e-5, abs=1e-7), key
    weights = [0.5, 1, 2, 1, 1, 1, 1]
    assert total.item() == pytest.approx(sum(w * v.item() for w, v in zip(weights, want.values())), rel=1e-5)


def test_default_recipe_and_config_errors():
    cfg = DistillConfig.from_cfg({"loss": "conaclip", "teacher": {"arch": "blip_feature_extractor"}})
    assert [(t.loss, "-".join(t.edge)) for t in cfg.conaclip] == [(r["loss"], r["edge"]) for r in DEFAULT_CONACLIP_TERMS]
    assert cfg.conaclip[-1].mirror == ("S_img", "T_txt") and cfg.conaclip[-1].temp == 0.5
    bad = {
        "loss: 'focal' is not one of": {"loss": "focal", "edge": "S_img-T_img"},
        r"edge='S_img-X_txt' is not an edge 'A-B' of nodes": {"loss": "sd", "edge": "S_img-X_txt"},
        "joins two teacher nodes": {"loss": "sd", "edge": "T_img-T_txt"},
        "fd compares features of one modality": {"loss": "fd", "edge": "S_img-T_txt"},
        "infonce needs two different nodes": {"loss": "infonce", "edge": "S_img-S_img"},
        r"unknown key model.distill.conaclip\[0\].wieght \(did you mean 'weight'\?\)": {"loss": "sd", "edge": "S_img-S_img", "wieght": 2},
        r"temp=0.0 is out of range: it must be in \(0.0, inf\)": {"loss": "kl", "edge": "S_img-S_txt", "temp": 0},
    }
    for message, term in bad.items():
        with pytest.raises(ValueError, match=message.replace("loss: ", r"conaclip\[0\].loss=")):
            DistillConfig.from_cfg({"loss": "conaclip", "teacher": {"arch": "blip_feature_extractor"}, "conaclip": [term]})
    # the teacher's kind is checked when the objective is built (the model's from_config)
    from lavis_cprd.distill.objective import DistillObjective

    with pytest.raises(ValueError, match=r"is a dual-encoder teacher, but this loss needs a cross-encoder"):
        DistillObjective(DistillConfig.from_cfg({"loss": "cprd", "teacher": {"arch": "clip_feature_extractor"}}))
    with pytest.raises(ValueError, match=r"needs a dual-encoder; available: \['blip_feature_extractor'"):
        DistillObjective(DistillConfig.from_cfg({"loss": "conaclip", "teacher": {"arch": "blip_image_text_matching"}}))


# ------------------------------------------------------------------ dual-encoder teachers
def save_runner_checkpoint(model, cfg, path):
    torch.save({"model": model.state_dict(), "config": {"model": OmegaConf.to_container(cfg, resolve=True)}}, path)
    return str(path)


def test_blip_feature_teacher_reads_the_dual_part_of_a_blip_retrieval_checkpoint(batch, tmp_path):
    torch.manual_seed(0)
    cfg = OmegaConf.load(CprdBlipRetrieval.default_config_path("tiny")).model
    cfg.update({"vit_width": 32, "vit_depth": 1, "vit_heads": 2, "text_width": 32, "text_depth": 1, "text_heads": 2,
                "embed_dim": 24, "queue_size": 16})
    blip = CprdBlipRetrieval.from_config(cfg).eval()
    ckpt = save_runner_checkpoint(blip, cfg, tmp_path / "blip.pth")
    teacher_cfg = OmegaConf.create({"arch": "blip_feature_extractor", "checkpoint": ckpt})
    assert BlipFeatureTeacher.embed_dim_of(teacher_cfg) == 24  # from the checkpoint, without building
    teacher = build_teacher(teacher_cfg, kind="dual")
    img, txt = teacher.encode(batch["image"], batch["text_input"])
    with torch.no_grad():
        want_img = F.normalize(blip.vision_proj(blip.visual_encoder.forward_features(batch["image"])[:, 0]), dim=-1)
        tokens = blip.tokenizer(batch["text_input"], padding="longest", truncation=True, max_length=blip.max_txt_len,
                                return_tensors="pt")
        want_txt = F.normalize(blip.text_proj(blip.text_encoder.forward_text(tokens).last_hidden_state[:, 0]), dim=-1)
    torch.testing.assert_close(img, want_img, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(txt, want_txt, rtol=1e-4, atol=1e-5)
    teacher.batch_size = 3  # chunking changes nothing
    torch.testing.assert_close(teacher.encode(batch["image"], batch["text_input"])[0], img, rtol=1e-5, atol=1e-6)
    assert not any(p.requires_grad for p in teacher.model.parameters())


def test_cprd_dual_teacher_equals_the_trained_student(batch, tmp_path):
    torch.manual_seed(1)
    cfg = tiny_model_cfg(loss="none")
    student = CprdDualEncoder.from_config(cfg).eval()
    ckpt = save_runner_checkpoint(student, cfg, tmp_path / "student.pth")
    teacher = build_teacher(OmegaConf.create({"arch": "cprd_dual_encoder", "checkpoint": ckpt}), kind="dual")
    img, txt = teacher.encode(batch["image"], batch["text_input"])
    with torch.no_grad():
        torch.testing.assert_close(img, student.encode_image(batch["image"]), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(txt, student.encode_text(student.tokenize(batch["text_input"], "cpu")), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="a cprd_dual_encoder teacher is a trained checkpoint"):
        CprdDualTeacher.embed_dim_of(OmegaConf.create({"checkpoint": str(tmp_path / "missing.pth")}))


CLIP_TINY = {"embed_dim": 16, "vision_cfg": {"layers": 1, "width": 64, "patch_size": 16, "image_size": 64},
             "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def test_clip_teacher_resizes_and_uses_clips_own_tokenizer(batch, tmp_path):
    torch.manual_seed(2)
    clip = CLIP(**CLIP_TINY).eval()
    path = tmp_path / "clip.pt"
    torch.save(clip.state_dict(), path)
    cfg = OmegaConf.create({"arch": "clip_feature_extractor", "model": CLIP_TINY, "pretrained": str(path)})
    assert ClipFeatureTeacher.embed_dim_of(cfg) == 16
    assert ClipFeatureTeacher.embed_dim_of(OmegaConf.create({"model_type": "ViT-B-32"})) == 512
    teacher = build_teacher(cfg, kind="dual")
    img, txt = teacher.encode(batch["image"], batch["text_input"])  # 48 px student images, 64 px teacher
    with torch.no_grad():
        big = F.interpolate(batch["image"], size=(64, 64), mode="bicubic", align_corners=False)
        torch.testing.assert_close(img, F.normalize(clip.encode_image(big), dim=-1), rtol=1e-4, atol=1e-5)
        tokens = clip.tokenizer(batch["text_input"], context_length=24)
        torch.testing.assert_close(txt, F.normalize(clip.encode_text(tokens), dim=-1), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="model_type='ViT-X' is not one of"):
        ClipFeatureTeacher.embed_dim_of(OmegaConf.create({"model_type": "ViT-X"}))


# ------------------------------------------------------------------ through the model
def conaclip_model_cfg(teacher_dim):
    cfg = tiny_model_cfg(loss="conaclip", weight=0.7)
    cfg.distill.teacher.arch = "blip_feature_extractor"
    cfg.distill.teacher.model.embed_dim = teacher_dim
    return cfg


@pytest.mark.parametrize("teacher_dim", [64, 40])
def test_model_loss_is_itc_plus_the_graph_on_its_own_and_teacher_features(batch, teacher_dim):
    torch.manual_seed(3)
    m = CprdDualEncoder.from_config(conaclip_model_cfg(teacher_dim)).eval()
    assert isinstance(m.conaclip_proj["img"], torch.nn.Identity) == (teacher_dim == 64)
    out = m(batch)
    ids = batch["image_id"]
    with torch.no_grad():
        s = {"img": m.encode_image(batch["image"]), "txt": m.encode_text(m.tokenize(batch["text_input"], "cpu"))}
        p = {k: F.normalize(m.conaclip_proj[k](v), dim=-1) for k, v in s.items()}
        t = dict(zip(("img", "txt"), m.teacher.encode(batch["image"], batch["text_input"])))
        assert t["img"].shape == (8, teacher_dim)
        node = lambda n, teacher_edge: t[n[2:]] if n[0] == "T" else (p if teacher_edge else s)[n[2:]]  # noqa: E731
        expected = 0.0
        for term in DEFAULT_CONACLIP_TERMS:
            a_name, b_name = term["edge"].split("-")
            on_t = "T" in (a_name[0], b_name[0])
            a, b = node(a_name, on_t), node(b_name, on_t)
            if term["loss"] == "infonce":
                expected += infonce_reference(a, b, ids, 0.07)
            elif term["loss"] == "sd":
                expected += sd_reference(a, b, t[a_name[2:]], t[b_name[2:]])
            elif term["loss"] == "sym_sd":
                expected += sd_reference(p["img"], t["img"], p["txt"], t["txt"])
            else:  # sym_kl, S_txt-T_img against S_img-T_txt at temp 0.5
                one, two = sims(p["txt"], t["img"], 0.5), sims(p["img"], t["txt"], 0.5)
                expected += row_kl_reference(one, two) + row_kl_reference(two, one)
    assert out.loss_distill.item() == pytest.approx(float(expected), rel=1e-4)
    assert out.loss.item() == pytest.approx(out.loss_itc.item() + 0.7 * out.loss_distill.item(), rel=1e-5)
    out.loss.backward()
    if teacher_dim != 64:
        assert m.conaclip_proj["txt"].weight.grad.abs().sum() > 0
    assert m.visual_encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    assert not any("teacher" in k for k in m.state_dict()) and m.teacher.model.training is False


def test_teacher_with_other_size_than_its_config_is_a_clear_error(batch):
    torch.manual_seed(4)
    m = CprdDualEncoder.from_config(conaclip_model_cfg(40))
    m.objective.teacher_embed_dim = 32  # as if the checkpoint held other sizes than the config said
    with pytest.raises(ValueError, match="embeds in 40 dimensions, but its config said 32"):
        m(batch)

