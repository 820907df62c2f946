"""The notebook collection: clean commits, documented parameters, smoke runs, nbval guards, sweeps.

Every ``notebooks/NN_*.ipynb`` is picked up automatically. Tests that start kernels are in the
``notebooks`` xdist group (one worker runs them all, one after the other).

nbval runs a notebook as it is, so CI first writes a smoke-parameterised copy with papermill's
``prepare_only`` (parameters injected, nothing executed, committed outputs kept) and runs
``pytest --nbval-lax`` on the copy: cells marked ``# NBVAL_CHECK_OUTPUT`` must reproduce their
committed outputs, every other cell must run without error.
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import papermill
import pytest

from rpnlab.lab import records, sweeps
from rpnlab.lab.course import course_setup

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
IDS = [p.stem for p in NOTEBOOKS]
REQUIRED_PARAMETERS = {"device", "seed", "smoke", "record_path"}
CHECK_MARK = "# NBVAL_CHECK_OUTPUT"

# The course setup (anchors of 01 and 03) comes from the model preset: counts follow from it.
COURSE = course_setup()
COURSE_K = len(COURSE.anchor_sizes) * len(COURSE.anchor_ratios)
COURSE_ANCHORS = math.ceil(128 / COURSE.anchor_stride) ** 2 * COURSE_K  # on a 128 x 128 image

# Record keys (and values where they are deterministic at smoke size) per notebook. Notebooks
# not listed here only need a non-empty record.
EXPECTED_RECORDS = {
    "00_setup": {"num_images": 16, "device": None, "num_objects": None, "objects_per_class": None},
    "01_anchors": {"k": COURSE_K, "num_anchors": COURSE_ANCHORS, "coverage_at_0.5": None, "coverage_at_0.7": None,
                   "mean_best_iou": None, "kmeans_mean_iou": None, "explorer_ms": None},
    "02_box_coding": {"slip_iou": None, "roundtrip_error_float32": None, "clamped_width_px": None,
                      "weights_equal_normalised_targets": True, "box_loss_ratio_with_weights": None,
                      "plus_one_iou_gap_at_8px": None},
    "03_matching_sampling": {"num_anchors": COURSE_ANCHORS, "image_positive": None, "image_negative": None,
                             "image_ignored": None, "sampled_positive": None, "sampled_negative": None,
                             "explorer_ms": None},
    # RoI Align reads half a cell off without aligned=True, at each stride (06's defaults: 1, 8, 16)
    "06_roi_pooling": {"roi_align_shift_px": {f"stride_{s}": {"False": s / 2, "True": 0.0} for s in (1, 8, 16)}},
    "07_fast_rcnn_head": {"background_candidates_per_image": None, "p_above_half_gt_without_proposal": None},
}


def _kernel_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _parameters_cell(nb):
    return next(c for c in nb.cells if c.cell_type == "code")


def test_collection_is_there():
    assert len(NOTEBOOKS) >= 4
    assert [p.stem[:2] for p in NOTEBOOKS] == sorted(p.stem[:2] for p in NOTEBOOKS)


# --------------------------------------------------------------------------- committed form


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_committed_notebook_is_clean(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    assert "widgets" not in nb.metadata and "papermill" not in nb.metadata
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# "), "a title and goal first"
    assert "parameters" in _parameters_cell(nb).metadata.get("tags", [])
    checked = 0
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        assert "injected-parameters" not in cell.metadata.get("tags", []), f"cell {i}"
        if cell.source.startswith(CHECK_MARK):
            checked += 1
            assert cell.outputs, f"cell {i} is guarded by nbval but has no committed output"
            assert all(o.output_type == "stream" or set(o.data) <= {"text/plain"} for o in cell.outputs)
        else:
            assert not cell.outputs, f"cell {i} has outputs but is not marked {CHECK_MARK}"
    assert checked >= 1, "guard at least one deterministic cell with # NBVAL_CHECK_OUTPUT"
    last_cells = [c for c in nb.cells if c.cell_type == "code"][-2:]
    assert any("save_record" in c.source for c in last_cells), "the notebook ends by recording what it measured"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_parameters_are_documented(path):
    declared = papermill.inspect_notebook(str(path))
    assert REQUIRED_PARAMETERS <= set(declared)
    for name, p in declared.items():
        assert p["help"].strip(), f"parameter {name} has no '# help' comment"
        assert p["inferred_type_name"] != "None", f"parameter {name} has no type annotation"
    # The same through the command line that users run.
    out = subprocess.run([sys.executable, "-m", "papermill", "--help-notebook", str(path)],
                         check=False, capture_output=True, text=True, timeout=60, env=_kernel_env())
    assert out.returncode == 0, out.stderr
    for name, p in declared.items():
        assert f"{name}: {p['inferred_type_name']}" in out.stdout
        assert p["help"].split()[0] in out.stdout
    assert "Unable to parse" not in out.stderr


# --------------------------------------------------------------------------- smoke runs


def _check_record(path: Path, record_path: Path) -> None:
    record = records.read_record(record_path)
    assert record, "the notebook recorded nothing"
    for key, value in EXPECTED_RECORDS.get(path.stem, {}).items():
        assert key in record, f"{key} missing from the record: {sorted(record)}"
        if value is not None:
            assert record[key] == value, f"{key}: {record[key]!r} != {value!r}"


@pytest.mark.xdist_group("notebooks")
def test_papermill_injects_parameters_and_record_comes_back(tmp_path):
    """papermill's own execution path (the one `rpnlab run` uses), on the quickest notebook."""
    path = NOTEBOOK_DIR / "02_box_coding.ipynb"
    record_path = tmp_path / f"{path.stem}.json"
    papermill.execute_notebook(
        str(path), str(tmp_path / path.name), parameters={"smoke": True, "record_path": str(record_path)},
        kernel_name="python3", progress_bar=False, cwd=str(NOTEBOOK_DIR),
    )
    executed = nbformat.read(tmp_path / path.name, as_version=4)
    injected = [c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and "smoke = True" in injected[0].source
    _check_record(path, record_path)


def _prepare_smoke_copy(path: Path, folder: Path, **parameters) -> Path:
    copy = folder / path.name
    papermill.execute_notebook(str(path), str(copy), parameters={"smoke": True, **parameters},
                               prepare_only=True, kernel_name="python3", progress_bar=False)
    return copy


def _nbval(*notebooks: Path) -> subprocess.CompletedProcess:
    folder = notebooks[0].parent
    return subprocess.run(
        [sys.executable, "-m", "pytest", "--nbval-lax", "-p", "no:xdist", "-p", "no:cacheprovider", "-q",
         "--rootdir", str(folder), *map(str, notebooks)],
        check=False, capture_output=True, text=True, cwd=folder, env=_kernel_env(), timeout=300,
    )


@pytest.mark.xdist_group("notebooks")
@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_smoke_run_under_nbval(path, tmp_path):
    """One smoke-sized execution per notebook: nbval checks the guarded outputs, then the record is read."""
    record_path = tmp_path / "record.json"
    copy = _prepare_smoke_copy(path, tmp_path, record_path=str(record_path))
    prepared = nbformat.read(copy, as_version=4)
    assert any("injected-parameters" in c.metadata.get("tags", []) for c in prepared.cells)
    assert any(c.source.startswith(CHECK_MARK) and c.outputs for c in prepared.cells), "committed outputs kept"
    result = _nbval(copy)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "failed" not in result.stdout
    _check_record(path, record_path)


GUARD_NOTEBOOK_CELLS = [
    ("x: int = 2  # a number\nsmoke: bool = False  # tiny sizes", ["parameters"]),
    (f"{CHECK_MARK}\nprint(x * 21)", []),
    ("print('not guarded', smoke)", []),
]


@pytest.mark.xdist_group("notebooks")
def test_nbval_guard_can_fail(tmp_path):
    """The guard works through papermill's injected cell, and an altered output makes it fail."""
    copies = []
    for name, committed in (("committed", "42\n"), ("altered", "43\n")):
        nb = nbformat.v4.new_notebook()
        for source, tags in GUARD_NOTEBOOK_CELLS:
            cell = nbformat.v4.new_code_cell(source)
            cell.metadata["tags"] = tags
            nb.cells.append(cell)
        nb.cells[1].outputs = [nbformat.v4.new_output("stream", name="stdout", text=committed)]
        nb.cells[1].execution_count = 1
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        source = tmp_path / "src" / f"{name}.ipynb"
        source.parent.mkdir(exist_ok=True)
        nbformat.write(nb, source)
        copies.append(_prepare_smoke_copy(source, tmp_path))
    result = _nbval(*copies)
    assert result.returncode != 0
    assert "1 failed" in result.stdout, result.stdout[-3000:]
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1 and "altered.ipynb::Cell 2" in failed[0], failed
    assert "43" in result.stdout and "42" in result.stdout  # the report shows both outputs


# --------------------------------------------------------------------------- runner on real notebooks


@pytest.mark.xdist_group("notebooks")
def test_sweep_anchor_stride(tmp_path):
    result = sweeps.sweep("01", {"anchor_stride": [8, 16]}, out_dir=tmp_path, parallel=2, smoke=True,
                          progress=False)
    assert result.ok, [r["error"] for r in result.rows]
    with result.table_path.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    by_stride = {int(r["anchor_stride"]): r for r in rows}
    assert int(by_stride[8]["num_anchors"]) == 16 * 16 * COURSE_K
    assert int(by_stride[16]["num_anchors"]) == 8 * 8 * COURSE_K
    # Four times the anchors cover the boxes at least as well.
    assert float(by_stride[8]["mean_best_iou"]) >= float(by_stride[16]["mean_best_iou"])
    assert {r["status"] for r in rows} == {"ok"}
    assert result.plot_path is not None and result.plot_path.is_file()
