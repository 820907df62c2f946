"""Run the notebook collection, or one notebook over a parameter grid, headlessly with papermill.

``run_collection`` executes ``notebooks/NN_*.ipynb`` in order into one run folder::

    runs/<timestamp>/
        00_setup.ipynb          the executed notebook (outputs included)
        00_setup.json           its record: the key figures it measured (see rpnlab.lab.records)
        figures/00_setup_1.png  every PNG the notebook displayed, in order
        summary.csv, summary.md notebook, status, seconds, key figures

``sweep`` executes one notebook at every point of a cartesian grid and collects one tidy table
(parameters, record values, status, seconds) and a plot; it lives in :mod:`rpnlab.lab.sweeps`
(executors, shards, resume, seed statistics).

Parameters are injected only where the notebook declares them in its ``parameters`` cell
(``papermill.inspect_notebook``). Before anything runs, a name that no notebook of the run declares
is a ``ParameterError`` naming the declared ones and the nearest (``allow_unknown_parameters=True``
skips it with a ``ParameterWarning`` instead), and so is a value of another type than the declared
one; in a collection, a name declared by some notebooks is injected into those only. A notebook that raises is reported (name, cell,
error) and the run goes on; ``ok`` is False if any failed. Notebooks run with their own folder
as working directory and the ``python3`` kernel.

Longer than 500 lines because the notebook parameters' checks (declared names, declared types) and
the collection run that applies them are read together; sweeps live in ``rpnlab.lab.sweeps``.
"""

from __future__ import annotations

import base64
import csv
import datetime as _dt
import itertools
import json
import math
import os
import re
import sys
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rpnlab.lab.records import read_record

__all__ = [
    "ParameterError",
    "ParameterWarning",
    "RunResult",
    "SweepResult",
    "check_collection_parameters",
    "check_parameter_value",
    "execute_one",
    "list_notebooks",
    "notebook_parameters",
    "notebooks_dir",
    "parse_parameter",
    "resolve_notebook",
    "run_collection",
    "select_parameters",
]

_REPO_ROOT = Path(__file__).resolve().parents[2]
_NOTEBOOK_GLOB = "[0-9][0-9]_*.ipynb"


class ParameterWarning(UserWarning):
    """A parameter was passed that a notebook does not declare; it was not injected."""


@dataclass
class RunResult:
    """What ``run_collection`` did: the run folder, one row per notebook, and whether all passed."""

    out_dir: Path
    rows: list[dict[str, Any]]
    ok: bool

    @property
    def summary_csv(self) -> Path:
        return self.out_dir / "summary.csv"

    @property
    def summary_md(self) -> Path:
        return self.out_dir / "summary.md"

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["status"] != "ok"]


@dataclass
class SweepResult:
    """What ``sweep`` did: the tidy CSV, the plot (None when nothing numeric was recorded), rows."""

    table_path: Path
    plot_path: Path | None
    rows: list[dict[str, Any]]
    ok: bool
    out_dir: Path = field(default=None)  # type: ignore[assignment]
    failed: int = 0  # points that failed (or, after ``collect``, that no shard finished)
    ran: int = 0  # points executed by this call (the others were already stored)
    aggregate_path: Path | None = None  # sweep_aggregate.csv, with ``aggregate=``
    plotted: list[str] = field(default_factory=list)  # the metrics drawn (those that vary)


# --------------------------------------------------------------------------- finding notebooks


def notebooks_dir() -> Path:
    """The collection's folder: ``$RPNLAB_NOTEBOOKS`` if set, else the repository's ``notebooks/``."""
    return Path(os.environ.get("RPNLAB_NOTEBOOKS", _REPO_ROOT / "notebooks"))


def list_notebooks(folder: str | os.PathLike | None = None) -> list[Path]:
    """``NN_*.ipynb`` in ``folder`` (default: the collection), in order."""
    folder = Path(folder) if folder is not None else notebooks_dir()
    return sorted(folder.glob(_NOTEBOOK_GLOB))


