"""The worker process of one sweep point: ``python -m rpnlab.lab.point_worker TASK.json WORK_DIR``.

Started by :func:`rpnlab.lab.executors.run_point`; executes the task's notebook with
:func:`rpnlab.lab.runner.execute_one` into ``WORK_DIR`` (``notebook.ipynb``, ``record.json``) and
writes ``result.json`` (the row) last, atomically: a worker that dies leaves no result.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rpnlab.lab.executors import _write_json
from rpnlab.lab.runner import execute_one


def main(spec_path: str, work_dir: str) -> int:
    """The worker process: execute the task's notebook into ``work_dir`` and write result.json last."""
    task = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    work = Path(work_dir)
    row = execute_one(task["notebook"], work / "notebook.ipynb", task["parameters"], smoke=task["smoke"],
                      record_path=work / "record.json", kernel_name=task.get("kernel_name", "python3"),
                      cell_timeout=task.get("cell_timeout"), warn_unknown=False)
    row.pop("output", None)
    row.pop("figures", None)
    _write_json(work / "result.json", row)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
