"""Sweeps beyond one machine: executors (local processes, Dask), shards, resume, seed statistics,
contained failures. The notebook is a tiny one the tests write (a kernel, no torch)."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from rpnlab import cli
from rpnlab.lab import executors, runner, sweeps

ROOT = Path(__file__).resolve().parents[1]
PARAMS = (
    'x: int = 1  # the input\n'
    'seed: int = 0  # the seed\n'
    'device: str = "cpu"  # where it would run\n'
    'smoke: bool = False  # tiny sizes\n'
    'record_path: str = ""  # where the record goes'
)
RECORD = (
    "import os, time\n"
    "from rpnlab.lab import records\n"
    "records.begin('sw', record_path)\n"
    "records.record('y', 10 * x + seed)\n"
    "records.record('k', 7)\n"
    "records.record('threads', os.environ.get('OMP_NUM_THREADS'))\n"
    "records.record('fit_ms', 1000 * time.perf_counter() % 1000)\n"
    "records.save_record()"
)
GRID = {"x": [1, 2], "seed": [0, 1]}


def make_notebook(folder: Path, stem: str, *cells: str) -> Path:
    nb = nbformat.v4.new_notebook()
    p = nbformat.v4.new_code_cell(PARAMS)
    p.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell(f"# {stem}"), p] + [nbformat.v4.new_code_cell(c) for c in cells]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = folder / f"{stem}.ipynb"
    nbformat.write(nb, path)
    return path


def read_csv(path: Path, drop: tuple[str, ...] = ("seconds", "fit_ms")) -> list[dict[str, str]]:
    with Path(path).open() as f:
        return [{k: v for k, v in r.items() if k not in drop} for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory):
    """The reference: a 4-point sweep (x by seed) on the local executor, aggregated over seed."""
    root = tmp_path_factory.mktemp("sweeps")
    nb = make_notebook(root, "sw", RECORD)
    result = sweeps.sweep(nb, GRID, out_dir=root / "local", parallel=2, smoke=True, progress=False,
                          aggregate="seed")
    return nb, result


# --------------------------------------------------------------------------- pieces


def test_shards_partition_the_grid_deterministically():
    parts = [sweeps.shard_indices(7, (i, 3)) for i in (1, 2, 3)]
    assert parts == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(i for part in parts for i in part) == list(range(7))
    assert sweeps.parse_shard("2/3") == (2, 3) and sweeps.parse_shard(None) is None
    for bad in ("0/2", "3/2", "1-2", "a/b"):
        with pytest.raises(ValueError, match="shard"):
            sweeps.parse_shard(bad)


def test_point_key_depends_on_notebook_parameters_smoke_version(tmp_path):
    a = make_notebook(tmp_path, "a", "print(1)")
    b = make_notebook(tmp_path, "b", "print(2)")
    ha, hb = executors.notebook_hash(a), executors.notebook_hash(b)
    assert ha != hb
    nb = nbformat.read(a, as_version=4)
    nb.cells[2].outputs = [nbformat.v4.new_output("stream", text="1\n")]
    nbformat.write(nb, a)
    assert executors.notebook_hash(a) == ha  # outputs are not what runs
    key = sweeps.point_key(ha, {"x": 1, "seed": 0}, True, "1.0")
    assert key == sweeps.point_key(ha, {"seed": 0, "x": 1}, True, "1.0")  # order does not matter
    others = [sweeps.point_key(hb, {"x": 1, "seed": 0}, True, "1.0"),
              sweeps.point_key(ha, {"x": 2, "seed": 0}, True, "1.0"),
              sweeps.point_key(ha, {"x": 1, "seed": 0}, False, "1.0"),
              sweeps.point_key(ha, {"x": 1, "seed": 0}, True, "1.1")]
    assert len({key, *others}) == 5


def test_slots_pin_one_device_each():
    envs = executors.slot_environments(3, gpus=["0", "1"], cpus=8)
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0", "1", "0"]
    assert {e["OMP_NUM_THREADS"] for e in envs} == {"2"}
    cpu = executors.slot_environments(4, gpus=[], cpus=2)
    assert all("CUDA_VISIBLE_DEVICES" not in e and e["OMP_NUM_THREADS"] == "1" for e in cpu)
    assert executors.point_resources({"device": "cuda:1"}) == {"GPU": 1}
    assert executors.point_resources({"device": "cpu"}) == {} == executors.point_resources({})


def test_plot_only_metrics_that_vary():
    rows = [{"status": "ok", "ap": 0.5, "k": 7, "num_gt": 3, "nms_ms": 1.0, "seconds": 2.0},
            {"status": "ok", "ap": 0.6, "k": 7, "num_gt": 3, "nms_ms": 2.0, "seconds": 3.0},
            {"status": "failed", "k": 9}]
    names = ["ap", "k", "num_gt", "nms_ms", "seconds"]
    assert sweeps.varying_metrics(rows, names) == ["ap"]
    assert sweeps.varying_metrics(rows, names, timings=True) == ["ap", "nms_ms", "seconds"]
    assert not sweeps.is_timing("slip_tx") and sweeps.is_timing("fit_time")


# --------------------------------------------------------------------------- end to end


@pytest.mark.xdist_group("sweeps")
def test_local_sweep_table_aggregate_and_plot(local_sweep):
    _, result = local_sweep
    assert result.ok and result.failed == 0 and result.ran == 4
    rows = read_csv(result.table_path)
    assert [(int(r["x"]), int(r["seed"]), int(r["y"])) for r in rows] == [(1, 0, 10), (1, 1, 11), (2, 0, 20),
                                                                        (2, 1, 21)]
    assert {r["threads"] for r in rows} == {str(max(1, len(os.sched_getaffinity(0)) // 2))}  # CPU split
    assert {r["attempts"] for r in rows} == {"1"}
    # the plot: y varies; k is a constant, fit_ms a timing
    assert result.plotted == ["y"] and result.plot_path.stat().st_size > 1000
    # seed statistics against a hand computation: two seeds, values v and v + 1
    agg = read_csv(result.aggregate_path, drop=())
    assert [int(a["x"]) for a in agg] == [1, 2] and {a["n"] for a in agg} == {"2"}
    std = math.sqrt(((0.5) ** 2 + (0.5) ** 2) / 1)
    half = 12.706 * std / math.sqrt(2)  # Student t, 1 degree of freedom, 95%
    for a, v in zip(agg, (10, 20)):
        assert float(a["y_mean"]) == pytest.approx(v + 0.5)
        assert float(a["y_std"]) == pytest.approx(std)
        assert float(a["y_low"]) == pytest.approx(v + 0.5 - half)
        assert float(a["y_high"]) == pytest.approx(v + 0.5 + half)
        assert float(a["k_std"]) == 0.0


@pytest.mark.xdist_group("sweeps")
def test_dask_executor_gives_the_local_records(local_sweep, tmp_path):
    distributed = pytest.importorskip("distributed")
    nb, local = local_sweep
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None) as cluster:
        code = cli.main(["sweep", str(nb), "-p", "x", "1", "2", "-p", "seed", "0", "1", "--smoke",
                         "--executor", "dask", "--scheduler", cluster.scheduler_address,
                         "--out", str(tmp_path / "dask"), "--no-progress", "--aggregate", "seed"])
        run = runner.run_collection([nb], parameters={"x": 4}, out_dir=tmp_path / "run", smoke=True,
                                    progress=False, executor="dask", scheduler=cluster.scheduler_address)
    assert run.ok and run.rows[0]["record"]["y"] == 40 and (tmp_path / "run" / "sw.ipynb").is_file()
    assert code == 0
    assert read_csv(tmp_path / "dask" / "sweep.csv", drop=("seconds", "fit_ms", "threads")) == \
        read_csv(local.table_path, drop=("seconds", "fit_ms", "threads"))
    assert read_csv(tmp_path / "dask" / "sweep_aggregate.csv", drop=()) != []
    results = list((tmp_path / "dask" / "points").glob("*/result.json"))
    assert len(results) == 4 and all((p.parent / "notebook.ipynb").is_file() for p in results)


@pytest.mark.xdist_group("sweeps")
def test_shards_collected_equal_the_whole_sweep(local_sweep, tmp_path, capsys):
    nb, local = local_sweep
    base = ["sweep", str(nb), "-p", "x", "1", "2", "-p", "seed", "0", "1", "--smoke", "--no-progress"]
    assert cli.main([*base, "--shard", "1/2", "--out", str(tmp_path / "a")]) == 0
    assert len(read_csv(tmp_path / "a" / "shard-1-of-2.csv")) == 2
    # collecting before shard 2 ran: its points are missing, and the exit status says how many
    assert cli.main(["sweep", "collect", str(tmp_path / "a")]) == 2
    assert [r["status"] for r in read_csv(tmp_path / "a" / "sweep.csv")] == ["ok", "missing", "ok", "missing"]
    assert cli.main([*base, "--shard", "2/2", "--out", str(tmp_path / "b")]) == 0  # another folder
    capsys.readouterr()
    assert cli.main(["sweep", "collect", str(tmp_path / "a"), str(tmp_path / "b"), "--out",
                     str(tmp_path / "all"), "--aggregate", "seed"]) == 0
    assert read_csv(tmp_path / "all" / "sweep.csv", drop=("seconds", "fit_ms", "threads")) == \
        read_csv(local.table_path, drop=("seconds", "fit_ms", "threads"))
    timing = tuple(f"fit_ms_{f}" for f in ("mean", "std", "low", "high"))
    assert read_csv(tmp_path / "all" / "sweep_aggregate.csv", drop=timing) == \
        read_csv(local.aggregate_path, drop=timing)


@pytest.mark.xdist_group("sweeps")
def test_interrupted_sweep_resumes_with_the_missing_points_only(tmp_path):
    marker = tmp_path / "reached"
    nb = make_notebook(tmp_path, "slow", RECORD,
                       f"import pathlib, time\nm = pathlib.Path({str(marker)!r})\n"
                       "if x == 3 and not m.exists():\n    m.touch(); time.sleep(120)")
    out = tmp_path / "sw"
    cmd = [sys.executable, "-m", "rpnlab", "sweep", str(nb), "-p", "x", "1", "2", "3", "4", "--smoke",
           "--out", str(out), "--no-progress"]
    (tmp_path / "scratch").mkdir()  # the killed point's scratch folder stays in here
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path / "scratch")}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert marker.exists(), "the sweep never reached its third point"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the sweep, its worker and its kernel, mid-point
        proc.wait()
    finished = sorted(p.parent.name for p in (out / "points").glob("*/result.json"))
    assert [n.split("-")[0] for n in finished] == ["x=1", "x=2"]
    assert not any((out / "points").glob("x=3-*/result.json"))  # nothing of the killed point
    # what an interruption while storing a point could leave: its files but no result.json
    done = next((out / "points").glob("x=1-*"))
    stamp = (done / "result.json").stat().st_mtime_ns
    key = sweeps.point_key(executors.notebook_hash(nb), {"x": 4}, True)
    partial = out / "points" / f"x=4-{key[:12]}"
    partial.mkdir()
    (partial / "record.json").write_text('{"y": -1}')
    result = sweeps.sweep(nb, {"x": [1, 2, 3, 4]}, out_dir=out, smoke=True, progress=False)
    assert result.ok and result.ran == 2
    assert [int(r["y"]) for r in result.rows] == [10, 20, 30, 40]
    assert (done / "result.json").stat().st_mtime_ns == stamp  # kept, not rerun
    assert json.loads((partial / "record.json").read_text())["y"] == 40  # the partial record was replaced
    forced = sweeps.sweep(nb, {"x": [1, 2, 3, 4]}, out_dir=out, smoke=True, progress=False, force=True,
                          shard="1/4")
    assert forced.ran == 1 and (done / "result.json").stat().st_mtime_ns != stamp


@pytest.mark.xdist_group("sweeps")
def test_failures_are_contained_and_a_lost_worker_is_retried_once(tmp_path, capsys):
    marker = tmp_path / "killed_once"
    nb = make_notebook(tmp_path, "flaky", RECORD,
                       "if x == 2:\n    raise RuntimeError('broken on purpose')",
                       f"import os, pathlib, signal\nm = pathlib.Path({str(marker)!r})\n"
                       "if x == 3 and not m.exists():\n    m.touch(); os.kill(os.getppid(), signal.SIGKILL)",
                       "if x == 4:\n    import os, signal; os.kill(os.getppid(), signal.SIGKILL)")
    code = cli.main(["sweep", str(nb), "-p", "x", "1", "2", "3", "4", "--smoke", "--parallel", "2",
                     "--out", str(tmp_path / "sw"), "--no-progress"])
    assert code == 2  # two of the four failed
    assert "2 of 4 points failed" in capsys.readouterr().err
    rows = {int(r["x"]): r for r in read_csv(tmp_path / "sw" / "sweep.csv")}
    assert rows[1]["status"] == "ok" and rows[1]["attempts"] == "1"
    assert rows[2]["status"] == "failed" and rows[2]["cell"] == "4"  # md, parameters, injected, record, raise
    assert "broken on purpose" in rows[2]["error"] and "cell 4" in rows[2]["error"]
    assert rows[3]["status"] == "ok" and rows[3]["attempts"] == "2" and rows[3]["y"] == "30"  # retried once
    assert rows[4]["status"] == "failed" and rows[4]["attempts"] == "2" and "WorkerLost" in rows[4]["error"]


def test_bad_sweep_options_are_one_clear_error(tmp_path, capsys):
    nb = make_notebook(tmp_path, "sw", RECORD)

    def error(*argv):
        with pytest.raises(SystemExit):
            cli.main(["sweep", str(nb), "-p", "x", "1", "2", *argv])
        return capsys.readouterr().err

    assert "--scheduler" in error("--executor", "dask")
    assert "--shard" in error("--shard", "3/2")
    assert "not a swept parameter" in error("--aggregate", "seed")
    assert "--parallel" in error("--parallel", "0")
    with pytest.raises(SystemExit):
        cli.main(["sweep", "collect", str(tmp_path)])
    assert "not a sweep folder" in capsys.readouterr().err
