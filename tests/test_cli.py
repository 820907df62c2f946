"""The rpnlab command: options from the config dataclasses, errors, and train/evaluate/predict end to end."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rpnlab import cli
from rpnlab.config import AnchorConfig, DataConfig, ModelConfig, RoIConfig, RPNConfig, TrainConfig


def _help(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as info:
        cli.main([*argv, "--help"])
    assert info.value.code == 0
    return capsys.readouterr().out


def _every_option():
    sections = [("model", ModelConfig), ("anchors", AnchorConfig), ("rpn", RPNConfig), ("roi", RoIConfig),
                ("data", DataConfig), ("train", TrainConfig)]
    for section, cls in sections:
        for f in dataclasses.fields(cls):
            if section == "model" and f.name in ("anchors", "rpn", "roi"):
                continue
            yield section, f.name, cli.option_name(section, f.name)


def test_train_help_lists_every_config_field_with_help(capsys):
    text = _help(capsys, "train")
    options = list(_every_option())
    for section, name, option in options:
        assert option in text, option
    # Every option has its own help text (argparse prints no help for those without one).
    parser = cli.build_parser()
    train_parser = next(a for a in parser._actions if a.dest == "command").choices["train"]
    for action in train_parser._actions:
        assert action.help, action.option_strings
    names = [option for _, _, option in options]
    assert len(set(names)) == len(names)  # no two fields share an option


def test_top_level_and_subcommand_help(capsys):
    text = _help(capsys)
    for command in ("train", "evaluate", "predict", "run", "sweep"):
        assert command in text
    assert "--checkpoint" in _help(capsys, "evaluate")
    assert "--score-thresh" in _help(capsys, "predict")
    assert "NAME VALUE" in _help(capsys, "run")
    assert "--parallel" in _help(capsys, "sweep")


def _error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as info:
        cli.main(list(argv))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_bad_choice_names_the_option_and_the_choices(capsys):
    err = _error(capsys, "train", "--backbone", "foo")
    assert "argument --backbone: invalid choice: 'foo' (choose from" in err
    assert "'small'" in err and "'mobilenet_v3_fpn'" in err
    err = _error(capsys, "train", "--schedule", "fancy")
    assert "argument --schedule: invalid choice: 'fancy'" in err and "'alternating'" in err
    assert "argument --epochs: invalid int value: 'many'" in _error(capsys, "train", "--epochs", "many")


def test_validation_errors_name_the_option(capsys):
    err = _error(capsys, "train", "--rpn-bg-iou-thresh", "0.9")
    assert "rpnlab: error: --rpn-bg-iou-thresh=0.9 must not exceed --rpn-fg-iou-thresh=0.7" in err
    err = _error(capsys, "train", "--lr", "-1")
    assert "rpnlab: error: --lr=-1.0 is invalid: expected a positive number" in err
    err = _error(capsys, "train", "--roi-nms-thresh", "2")
    assert "--roi-nms-thresh=2.0 is invalid" in err
    err = _error(capsys, "train", "--anchor-strides", "16", "--no-progress", "--max-iters", "1", "--num-train", "1")
    assert "anchors.strides=(16,)" in err and "strides are (8,)" in err


def test_options_override_the_preset():
    parser = cli.build_parser()
    args = parser.parse_args(["train", "--anchor-sizes", "8,16", "32", "--rpn-nms-thresh", "0.6",
                              "--roi-aligned", "--data-seed", "4", "--seed", "5", "--max-iters", "none",
                              "--lr-steps", "3", "6", "--pretrained", "none", "--rpn-box-weights", "1", "1", "2", "2",
                              "--anchor-aspect-ratios", "1", "--anchor-strides", "16", "16"])
    model, data, train = cli.configs_from_args(args)
    assert model.anchors.sizes == ((8.0, 16.0), (32.0,))
    assert model.anchors.aspect_ratios == ((1.0,), (1.0,))
    assert model.rpn.nms_thresh == 0.6 and model.roi.aligned is True
    assert data.seed == 4 and train.seed == 5
    assert train.max_iters is None and train.lr_steps == (3, 6)
    assert model.pretrained is None and model.rpn.box_weights == (1.0, 1.0, 2.0, 2.0)
    # Untouched options keep the synthetic preset's values, not the dataclass defaults.
    preset_model, _, preset_train = cli.preset_configs("synthetic")
    assert model.roi.representation_size == preset_model.roi.representation_size
    assert train.batch_size == preset_train.batch_size
    default_args = parser.parse_args(["train", "--preset", "defaults"])
    model, data, train = cli.configs_from_args(default_args)
    assert model == ModelConfig() and train == TrainConfig()


@pytest.mark.parametrize(
    "options, sizes",
    [([], (24.0, 48.0, 96.0)),  # the preset: 192 px
     (["--min-size", "128", "--max-size", "256"], (16.0, 32.0, 64.0)),  # the course's input, its anchors
     (["--image-size", "256"], (24.0, 48.0, 96.0)),  # drawn larger, still fed at 192: same anchors
     (["--min-size", "128", "--anchor-sizes", "20", "40"], (20.0, 40.0))],  # given sizes win
)
def test_synthetic_preset_anchors_follow_the_input_size(options, sizes):
    model, _, _ = cli.configs_from_args(cli.build_parser().parse_args(["train", *options]))
    assert model.anchors.sizes == (sizes,)


@pytest.mark.parametrize(
    "values, levels",
    [(["16", "32"], ((16.0, 32.0),)), (["16,32", "64"], ((16.0, 32.0), (64.0,))), (["[[8], [16, 32]]"], ((8.0,), (16.0, 32.0)))],
)
def test_anchor_level_forms(values, levels):
    strides = [str(8 * 2**i) for i in range(len(levels))]
    args = cli.build_parser().parse_args(["train", "--anchor-sizes", *values, "--anchor-strides", *strides])
    model, _, _ = cli.configs_from_args(args)
    assert model.anchors.sizes == levels
    with pytest.raises(ValueError, match="--anchor-sizes"):
        cli._levels(["16,x"], "--anchor-sizes")


def test_choices_agree_with_config_validation():
    for (section, field), choices in cli._CHOICES.items():
        for value in (*choices, "bogus"):
            model, data, train = cli.preset_configs()
            data.root = "some/folder"  # VOC and COCO need one
            cfg = cli._section_defaults(model, data, train)[section]
            setattr(cfg, field, value)
            if value == "bogus":
                with pytest.raises(ValueError, match=field):
                    cfg.validate()
            else:
                cfg.validate()  # every choice the CLI offers is one the config accepts


def test_parse_value():
    assert cli.parse_value("3") == 3
    assert cli.parse_value("0.5") == 0.5
    assert cli.parse_value("[1, 2]") == [1, 2]
    assert cli.parse_value("true") is True
    assert cli.parse_value("cpu") == "cpu"


# --------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    common = ["--root", str(root / "synthetic"), "--image-size", "64", "--min-size", "64", "--max-size", "64",
              "--num-train", "8", "--num-val", "4", "--num-test", "4"]
    code = cli.main(["train", *common, "--batch-size", "4", "--epochs", "2", "--max-iters", "2",
                     "--rpn-post-nms-top-n-train", "30", "--roi-batch-size-per-image", "16",
                     "--device", "cpu", "--out-dir", str(root / "run"), "--no-progress"])
    assert code == 0
    return root, common


def test_train_writes_a_checkpoint(trained, capsys):
    root, _ = trained
    state = torch.load(root / "run" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 2
    assert state["configs"]["model"]["rpn"]["post_nms_top_n_train"] == 30
    assert state["configs"]["data"]["num_train"] == 8


def test_resume_from_the_command_line(trained, capsys):
    root, _ = trained
    code = cli.main(["train", "--resume", str(root / "run" / "checkpoint.pt"), "--max-iters", "3",
                     "--out-dir", str(root / "resumed"), "--no-progress"])
    assert code == 0
    state = torch.load(root / "resumed" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 3 and state["configs"]["data"]["num_train"] == 8  # the checkpoint's configs
    assert "max_iters: 1 iterations" in capsys.readouterr().out


def test_evaluate_prints_tables_and_writes_json(trained, capsys, tmp_path):
    root, _ = trained
    out = tmp_path / "metrics.json"
    code = cli.main(["evaluate", "--checkpoint", str(root / "run" / "checkpoint.pt"), "--split", "val",
                     "--device", "cpu", "--json", str(out), "--no-progress", "--batch-size", "2"])
    assert code == 0
    text = capsys.readouterr().out
    assert "VOC mAP@0.5" in text and "COCO mAP" in text
    assert "| rectangle |" in text and "recall@0.5" in text
    metrics = json.loads(out.read_text())
    assert metrics["num_images"] == 4 and metrics["split"] == "val"
    assert set(metrics["ap_per_class"]) == {"rectangle", "ellipse", "triangle"}
    assert len(metrics["proposal_recall"]["recall_50"]) == len(metrics["proposal_recall"]["num_proposals"])


def test_evaluate_errors(capsys, tmp_path, trained):
    err = _error(capsys, "evaluate", "--checkpoint", str(tmp_path / "missing.pt"))
    assert "rpnlab: error: checkpoint file not found" in err and "missing.pt" in err
    root, _ = trained
    err = _error(capsys, "evaluate", "--checkpoint", str(root / "run" / "checkpoint.pt"), "--split", "dev")
    assert "split='dev'" in err


def test_predict_draws_and_lists_detections(trained, capsys, tmp_path):
    from PIL import Image

    from rpnlab.data import render_image

    root, _ = trained
    paths = []
    for i in range(2):
        pixels = render_image(0, "test", i, 96).image.transpose(1, 2, 0)
        paths.append(tmp_path / f"img{i}.png")
        Image.fromarray(pixels).save(paths[-1])
    out = tmp_path / "pred"
    code = cli.main(["predict", *map(str, paths), "--checkpoint", str(root / "run" / "checkpoint.pt"),
                     "--out", str(out), "--score-thresh", "0.0", "--device", "cpu"])
    assert code == 0
    assert (out / "img0.png").is_file() and (out / "img1.png").is_file()
    with Image.open(out / "img0.png") as drawn:
        assert drawn.size[0] > 0
    results = json.loads((out / "detections.json").read_text())
    assert [r["image"] for r in results] == [str(p) for p in paths]
    for r in results:
        assert r["size"] == [96, 96]
        for d in r["detections"]:
            x1, y1, x2, y2 = d["box"]
            assert 0 <= x1 <= x2 <= 96 and 0 <= y1 <= y2 <= 96  # back in the file's pixels
            assert d["name"] in ("rectangle", "ellipse", "triangle")
    err = _error(capsys, "predict", str(tmp_path / "nope.png"), "--checkpoint", str(root / "run" / "checkpoint.pt"),
                 "--out", str(out))
    assert "nope.png" in err


def test_run_and_sweep_delegate_to_the_runner(monkeypatch):
    from rpnlab.lab import runner, sweeps

    calls = {}

    class Result:
        ok = True
        table_path = "sweep.csv"
        failed, rows, aggregate_path, plot_path = 0, [], None, None
        summary_md = "runs/x/summary.md"

    monkeypatch.setattr(runner, "run_collection", lambda **kw: calls.setdefault("run", kw) and Result())
    monkeypatch.setattr(sweeps, "sweep", lambda notebook, grid, **kw: calls.setdefault("sweep", (notebook, grid, kw))
                        and Result())
    with pytest.warns(runner.ParameterWarning, match="lr, sizes"):
        assert cli.main(["run", "01", "02", "-p", "lr", "0.1", "-p", "device", "cpu", "-p", "sizes", "[16, 32]",
                         "--smoke", "--out", "runs/x", "--allow-unknown-parameters"]) == 0
    assert [Path(n).stem for n in calls["run"]["notebooks"]] == ["01_anchors", "02_box_coding"]
    assert calls["run"]["allow_unknown_parameters"] is True
    assert calls["run"]["parameters"] == {"lr": 0.1, "device": "cpu", "sizes": [16, 32]}
    assert calls["run"]["smoke"] is True and calls["run"]["out_dir"] == "runs/x"
    assert cli.main(["sweep", "03", "-p", "anchor_stride", "8", "16", "-p", "device", "cpu", "--parallel", "2"]) == 0
    notebook, grid, kw = calls["sweep"]
    assert Path(notebook).stem == "03_matching_sampling" and grid == {"anchor_stride": [8, 16]}
    assert kw["base_parameters"] == {"device": "cpu"} and kw["parallel"] == 2
    assert kw["executor"] == "local" and kw["shard"] is None and kw["aggregate"] is None


def test_sweep_needs_values(capsys):
    assert "two or more values" in _error(capsys, "sweep", "03", "-p", "x", "1")


def test_python_dash_m_rpnlab():
    out = subprocess.run([sys.executable, "-m", "rpnlab", "--help"], capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.returncode == 0 and "evaluate" in out.stdout
