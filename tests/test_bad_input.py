"""The bad-input battery: every bad option, file, parameter and tensor is one clear error before any
work, naming its culprit, and leaves nothing half-written.

Each case asserts the exit status (or exception type), that the message names the culprit, and
that the folder it ran in holds nothing new (no output, no temp file). Categories: CLI options
(train, evaluate, predict, run/sweep), notebook parameters, data, checkpoints, the tensor API.
Faults (SIGINT/SIGTERM, kill -9 during a save, a full disk, divergence) are in
``test_bad_input_faults.py``. Everything runs in-process on tiny configs except where a real
signal is the point.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from rpnlab import cli
from rpnlab.data.checks import check_image_file, scan_coco, scan_voc
from rpnlab.detector import checks as value_checks_module
from rpnlab.detector.boxes import box_iou
from rpnlab.detector.proposals import batched_nms, nms
from rpnlab.detector.roi import crop_and_resize_pool, roi_align, roi_pool
from rpnlab.engine.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from rpnlab.lab import runner

TINY = ["--image-size", "64", "--min-size", "64", "--max-size", "64", "--num-train", "8", "--num-val", "4",
        "--num-test", "4", "--batch-size", "4", "--rpn-post-nms-top-n-train", "30", "--roi-batch-size-per-image",
        "16", "--device", "cpu", "--no-progress"]


def listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def run_cli(argv, capsys) -> tuple[int, str]:
    """``rpnlab argv`` in-process: (exit status, stderr + stdout)."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.err + out.out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A real checkpoint of a 2-iteration run, its data root, and a few bad files next to it."""
    root = tmp_path_factory.mktemp("bad_input")
    code = cli.main(["train", "--root", str(root / "synthetic"), *TINY, "--epochs", "1", "--max-iters", "2",
                     "--out-dir", str(root / "run")])
    assert code == 0
    good = root / "run" / "checkpoint.pt"
    (root / "text.pt").write_text("hello, I am not a checkpoint\n")
    (root / "empty.pt").write_bytes(b"")
    data = good.read_bytes()
    (root / "truncated.pt").write_bytes(data[: len(data) // 2])
    (root / "random.pt").write_bytes(os.urandom(4096))
    save_checkpoint(root / "noconfigs.pt", {"step": 1})
    state = load_checkpoint(good)
    name = next(k for k, v in state["model"].items() if v.is_floating_point())
    state["model"][name] = state["model"][name].clone().fill_(float("nan"))
    save_checkpoint(root / "nan.pt", state)
    (root / "a_folder.pt").mkdir()
    torch.save({"model": _Evil(str(root / "pwned"))}, root / "evil.pt")
    Image.new("RGB", (40, 30), (200, 30, 30)).save(root / "good.png")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not the rest of a PNG")
    (root / "plain.txt").write_text("text")
    return root


class _Evil:
    """Unpickling this runs a shell command: a checkpoint or weights file must never do that."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def dirs(ckpt, tmp_path) -> dict[str, str]:
    return {"CKPT": str(ckpt / "run" / "checkpoint.pt"), "ROOT": str(ckpt), "TMP": str(tmp_path),
            "FILE": str(ckpt / "plain.txt")}


def expand(argv, names):
    return [a.format(**names) if isinstance(a, str) else a for a in argv]


# ------------------------------------------------------------------------------- CLI: train options

TRAIN_CASES = [
    (["--weight-decay", "inf"], "--weight-decay=inf"),
    (["--weight-decay", "nan"], "--weight-decay=nan"),
    (["--weight-decay", "-1"], "--weight-decay=-1"),
    (["--lr", "inf"], "--lr=inf"),
    (["--lr", "nan"], "--lr=nan"),
    (["--lr", "0"], "--lr=0"),
    (["--lr", "-0.1"], "--lr=-0.1"),
    (["--momentum", "nan"], "--momentum=nan"),
    (["--momentum", "1.5"], "--momentum=1.5"),
    (["--rpn-smooth-l1-beta", "inf"], "--rpn-smooth-l1-beta=inf"),
    (["--rpn-min-size", "inf"], "--rpn-min-size=inf"),
    (["--rpn-min-size", "-2"], "--rpn-min-size=-2"),
    (["--roi-smooth-l1-beta", "nan"], "--roi-smooth-l1-beta=nan"),
    (["--rpn-reg-loss-weight", "inf"], "--rpn-reg-loss-weight=inf"),
    (["--lr-steps", "-5"], "--lr-steps=(-5,)"),
    (["--lr-steps", "0"], "--lr-steps=(0,)"),
    (["--lr-steps", "3", "2"], "--lr-steps=(3, 2)"),
    (["--rpn-nms-thresh", "1.5"], "--rpn-nms-thresh=1.5"),
    (["--rpn-nms-thresh", "nan"], "--rpn-nms-thresh=nan"),
    (["--roi-nms-thresh", "-0.5"], "--roi-nms-thresh=-0.5"),
    (["--rpn-score-thresh", "2"], "--rpn-score-thresh=2"),
    (["--roi-score-thresh", "nan"], "--roi-score-thresh=nan"),
    (["--rpn-positive-fraction", "0"], "--rpn-positive-fraction=0"),
    (["--roi-positive-fraction", "inf"], "--roi-positive-fraction=inf"),
    (["--hflip-prob", "2"], "--hflip-prob=2"),
    (["--hflip-prob", "nan"], "--hflip-prob=nan"),
    (["--anchor-offset", "inf"], "--anchor-offset=inf"),
    (["--anchor-offset", "1"], "--anchor-offset=1"),
    (["--anchor-sizes", "0", "32"], "--anchor-sizes"),
    (["--anchor-sizes", "nan"], "--anchor-sizes"),
    (["--anchor-sizes", "abc"], "--anchor-sizes"),
    (["--anchor-aspect-ratios", "-1"], "--anchor-aspect-ratios"),
    (["--rpn-box-weights", "1", "1", "nan", "1"], "--rpn-box-weights"),
    (["--roi-box-weights", "1", "1", "inf", "1"], "--roi-box-weights"),
    (["--time-budget-s", "inf"], "--time-budget-s=inf"),
    (["--time-budget-s", "-1"], "--time-budget-s=-1"),
    (["--time-budget-s", "nan"], "--time-budget-s=nan"),
    (["--epochs", "0"], "--epochs=0"),
    (["--batch-size", "0"], "--batch-size=0"),
    (["--max-iters", "0"], "--max-iters=0"),
    (["--warmup-iters", "-1"], "--warmup-iters=-1"),
    (["--num-workers", "-1"], "--num-workers=-1"),
    (["--checkpoint-every", "0"], "--checkpoint-every=0"),
    (["--num-classes", "0"], "--num-classes=0"),
    (["--rpn-fg-iou-thresh", "0.2", "--rpn-bg-iou-thresh", "0.5"], "--rpn-bg-iou-thresh=0.5"),
    (["--rpn-pre-nms-top-n-train", "10"], "--rpn-post-nms-top-n-train=30"),
    (["--min-size", "300", "--max-size", "200"], "--max-size=200"),
    (["--device", "cuda:7" if not torch.cuda.is_available() else "tpu"], "device"),
    (["--amp", "fp16"], "amp='fp16'"),
    (["--dataset", "voc"], "Annotations"),  # --root is the synthetic folder: not a VOC one
    (["--dataset", "voc", "--root", "{TMP}/no_such_voc"], "no_such_voc"),
    (["--dataset", "coco", "--root", "{FILE}"], "plain.txt"),
    (["--out-dir", "{FILE}"], "--out-dir"),
    (["--out-dir", "{FILE}/sub"], "plain.txt"),
    (["--resume", "{TMP}/missing.pt"], "missing.pt"),
    (["--resume", "{ROOT}/a_folder.pt"], "a_folder.pt"),
    (["--resume", "{ROOT}/text.pt"], "text.pt"),
    (["--resume", "{ROOT}/truncated.pt"], "truncated.pt"),
    (["--resume", "{ROOT}/noconfigs.pt"], "noconfigs.pt"),
    (["--pretrained", "{TMP}/weights.pth"], "--pretrained"),
    (["--pretrained", "{ROOT}/evil.pt"], ("evil.pt", "could run code")),
    (["--pretrained", "{ROOT}/text.pt"], "text.pt"),
    (["--resume", "{ROOT}/evil.pt"], ("evil.pt", "could run code")),
    (["--resume", "{ROOT}/nan.pt"], ("nan.pt", "not finite")),
    # Several problems: all named in one report.
    (["--weight-decay", "inf", "--lr-steps", "-5", "--momentum", "2", "--out-dir", "{FILE}"],
     ("--weight-decay=inf", "--lr-steps=(-5,)", "--momentum=2", "--out-dir")),
]


@pytest.mark.parametrize(("extra", "culprit"), TRAIN_CASES, ids=[" ".join(c[0])[:60] for c in TRAIN_CASES])
def test_cli_train_refuses_before_work(extra, culprit, ckpt, tmp_path, capsys):
    before = listing(tmp_path)
    argv = ["train", "--root", str(ckpt / "synthetic"), *TINY, "--out-dir", str(tmp_path / "out"),
            *expand(extra, dirs(ckpt, tmp_path))]
    code, message = run_cli(argv, capsys)
    assert code == 2, message
    for c in (culprit if isinstance(culprit, tuple) else (culprit,)):
        assert c in message
    assert "Traceback" not in message
    assert listing(tmp_path) == before  # no out-dir, no checkpoint, no temp file
    assert not (ckpt / "pwned").exists()


# ------------------------------------------------------------------------------- CLI: evaluate, predict

EVALUATE_CASES = [
    (["--checkpoint", "{TMP}/missing.pt"], "missing.pt"),
    (["--checkpoint", "{ROOT}/a_folder.pt"], "a_folder.pt"),
    (["--checkpoint", "{ROOT}/text.pt"], "text.pt"),
    (["--checkpoint", "{ROOT}/empty.pt"], "empty.pt"),
    (["--checkpoint", "{ROOT}/random.pt"], "random.pt"),
    (["--checkpoint", "{ROOT}/truncated.pt"], "truncated.pt"),
    (["--checkpoint", "{ROOT}/noconfigs.pt"], "noconfigs.pt"),
    (["--checkpoint", "{ROOT}/nan.pt"], "non-finite weights"),
    (["--checkpoint", "{ROOT}/evil.pt"], "could run code"),
    (["--checkpoint", "{CKPT}", "--json", "{FILE}/m.json"], "--json"),
    (["--checkpoint", "{CKPT}", "--json", "{TMP}"], "--json"),
    (["--checkpoint", "{CKPT}", "--batch-size", "0"], "--batch-size=0"),
    (["--checkpoint", "{CKPT}", "--split", "bogus"], "--split='bogus'"),
    (["--checkpoint", "{CKPT}", "--device", "bogus"], "bogus"),
    (["--checkpoint", "{CKPT}", "--dataset", "coco", "--root", "{TMP}/nowhere"], "nowhere"),
    (["--checkpoint", "{CKPT}", "--hflip-prob", "nan"], "--hflip-prob=nan"),
]


@pytest.mark.parametrize(("extra", "culprit"), EVALUATE_CASES, ids=[" ".join(c[0])[-50:] for c in EVALUATE_CASES])
def test_cli_evaluate_refuses_before_work(extra, culprit, ckpt, tmp_path, capsys):
    before = listing(tmp_path)
    code, message = run_cli(["evaluate", "--no-progress", *expand(extra, dirs(ckpt, tmp_path))], capsys)
    assert code == 2, message
    assert culprit in message and "Traceback" not in message
    assert "mAP" not in message  # refused before evaluating
    assert listing(tmp_path) == before


PREDICT_CASES = [
    (["{TMP}/missing.png"], "missing.png"),
    (["{ROOT}/good.png", "--score-thresh", "nan"], "--score-thresh=nan"),
    (["{ROOT}/good.png", "--score-thresh", "1.5"], "--score-thresh=1.5"),
    (["{ROOT}/good.png", "--score-thresh", "-1"], "--score-thresh=-1"),
    (["{ROOT}/good.png", "--score-thresh", "inf"], "--score-thresh=inf"),
    (["{ROOT}/good.png", "{ROOT}/good.png"], "share the name"),
    (["{ROOT}/good.png", "--checkpoint", "{ROOT}/text.pt"], "text.pt"),
    (["{ROOT}/good.png", "--checkpoint", "{ROOT}/nan.pt"], "nan.pt"),
    (["{ROOT}/good.png", "--checkpoint", "{ROOT}/truncated.pt"], "truncated.pt"),
    (["{ROOT}/good.png", "--device", "bogus"], "bogus"),
]


@pytest.mark.parametrize(("extra", "culprit"), PREDICT_CASES, ids=[" ".join(c[0])[-50:] for c in PREDICT_CASES])
def test_cli_predict_refuses_before_work(extra, culprit, ckpt, tmp_path, capsys):
    names = dirs(ckpt, tmp_path)
    extra = expand(extra, names)
    argv = ["predict", *extra, "--out", str(tmp_path / "pred")]
    if "--checkpoint" not in extra:
        argv += ["--checkpoint", names["CKPT"]]
    before = listing(tmp_path)
    code, message = run_cli(argv, capsys)
    assert code == 2, message
    assert culprit in message and "Traceback" not in message
    assert listing(tmp_path) == before


def test_cli_predict_out_is_a_file(ckpt, tmp_path, capsys):
    code, message = run_cli(["predict", ckpt / "good.png", "--checkpoint", ckpt / "run" / "checkpoint.pt",
                             "--out", ckpt / "plain.txt"], capsys)
    assert code == 2 and "--out" in message and "plain.txt" in message


@pytest.mark.parametrize("bad", ["corrupt.png", "plain.txt", "missing.png"])
def test_cli_predict_goes_past_a_bad_image(bad, ckpt, tmp_path, capsys):
    out = tmp_path / "pred"
    code, message = run_cli(["predict", ckpt / "good.png", ckpt / bad, "--checkpoint", ckpt / "run" / "checkpoint.pt",
                             "--out", out], capsys)
    assert code == 1 and bad in message and "Traceback" not in message
    payload = json.loads((out / "detections.json").read_text())  # complete, valid JSON
    assert [e["image"] for e in payload["images"]] == [str(ckpt / "good.png")]
    assert [Path(e["image"]).name for e in payload["failed"]] == [bad]
    assert sorted(p.name for p in out.iterdir()) == ["detections.json", "good.png"]  # no temp files


# ------------------------------------------------------------------------------- CLI: run, sweep

RUN_CASES = [
    (["run", "01", "-p", "stride", "8"], ("'stride'", "did you mean 'anchor_stride'")),
    (["run", "08", "-p", "epochs", "20"], ("'epochs'", "did you mean 'max_epochs'")),
    (["run", "01", "-p", "anchor_stride", "abc"], ("anchor_stride='abc'", "integer")),
    (["run", "01", "-p", "anchor_stride", "8.5"], ("anchor_stride=8.5", "integer")),
    (["run", "01", "-p", "anchor_sizes", "32"], ("anchor_sizes=32", "[32]")),
    (["run", "02", "-p", "head_weights", '["a", "b"]'], ("head_weights", "finite numbers")),
    (["run", "03", "-p", "high_threshold", "NaN"], ("high_threshold=nan", "finite")),
    (["run", "03", "-p", "high_threshold", "high"], ("high_threshold='high'", "finite")),
    (["run", "03", "-p", "allow_low_quality_matches", "3"], ("allow_low_quality_matches=3", "true or false")),
    (["run", "08", "-p", "schedules", "joint"], ("schedules='joint'", "list")),
    (["run", "01", "02", "-p", "nope", "1"], ("none of the 2 notebooks", "'nope'")),
    (["run", "99"], ("'99'", "known: 00_setup")),
    (["run", "01", "--out", "{FILE}"], ("--out", "plain.txt")),
    (["sweep", "01", "-p", "stride", "8", "16", "32"], ("'stride'", "anchor_stride")),
    (["sweep", "01", "-p", "anchor_stride", "8", "x"], ("anchor_stride='x'",)),
    (["sweep", "01", "-p", "anchor_stride", "8", "16", "--parallel", "0"], ("--parallel=0",)),
    (["sweep", "01", "-p", "anchor_stride", "8"], ("two or more values",)),
    (["sweep", "42", "-p", "x", "1", "2"], ("'42'",)),
    (["sweep", "01", "-p", "anchor_stride", "8", "16", "-p", "device", "[1]"], ("device=[1]", "text")),
]


@pytest.mark.parametrize(("argv", "culprits"), RUN_CASES, ids=[" ".join(c[0])[:60] for c in RUN_CASES])
def test_cli_run_and_sweep_refuse_before_running(argv, culprits, ckpt, tmp_path, capsys, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("a notebook ran")

    monkeypatch.setattr(runner, "execute_one", never)
    monkeypatch.chdir(tmp_path)
    code, message = run_cli(expand(argv, dirs(ckpt, tmp_path)), capsys)
    assert code == 2, message
    for c in culprits:
        assert c in message
    assert listing(tmp_path) == set()  # no runs/ folder


# ------------------------------------------------------------------------------- notebook parameters (API)

DECLARED = {
    "n": {"inferred_type_name": "int", "default": "3"},
    "rate": {"inferred_type_name": "float", "default": "0.5"},
    "flag": {"inferred_type_name": "bool", "default": "False"},
    "name": {"inferred_type_name": "str", "default": '"a"'},
    "sizes": {"inferred_type_name": "list", "default": "[16, 32]"},
    "modes": {"inferred_type_name": "list", "default": '["joint"]'},
}

PARAMETER_CASES = [
    ({"m": 1}, "'m'"),
    ({"sise": [1]}, "did you mean 'sizes'"),
    ({"n": "abc"}, "n='abc'"),
    ({"n": 2.5}, "n=2.5"),
    ({"n": True}, "n=True"),
    ({"rate": float("nan")}, "rate=nan"),
    ({"rate": float("inf")}, "rate=inf"),
    ({"rate": [0.1]}, "rate=[0.1]"),
    ({"flag": 1}, "flag=1"),
    ({"name": [1]}, "name=[1]"),
    ({"sizes": 32}, "[32]"),
    ({"sizes": "16 32"}, "sizes='16 32'"),
    ({"sizes": [16, "x"]}, "'x'"),
    ({"sizes": [16, float("nan")]}, "nan"),
    ({"modes": [1]}, "text items"),
]


@pytest.mark.parametrize(("params", "culprit"), PARAMETER_CASES, ids=[repr(c[0])[:40] for c in PARAMETER_CASES])
def test_select_parameters_refuses(params, culprit, tmp_path):
    with pytest.raises(runner.ParameterError) as info:
        runner.select_parameters(tmp_path / "07_demo.ipynb", params, declared=DECLARED)
    assert culprit in str(info.value) and "07_demo" in str(info.value)


def test_select_parameters_reports_every_problem_at_once(tmp_path):
    with pytest.raises(runner.ParameterError) as info:
        runner.select_parameters(tmp_path / "x.ipynb", {"n": "a", "rate": "b", "zzz": 1}, declared=DECLARED)
    assert all(s in str(info.value) for s in ("n='a'", "rate='b'", "'zzz'"))


# ------------------------------------------------------------------------------- data


def make_coco(root: Path, edit=None, images=2) -> Path:
    (root / "train").mkdir(parents=True)
    (root / "annotations").mkdir()
    entries = []
    for i in range(1, images + 1):
        Image.new("RGB", (32, 24), (10 * i, 80, 160)).save(root / "train" / f"im{i}.png")
        entries.append({"id": i, "file_name": f"im{i}.png", "height": 24, "width": 32})
    data = {"images": entries, "categories": [{"id": 1, "name": "thing"}, {"id": 2, "name": "other"}],
            "annotations": [{"id": 10 + i, "image_id": i, "category_id": 1, "bbox": [2, 2, 10, 8], "iscrowd": 0}
                            for i in range(1, images + 1)]}
    if edit:
        edit(data, root)
    (root / "annotations" / "train.json").write_text(json.dumps(data))
    return root


def _set(path, value):
    def edit(data, root):
        target = data
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return edit


COCO_CASES = [
    ("duplicate image id", _set(("images", 1, "id"), 1), "image id=1 appears 2 times"),
    ("unknown image id", _set(("annotations", 0, "image_id"), 99), "annotation id=11 points to unknown image_id=99"),
    ("unknown category", _set(("annotations", 0, "category_id"), 7), "annotation id=11 has unknown category_id=7"),
    ("nan bbox", _set(("annotations", 0, "bbox"), [1, 1, float("nan"), 3]), "annotation id=11 has bbox"),
    ("inf bbox", _set(("annotations", 0, "bbox"), [1, 1, float("inf"), 3]), "annotation id=11 has bbox"),
    ("3-number bbox", _set(("annotations", 0, "bbox"), [1, 1, 3]), "annotation id=11 has bbox=[1, 1, 3]"),
    ("negative width", _set(("annotations", 0, "bbox"), [5, 5, -3, 3]), "zero or negative size"),
    ("text bbox", _set(("annotations", 0, "bbox"), "1 2 3 4"), "annotation id=11 has bbox='1 2 3 4'"),
    ("duplicate annotation id", _set(("annotations", 1, "id"), 11), "annotation id=11 appears 2 times"),
    ("empty images", _set(("images",), []), "the 'images' list is empty"),
    ("no images key", lambda d, r: d.pop("images"), "has no 'images' list"),
    ("no categories", _set(("categories",), []), "has no 'categories'"),
    ("string image id", _set(("images", 0, "id"), "one"), "images[0] has id='one'"),
    ("no file_name", lambda d, r: d["images"][0].pop("file_name"), "image id=1 has no file_name"),
    ("missing image file", lambda d, r: (r / "train" / "im2.png").unlink(), "im2.png: image file not found"),
    ("corrupt image", lambda d, r: (r / "train" / "im2.png").write_bytes(b"garbage"), "im2.png: not a readable image"),
    ("size mismatch", _set(("images", 0, "height"), 99), "im1.png: image is 32x24 but annotated as 32x99"),
    ("image is a folder", lambda d, r: ((r / "train" / "im2.png").unlink(), (r / "train" / "im2.png").mkdir()),
     "im2.png: is not a file"),
]


@pytest.mark.parametrize(("edit", "culprit"), [c[1:] for c in COCO_CASES], ids=[c[0] for c in COCO_CASES])
def test_check_data_names_each_coco_problem(edit, culprit, tmp_path, capsys):
    root = make_coco(tmp_path / "coco", edit)
    before = listing(tmp_path)
    code, message = run_cli(["check-data", root, "--split", "train"], capsys)
    assert code == 1, message
    assert culprit in message
    assert listing(tmp_path) == before


def test_coco_malformed_json_is_named(tmp_path, capsys):
    root = make_coco(tmp_path / "coco")
    (root / "annotations" / "train.json").write_text("{not json")
    code, message = run_cli(["check-data", root, "--split", "train"], capsys)
    assert code == 1 and "train.json: not valid JSON" in message


def test_truncated_jpeg_is_found(tmp_path):
    Image.new("RGB", (64, 48), (1, 2, 3)).save(tmp_path / "a.jpg", quality=90)
    data = (tmp_path / "a.jpg").read_bytes()
    (tmp_path / "a.jpg").write_bytes(data[: len(data) * 2 // 3])
    assert "truncated" in check_image_file(tmp_path / "a.jpg").lower()


def test_check_data_passes_a_clean_folder(tmp_path, capsys):
    code, message = run_cli(["check-data", make_coco(tmp_path / "coco"), "--split", "train"], capsys)
    assert code == 0 and "coco train: ok" in message


def test_check_data_root_errors(tmp_path, capsys):
    code, message = run_cli(["check-data", tmp_path / "nowhere"], capsys)
    assert code == 2 and "nowhere" in message
    code, message = run_cli(["check-data", tmp_path], capsys)
    assert code == 2 and "neither a COCO folder" in message


def make_voc(root: Path, names=("a", "b")) -> Path:
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    for name in names:
        Image.new("RGB", (40, 30)).save(root / "JPEGImages" / f"{name}.jpg")
        (root / "Annotations" / f"{name}.xml").write_text(
            f"<annotation><filename>{name}.jpg</filename><size><width>40</width><height>30</height></size>"
            "<object><name>dog</name><difficult>0</difficult><bndbox><xmin>2</xmin><ymin>3</ymin>"
            "<xmax>20</xmax><ymax>25</ymax></bndbox></object></annotation>")
    (root / "ImageSets" / "Main" / "train.txt").write_text("".join(f"{n}\n" for n in names))
    return root


VOC_CASES = [
    ("empty list", lambda r: (r / "ImageSets/Main/train.txt").write_text("\n"), "train.txt: the image list is empty"),
    ("missing list", lambda r: (r / "ImageSets/Main/train.txt").unlink(), "train.txt: image list not found"),
    ("missing xml", lambda r: (r / "Annotations/b.xml").unlink(), "b.xml: annotation file not found"),
    ("malformed xml", lambda r: (r / "Annotations/b.xml").write_text("<annotation>"), "b.xml: malformed XML"),
    ("bad coordinate", lambda r: (r / "Annotations/b.xml").write_text(
        "<annotation><object><name>dog</name><bndbox><xmin>x</xmin><ymin>1</ymin><xmax>2</xmax><ymax>3</ymax>"
        "</bndbox></object></annotation>"), "b.xml"),
    ("missing jpg", lambda r: (r / "JPEGImages/b.jpg").unlink(), "b.jpg: image file not found (VOC id b)"),
    ("corrupt jpg", lambda r: (r / "JPEGImages/b.jpg").write_bytes(b"\xff\xd8junk"), "b.jpg: not a readable image"),
    ("duplicate id", lambda r: (r / "ImageSets/Main/train.txt").write_text("a\nb\na\n"), "'a' is listed 2 times"),
]


@pytest.mark.parametrize(("edit", "culprit"), [c[1:] for c in VOC_CASES], ids=[c[0] for c in VOC_CASES])
def test_scan_voc_names_each_problem(edit, culprit, tmp_path):
    root = make_voc(tmp_path / "VOC2007")
    edit(root)
    problems = scan_voc(root, "train")
    assert any(culprit in str(p) for p in problems), problems


def test_training_stops_before_the_first_step_listing_bad_files(tmp_path, capsys):
    root = make_coco(tmp_path / "coco", lambda d, r: ((r / "train" / "im2.png").write_bytes(b"junk"),
                                                       d["annotations"].append({"id": 99, "image_id": 5,
                                                                                "category_id": 1, "bbox": [1, 1, 2, 2]})))
    out = tmp_path / "out"
    code, message = run_cli(["train", "--dataset", "coco", "--root", root, "--num-classes", "2", *TINY,
                             "--out-dir", out], capsys)
    assert code == 2 and "2 problem(s)" in message and "im2.png" in message and "annotation id=99" in message
    assert "nothing was trained" in message and not out.exists()


def test_skip_bad_images_trains_on_the_others(tmp_path, capsys):
    root = make_coco(tmp_path / "coco", lambda d, r: (r / "train" / "im2.png").write_bytes(b"junk"), images=3)
    out = tmp_path / "out"
    code, message = run_cli(["train", "--dataset", "coco", "--root", root, "--num-classes", "2", *TINY,
                             "--max-iters", "1", "--out-dir", out], capsys)
    assert code == 2 and "--skip-bad-images" in message and not out.exists()
    code, message = run_cli(["train", "--dataset", "coco", "--root", root, "--num-classes", "2", *TINY,
                             "--max-iters", "1", "--out-dir", out, "--skip-bad-images"], capsys)
    assert code == 0, message
    assert "skipping 1 bad image(s)" in message and "im2.png" in message
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 1


def test_coco_scan_api_returns_kinds(tmp_path):
    root = make_coco(tmp_path / "coco", lambda d, r: (r / "train" / "im1.png").write_bytes(b"x"))
    (problem,) = scan_coco(root / "train", root / "annotations" / "train.json")
    assert problem.kind == "image" and "image id=1" in str(problem)


# ------------------------------------------------------------------------------- checkpoints (API)

CHECKPOINT_CASES = ["text.pt", "empty.pt", "random.pt", "truncated.pt", "a_folder.pt"]


@pytest.mark.parametrize("name", CHECKPOINT_CASES)
def test_load_checkpoint_names_the_file(name, ckpt):
    with pytest.raises(CheckpointError, match=name):
        load_checkpoint(ckpt / name)


@pytest.mark.parametrize(("name", "culprit"), [("nan.pt", "non-finite weights"), ("noconfigs.pt", "noconfigs.pt")])
def test_load_model_refuses(name, culprit, ckpt):
    with pytest.raises(CheckpointError, match=culprit):
        load_model(ckpt / name)


def test_a_pickle_that_runs_code_is_refused_naming_the_file(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"model": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()


# ------------------------------------------------------------------------------- the tensor API

B = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 15.0, 15.0]])
S = torch.tensor([0.9, 0.8])
NAN_B = torch.tensor([[0.0, 0.0, float("nan"), 10.0], [5.0, 5.0, 15.0, 15.0]])
FEAT = torch.rand(1, 2, 8, 8)

API_CASES = [
    ("nms iou 1.5", lambda: nms(B, S, 1.5), "iou_threshold=1.5"),
    ("nms iou -0.1", lambda: nms(B, S, -0.1), "iou_threshold=-0.1"),
    ("nms iou nan", lambda: nms(B, S, float("nan")), "iou_threshold=nan"),
    ("nms iou text", lambda: nms(B, S, "0.5"), "iou_threshold='0.5'"),
    ("nms nan score", lambda: nms(B, torch.tensor([float("nan"), 0.1]), 0.5), "scores"),
    ("nms inf score", lambda: nms(B, torch.tensor([float("inf"), 0.1]), 0.5), "scores"),
    ("nms nan box", lambda: nms(NAN_B, S, 0.5), "boxes"),
    ("nms shape", lambda: nms(B, S[:1], 0.5), "scores must have shape"),
    ("batched_nms iou 1.5", lambda: batched_nms(B, S, torch.tensor([0, 1]), 1.5), "iou_threshold=1.5"),
    ("batched_nms python nan", lambda: batched_nms(B, S, torch.tensor([0, 1]), float("nan"), "python"),
     "iou_threshold=nan"),
    ("roi_align nan box", lambda: roi_align(FEAT, [NAN_B], 2), "boxes"),
    ("roi_align inf box", lambda: roi_align(FEAT, torch.tensor([[0, 0, 0, float("inf"), 3.0]]), 2), "boxes"),
    ("roi_align batch index", lambda: roi_align(FEAT, torch.tensor([[3.0, 0, 0, 4, 4]]), 2), "batch index 3"),
    ("roi_align negative index", lambda: roi_align(FEAT, torch.tensor([[-1.0, 0, 0, 4, 4]]), 2), "batch index -1"),
    ("roi_pool nan box", lambda: roi_pool(FEAT, [NAN_B], 2), "boxes"),
    ("roi_pool batch index", lambda: roi_pool(FEAT, torch.tensor([[0.5, 0, 0, 4, 4]]), 2), "batch index 0.5"),
    ("crop nan box", lambda: crop_and_resize_pool(FEAT, [NAN_B], 2), "boxes"),
    ("box_iou shape", lambda: box_iou(B[:, :3], B), "boxes1"),
]


@pytest.mark.parametrize(("call", "culprit"), [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_tensor_api_names_the_argument(call, culprit):
    with pytest.raises(ValueError) as info:
        call()
    assert culprit in str(info.value)


def test_box_iou_gives_nan_not_zero_for_nan_boxes_and_checks_under_the_flag():
    iou = box_iou(NAN_B, B)
    assert math.isnan(iou[0, 0]) and math.isnan(iou[0, 1]) and iou[1, 1] == 1
    with value_checks_module.value_checks(), pytest.raises(ValueError, match="boxes1"):
        box_iou(NAN_B, B)
    assert not value_checks_module._enabled or os.environ.get("RPNLAB_CHECK_VALUES")


@pytest.mark.parametrize(("target", "culprit"), [
    ({"boxes": torch.tensor([[1.0, 1, 20, 20]]), "labels": torch.tensor([7])}, "label 7, outside 1..3"),
    ({"boxes": torch.tensor([[1.0, 1, 20, 20]]), "labels": torch.tensor([0])}, "label 0, outside 1..3"),
    ({"boxes": torch.tensor([[1.0, 1, float("nan"), 20]]), "labels": torch.tensor([1])}, "targets[0]['boxes']"),
])
def test_model_targets_are_checked(target, culprit):
    from rpnlab.detector.model import FasterRCNN, synthetic_model_config

    model = FasterRCNN.from_config(synthetic_model_config()).train()
    with pytest.raises(ValueError) as info:
        model([torch.rand(3, 64, 64)], [target])
    assert culprit in str(info.value)
