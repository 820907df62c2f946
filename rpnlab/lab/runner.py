"""Run the notebook collection, or one notebook over a parameter grid, headlessly with papermill.

``run_collection`` executes ``notebooks/NN_*.ipynb`` in order into one run folder::

    runs/<timestamp>/
        00_setup.ipynb          the executed notebook (outputs included)
        00_setup.json           its record: the key figures it measured (see rpnlab.lab.records)
        figures/00_setup_1.png  every PNG the notebook displayed, in order
        summary.csv, summary.md notebook, status, seconds, key figures

``sweep`` executes one notebook at every point of a cartesian grid and collects one tidy table
(parameters, record values, status, seconds) and a plot of each numeric record value against
the first swept parameter.

Parameters are injected only where the notebook declares them in its ``parameters`` cell
(``papermill.inspect_notebook``); others are skipped with a ``ParameterWarning``, so one
parameter dict can drive a whole collection. A notebook that raises is reported (name, cell,
error) and the run goes on; ``ok`` is False if any failed. Notebooks run with their own folder
as working directory and the ``python3`` kernel.

Longer than 500 lines because running one notebook, the collection and a sweep share parameter
handling, records and summaries.
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rpnlab.lab.records import read_record

__all__ = [
    "ParameterWarning",
    "RunResult",
    "SweepResult",
    "execute_one",
    "list_notebooks",
    "notebook_parameters",
    "notebooks_dir",
    "parse_parameter",
    "resolve_notebook",
    "run_collection",
    "select_parameters",
    "sweep",
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


def select_parameters(
    notebook: str | os.PathLike,
    parameters: Mapping[str, Any] | None,
    smoke: bool = False,
    declared: Mapping[str, Any] | None = None,
    warn: bool = True,
) -> tuple[dict[str, Any], list[str]]:
    """Split ``parameters`` into those ``notebook`` declares and the names it does not.

    ``smoke=True`` adds ``smoke=True`` when the notebook declares ``smoke``. Unknown names are
    returned (and warned about with ``ParameterWarning``) rather than raised: one dict can feed
    a whole collection whose notebooks declare different parameters.
    """
    declared = notebook_parameters(notebook) if declared is None else declared
    params = dict(parameters or {})
    if smoke:
        params["smoke"] = True
    accepted = {k: v for k, v in params.items() if k in declared}
    unknown = sorted(k for k in params if k not in declared and not (k == "smoke" and smoke))
    if unknown and warn:
        warnings.warn(
            f"{Path(notebook).stem}: does not declare parameter(s) {', '.join(unknown)}; not injected",
            ParameterWarning,
            stacklevel=2,
        )
    return accepted, unknown


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
    accepted, unknown = select_parameters(notebook, params, smoke, declared, warn=warn_unknown)
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
) -> RunResult:
    """Execute notebooks in order into one run folder and write ``summary.csv`` / ``summary.md``.

    Args:
        notebooks: paths, stems or numbers (``"01"``); default every ``notebooks/NN_*.ipynb``.
        parameters: injected into each notebook that declares them (others skip them, with a
            ``ParameterWarning``).
        out_dir: the run folder; default ``runs/<timestamp>`` under the current directory.
        smoke: set each notebook's ``smoke`` parameter to True (tiny sizes, as CI runs them).
        progress: a tqdm bar over the notebooks.
        kernel_name: the Jupyter kernel to run them with.
        cell_timeout: seconds a single cell may run (None: no limit).
    Returns:
        ``RunResult(out_dir, rows, ok)``; one row per notebook (see :func:`execute_one`).
    """
    from tqdm.auto import tqdm

    paths = [resolve_notebook(n) for n in notebooks] if notebooks is not None else list_notebooks()
    if not paths:
        raise FileNotFoundError(f"no notebooks to run (looked in {notebooks_dir()})")
    run_dir = _fresh_run_dir(out_dir)
    rows = []
    bar = tqdm(paths, desc="notebooks", unit="nb", disable=not progress, file=sys.stderr)
    for path in bar:
        bar.set_postfix_str(path.stem)
        row = execute_one(
            path,
            run_dir / path.name,
            parameters=parameters,
            smoke=smoke,
            record_path=run_dir / f"{path.stem}.json",
            figures_dir=run_dir / "figures",
            kernel_name=kernel_name,
            cell_timeout=cell_timeout,
        )
        if row["status"] != "ok":
            _log(_describe_failure(row))
        rows.append(row)
    bar.close()
    _write_summary(run_dir, rows)
    return RunResult(out_dir=run_dir, rows=rows, ok=all(r["status"] == "ok" for r in rows))


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


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _plot_sweep(rows: Sequence[Mapping[str, Any]], swept: Sequence[str], metrics: Sequence[str], path: Path) -> Path | None:
    """One panel per numeric metric against the first swept parameter; a line per other combination."""
    from matplotlib.figure import Figure

    if not metrics or not swept:
        return None
    x_name, others = swept[0], list(swept[1:])
    ok_rows = [r for r in rows if r["status"] == "ok"]
    cols = min(3, len(metrics))
    nrows = math.ceil(len(metrics) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * nrows), layout="constrained")
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    numeric_x = all(_is_number(r[x_name]) for r in ok_rows)
    for ax, metric in zip(axes, metrics):
        groups: dict[tuple, list] = {}
        for r in ok_rows:
            if _is_number(r.get(metric)):
                groups.setdefault(tuple(r[o] for o in others), []).append(r)
        for key, group in groups.items():
            xs = [r[x_name] if numeric_x else str(r[x_name]) for r in group]
            ys = [r[metric] for r in group]
            if numeric_x:
                order = sorted(range(len(xs)), key=lambda i: xs[i])
                xs, ys = [xs[i] for i in order], [ys[i] for i in order]
            label = ", ".join(f"{o}={v}" for o, v in zip(others, key)) or None
            ax.plot(xs, ys, marker="o", label=label)
        ax.set_title(metric)
        ax.set_xlabel(x_name)
        ax.set_ylabel(metric)
        if others and groups:
            ax.legend(fontsize="small")
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    fig.suptitle(f"sweep over {', '.join(swept)}")
    fig.savefig(path, dpi=100)
    return path


def sweep(
    notebook: str | os.PathLike,
    grid: Mapping[str, Sequence[Any]],
    out_dir: str | os.PathLike | None = None,
    parallel: int = 1,
    base_parameters: Mapping[str, Any] | None = None,
    smoke: bool = False,
    kernel_name: str = "python3",
    cell_timeout: float | None = None,
    progress: bool = True,
) -> SweepResult:
    """Execute ``notebook`` once per point of the cartesian ``grid`` and tabulate the records.

    Args:
        notebook: a path, stem or number (``"01"``).
        grid: parameter name -> values, e.g. ``{"anchor_stride": [8, 16]}``.
        out_dir: default ``runs/sweep-<stem>-<timestamp>``.
        parallel: how many notebooks run at once (threads; each kernel is its own process).
        base_parameters: injected at every point (the grid wins on a clash).
        smoke: set the notebook's ``smoke`` parameter.
    Returns:
        ``SweepResult(table_path, plot_path, rows, ok)``: ``sweep.csv`` has one row per point,
        columns = swept parameters, flattened record values, ``status``, ``seconds``, ``error``;
        ``sweep.png`` plots each numeric record value against the first swept parameter.
    """
    from tqdm.auto import tqdm

    path = resolve_notebook(notebook)
    points = _grid_points(grid)
    if not isinstance(parallel, int) or parallel < 1:
        raise ValueError(f"parallel must be a positive int, got {parallel!r}")
    declared = notebook_parameters(path)
    # Warn once here, not once per point: an undeclared grid parameter leaves every point alike.
    select_parameters(path, {**dict(base_parameters or {}), **points[0]}, smoke, declared)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = _fresh_run_dir(out_dir if out_dir is not None else Path("runs") / f"sweep-{path.stem}-{stamp}")

    def run_point(index_point: tuple[int, dict[str, Any]]) -> dict[str, Any]:
        index, point = index_point
        name = f"{index:03d}_{_point_name(point)}"
        params = {**dict(base_parameters or {}), **point}
        row = execute_one(path, run_dir / "notebooks" / f"{name}.ipynb", params, smoke=smoke,
                          record_path=run_dir / "records" / f"{name}.json",
                          kernel_name=kernel_name, cell_timeout=cell_timeout, warn_unknown=False)
        return {"point": point, **row}

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        results = list(tqdm(pool.map(run_point, enumerate(points)), total=len(points),
                            desc=f"sweep {path.stem}", disable=not progress, file=sys.stderr))

    rows, metrics = [], []
    for r in results:
        flat = _flatten(r["record"])
        for key in flat:
            if key not in metrics and key not in r["point"]:
                metrics.append(key)
        error = _describe_failure(r) if r["status"] != "ok" else ""
        if error:
            _log(error)
        rows.append({**r["point"], **{k: v for k, v in flat.items() if k not in r["point"]},
                     "status": r["status"], "seconds": r["seconds"], "error": error})
    columns = list(grid) + metrics + ["status", "seconds", "error"]
    table_path = run_dir / "sweep.csv"
    with table_path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: _cell(row.get(c)) for c in columns})
    numeric = [m for m in metrics if any(_is_number(r.get(m)) for r in rows)]
    plot_path = _plot_sweep(rows, list(grid), numeric, run_dir / "sweep.png")
    return SweepResult(table_path=table_path, plot_path=plot_path, rows=rows,
                       ok=all(r["status"] == "ok" for r in rows), out_dir=run_dir)
