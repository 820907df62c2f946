"""rpnlab.lab.ablations and rpnlab.lab.results: the seed loop, Table 2's baselines, Figure 4, the tables."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from rpnlab.config import DataConfig
from rpnlab.data import SyntheticShapes
from rpnlab.detector.boxes import box_iou, clip_boxes
from rpnlab.detector.model import synthetic_model_config
from rpnlab.engine.train import synthetic_train_config, train
from rpnlab.lab import ablations as ab
from rpnlab.lab import results
from rpnlab.lab.stats import t_critical

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Four training and four validation images, RPN-only runs of one SGD step."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("ablations")
    data_cfg = DataConfig(num_train=4, num_val=4, seed=0)
    train_cfg = synthetic_train_config(schedule="rpn", epochs=1, batch_size=4, warmup_iters=1, device="cpu",
                                       out_dir=str(out))
    val = SyntheticShapes("val", num_images=4, seed=0)
    return data_cfg, train_cfg, synthetic_model_config(), val


@pytest.fixture(scope="module")
def rpn_model(tiny):
    data_cfg, train_cfg, model_cfg, _ = tiny
    cfg = copy.deepcopy(train_cfg)
    cfg.epochs, cfg.out_dir = 2, str(Path(train_cfg.out_dir) / "model")
    return train(model_cfg, data_cfg, cfg, progress=False).model


@pytest.fixture(scope="module")
def rpn_outputs(rpn_model, tiny):
    *_, val = tiny
    return next(ab._rpn_outputs(rpn_model, val, batch_size=4))


# --------------------------------------------------------------------------- settings


def test_table8_settings_six_rows_of_the_paper():
    rows = ab.table8_settings((16, 32, 64), (0.5, 1.0, 2.0))
    assert [r["sizes"] for r in rows] == [(16.0,), (32.0,), (16.0,), (32.0,), (16.0, 32.0, 64.0), (16.0, 32.0, 64.0)]
    assert [r["ratios"] for r in rows] == [(1.0,), (1.0,), (0.5, 1.0, 2.0), (0.5, 1.0, 2.0), (1.0,), (0.5, 1.0, 2.0)]
    assert [r["paper_map"] for r in rows] == [65.8, 66.7, 68.8, 67.9, 69.8, 69.9]
    assert len({r["setting"] for r in rows}) == 6
    # Four sizes: no row of the paper matches, so no paper number.
    assert all(r["paper_map"] is None for r in ab.table8_settings((8, 16, 32, 64)))
    with pytest.raises(ValueError, match="ratios"):
        ab.table8_settings((16, 32), (0.5, 2.0))


# --------------------------------------------------------------------------- the seed loop


def test_repeat_over_seeds_order_keep_and_errors():
    calls = []

    def run(setting, seed):
        calls.append((setting["setting"], seed))
        return {"value": setting["x"] * 10 + seed}, f"model {setting['setting']} {seed}"

    settings = [{"setting": "a", "x": 1}, {"setting": "b", "x": 2}]
    rows, kept = ab.repeat_over_seeds(settings, run, [3, 4, 5], keep=lambda s: s["setting"] == "b")
    # Seed by seed, so an interrupted run holds whole seeds.
    assert calls == [("a", 3), ("b", 3), ("a", 4), ("b", 4), ("a", 5), ("b", 5)]
    assert [(r["setting"], r["seed"], r["value"]) for r in rows] == [
        ("a", 3, 13), ("b", 3, 23), ("a", 4, 14), ("b", 4, 24), ("a", 5, 15), ("b", 5, 25)]
    assert kept == {("b", 3): "model b 3", ("b", 4): "model b 4", ("b", 5): "model b 5"}
    with pytest.raises(ValueError, match="seeds"):
        ab.repeat_over_seeds(settings, run, [1, 1])
    with pytest.raises(ValueError, match="unique"):
        ab.repeat_over_seeds([{"setting": "a"}, {"setting": "a"}], run, [0])
    with pytest.raises(ValueError, match="settings"):
        ab.repeat_over_seeds([], run, [0])


def test_lambda_rows_over_seeds_train_real_models(tiny):
    data_cfg, train_cfg, model_cfg, val = tiny
    rows = ab.lambda_rows([1.0, 100.0], [0, 1], data_cfg, train_cfg, model_cfg, val)
    assert [(r["lambda"], r["seed"]) for r in rows] == [(1.0, 0), (100.0, 0), (1.0, 1), (100.0, 1)]
    for r in rows:
        for key in (*ab.RECALL_KEYS, "box_share"):
            assert 0.0 <= r[key] <= 1.0, (key, r[key])
        assert r["iterations"] == 1 and "map_50" not in r  # RPN alone: no detector score
    # The same seed, the same start: a 100x larger lambda gives the box term a larger share.
    assert rows[1]["box_share"] > rows[0]["box_share"]
    # Different seeds, different runs.
    assert rows[0]["loss_objectness"] != rows[2]["loss_objectness"]
    assert model_cfg.rpn.loss_normalization == "sampled", "the base config is not modified"


# --------------------------------------------------------------------------- Table 2's baselines


def test_no_regression_proposals_are_anchors(rpn_model, rpn_outputs):
    anchors, logits, deltas, levels, sizes, _, _ = rpn_outputs
    props = ab.variant_proposals(rpn_model.rpn.proposal_layer, "no regression (anchors)", 50, anchors, logits,
                                 deltas, sizes, levels)
    assert len(props) == logits.shape[0]
    for boxes, size in zip(props, sizes):
        assert 0 < len(boxes) <= 50
        # Every proposal is one of the (clipped) anchors, exactly.
        assert torch.all(box_iou(boxes, clip_boxes(anchors, size)).max(dim=1).values > 1 - 1e-6)
    # With the trained offsets the boxes move off the anchors.
    rpn = ab.variant_proposals(rpn_model.rpn.proposal_layer, "RPN", 50, anchors, logits, deltas, sizes, levels)
    assert not torch.all(box_iou(rpn[0], clip_boxes(anchors, sizes[0])).max(dim=1).values > 1 - 1e-6)


def test_random_proposals_are_unranked_regressed_boxes(rpn_model, rpn_outputs):
    anchors, logits, deltas, levels, sizes, _, _ = rpn_outputs
    layer = rpn_model.rpn.proposal_layer
    saved = (layer.pre_nms_top_n, layer.post_nms_top_n, layer.mode)
    everything = ab.variant_proposals(layer, "no NMS", 10**6, anchors, logits, deltas, sizes, levels)
    assert [len(b) for b in everything] == [anchors.shape[0]] * len(sizes)  # no NMS: every box
    first = ab.variant_proposals(layer, "no scores (random)", 100, anchors, logits, deltas, sizes, levels,
                                 torch.Generator().manual_seed(0))
    again = ab.variant_proposals(layer, "no scores (random)", 100, anchors, logits, deltas, sizes, levels,
                                 torch.Generator().manual_seed(0))
    other = ab.variant_proposals(layer, "no scores (random)", 100, anchors, logits, deltas, sizes, levels,
                                 torch.Generator().manual_seed(1))
    ranked = ab.variant_proposals(layer, "no NMS", 100, anchors, logits, deltas, sizes, levels)
    for f, a, o, r, allb in zip(first, again, other, ranked, everything):
        assert len(f) == 100
        assert torch.equal(f, a) and not torch.equal(f, o)  # seeded, and the seed matters
        assert not torch.equal(f, r)  # not the top-scored boxes
        assert torch.all(box_iou(f, allb).max(dim=1).values > 1 - 1e-6)  # but regressed boxes of the RPN
    assert (layer.pre_nms_top_n, layer.post_nms_top_n, layer.mode) == saved, "the model's layer is not changed"
    with pytest.raises(ValueError, match="variant"):
        ab.variant_proposals(layer, "no cls", 10, anchors, logits, deltas, sizes, levels)


def test_proposal_variants_rows(rpn_model, tiny):
    *_, val = tiny
    rows = ab.proposal_variants(rpn_model, val, counts=(10, 300))
    by = {(r["variant"], r["test_proposals"]): r for r in rows}
    assert set(by) == {("RPN", 10), ("RPN", 300), ("no NMS", 6000), ("no scores (random)", 10),
                       ("no scores (random)", 300), ("no regression (anchors)", 10), ("no regression (anchors)", 300)}
    assert by[("RPN", 300)]["paper_map"] == 56.8 and by[("no NMS", 6000)]["paper_map"] == 55.2
    assert by[("RPN", 10)]["paper_map"] is None
    for variant in ("RPN", "no scores (random)", "no regression (anchors)"):
        assert by[(variant, 10)]["mean_proposals"] == 10
        assert by[(variant, 10)]["recall_50"] <= by[(variant, 300)]["recall_50"]  # top 10 is a prefix of top 300
    # Every regressed box, unsorted, recalls at least what any 300 of them do.
    assert by[("no NMS", 6000)]["recall_50"] >= by[("no scores (random)", 300)]["recall_50"]
    for r in rows:
        assert 0.0 <= r["recall_70"] <= r["recall_50"] <= 1.0


def test_recall_vs_iou_monotonic(rpn_model, tiny):
    *_, val = tiny
    rows = ab.recall_vs_iou(rpn_model, val, counts=(10, 300))
    for n in (10, 300):
        curve = [r["recall"] for r in rows if r["test_proposals"] == n]
        assert len(curve) == 11 and curve == sorted(curve, reverse=True)
    by = {(r["test_proposals"], r["iou"]): r["recall"] for r in rows}
    assert all(by[(10, t)] <= by[(300, t)] for t in {r["iou"] for r in rows})
    assert ab.plot_recall_vs_iou([{**r, "seed": 0} for r in rows]).axes


# --------------------------------------------------------------------------- tables


def _seed_rows():
    # Known samples: a = 1, 2, 3; b = 11, 12, 13 (far apart); c = 2, 3, 4 (overlaps a).
    return [{"setting": s, "seed": i, "paper_map": p, "x": base + i}
            for i in range(3) for s, base, p in (("a", 1.0, 60.0), ("b", 11.0, None), ("c", 2.0, 61.0))]


def test_summarise_and_markdown_on_known_samples():
    summary = ab.summarise(_seed_rows(), "setting", ["x"], keep=["paper_map"])
    assert [s["setting"] for s in summary] == ["a", "b", "c"]
    a = summary[0]
    half = t_critical(2) * 1.0 / math.sqrt(3)  # std 1 over 3 seeds
    assert a["x_mean"] == pytest.approx(2.0) and a["x_high"] - a["x_mean"] == pytest.approx(half)
    assert a["n"] == 3 and a["paper_map"] == 60.0
    table = ab.summary_markdown(summary, "setting", ["x"], keep=["paper_map"])
    assert f"| a | 60.0 | 2.000 ± {half:.3f} | 3 |" in table
    assert ab.format_interval(2.0, math.nan, math.nan) == "2.000"
    with pytest.raises(ValueError, match="no row has"):
        ab.summarise(_seed_rows(), "setting", ["y"])


def test_differing_pairs_follow_the_intervals():
    summary = ab.summarise(_seed_rows(), "setting", ["x"])
    pairs = {(p["a"], p["b"]): p for p in ab.differing_pairs(summary, "setting", "x")}
    assert set(pairs) == {("a", "b"), ("a", "c"), ("b", "c")}
    assert pairs[("a", "b")]["differ"] and pairs[("a", "b")]["higher"] == "b"
    assert not pairs[("a", "c")]["differ"] and pairs[("a", "c")]["higher"] is None
    with pytest.raises(ValueError, match="summary has no"):
        ab.differing_pairs(summary, "setting", "y")


def test_write_and_read_reference(tmp_path):
    rows = [{**r, "ar_300": r["x"] / 20, "ar_100": r["x"] / 30, "recall_50": 0.5, "recall_70": 0.3, "k": 9,
             "coverage_50": 0.9, "coverage_70": 0.5, "mean_best_iou": 0.7} for r in _seed_rows()]
    written = results.write_results({"anchors": rows}, tmp_path, {"device": "cpu", "seeds": [0, 1, 2]})
    assert {p.name for p in written.values()} >= {"ablations_anchors.csv", "ablations_anchors_runs.csv",
                                                  "ablations_anchors.png", "ablations.md", "ablations_meta.json"}
    text = (tmp_path / "ablations.md").read_text()
    assert "Pairs whose ar_300 intervals do not overlap: 2 of 3." in text and "- b > a" in text
    back = results.read_reference(tmp_path)
    assert back["meta"]["seeds"] == [0, 1, 2]
    fresh = results.summaries({"anchors": rows})["anchors"]
    assert [r["setting"] for r in back["anchors"]] == ["a", "b", "c"]
    assert back["anchors"][0]["ar_300_mean"] == pytest.approx(fresh[0]["ar_300_mean"])
    side = results.beside_reference(fresh, back["anchors"], "setting", "ar_300")
    assert side[0]["ar_300 (this run)"] == side[0]["ar_300 (reference)"] != "-"
    assert results.beside_reference(fresh, None, "setting", "ar_300")[0]["ar_300 (reference)"] == "-"
    assert results.read_reference(tmp_path / "missing") == {}


def test_results_script_quick(tmp_path):
    """``make results`` end to end on tiny sizes: one table, two seeds."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("results_script", ROOT / "benchmarks" / "results.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    code = script.main(["--quick", "--tables", "lambda", "--seeds", "0", "1", "--num-train", "4", "--num-val", "4",
                        "--device", "cpu", "--out", str(tmp_path)])
    assert code == 0
    back = results.read_reference(tmp_path)
    assert [r["lambda"] for r in back["lambda"]] == [0.1, 1.0, 3.0, 10.0, 100.0]
    assert all(r["n"] == 2 for r in back["lambda"])
    meta = back["meta"]
    assert meta["seeds"] == [0, 1] and meta["device"] == "cpu" and meta["wall_seconds"] > 0
    assert {"torch", "torchvision", "python", "machine", "cpu_count"} <= set(meta)



