"""rpnlab.lab.runner and rpnlab.lab.records on tiny throwaway notebooks (fast kernels, no torch)."""

from __future__ import annotations

import csv
import json
import math

import nbformat
import numpy as np
import pytest
import torch

from rpnlab.lab import records, runner, sweeps

PARAMS = (
    'x: int = 1  # the input\n'
    'smoke: bool = False  # tiny sizes\n'
    'record_path: str = ""  # where the record goes'
)
RECORD = (
    "from rpnlab.lab import records\n"
    "records.begin('{stem}', record_path)\n"
    "records.record('y', x * 2)\n"
    "records.record('smoke', smoke)\n"
    "records.record('stats', {{'half': x / 2}})\n"
    "records.save_record()"
)


def make_notebook(folder, stem, *cells, params=PARAMS):
    nb = nbformat.v4.new_notebook()
    p = nbformat.v4.new_code_cell(params)
    p.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell(f"# {stem}"), p]
    nb.cells += [nbformat.v4.new_code_cell(c.format(stem=stem)) for c in cells]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = folder / f"{stem}.ipynb"
    nbformat.write(nb, path)
    return path


# --------------------------------------------------------------------------- records


def test_to_jsonable_converts_tensors_numpy_and_nan():
    value = {
        "t": torch.tensor([1.5, 2.0]),
        "s": torch.tensor(3),
        "np": np.float32(0.25),
        "ni": np.int64(7),
        "nb": np.bool_(True),
        "arr": np.arange(3),
        "nan": float("nan"),
        "tup": (1, (2, 3)),
        1: "int key",
    }
    out = records.to_jsonable(value)
    assert out == {"t": [1.5, 2.0], "s": 3, "np": 0.25, "ni": 7, "nb": True, "arr": [0, 1, 2],
                   "nan": None, "tup": [1, [2, 3]], "1": "int key"}
    assert type(out["ni"]) is int and type(out["np"]) is float
    json.dumps(out, allow_nan=False)  # strict JSON


def test_to_jsonable_rejects_objects():
    with pytest.raises(TypeError, match="JSON-able"):
        records.to_jsonable(object())


def test_record_roundtrip_and_atomic_write(tmp_path, capsys):
    path = records.begin("nb", str(tmp_path / "sub" / "r.json"))
    assert records.record("a", torch.tensor(0.5)) == 0.5
    records.record("b", [1, 2])
    written = records.save_record()
    assert written == path and path.is_file()
    assert records.read_record(path) == {"a": 0.5, "b": [1, 2]}
    assert "a  0.5" in capsys.readouterr().out
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]  # no temp file left behind
    records.begin("nb", str(path))
    assert records.current() == {}  # begin() starts afresh


def test_default_record_path_uses_env(tmp_path, monkeypatch):
    monkeypatch.setenv("RPNLAB_RECORD_DIR", str(tmp_path))
    assert records.begin("07_x", "") == tmp_path / "07_x.json"
    monkeypatch.delenv("RPNLAB_RECORD_DIR")
    assert records.begin("07_x", "").parts[-3:] == ("runs", "records", "07_x.json")


def test_read_record_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no record"):
        records.read_record(tmp_path / "missing.json")
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(TypeError, match="not a record"):
        records.read_record(tmp_path / "list.json")
    with pytest.raises(ValueError, match="name"):
        records.begin("", "")


# --------------------------------------------------------------------------- resolving, parameters


def test_resolve_notebook_forms(tmp_path):
    nb = make_notebook(tmp_path, "01_anchors", "pass")
    make_notebook(tmp_path, "02_box_coding", "pass")
    for spec in ("01", 1, "1", "01_anchors", "01_anchors.ipynb", str(nb)):
        assert runner.resolve_notebook(spec, tmp_path) == nb.resolve()
    with pytest.raises(FileNotFoundError, match="02_box_coding"):
        runner.resolve_notebook("05", tmp_path)
    assert [p.stem for p in runner.list_notebooks(tmp_path)] == ["01_anchors", "02_box_coding"]


def test_select_parameters_warns_and_skips_unknown(tmp_path):
    nb = make_notebook(tmp_path, "a", "pass")
    with pytest.warns(runner.ParameterWarning, match="nope"):
        accepted, unknown = runner.select_parameters(nb, {"x": 3, "nope": 1}, smoke=True, allow_unknown=True)
    assert accepted == {"x": 3, "smoke": True} and unknown == ["nope"]
    nb2 = make_notebook(tmp_path, "b", "pass", params="x: int = 1  # x")
    accepted, unknown = runner.select_parameters(nb2, {}, smoke=True)  # no smoke declared: no warning
    assert accepted == {} and unknown == []


