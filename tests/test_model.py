"""cprd_dual_encoder: loss wiring, retrieval scores, teacher isolation, config errors."""
import numpy as np
import pytest
import torch
from lavis.common.registry import registry
from lavis.tasks.retrieval import RetrievalTask
from torch.utils.data import DataLoader, Dataset

from conftest import tiny_model_cfg
from lavis_cprd.models.dual_encoder import CprdDualEncoder
from test_losses import cprd_reference, kl_reference, margin_mse_reference


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # eval(): BERT's dropout would make two forwards differ.
    return CprdDualEncoder.from_config(tiny_model_cfg(num_hard_negatives=3, valid_threshold=0.5)).eval()


def test_registered_names():
    assert registry.get_model_class("cprd_dual_encoder") is CprdDualEncoder
    assert registry.get_task_class("cprd_retrieval") is not None
    assert registry.get_runner_class("cprd_runner") is not None
    assert registry.get_builder_class("cprd_shapes") is not None


def test_forward_equals_independent_itc_plus_cprd(model, batch):
    assert_forward_is_itc_plus_cprd(model, batch, K=3)


@pytest.mark.parametrize("temperature", ["itc", 0.02])
def test_cprd_at_distillation_temperature(batch, temperature):
    """CPRD's student logits are s / tau_d: the ITC temperature with ``itc`` (the formula as
    first written), the fixed value otherwise; ITC keeps its own learnable tau either way."""
    torch.manual_seed(0)
    m = CprdDualEncoder.from_config(tiny_model_cfg(num_hard_negatives=3, valid_threshold=0.5, temperature=temperature))
    with torch.no_grad():
        m.temp.fill_(0.01)  # far from 0.02: a mix-up of the two temperatures shows
    assert_forward_is_itc_plus_cprd(m.eval(), batch, K=3, tau_d=m.temp.detach().clone() if temperature == "itc" else 0.02)


def test_distillation_temperature_default_and_errors():
    from lavis_cprd.distill.config import DEFAULT_DISTILL_TEMPERATURE, DistillConfig

    assert DistillConfig.from_cfg({"loss": "none"}).temperature == DEFAULT_DISTILL_TEMPERATURE
    assert DistillConfig.from_cfg({"loss": "none", "temperature": "ITC"}).temperature == "itc"
    for bad in (0, -0.1, "warm", True, float("nan")):
        with pytest.raises(ValueError, match="temperature must be a positive number or 'itc'"):
            DistillConfig.from_cfg({"loss": "none", "temperature": bad})
    with pytest.raises(ValueError, match=r"normalize='some' is not one of \['contributing', 'all'\]"):
        DistillConfig.from_cfg({"loss": "none", "normalize": "some"})


def test_normalize_all_divides_by_every_query(batch):
    """``normalize: all`` averages the CPRD terms over every query, ``contributing`` over those
    with a valid negative: equal when every query contributes, smaller when some do not."""
    torch.manual_seed(0)
    probe = CprdDualEncoder.from_config(tiny_model_cfg()).eval()
    pairs = torch.tensor([(i, j) for i in range(8) for j in range(8)])
    median = float(probe.teacher.score(batch["image"], batch["text_input"], pairs).median())
    losses = {}
    for threshold in (0.0, median):
        for norm in ("contributing", "all"):
            torch.manual_seed(0)
            cfg = tiny_model_cfg(num_hard_negatives=3, valid_threshold=threshold, normalize=norm)
            out = CprdDualEncoder.from_config(cfg).eval()(batch)
            losses[threshold, norm], share = out.loss_distill.item(), out.contributing_queries.item()
        assert share == 1.0 if threshold == 0.0 else 0 < share < 1
    assert losses[0.0, "all"] == pytest.approx(losses[0.0, "contributing"], rel=1e-6)
    assert 0 < losses[median, "all"] < losses[median, "contributing"]