def resolve_notebook(spec: str | os.PathLike, folder: str | os.PathLike | None = None) -> Path:
    """A notebook from a path, a stem (``"01_anchors"``) or its number (``"01"`` or ``1``)."""
    folder = Path(folder) if folder is not None else notebooks_dir()
    if isinstance(spec, int):
        spec = f"{spec:02d}"
    path = Path(spec)
    if path.suffix == ".ipynb" and path.is_file():
        return path.resolve()
    candidates = [folder / path, folder / f"{spec}.ipynb"]
    for c in candidates:
        if c.suffix == ".ipynb" and c.is_file():
            return c.resolve()
    if re.fullmatch(r"\d{1,2}", str(spec)):
        matches = sorted(folder.glob(f"{int(spec):02d}_*.ipynb"))
        if len(matches) == 1:
            return matches[0].resolve()
    known = ", ".join(p.stem for p in list_notebooks(folder)) or "none"
    raise FileNotFoundError(f"no notebook {spec!r} (as a path or in {folder}); known: {known}")


# --------------------------------------------------------------------------- parameters


def notebook_parameters(notebook: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The parameters a notebook declares: name -> {name, inferred_type_name, default, help}."""
    import papermill

    return papermill.inspect_notebook(str(notebook))


class ParameterError(ValueError):
    """A parameter a notebook does not declare, or a value of the wrong type; raised before any run."""


def _nearest(name: str, names: Iterable[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(names), n=1, cutoff=0.5)
    if not close:  # "stride" for "anchor_stride": a suffix or prefix match is a good guess too
        close = [n for n in names if n.endswith(name) or n.startswith(name)][:1]
    return f"; did you mean {close[0]!r}?" if close else ""


def _literal(text: Any) -> Any:
    import ast

    try:
        return ast.literal_eval(text) if isinstance(text, str) else text
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_parameter_value(name: str, value: Any, info: Mapping[str, Any]) -> tuple[Any, str | None]:
    """``value`` checked against the type a notebook declares for ``name`` (``info``, one entry of
    ``notebook_parameters``): returns ``(value, None)`` (an int is widened to a float where a float
    is declared, a number to text where text is), or ``(value, problem)``.

    Declared ``int``: an int; ``float``: a finite number; ``bool``: true/false; ``str``: text;
    ``list``/``tuple``: a list whose items are of the kind of the default's items (numbers or
    text). Other or undeclared types are not checked.
    """
    kind = str(info.get("inferred_type_name") or "").strip()
    shown = f"{name}={value!r}"
    if kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value, None
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value), None
        return value, f"{shown}: expected an integer (declared int, default {info.get('default')})"
    if kind == "float":
        if _is_real(value) and math.isfinite(value):
            return float(value), None
        return value, f"{shown}: expected a finite number (declared float, default {info.get('default')})"
    if kind == "bool":
        if isinstance(value, bool):
            return value, None
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true", None
        return value, f"{shown}: expected true or false (declared bool)"
    if kind == "str":
        if isinstance(value, str):
            return value, None
        if _is_real(value):  # -p device 0: the CLI read the text as JSON
            return str(value), None
        return value, f"{shown}: expected text (declared str, default {info.get('default')})"
    if kind.startswith(("list", "tuple", "List", "Tuple")):
        if not isinstance(value, (list, tuple)):
            hint = f"; write [{value}] for a list of one" if _is_real(value) else ""
            return value, f"{shown}: expected a list (declared {kind}, default {info.get('default')}){hint}"
        default = _literal(info.get("default"))
        if isinstance(default, (list, tuple)) and default:
            if all(_is_real(v) for v in default):
                bad = [v for v in value if not (_is_real(v) and math.isfinite(v))]
                if bad:
                    return value, f"{shown}: expected a list of finite numbers (as the default {list(default)}), got {bad[0]!r} in it"
            elif all(isinstance(v, str) for v in default):
                bad = [v for v in value if not isinstance(v, str)]
                if bad:
                    return value, f"{shown}: expected a list of text items (as the default {list(default)}), got {bad[0]!r} in it"
        return list(value), None
    return value, None


def select_parameters(
    notebook: str | os.PathLike,
    parameters: Mapping[str, Any] | None,
    smoke: bool = False,
    declared: Mapping[str, Any] | None = None,
    warn: bool = True,
    allow_unknown: bool = False,
) -> tuple[dict[str, Any], list[str]]:
    """Split ``parameters`` into those ``notebook`` declares (type-checked) and the names it does not.

    Raises ``ParameterError`` listing every problem at once: a name the notebook does not declare
    (with the declared names and the nearest one), unless ``allow_unknown=True``, in which case
    unknown names are returned and warned about (``ParameterWarning``, when ``warn``); and a value
    whose type differs from the declared one (``check_parameter_value``). ``smoke=True`` adds
    ``smoke=True`` when the notebook declares ``smoke``.
    """
    declared = notebook_parameters(notebook) if declared is None else declared
    params = dict(parameters or {})
    if smoke:
        params["smoke"] = True
    stem = Path(notebook).stem
    unknown = sorted(k for k in params if k not in declared and not (k == "smoke" and smoke))
    problems = []
    if unknown and not allow_unknown:
        names = ", ".join(declared) or "none"
        for k in unknown:
            problems.append(f"{stem} does not declare parameter {k!r}{_nearest(k, declared)} (declared: {names})")
    accepted = {}
    for k, v in params.items():
        if k in declared:
            accepted[k], problem = check_parameter_value(k, v, declared[k])
            if problem:
                problems.append(f"{stem}: {problem}")
    if problems:
        raise ParameterError("; ".join(problems) if len(problems) == 1 else "\n  " + "\n  ".join(problems))
    if unknown and warn:
        warnings.warn(
            f"{stem}: does not declare parameter(s) {', '.join(unknown)}; not injected",
            ParameterWarning,
            stacklevel=2,
        )
    return accepted, unknown


def check_collection_parameters(
    notebooks: Sequence[str | os.PathLike],
    parameters: Mapping[str, Any] | None,
    smoke: bool = False,
    allow_unknown: bool = False,
) -> dict[str, dict[str, Any]]:
    """Check ``parameters`` for a run of several ``notebooks`` before any runs.

    A name counts as known when at least one of the notebooks declares it (it is injected only
    where declared); a name none declares is an error unless ``allow_unknown``. Each declared
    value is type-checked for every notebook that declares it. Raises ``ParameterError`` listing
    every problem; returns ``{stem: declared parameters}``.
    """
    declared = {Path(n).stem: notebook_parameters(n) for n in notebooks}
    params = dict(parameters or {})
    everywhere = set().union(*declared.values()) if declared else set()
    problems = []
    if not allow_unknown:
        names = sorted(everywhere)
        where = next(iter(declared)) if len(declared) == 1 else f"none of the {len(declared)} notebooks"
        for k in params:
            if k not in everywhere:
                problems.append(f"{where} declares parameter {k!r}{_nearest(k, names)} (declared: {', '.join(names) or 'none'})"
                                if len(declared) > 1 else
                                f"{where} does not declare parameter {k!r}{_nearest(k, names)} (declared: {', '.join(names) or 'none'})")
    unknown = sorted(k for k in params if k not in everywhere)
    if unknown and allow_unknown:
        warnings.warn(f"no notebook of the run declares parameter(s) {', '.join(unknown)}; not injected",
                      ParameterWarning, stacklevel=2)
    for stem, decl in declared.items():
        for k, v in params.items():
            if k in decl:
                _, problem = check_parameter_value(k, v, decl[k])
                if problem and f": {problem}" not in "".join(problems):
                    problems.append(f"{stem}: {problem}")
    if problems:
        raise ParameterError(problems[0] if len(problems) == 1 else "\n  " + "\n  ".join(problems))
    return declared


def parse_parameter(text: str) -> tuple[str, Any]:
    """``"name=value"`` -> ``(name, value)`` with the value read as YAML (as papermill's ``-y``).

    ``"stride=8"`` -> ``("stride", 8)``, ``"sizes=[32, 64]"`` -> a list, ``"device=cpu"`` -> a string.
    """
    import yaml

    name, sep, value = text.partition("=")
    if not sep or not name.strip().isidentifier():
        raise ValueError(f"parameter must look like name=value, got {text!r}")
    return name.strip(), yaml.safe_load(value) if value.strip() else ""


# --------------------------------------------------------------------------- executing


def _save_figures(executed_nb: Path, figures_dir: Path, prefix: str) -> list[Path]:
    """Write every ``image/png`` output of ``executed_nb`` to ``figures_dir/<prefix>_<n>.png``."""
    import nbformat

    if not executed_nb.is_file():
        return []
    nb = nbformat.read(executed_nb, as_version=4)
    saved = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            png = output.get("data", {}).get("image/png")
            if not png:
                continue
            figures_dir.mkdir(parents=True, exist_ok=True)
            path = figures_dir / f"{prefix}_{len(saved) + 1}.png"
            path.write_bytes(base64.b64decode(png))
            saved.append(path)
    return saved


def execute_one(
    notebook: str | os.PathLike,
    output_path: str | os.PathLike,
    parameters: Mapping[str, Any] | None = None,
    smoke: bool = False,
    record_path: str | os.PathLike | None = None,
    figures_dir: str | os.PathLike | None = None,
    kernel_name: str = "python3",
    cell_timeout: float | None = None,
    warn_unknown: bool = True,
    allow_unknown_parameters: bool = False,
) -> dict[str, Any]:
    """Execute one notebook with papermill; never raises for a failing notebook.

    Returns a row: ``notebook`` (stem), ``status`` ("ok" or "failed"), ``seconds``, ``output``,
    ``record`` (dict, empty if none was written), ``figures`` (paths), ``skipped_parameters``,
    and for a failure ``cell_index``, ``error_name``, ``error`` (a one-line message).
    """
    import papermill
    from papermill.exceptions import PapermillExecutionError

    notebook = Path(notebook).resolve()
    output_path = Path(output_path).resolve()
    output_path.parent.mkdir(parents=True, exist_ok=True)
    declared = notebook_parameters(notebook)
    params = dict(parameters or {})
    if record_path is not None and "record_path" in declared:
        params["record_path"] = str(Path(record_path).resolve())
    accepted, unknown = select_parameters(notebook, params, smoke, declared, warn=warn_unknown,
                                          allow_unknown=allow_unknown_parameters)
    if record_path is not None and Path(record_path).exists():
        Path(record_path).unlink()  # a stale record from an earlier run must not look like this one's

    row: dict[str, Any] = {
        "notebook": notebook.stem,
        "status": "ok",
        "seconds": 0.0,
        "output": str(output_path),
        "parameters": accepted,
        "skipped_parameters": unknown,
        "record": {},
        "figures": [],
        "cell_index": None,
        "error_name": "",
        "error": "",
    }
    engine_kwargs: dict[str, Any] = {"execution_timeout": cell_timeout} if cell_timeout else {}
    if os.name == "posix":  # local sockets: no "Kernel is running over TCP without encryption"
        engine_kwargs["kernel_manager_class"] = _ipc_kernel_manager()
    start = time.perf_counter()
    try:
        papermill.execute_notebook(
            str(notebook),
            str(output_path),
            parameters=accepted,
            kernel_name=kernel_name,
            progress_bar=False,
            cwd=str(notebook.parent),
            **engine_kwargs,
        )
    except PapermillExecutionError as exc:
        row.update(status="failed", cell_index=exc.cell_index, error_name=exc.ename,
                   error=f"{exc.ename}: {exc.evalue}".strip())
    except Exception as exc:  # noqa: BLE001  a dead kernel, a timeout, no kernel: report, go on
        row.update(status="failed", error_name=type(exc).__name__,
                   error=f"{type(exc).__name__}: {exc}".strip().splitlines()[0])
    row["seconds"] = round(time.perf_counter() - start, 3)
    _trust(output_path)
    if record_path is not None and Path(record_path).is_file():
        row["record"] = read_record(record_path)
    if figures_dir is not None:
        row["figures"] = [str(p) for p in _save_figures(output_path, Path(figures_dir), notebook.stem)]
    return row


def _ipc_kernel_manager():
    """A kernel manager that talks to the kernel over IPC (Unix sockets in the runtime folder)
    instead of TCP on loopback: the kernel then has no reason to warn about unencrypted TCP.
    Each kernel gets its own socket prefix, so kernels started at once (a parallel sweep) never
    pick the same socket files."""
    import uuid

    from jupyter_client.manager import AsyncKernelManager
    from jupyter_core.paths import jupyter_runtime_dir
    from traitlets import default

    class IPCKernelManager(AsyncKernelManager):
        @default("transport")
        def _default_transport(self):
            return "ipc"

        @default("ip")
        def _default_ip(self):
            folder = Path(jupyter_runtime_dir())
            folder.mkdir(parents=True, exist_ok=True)
            return str(folder / f"rpnlab-{uuid.uuid4().hex[:12]}")

    return IPCKernelManager


def _trust(executed_nb: Path) -> None:
    """Sign the executed notebook as trusted (what ``jupyter trust`` does), so JupyterLab renders
    its stored widgets when it is reopened instead of their text fallback ("VBox(children=...")."""
    import nbformat
    from nbformat.sign import NotebookNotary

    if not executed_nb.is_file():
        return
    try:
        NotebookNotary().sign(nbformat.read(executed_nb, as_version=4))
    except Exception as exc:  # noqa: BLE001  no writable signature store: the run itself still counts
        warnings.warn(f"could not mark {executed_nb.name} as trusted: {exc}", stacklevel=2)


def _describe_failure(row: Mapping[str, Any]) -> str:
    where = f"cell {row['cell_index']}" if row.get("cell_index") is not None else "setup"
    return f"{row['notebook']} failed at {where}: {row['error']}"


# --------------------------------------------------------------------------- tables


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> ``{"a.b": v}``; lists stay as they are (JSON text in a CSV cell)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _cell(value: Any) -> Any:
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return "" if value is None else value


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return json.dumps(value) if len(json.dumps(value)) <= 40 else f"[{len(value)} values]"
    return str(value)


def _key_figures(record: Mapping[str, Any]) -> str:
    return "; ".join(f"{k}={_short(v)}" for k, v in _flatten(record).items())


def _write_summary(out_dir: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    header = ["notebook", "status", "seconds", "error", "key_figures"]
    with (out_dir / "summary.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for r in rows:
            error = _describe_failure(r) if r["status"] != "ok" else ""
            writer.writerow([r["notebook"], r["status"], r["seconds"], error, _key_figures(r["record"])])
    lines = [
        "| notebook | status | seconds | key figures |",
        "| --- | --- | ---: | --- |",
    ]
    for r in rows:
        figures = _key_figures(r["record"]).replace("|", "\\|")
        status = r["status"] if r["status"] == "ok" else f"**{r['status']}**: {_describe_failure(r)}"
        lines.append(f"| {r['notebook']} | {status} | {r['seconds']:.1f} | {figures} |")
    (out_dir / "summary.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _fresh_run_dir(out_dir: str | os.PathLike | None, base: str = "runs") -> Path:
    if out_dir is not None:
        path = Path(out_dir)
    else:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = Path(base) / stamp
        n = 1
        while path.exists():  # two runs in the same second get different folders
            n += 1
            path = Path(base) / f"{stamp}-{n}"
    path = path.resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _log(message: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(message, file=sys.stderr)


# --------------------------------------------------------------------------- the collection


def run_collection(
    notebooks: Iterable[str | os.PathLike] | None = None,
    parameters: Mapping[str, Any] | None = None,
    out_dir: str | os.PathLike | None = None,
    smoke: bool = False,
    progress: bool = True,
    kernel_name: str = "python3",
    cell_timeout: float | None = None,
    executor: str = "local",
    scheduler: Any = None,
    parallel: int = 1,
    allow_unknown_parameters: bool = False,
) -> RunResult:
    """Execute notebooks into one run folder and write ``summary.csv`` / ``summary.md``.

    Args:
        notebooks: paths, stems or numbers (``"01"``); default every ``notebooks/NN_*.ipynb``.
        parameters: injected into each notebook that declares them; a name no notebook declares,
            or a value of the wrong type, raises ``ParameterError`` before anything runs.
        out_dir: the run folder; default ``runs/<timestamp>`` under the current directory.
        smoke: set each notebook's ``smoke`` parameter to True (tiny sizes, as CI runs them).
        progress: a tqdm bar over the notebooks.
        kernel_name: the Jupyter kernel to run them with.
        cell_timeout: seconds a single cell may run (None: no limit).
        executor: ``"local"``: worker processes on this machine, ``parallel`` at once, each pinned
            to a device (with 1, the notebooks run one after another, in order); ``"dask"``: each
            notebook a task on the Dask cluster at ``scheduler`` (they may then run at once:
            use it for notebooks that do not need each other's outputs).
        allow_unknown_parameters: skip names no notebook declares (with a warning) instead.
    Returns:
        ``RunResult(out_dir, rows, ok)``; one row per notebook, in order (see :func:`execute_one`;
        plus ``attempts`` and ``host``).
    """
    from tqdm.auto import tqdm

    from rpnlab.lab.executors import DaskExecutor, LocalExecutor, notebook_hash

    paths = [resolve_notebook(n) for n in notebooks] if notebooks is not None else list_notebooks()
    if not paths:
        raise FileNotFoundError(f"no notebooks to run (looked in {notebooks_dir()})")
    if executor == "local":
        pool: Any = LocalExecutor(parallel)
    elif executor == "dask":
        if scheduler is None:
            raise ValueError("executor='dask' needs scheduler: the cluster's address, e.g. tcp://HOST:8786")
        pool = None
    else:
        raise ValueError(f"executor must be 'local' or 'dask', got {executor!r}")
    # Checked once for the collection: a name any of its notebooks declares is known.
    check_collection_parameters(paths, parameters, smoke, allow_unknown=allow_unknown_parameters)
    tasks = []
    for index, path in enumerate(paths):
        tasks.append({"allow_unknown": True, "notebook": str(path), "notebook_sha": notebook_hash(path),
                      "parameters": dict(parameters or {}), "smoke": bool(smoke), "kernel_name": kernel_name,
                      "cell_timeout": cell_timeout, "key": f"{index:02d}-{path.stem}", "index": index,
                      "point": {}})
    run_dir = _fresh_run_dir(out_dir)
    rows: dict[int, dict[str, Any]] = {}
    bar = tqdm(total=len(paths), desc="notebooks", unit="nb", disable=not progress, file=sys.stderr)

    def on_done(task: Mapping[str, Any], payload: Mapping[str, Any]) -> None:
        stem = Path(task["notebook"]).stem
        row = dict(payload["row"])
        output = run_dir / f"{stem}.ipynb"
        if payload.get("notebook"):
            output.write_text(payload["notebook"], encoding="utf-8")
        if row.get("record"):
            (run_dir / f"{stem}.json").write_text(json.dumps(row["record"], indent=2) + "\n", encoding="utf-8")
        row["output"] = str(output)
        row["figures"] = [str(p) for p in _save_figures(output, run_dir / "figures", stem)]
        if row["status"] != "ok":
            _log(_describe_failure(row))
        rows[task["index"]] = row
        bar.set_postfix_str(stem)
        bar.update(1)

    try:
        (pool or DaskExecutor(scheduler)).run(tasks, on_done)
    finally:
        bar.close()
    ordered = [rows[i] for i in sorted(rows)]
    _write_summary(run_dir, ordered)
    return RunResult(out_dir=run_dir, rows=ordered, ok=all(r["status"] == "ok" for r in ordered))


# --------------------------------------------------------------------------- sweeps


def _point_name(point: Mapping[str, Any]) -> str:
    text = "__".join(f"{k}={v}" for k, v in point.items())
    return re.sub(r"[^A-Za-z0-9_.=-]+", "-", text)[:150] or "default"


def _grid_points(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    if not isinstance(grid, Mapping):
        raise TypeError(f"grid must be a dict name -> list of values, got {type(grid).__name__}")
    for name, values in grid.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
            raise ValueError(f"grid[{name!r}] must be a non-empty list of values, got {values!r}")
    names = list(grid)
    return [dict(zip(names, combo)) for combo in itertools.product(*(grid[n] for n in names))]