def test_select_parameters_refuses_unknown_and_ill_typed(tmp_path):
    nb = make_notebook(tmp_path, "a", "pass", params=PARAMS + "\nsizes: list = [16, 32]  # sizes")
    with pytest.raises(runner.ParameterError, match="'nope'.*declared: x, smoke, record_path, sizes"):
        runner.select_parameters(nb, {"nope": 1})
    with pytest.raises(runner.ParameterError, match="did you mean 'sizes'"):
        runner.select_parameters(nb, {"size": [1]})
    with pytest.raises(runner.ParameterError, match="x='abc': expected an integer"):
        runner.select_parameters(nb, {"x": "abc"})
    with pytest.raises(runner.ParameterError, match=r"sizes=32: expected a list.*\[32\]"):
        runner.select_parameters(nb, {"sizes": 32})
    accepted, _ = runner.select_parameters(nb, {"x": 4.0, "record_path": 7, "sizes": [8]})
    assert accepted == {"x": 4, "record_path": "7", "sizes": [8]}


def test_parse_parameter():
    assert runner.parse_parameter("stride=8") == ("stride", 8)
    assert runner.parse_parameter("sizes=[32, 64]") == ("sizes", [32, 64])
    assert runner.parse_parameter("device=cpu") == ("device", "cpu")
    assert runner.parse_parameter("smoke=true") == ("smoke", True)
    with pytest.raises(ValueError, match="name=value"):
        runner.parse_parameter("8")


# --------------------------------------------------------------------------- running


@pytest.mark.xdist_group("notebooks")
def test_run_collection_reports_failure_and_goes_on(tmp_path):
    src = tmp_path / "nbs"
    src.mkdir()
    bad = make_notebook(src, "00_bad", "a = 1", "raise ValueError('broken on purpose')", "print('never')")
    good = make_notebook(
        src, "01_good",
        "%matplotlib inline\nimport matplotlib.pyplot as plt\nplt.plot([0, 1]); plt.title('t'); plt.show()",
        RECORD,
    )
    out = tmp_path / "run"
    with pytest.warns(runner.ParameterWarning, match="unknown_one"):
        result = runner.run_collection([bad, good], parameters={"x": 5, "unknown_one": 1},
                                       out_dir=out, smoke=True, progress=False, allow_unknown_parameters=True)
    assert not result.ok
    by_name = {r["notebook"]: r for r in result.rows}
    failed = by_name["00_bad"]
    assert failed["status"] == "failed" and failed["error_name"] == "ValueError"
    assert "broken on purpose" in failed["error"]
    assert failed["cell_index"] == 4  # markdown, parameters, injected parameters, a = 1, raise
    ok = by_name["01_good"]
    assert ok["status"] == "ok"
    assert ok["record"] == {"y": 10, "smoke": True, "stats": {"half": 2.5}}
    assert records.read_record(out / "01_good.json") == ok["record"]
    assert (out / "01_good.ipynb").is_file() and (out / "00_bad.ipynb").is_file()
    assert [p.name for p in sorted((out / "figures").iterdir())] == ["01_good_1.png"]
    assert (out / "figures" / "01_good_1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with (out / "summary.csv").open() as f:
        summary = list(csv.DictReader(f))
    assert [r["status"] for r in summary] == ["failed", "ok"]
    assert "y=10" in summary[1]["key_figures"] and "stats.half=2.5" in summary[1]["key_figures"]
    assert "cell 4" in summary[0]["error"]
    md = (out / "summary.md").read_text()
    assert "| 01_good | ok |" in md and "broken on purpose" in md


@pytest.mark.xdist_group("notebooks")
def test_sweep_table_and_plot(tmp_path):
    nb = make_notebook(tmp_path, "03_sweepme", RECORD)
    with pytest.warns(runner.ParameterWarning, match="not_there"):
        result = sweeps.sweep(nb, {"x": [3, 1, 2]}, out_dir=tmp_path / "sw", parallel=2,
                              base_parameters={"not_there": 1}, progress=False, allow_unknown_parameters=True)
    assert result.ok
    with result.table_path.open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["x"]) for r in rows] == [3, 1, 2]
    assert [int(r["y"]) for r in rows] == [6, 2, 4]
    assert [float(r["stats.half"]) for r in rows] == [1.5, 0.5, 1.0]
    assert {r["status"] for r in rows} == {"ok"}
    assert all(float(r["seconds"]) > 0 for r in rows)
    assert result.plot_path.is_file() and result.plot_path.stat().st_size > 1000
    assert not math.isnan(result.rows[0]["seconds"])


def test_grid_validation(tmp_path):
    nb = make_notebook(tmp_path, "a", "pass")
    with pytest.raises(ValueError, match="grid\\['x'\\]"):
        sweeps.sweep(nb, {"x": []}, out_dir=tmp_path / "o")
    with pytest.raises(ValueError, match="parallel"):
        sweeps.sweep(nb, {"x": [1]}, out_dir=tmp_path / "o", parallel=0)