def assert_forward_is_itc_plus_cprd(model, batch, K, tau_d=None):
    """Any student family: loss = ITC on its own features + CPRD on K hard negatives mined
    here by loops and scored pair by pair by its teacher (valid threshold 0.5), with the
    CPRD logits at ``tau_d`` (default: the model's configured distillation temperature)."""
    out = model(batch)
    ids, tau = batch["image_id"], model.temp
    if tau_d is None:
        tau_d = tau if model.distill.temperature == "itc" else model.distill.temperature
    with torch.no_grad():
        v = model.encode_image(batch["image"])
        t = model.encode_text(model.tokenize(batch["text_input"], "cpu"))
        sim = v @ t.t()
        teacher = model.teacher

        def direction(queries, sims, cand_ok, pair):
            xs, ts = [], []
            for q in queries:  # batch index of the query
                cands = [c for c in range(sims.shape[1]) if ids[c] != ids[q] and cand_ok[c]]
                negs = sorted(cands, key=lambda c: -float(sims[q, c]))[:K]
                xs.append(torch.stack([sims[q, c] / tau_d for c in negs]))
                ts.append(teacher.score(batch["image"], batch["text_input"], torch.tensor([pair(q, c) for c in negs])))
            x, ts = torch.stack(xs), torch.stack(ts)
            return cprd_reference(x, ts, ts >= 0.5)

        first = [int((ids[: i + 1] == ids[i]).sum()) == 1 for i in range(len(ids))]
        image_queries = [i for i in range(len(ids)) if first[i]]
        l_i2t = direction(image_queries, sim, [True] * len(ids), lambda q, c: (q, c))
        l_t2i = direction(range(len(ids)), sim.t(), first, lambda q, c: (c, q))
        cprd = 0.5 * (l_i2t + l_t2i)

        pos = (ids[:, None] == ids[None, :]).float()
        y = pos / pos.sum(1, keepdim=True)
        itc = 0.5 * (-(y * (sim / tau).log_softmax(1)).sum(1).mean() - (y * (sim.t() / tau).log_softmax(1)).sum(1).mean())
    assert out.loss_itc.item() == pytest.approx(itc.item(), rel=1e-5)
    assert out.loss_distill.item() == pytest.approx(cprd.item(), rel=1e-4)
    assert out.loss.item() == pytest.approx(itc.item() + cprd.item(), rel=1e-4)


@pytest.mark.parametrize("loss", ["kl", "listmle_full", "loopitr", "margin_mse"])
def test_forward_equals_independent_peer_loss(batch, loss):
    """Each peer loss through the model equals its slow formula on candidates picked here by
    loops: K mined hard negatives (loopitr, margin_mse) or every in-batch negative (kl,
    listmle_full), next to the query's own positive, teacher logits scored pair by pair."""
    torch.manual_seed(0)
    K, T = 3, 0.5
    m = CprdDualEncoder.from_config(tiny_model_cfg(loss=loss, num_hard_negatives=K, teacher_temp=T)).eval()
    out = m(batch)
    ids, tau = batch["image_id"], m.distill.temperature
    with torch.no_grad():
        v = m.encode_image(batch["image"])
        t = m.encode_text(m.tokenize(batch["text_input"], "cpu"))
        sim = v @ t.t()

        def z(pairs):
            return m.teacher.logit(batch["image"], batch["text_input"], torch.tensor(pairs))

        def direction(sims, queries, cand_ok, pair):
            rows = []
            for q in queries:
                cands = [c for c in range(sims.shape[1]) if ids[c] != ids[q] and cand_ok[c]]
                negs = sorted(cands, key=lambda c: -float(sims[q, c]))
                negs = negs[:K] if loss in ("loopitr", "margin_mse") else negs
                rows.append((sims[q, q] / tau, sims[q, negs] / tau, z([pair(q, q)])[0], z([pair(q, c) for c in negs])))
            width = max(len(r[1]) for r in rows)
            pad = lambda vals: torch.cat([vals, vals.new_zeros(width - len(vals))])  # noqa: E731
            xp = torch.stack([r[0] for r in rows])
            zp = torch.stack([r[2] for r in rows])
            xn, zn = torch.stack([pad(r[1]) for r in rows]), torch.stack([pad(r[3]) for r in rows])
            mask = torch.stack([torch.arange(width) < len(r[1]) for r in rows])
            if loss == "listmle_full":
                return cprd_reference(xn, zn, None, mask)
            if loss == "margin_mse":
                return margin_mse_reference(xp, xn, zp, zn, mask)
            with_pos = lambda a, b: torch.cat([a.view(-1, 1), b], 1)  # noqa: E731
            return kl_reference(with_pos(xp, xn), with_pos(zp, zn), with_pos(torch.ones(len(rows), dtype=torch.bool), mask), T)

        first = [int((ids[: i + 1] == ids[i]).sum()) == 1 for i in range(len(ids))]
        image_queries = [i for i in range(len(ids)) if first[i]]
        expected = 0.5 * (
            direction(sim, image_queries, [True] * len(ids), lambda q, c: (q, c))
            + direction(sim.t(), range(len(ids)), first, lambda q, c: (c, q))
        )
    assert out.loss_distill.item() == pytest.approx(expected.item(), rel=1e-4)
    assert out.loss.item() == pytest.approx(out.loss_itc.item() + out.loss_distill.item(), rel=1e-5)


