"""The worker process of sweep points: ``python -m rpnlab.lab.point_worker TASK.json WORK_DIR`` (one
point), or ``--serve`` (points one after another: ``TASK.json<TAB>WORK_DIR`` lines on stdin, a
``rpnlab-point-done WORK_DIR`` line on stdout after each).

Started by :class:`rpnlab.lab.executors.WorkerProcess`; executes the task's notebook with
:func:`rpnlab.lab.runner.execute_one` into ``WORK_DIR`` (``notebook.ipynb``, ``record.json``) and
writes ``result.json`` (the row) last, atomically: a worker that dies leaves no result.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

from rpnlab.lab.executors import DONE, _write_json
from rpnlab.lab.runner import execute_one


def main(spec_path: str, work_dir: str) -> int:
    """The worker process: execute the task's notebook into ``work_dir`` and write result.json last."""
    task = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    work = Path(work_dir)
    row = execute_one(task["notebook"], work / "notebook.ipynb", task["parameters"], smoke=task["smoke"],
                      record_path=work / "record.json", kernel_name=task.get("kernel_name", "python3"),
                      cell_timeout=task.get("cell_timeout"), warn_unknown=False,
                      allow_unknown_parameters=task.get("allow_unknown", False))
    row.pop("output", None)
    row.pop("figures", None)
    _write_json(work / "result.json", row)
    return 0


def serve() -> int:
    """Run the points named on stdin until it closes."""
    # Answer on a private copy of stdout and point fd 1 at stderr: the kernels this process starts
    # inherit fd 1, and must neither write into the answers nor hold the pipe open after we die.
    answers = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    for line in sys.stdin:
        if not line.strip():
            continue
        spec, work = line.rstrip("\n").split("\t")
        try:
            main(spec, work)
        except Exception as exc:  # noqa: BLE001  a broken task is this point's failure, not the worker's
            traceback.print_exc()
            task = json.loads(Path(spec).read_text(encoding="utf-8"))
            _write_json(Path(work) / "result.json", {
                "notebook": Path(task["notebook"]).stem, "status": "failed", "seconds": 0.0,
                "parameters": task.get("parameters", {}), "record": {}, "cell_index": None,
                "error_name": type(exc).__name__, "error": f"{type(exc).__name__}: {exc}"})
        answers.write(f"{DONE} {work}\n")
    return 0


if __name__ == "__main__":
    sys.exit(serve() if sys.argv[1:] == ["--serve"] else main(*sys.argv[1:3]))
