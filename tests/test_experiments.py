"""rpnlab.lab.experiments: the ablations on tiny settings, the tables, the paper's numbers, the budget."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import nbformat
import pytest
import torch

from rpnlab.config import DataConfig
from rpnlab.data import SyntheticShapes
from rpnlab.detector.model import synthetic_model_config
from rpnlab.engine.train import synthetic_train_config, train
from rpnlab.lab import experiments as ex
from rpnlab.lab.detections import plot_training_history

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_09 = ROOT / "notebooks" / "09_experiments.ipynb"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Four training and four validation images, one SGD step per run, the small model."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("runs")
    data_cfg = DataConfig(num_train=4, num_val=4, seed=0)
    train_cfg = synthetic_train_config(epochs=1, batch_size=4, max_iters=1, warmup_iters=1, device="cpu",
                                       out_dir=str(out))
    model_cfg = synthetic_model_config()
    val = SyntheticShapes("val", num_images=4, seed=0)
    return data_cfg, train_cfg, model_cfg, val


@pytest.fixture(scope="module")
def trained(tiny):
    data_cfg, train_cfg, model_cfg, _ = tiny
    cfg = copy.deepcopy(train_cfg)
    cfg.max_iters = 2
    cfg.out_dir = str(Path(train_cfg.out_dir) / "trained")
    return train(model_cfg, data_cfg, cfg, progress=False).model


def _locations(model_cfg, image_size=128):
    stride = model_cfg.anchors.strides[0]
    return math.ceil(image_size / stride) ** 2


# --------------------------------------------------------------------------- ablations


def test_proposal_recall_for(trained, tiny):
    *_, val = tiny
    saved = trained.rpn.proposal_layer.post_nms_top_n
    result = ex.proposal_recall_for(trained, val, [10, 100, 300])
    assert result["recall"].shape == (3, 10)
    assert torch.all(result["recall_50"][1:] >= result["recall_50"][:-1])
    assert torch.all(result["recall_50"] >= result["recall_70"])
    assert 100 < result["mean_proposals"] <= 300
    assert trained.rpn.proposal_layer.post_nms_top_n == saved


# --------------------------------------------------------------------------- settings and numbers


def test_paper_numbers():
    # Ren et al. 2015, arXiv:1506.01497v3: Table 8 (anchors), Table 9 (lambda), Table 2 (ZF, test proposals).
    assert [r["paper_map"] for r in ex.PAPER_ANCHORS] == [65.8, 66.7, 68.8, 67.9, 69.8, 69.9]
    assert ex.PAPER_LAMBDA == {0.1: 67.2, 1.0: 68.9, 3.0: 69.8, 10.0: 69.9, 100.0: 69.1}
    assert ex.PAPER_TEST_PROPOSALS == {100: 55.1, 300: 56.8, 1000: 56.3}
    rows = ex.paper_reference_rows()
    assert set(rows) == {"anchors", "lambda", "proposals"}
    assert {r["table"] for r in rows["anchors"]} == {"Table 8"}
    assert [(r["lambda"], r["paper_map"]) for r in rows["lambda"]] == list(ex.PAPER_LAMBDA.items())
    assert [r["test_proposals"] for r in rows["proposals"]] == [100, 300, 1000]


def test_notebook_shows_the_paper_table():
    """The guarded cell of notebook 09 prints exactly ``paper_reference_rows`` as markdown."""
    nb = nbformat.read(NOTEBOOK_09, as_version=4)
    cells = [c for c in nb.cells if c.cell_type == "code" and "paper_reference_rows" in c.source]
    assert len(cells) == 1 and cells[0].source.startswith("# NBVAL_CHECK_OUTPUT")
    shown = "".join(o.get("text", "") for o in cells[0].outputs)
    expected = "".join(f"{name}:\n" + ex.rows_to_markdown(rows, digits=1) + "\n\n"
                       for name, rows in ex.paper_reference_rows().items())
    assert shown == expected
    for value in ("65.8", "66.7", "68.8", "67.9", "69.8", "69.9", "67.2", "68.9", "69.1", "55.1", "56.8", "56.3"):
        assert f"| {value} |" in shown


def test_loss_balance():
    assert ex.loss_balance(10, 256, 2400) == pytest.approx(1.0667, abs=1e-4)  # "roughly equally weighted"
    assert ex.loss_balance(10, 256, 64) == pytest.approx(40.0)
    assert ex.loss_balance(0, 256, 64) == 0.0
    with pytest.raises(ValueError, match="num_locations"):
        ex.loss_balance(10, 256, 0)


# --------------------------------------------------------------------------- tables


def test_rows_to_markdown_format():
    rows = [{"setting": "a|b", "sizes": (16.0, 32.5), "k": 9, "map": 0.12345, "paper": 69.9},
            {"setting": "c", "sizes": (64.0,), "k": 1, "map": float("nan"), "paper": None, "extra": True}]
    text = ex.rows_to_markdown(rows)
    lines = text.split("\n")
    assert lines[0] == "| setting | sizes | k | map | paper | extra |"
    # Text columns left-aligned, numeric columns (None/NaN ignored) right-aligned; booleans are text.
    assert lines[1] == "|---|---|---:|---:|---:|---|"
    assert lines[2] == "| a\\|b | 16, 32.5 | 9 | 0.123 | 69.900 | - |"
    assert lines[3] == "| c | 64 | 1 | - | - | True |"
    assert len(lines) == 4


def test_rows_to_markdown_columns_headers_digits():
    rows = [{"lambda": 0.1, "map": 0.5, "seconds": 61.7}, {"lambda": 10.0, "map": 0.25}]
    text = ex.rows_to_markdown(rows, columns=["lambda", "seconds", "map"], headers={"map": "mAP"},
                               digits={"lambda": 1, "seconds": 0})
    assert text.split("\n") == ["| lambda | seconds | mAP |", "|---:|---:|---:|",
                                "| 0.1 | 62 | 0.500 |", "| 10.0 | - | 0.250 |"]
    assert ex.rows_to_markdown(rows, columns=["map"], digits=1).split("\n")[2:] == ["| 0.5 |", "| 0.2 |"]
    assert ex.rows_to_markdown([], columns=["a", "b"]) == "| a | b |\n|---|---|"
    with pytest.raises(ValueError, match="column"):
        ex.rows_to_markdown([])
    with pytest.raises(TypeError, match="rows"):
        ex.rows_to_markdown({"a": 1})
    with pytest.raises(TypeError, match="rows"):
        ex.rows_to_markdown([1, 2])


# --------------------------------------------------------------------------- budget


def test_plan_epochs():
    assert ex.plan_epochs(60, 0.5, 10) == 12
    assert ex.plan_epochs(59.9, 0.5, 10) == 11
    assert ex.plan_epochs(60, 0.5, 10, max_epochs=5) == 5
    assert ex.plan_epochs(1, 0.5, 10) == 1  # never zero
    assert ex.plan_epochs(1, 0.5, 10, schedule="alternating") == 4  # one epoch per step
    # Stages that cost differently: 6 epochs of alternating training split 2 : 1 : 2 : 1.
    per_stage = {"step1_rpn": 0.1, "step2_fast_rcnn": 1.0, "step3_rpn": 0.1, "step4_fast_rcnn": 0.2}
    cost_6 = 10 * (2 * 0.1 + 1 * 1.0 + 2 * 0.1 + 1 * 0.2)
    assert ex.plan_epochs(cost_6 + 1e-9, per_stage, 10, schedule="alternating") == 6
    assert ex.plan_epochs(cost_6 - 0.01, per_stage, 10, schedule="alternating") < 6
    # The same budget at the most expensive stage's cost everywhere buys fewer epochs.
    assert ex.plan_epochs(cost_6 + 1e-9, 1.0, 10, schedule="alternating") == 4
    with pytest.raises(ValueError, match="positive"):
        ex.plan_epochs(0, 0.5, 10)
    with pytest.raises(ValueError, match="positive"):
        ex.plan_epochs(10, {"joint": 0.0}, 10)
    with pytest.raises(ValueError, match="iterations_per_epoch"):
        ex.plan_epochs(10, 0.5, 0)


def test_fit_to_budget(tiny, monkeypatch):
    _, train_cfg, model_cfg, _ = tiny
    monkeypatch.setattr(ex, "measure_stage_seconds", lambda *args, **kwargs: {"joint": 0.5})
    cfg = copy.deepcopy(train_cfg)
    cfg.max_iters = None
    fitted, plan = ex.fit_to_budget(model_cfg, DataConfig(num_train=16), cfg, 10.0)
    assert plan == {"seconds_per_iteration": {"joint": 0.5}, "iterations_per_epoch": 4, "epochs": 5,
                    "planned_seconds": 10.0}
    assert fitted.epochs == 5 and fitted.time_budget_s == 15.0
    assert cfg.epochs == 1 and cfg.time_budget_s is None, "the given config is not modified"


def test_measure_stage_seconds(tiny):
    data_cfg, train_cfg, model_cfg, _ = tiny
    cfg = copy.deepcopy(train_cfg)
    cfg.batch_size, cfg.schedule = 2, "alternating"
    seconds = ex.measure_stage_seconds(model_cfg, data_cfg, cfg, iterations=1)
    assert list(seconds) == ["step1_rpn", "step2_fast_rcnn", "step3_rpn", "step4_fast_rcnn"]
    assert all(0 < v < 60 for v in seconds.values())
    mean = ex.measure_iteration_seconds(model_cfg, data_cfg, train_cfg, iterations=1)
    assert 0 < mean < 60


# --------------------------------------------------------------------------- figures


def test_plot_training_history():
    history = [{"step": 0, "stage": "step1_rpn", "loss_objectness": 0.7, "total": 0.7},
               {"step": 1, "stage": "step1_rpn", "loss_objectness": 0.6, "total": 0.6},
               {"step": 2, "stage": "step2_fast_rcnn", "loss_classifier": 1.2, "total": 1.2}]
    fig = plot_training_history(history)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "iteration" and ax.get_ylabel() == "loss" and ax.get_title()
    drawn = {line.get_label(): list(line.get_xdata()) for line in ax.lines if not line.get_label().startswith("_")}
    assert drawn == {"loss_objectness": [0, 1], "loss_classifier": [2]}  # each loss at its own steps
    assert sum(1 for line in ax.lines if line.get_linestyle() == ":") == 2  # one marker per stage


def test_locations_per_image(tiny):
    _, _, model_cfg, val = tiny
    assert ex.locations_per_image(model_cfg, val) == _locations(model_cfg)