def test_teacher_scores_each_distinct_pair_once(batch):
    """Over every negative, both directions need the same pairs: one teacher call, no repeats."""
    torch.manual_seed(0)
    m = CprdDualEncoder.from_config(tiny_model_cfg(loss="kl")).eval()
    m(batch)  # builds the teacher
    calls, score = [], m.teacher.logit
    m.teacher.logit = lambda images, captions, pairs, image_ids=None: calls.append(pairs.clone()) or score(images, captions, pairs)
    m(batch)
    (pairs,) = calls
    assert len({tuple(p) for p in pairs.tolist()}) == len(pairs)
    # ids [0, 0, 1, 2, 3, 3, 4, 5]: 6 distinct images x the captions of other images (40 pairs),
    # plus each of the 8 captions with the image at its own position.
    assert len(pairs) == 40 + 8


@pytest.mark.parametrize("loss,drop,positives", [("cprd", False, False), ("cprd", True, True),
                                                  ("listmle_full", False, False), ("loopitr", False, True)])
def test_positive_pairs_are_scored_only_when_the_loss_reads_them(batch, loss, drop, positives):
    torch.manual_seed(0)
    m = CprdDualEncoder.from_config(tiny_model_cfg(loss=loss, num_hard_negatives=3, drop_above_positive=drop)).eval()
    calls, score = [], m.teacher.logit
    m.teacher.logit = lambda images, captions, pairs, image_ids=None: calls.append(pairs.clone()) or score(images, captions, pairs)
    out = m(batch)
    ids = batch["image_id"]
    positive = {(i, t) for i, t in torch.cat(calls).tolist() if ids[i] == ids[t]}
    assert positive == ({(i, i) for i in range(len(ids))} if positives else set())
    assert torch.isfinite(out.loss_distill)


def test_gradients_reach_both_towers_and_temperature(model, batch):
    model.zero_grad()
    model(batch).loss.backward()
    for name in ("visual_encoder.patch_embed.proj.weight", "text_encoder.embeddings.word_embeddings.weight", "temp"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_teacher_not_in_state_dict_or_parameters(model, batch):
    model(batch)  # builds the teacher
    assert model.objective.teacher_built
    teacher_params = {id(p) for p in model.teacher.model.parameters()}
    assert not teacher_params & {id(p) for p in model.parameters()}
    assert not any("teacher" in k or "itm_head" in k for k in model.state_dict())


class _EvalSet(Dataset):
    def __init__(self, images, texts, img2txt):
        self.images, self.text, self.img2txt = images, texts, img2txt
        self.txt2img = {t: i for i, ts in img2txt.items() for t in ts}

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "index": i}


def independent_recall(scores_i2t, img2txt, txt2img, ks=(1, 5, 10)):
    """Recall@k by counting how many candidates score strictly higher than the best positive."""
    out = {}
    for k in ks:
        hits = [sum(scores_i2t[i] > max(scores_i2t[i][t] for t in img2txt[i])) < k for i in range(len(img2txt))]
        out[f"txt_r{k}"] = 100.0 * np.mean(hits)
        hits = [sum(scores_i2t[:, t] > scores_i2t[txt2img[t], t]) < k for t in range(len(txt2img))]
        out[f"img_r{k}"] = 100.0 * np.mean(hits)
    out["r_mean"] = np.mean([out[f"{m}_r{k}"] for m in ("txt", "img") for k in ks])
    return out


