"""Overhead per sweep point: in-process papermill vs the local executor vs a Dask cluster.

A trivial notebook (one record) is swept over ``--points`` points each way, one point at a time,
in ``--rounds`` interleaved rounds (in-process, local, dask, in-process, ...), so that load on a
shared machine hits the three alike. The overhead of an executor is its median seconds per point
minus the in-process median (papermill + kernel start are common to all three); a local sweep
includes starting its worker process once. The Dask cluster is a
``LocalCluster(processes=True)`` on loopback: scheduling and serialisation, not a network.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_sweeps.py --points 4 --rounds 3
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
    parser.add_argument("--points", type=int, default=4, help="points per sweep")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of (in-process, local, dask) sweeps")
    args = parser.parse_args()
    from distributed import Client, LocalCluster

    times: dict[str, list[float]] = {"in-process": [], "local": [], "dask": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        nb = _notebook(folder)
        sha = notebook_hash(nb)
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                          dashboard_address=None) as cluster, Client(cluster) as client:
            dask = DaskExecutor(client)
            for r in range(args.rounds):
                tasks = [{"notebook": str(nb), "notebook_sha": sha, "parameters": {"x": i}, "smoke": False,
                          "kernel_name": "python3", "cell_timeout": None, "key": f"r{r}p{i}", "index": i,
                          "point": {}} for i in range(args.points)]
                start = time.perf_counter()
                for i in range(args.points):
                    row = runner.execute_one(nb, folder / f"ip{i}.ipynb", {"x": i}, record_path=folder / f"{i}.json")
                    assert row["status"] == "ok", row
                times["in-process"].append((time.perf_counter() - start) / args.points)
                for name, pool in (("local", LocalExecutor(1)), ("dask", dask)):
                    got = []
                    start = time.perf_counter()
                    pool.run([{**t, "key": f"{name}-{t['key']}"} for t in tasks], lambda t, p: got.append(p))  # noqa: B023
                    times[name].append((time.perf_counter() - start) / args.points)
                    assert all(p["row"]["status"] == "ok" for p in got), got
    base = statistics.median(times["in-process"])
    print(f"{'way':<11} {'median s/point':>15} {'overhead s':>11}  "
          f"({args.rounds} interleaved rounds of {args.points}-point sweeps, one point at a time)")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<11} {med:15.2f} {med - base:11.2f}   rounds: {', '.join(f'{t:.2f}' for t in ts)}")


if __name__ == "__main__":
    main()