def test_compare_with_paper():
    summary = ab.summarise(_seed_rows(), "setting", ["x"], keep=["paper_map"])
    rows = ab.compare_with_paper(summary, "setting", "x")
    # b has no paper number: only the pair (a, c) is compared. The paper has c 1 point above a;
    # our intervals overlap: no agreement.
    assert rows == [{"a": "a", "b": "c", "paper": "c > a", "ours": "a ≈ c", "agree": False}]
    assert ab.compare_with_paper(summary, "setting", "x", paper_tolerance=2.0)[0]["agree"]


def test_detector_mode_adds_map(tiny):
    """``schedule="joint"`` (the longer mode): the whole detector trains and mAP joins the recall."""
    data_cfg, train_cfg, model_cfg, val = tiny
    cfg = copy.deepcopy(train_cfg)
    cfg.schedule, cfg.out_dir = "joint", str(Path(train_cfg.out_dir) / "joint")
    row, model = ab.train_and_measure(model_cfg, data_cfg, cfg, val)
    assert 0.0 <= row["map_50"] <= 1.0 and 0.0 <= row["map"] <= 1.0
    rows = ab.proposal_variants(model, val, counts=(10,), detector=True)
    assert {r["variant"] for r in rows} == set(ab.VARIANTS)
    assert all(0.0 <= r["map_50"] <= 1.0 for r in rows)
