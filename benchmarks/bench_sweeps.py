"""Overhead per sweep point: in-process papermill vs the local executor vs a Dask cluster.

A trivial notebook (one record) is executed ``--repeats`` times each way, one point at a time and
interleaved (in-process, local, dask, in-process, ...), so that load on a shared machine hits the
three alike. The overhead of an executor is its median seconds per point minus the in-process
median (papermill + kernel start are common to all three). The Dask cluster is a
``LocalCluster(processes=True)`` on loopback: scheduling and serialisation, not a network.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_sweeps.py --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import nbformat

from rpnlab.lab import runner
from rpnlab.lab.executors import DaskExecutor, LocalExecutor, notebook_hash


def _notebook(folder: Path) -> Path:
    nb = nbformat.v4.new_notebook()
    p = nbformat.v4.new_code_cell('x: int = 1  # input\nrecord_path: str = ""  # record')
    p.metadata["tags"] = ["parameters"]
    nb.cells = [p, nbformat.v4.new_code_cell(
        "from rpnlab.lab import records\nrecords.begin('b', record_path)\nrecords.record('y', x)\n"
        "records.save_record(verbose=False)")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = folder / "00_bench.ipynb"
    nbformat.write(nb, path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="points per way")
    args = parser.parse_args()
    from distributed import Client, LocalCluster

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        nb = _notebook(folder)
        sha = notebook_hash(nb)
        times: dict[str, list[float]] = {"in-process": [], "local": [], "dask": []}
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                          dashboard_address=None) as cluster, Client(cluster) as client:
            local, dask = LocalExecutor(1), DaskExecutor(client)
            for i in range(args.repeats):
                task = {"notebook": str(nb), "notebook_sha": sha, "parameters": {"x": i}, "smoke": False,
                        "kernel_name": "python3", "cell_timeout": None, "key": f"k{i}", "index": i, "point": {}}
                start = time.perf_counter()
                row = runner.execute_one(nb, folder / f"ip{i}.ipynb", {"x": i}, record_path=folder / f"ip{i}.json")
                times["in-process"].append(time.perf_counter() - start)
                assert row["status"] == "ok", row
                for name, pool in (("local", local), ("dask", dask)):
                    got = []
                    start = time.perf_counter()
                    pool.run([{**task, "key": f"{name}{i}"}], lambda t, p: got.append(p))  # noqa: B023
                    times[name].append(time.perf_counter() - start)
                    assert got[0]["row"]["status"] == "ok", got
    base = statistics.median(times["in-process"])
    print(f"{'way':<11} {'median s/point':>15} {'overhead s':>11}  (n={args.repeats} each, interleaved)")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<11} {med:15.2f} {med - base:11.2f}")


if __name__ == "__main__":
    main()
