"""COCO ids for LAVIS's retrieval split, and ECCV Caption / CxC metrics against the
``eccv_caption`` package's own ``Metrics`` on a small fake COCO-format fixture."""
import json
import os

import numpy as np
import pytest

from conftest import experiment_yaml, write_retrieval_dataset
from lavis_cprd.datasets import coco_eccv


def _fake_coco(tmp_path, rng):
    """A flickr30k-format fixture renamed the COCO way, COCO's caption file for it (with
    changed case and full stops, and captions the split does not use), and made-up ECCV
    Caption and CxC positives over its ids, as ``eccv_caption.Metrics`` reads them."""
    root = str(tmp_path / "data")
    splits = write_retrieval_dataset(root, n_train=8, n_val=4, n_test=10, captions=2)
    ids = [int(x) for x in rng.choice(np.arange(1, 580000), size=14, replace=False)]
    coco, next_id = [], 1000
    for split, split_ids in (("val", ids[10:]), ("test", ids[:10])):  # both come from COCO's val2014
        entries, caption_ids = json.load(open(splits[split])), []
        for entry, iid in zip(entries, split_ids):
            name = f"images/COCO_val2014_{iid:012d}.png"
            os.rename(os.path.join(root, entry["image"]), os.path.join(root, name))
            entry["image"] = name
            extra = {"image_id": iid, "id": next_id, "caption": "Another caption nobody uses."}
            own = []
            for k, caption in enumerate(entry["caption"]):
                own.append({"image_id": iid, "id": next_id + 1 + k, "caption": caption.capitalize() + " ."})
                caption_ids.append(next_id + 1 + k)
            coco += [extra, *own[::-1]]  # COCO's order is not the split's
            next_id += 10
        json.dump(entries, open(splits[split], "w"))
    image_ids = ids[:10]
    coco.append({"image_id": 7, "id": 5, "caption": "an image outside the split"})
    captions_json = tmp_path / "captions_val2014.json"
    json.dump({"images": [], "annotations": coco}, open(captions_json, "w"))

    gts = {}
    for source, n_queries in (("eccv", 5), ("cxc", 10)):
        i2t = {iid: sorted(set(caption_ids[2 * i: 2 * i + 2]) | set(rng.choice(caption_ids, 3).tolist()))
               for i, iid in enumerate(image_ids[:n_queries])}
        t2i = {cid: sorted({image_ids[j // 2]} | set(rng.choice(image_ids, 2).tolist()))
               for j, cid in enumerate(caption_ids[: 2 * n_queries])}
        i2t[image_ids[0]].append(999999)  # a listed positive outside the split: it counts in R
        paths = []
        for direction, gt in (("image_to_caption", i2t), ("caption_to_image", t2i)):
            paths.append(tmp_path / f"{source}_{direction}.json")
            json.dump({str(k): [int(x) for x in v] for k, v in gt.items()}, open(paths[-1], "w"))
        gts[source] = [str(p) for p in paths]
    return root, splits, str(captions_json), ids, caption_ids, gts


def _reference(gts):
    from eccv_caption import Metrics

    m = Metrics()
    m.set_eccv_gts(*gts["eccv"])
    m.set_cxc_gts(*gts["cxc"])
    return m


def test_coco_mapping_and_metrics_equal_eccv_caption(tmp_path, monkeypatch):
    import lavis.tasks as tasks
    from lavis.common.registry import registry

    from lavis_cprd.training.launch import load_config

    rng = np.random.default_rng(0)
    root, splits, captions_json, ids, caption_ids, gts = _fake_coco(tmp_path, rng)
    image_ids = ids[:10]
    cfg_path = experiment_yaml(tmp_path / "x.yaml", root, splits, tmp_path / "out",
                               **{"datasets.flickr30k.coco_captions": captions_json})
    cfg = load_config(type("Args", (), {"cfg_path": cfg_path, "options": []})())
    task = tasks.setup_task(cfg)
    built = task.build_datasets(cfg)["flickr30k"]
    test = built["test"]
    assert test.coco_ids == (image_ids, caption_ids)
    assert built["val"].coco_ids[0] == ids[10:] and not hasattr(built["train"], "coco_ids")

    score_i2t = rng.normal(size=(len(image_ids), len(caption_ids)))
    score_t2i = rng.normal(size=(len(caption_ids), len(image_ids)))

    class Stub:
        def compute_sim_matrix(self, data_loader, task_cfg=None):
            return score_i2t, score_t2i

    reference = _reference(gts)
    monkeypatch.setattr(coco_eccv, "package_reference", lambda: reference)
    registry.mapping["paths"]["output_dir"] = str(tmp_path / "out")
    os.makedirs(tmp_path / "out", exist_ok=True)
    result = task.evaluation(Stub(), type("Loader", (), {"dataset": test})())

    # eccv_caption's own code on ranked COCO ids, built here from the known ids
    i2t = {iid: [caption_ids[j] for j in np.argsort(-row)] for iid, row in zip(image_ids, score_i2t)}
    t2i = {cid: [image_ids[j] for j in np.argsort(-row)] for cid, row in zip(caption_ids, score_t2i)}
    expected = reference.compute_all_metrics(
        i2t, t2i, target_metrics=("eccv_map_at_r", "eccv_rprecision", "eccv_r1", "cxc_recalls"), Ks=(1, 5, 10)
    )
    for d in ("i2t", "t2i"):
        assert result[f"eccv_{d}_map_at_r"] == pytest.approx(100 * expected["eccv_map_at_r"][d])
        assert result[f"eccv_{d}_r_precision"] == pytest.approx(100 * expected["eccv_rprecision"][d])
        assert result[f"eccv_{d}_true_r1"] == pytest.approx(100 * expected["eccv_r1"][d])
        for k in (1, 5, 10):
            assert result[f"cxc_{d}_true_r{k}"] == pytest.approx(100 * expected[f"cxc_r{k}"][d])
    assert result["txt_r1"] >= 0  # LAVIS's keys are still there
    # the fixture's ECCV queries are a subset: the metric counts only those
    assert result["eccv_i2t_true_per_query"] == pytest.approx(np.mean([len(json.load(open(gts["eccv"][0]))[str(i)])
                                                                        for i in image_ids[:5]]))


def test_coco_mapping_fails_clearly(tmp_path):
    rng = np.random.default_rng(1)
    root, splits, captions_json, image_ids, _, _ = _fake_coco(tmp_path, rng)
    test = json.load(open(splits["test"]))
    test[3]["caption"][1] = "a caption COCO never had"
    with pytest.raises(ValueError, match=r"entry 3 .*'a caption COCO never had' is not among image \d+'s captions"):
        coco_eccv.coco_ids(test, captions_json)
    with pytest.raises(ValueError, match="cannot read a COCO image id"):
        coco_eccv.image_id_of("images/photo.png")
    with pytest.raises(FileNotFoundError, match=r"datasets\.coco_retrieval\.coco_captions: nope\.json does not exist"):
        coco_eccv.resolve_captions_path("coco_retrieval", "nope.json", str(tmp_path))


def test_package_positives_map_onto_coco_test_ids():
    """The shipped positives are keyed by COCO ids of the 5K test split (5000 images, 25000
    captions); every ECCV Caption / CxC query is one of them."""
    m = coco_eccv.package_reference()
    images, captions = set(m.coco_gts["i2t"]), set(m.coco_gts["t2i"])
    assert (len(images), len(captions)) == (5000, 25000)
    assert captions == {int(c) for c in m.coco_ids}
    for gts in (m.eccv_gts, m.cxc_gts):
        assert set(gts["i2t"]) <= images and set(gts["t2i"]) <= captions
        assert all(set(v) <= images for v in gts["t2i"].values())
