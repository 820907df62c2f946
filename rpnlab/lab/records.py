"""A notebook's key figures as a small JSON record, so runs and sweeps can tabulate them.

In a notebook::

    from rpnlab.lab import records
    records.begin("01_anchors", record_path)     # record_path: the notebook's parameter
    ...
    records.record("coverage_at_0.5", coverage)   # tensors and numpy scalars are converted
    records.save_record()                          # writes the JSON file atomically, prints it

Where the file goes: ``record_path`` when it is not empty (the runner injects a path inside
its run folder), otherwise ``<notebook stem>.json`` in the default record folder: the
``RPNLAB_RECORD_DIR`` environment variable if set, else ``runs/records/`` of the repository
(git-ignored, so an interactive run does not leave files among the notebooks), else the current
working directory when rpnlab is not inside its repository.

Values are stored as JSON: tensors and numpy arrays become numbers or nested lists, tuples
become lists, non-finite floats become ``null`` (strict JSON has no NaN).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "begin",
    "beside_reference",
    "current",
    "default_record_dir",
    "read_record",
    "record",
    "save_record",
    "to_jsonable",
    "write_text_atomic",
]

_REPO_ROOT = Path(__file__).resolve().parents[2]

# One record per kernel: a notebook is one process, so module state is the notebook's state.
_state: dict[str, Any] = {"name": None, "path": None, "values": {}}


def default_record_dir() -> Path:
    """Where records go when the notebook's ``record_path`` is empty (see the module docstring)."""
    env = os.environ.get("RPNLAB_RECORD_DIR")
    if env:
        return Path(env)
    if (_REPO_ROOT / "notebooks").is_dir() and (_REPO_ROOT / "rpnlab").is_dir():
        return _REPO_ROOT / "runs" / "records"
    return Path.cwd()


def begin(name: str, record_path: str | os.PathLike | None = "") -> Path:
    """Start a fresh record for notebook ``name`` (its stem, e.g. ``"01_anchors"``).

    ``record_path`` is the notebook's parameter: empty means the default folder. Returns the path
    the record will be written to. Calling it again (re-running the cell) clears the values.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be the notebook's stem, e.g. '01_anchors', got {name!r}")
    path = Path(record_path) if record_path else default_record_dir() / f"{name}.json"
    _state.update(name=name, path=path, values={})
    return path


def to_jsonable(value: Any) -> Any:
    """``value`` as plain JSON types: tensors, numpy values, tuples, paths, nested containers.

    Raises ``TypeError`` naming the type for anything else, so a record never half-writes.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value) if isinstance(value, (set, frozenset)) else value
        return [to_jsonable(v) for v in items]
    # torch and numpy both offer .tolist(): a scalar tensor / 0-d array gives a Python number.
    if hasattr(value, "tolist") and callable(value.tolist):
        module = type(value).__module__.split(".")[0]
        if module in ("torch", "numpy"):
            if hasattr(value, "detach"):
                value = value.detach().cpu()
            return to_jsonable(value.tolist())
    if hasattr(value, "item") and type(value).__module__.split(".")[0] == "numpy":
        return to_jsonable(value.item())
    raise TypeError(f"record values must be JSON-able (numbers, strings, lists, dicts, tensors); "
                    f"got {type(value).__name__}")


def record(name: str, value: Any) -> Any:
    """Store ``value`` under ``name`` in the current record and return it (converted to JSON types)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    converted = to_jsonable(value)
    _state["values"][name] = converted
    return converted


def current() -> dict[str, Any]:
    """A copy of the values recorded so far."""
    return dict(_state["values"])


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same folder and a rename: a reader
    never sees half a file, and an interrupted write leaves the old file (or none) and no temp."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_record(path: str | os.PathLike | None = None, verbose: bool = True) -> Path:
    """Write the current record as JSON (atomically) and return its path.

    ``path`` overrides the one chosen by :func:`begin`. With ``verbose`` the values are printed,
    one per line, so the notebook's last cell shows what it measured.
    """
    target = Path(path) if path else _state["path"]
    if target is None:
        raise ValueError("no record path: call records.begin(name, record_path) first or pass path=")
    values = _state["values"]
    write_text_atomic(target, json.dumps(values, indent=2, allow_nan=False) + "\n")
    if verbose:
        width = max((len(k) for k in values), default=0)
        for key, value in values.items():
            print(f"{key:<{width}}  {value}")
        print(f"record written to {target}")
    return target


def read_record(path: str | os.PathLike) -> dict[str, Any]:
    """The values of a record file; ``FileNotFoundError`` names the missing path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no record at {path}")
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise TypeError(f"{path} is not a record (expected a JSON object, got {type(data).__name__})")
    return data


def beside_reference(fresh: Mapping[str, Any], reference_path: str | os.PathLike | None,
                     keys: list[str], digits: int = 3) -> list[dict[str, Any]]:
    """Rows ``{"figure", "this run", "reference"}`` for ``keys`` of a notebook's ``fresh`` record
    beside those of a committed reference run (a JSON file with the same keys under ``"record"``,
    e.g. ``docs/results/end_to_end_cpu.json``). An absent or empty ``reference_path``: ``[]``; a
    key either side lacks shows ``-``. Numbers are rounded to ``digits``."""
    if not reference_path or not Path(reference_path).is_file():
        return []
    data = json.loads(Path(reference_path).read_text(encoding="utf-8"))
    if not isinstance(data, Mapping) or not isinstance(data.get("record"), Mapping):
        raise TypeError(f"{str(reference_path)!r} is not a reference run: "
                         "expected a JSON object with a 'record' object")
    reference = data["record"]

    def show(value: Any) -> Any:
        if value is None:
            return "-"
        return round(value, digits) if isinstance(value, float) else value

    return [{"figure": key, "this run": show(fresh.get(key)), "reference": show(reference.get(key))} for key in keys]