def test_compute_sim_matrix_is_dual_encoder_retrieval_and_lavis_metrics_agree(model, tmp_path):
    registry.mapping["paths"]["output_dir"] = str(tmp_path)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(12, 3, 48, 48, generator=g)
    texts = [f"caption {i} of a shape {i % 5}" for i in range(24)]
    img2txt = {i: [2 * i, 2 * i + 1] for i in range(12)}
    dataset = _EvalSet(images, texts, img2txt)
    loader = DataLoader(dataset, batch_size=5, shuffle=True)  # row placement must not depend on order
    i2t, t2i = model.compute_sim_matrix(loader, {"text_batch_size": 7})
    assert i2t.shape == (12, 24) and t2i.shape == (24, 12)
    with torch.no_grad():
        expected = model.encode_image(images) @ model.encode_text(model.tokenize(texts, "cpu")).t()
    np.testing.assert_allclose(i2t, expected.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(t2i, i2t.T)

    metrics = RetrievalTask._report_metrics(i2t, t2i, dataset.txt2img, dataset.img2txt)
    ours = independent_recall(i2t, dataset.img2txt, dataset.txt2img)
    for key, value in ours.items():
        assert metrics[key] == pytest.approx(value), key


def test_distillation_starts_at_start_epoch(batch):
    """Before ``distill.start_epoch`` the loss is ITC alone and the teacher is never built;
    from it on, ITC + CPRD. The task sets the epoch (through DDP's wrapper too)."""
    from unittest import mock

    from lavis.tasks.base_task import BaseTask

    from lavis_cprd.training.task import CprdRetrievalTask

    torch.manual_seed(0)
    m = CprdDualEncoder.from_config(tiny_model_cfg(num_hard_negatives=3, valid_threshold=0.0, start_epoch=2)).eval()
    m.set_epoch(1)
    early = m(batch)
    assert early.loss_distill is None and not m.objective.teacher_built
    assert early.loss.item() == pytest.approx(early.loss_itc.item())
    wrapped = torch.nn.Module()
    wrapped.module = m
    task = CprdRetrievalTask(None)
    with mock.patch.object(BaseTask, "train_epoch", return_value={}) as lavis_loop:  # LAVIS's step loop
        task.train_epoch(epoch=2, model=wrapped, data_loader=None, optimizer=None, lr_scheduler=None)
    assert lavis_loop.call_args.kwargs["model"] is wrapped
    assert m.epoch == 2 and m.distilling
    late = m(batch)
    assert late.loss_distill is not None and late.loss_distill.item() > 0
    assert late.loss.item() == pytest.approx(late.loss_itc.item() + late.loss_distill.item(), rel=1e-5)
    with pytest.raises(ValueError, match=r"start_epoch=-1 is out of range: it must be in \[0, inf\)"):
        CprdDualEncoder.from_config(tiny_model_cfg(start_epoch=-1))


def test_detach_temperature_keeps_distillation_off_tau(batch):
    """``detach_temperature``: same loss value, but the distillation term sends no gradient
    to the learnable temperature (and still does to the towers)."""
    grads = {}
    for detach in (False, True):
        torch.manual_seed(0)
        m = CprdDualEncoder.from_config(tiny_model_cfg(num_hard_negatives=3, valid_threshold=0.0, detach_temperature=detach, temperature="itc"))
        m.eval()
        out = m(batch)
        out.loss_distill.backward()
        grads[detach] = (out.loss_distill.item(), m.temp.grad, m.vision_proj.weight.grad.abs().sum().item())
    value, temp_grad, tower_grad = grads[True]
    assert value == pytest.approx(grads[False][0], rel=1e-6)
    assert temp_grad is None or temp_grad.abs().item() == 0.0
    assert grads[False][1].abs().item() > 0 and tower_grad > 0
    with pytest.raises(ValueError, match="detach_temperature must be true or false"):
        CprdDualEncoder.from_config(tiny_model_cfg(detach_temperature="yes"))
    with pytest.raises(ValueError, match=r"detach_temperature: true acts only with temperature: itc; the temperature is 0.05"):
        CprdDualEncoder.from_config(tiny_model_cfg(detach_temperature=True))


def test_config_errors_are_clear():
    choices = r"\['none', 'cprd', 'margin_mse', 'loopitr', 'kl', 'listmle_full', 'conaclip'\]"
    with pytest.raises(ValueError, match=r"model.distill.loss='cprdd' is not one of " + choices):
        CprdDualEncoder.from_config(tiny_model_cfg(loss="cprdd"))
    with pytest.raises(ValueError, match=r"teacher_temp=0.0 is out of range: it must be in \(0.0, inf\)"):
        CprdDualEncoder.from_config(tiny_model_cfg(teacher_temp=0))
    with pytest.raises(ValueError, match=r"mining_scope='global' is not one of \['gathered', 'local'\]"):
        CprdDualEncoder.from_config(tiny_model_cfg(mining_scope="global"))
    cfg = tiny_model_cfg()
    cfg.distill.num_negatives = 4
    with pytest.raises(ValueError, match=r"unknown key model.distill.num_negatives \(did you mean 'num_hard_negatives'\?\)"):
        CprdDualEncoder.from_config(cfg)
    cfg = tiny_model_cfg()
    cfg.distill.teacher.arch = "albef_typo"
    with pytest.raises(ValueError, match="has no teacher adapter; available"):
        CprdDualEncoder.from_config(cfg)
    cfg = tiny_model_cfg()
    cfg.vit_type = "giant"
    with pytest.raises(ValueError, match=r"model.vit_type='giant' is not one of"):
        CprdDualEncoder.from_config(cfg)


def test_missing_tokenizer_folder_is_a_clear_error(tmp_path):
    cfg = tiny_model_cfg()
    cfg.tokenizer_path = str(tmp_path / "no_such_tokenizer")
    with pytest.raises(FileNotFoundError, match="no tokenizer folder at .*no_such_tokenizer.*vocab.txt"):
        CprdDualEncoder.from_config(cfg)
    cfg.tokenizer_path = "pkg://not_a_package_xyz/model"
    with pytest.raises(FileNotFoundError, match="package 'not_a_package_xyz' is not installed"):
        CprdDualEncoder.from_config(cfg)
