"""A notebook over a parameter grid: shards, a resumable cache of points, tables, seed statistics.

``sweep`` executes one notebook at every point of a cartesian grid (through an executor of
:mod:`rpnlab.lab.executors`) into one folder::

    DIR/sweep.json                        what the sweep is: notebook, its hash, grid, fixed parameters
    DIR/points/<point>-<key>/result.json  a finished point: its row (written last, atomically)
    DIR/points/<point>-<key>/notebook.ipynb, record.json
    DIR/sweep.csv, sweep.png              one row per point; the metrics that vary, plotted
    DIR/sweep_aggregate.csv               with aggregate="seed": mean, std, 95% interval, n per setting
    DIR/shard-I-of-N.csv                  what shard I of N ran (``sweep collect`` merges the shards)

Each point has a content key: the hash of the notebook's cells, the parameters (grid point, fixed
parameters, ``smoke``) and the rpnlab version. A point whose finished, successful result with
that key exists is not run again (``force=True`` reruns it); a failed point is rerun. A point's
outputs enter its folder only once it has finished (``result.json`` last), and a folder without
``result.json`` (the leftovers of an interrupted run) is cleared before the point runs again.

Shards: ``shard=(i, n)`` runs points ``index % n == i - 1`` of the grid (in the grid's order), so
a SLURM array or a Kubernetes Indexed Job can split a sweep with no Dask at all; the shards write
into one shared folder (or several, merged by ``collect``).
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import json
import math
import re
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rpnlab.lab import runner
from rpnlab.lab.executors import DaskExecutor, LocalExecutor, _write_json, notebook_hash
from rpnlab.lab.stats import aggregate_rows

__all__ = ["collect", "notebook_hash", "parse_shard", "point_key", "shard_indices", "sweep", "varying_metrics"]

SPEC = "sweep.json"
# The running package's version (importing the top-level package would cross the house's rooms).
_VERSION = sys.modules["rpnlab"].__version__
_TIMING = re.compile(r"(^|[._])(ms|s|sec|secs|seconds|time|wall|wall_s)$")


# --------------------------------------------------------------------------- keys, shards


def point_key(notebook_sha: str, parameters: Mapping[str, Any], smoke: bool,
              version: str = _VERSION) -> str:
    """The content key of one point: notebook hash + parameters + smoke + package version."""
    text = json.dumps({"notebook": notebook_sha, "parameters": dict(parameters), "smoke": bool(smoke),
                       "version": version}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def parse_shard(text: str | Sequence[int] | None) -> tuple[int, int] | None:
    """``"2/4"`` -> ``(2, 4)`` (the second of four slices); None stays None."""
    if text is None:
        return None
    if isinstance(text, str):
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not m:
            raise ValueError(f"shard must look like I/N (e.g. 1/4), got {text!r}")
        i, n = int(m.group(1)), int(m.group(2))
    else:
        i, n = text
    if not (isinstance(i, int) and isinstance(n, int) and 1 <= i <= n):
        raise ValueError(f"shard {i}/{n}: need 1 <= I <= N")
    return i, n


def shard_indices(count: int, shard: tuple[int, int] | None) -> list[int]:
    """Grid indices of shard ``(i, n)``: every n-th point from the (i-1)-th, so shards stay balanced."""
    if shard is None:
        return list(range(count))
    i, n = shard
    return [k for k in range(count) if k % n == i - 1]


# --------------------------------------------------------------------------- the spec and points


def _point_dir(run_dir: Path, point: Mapping[str, Any], key: str) -> Path:
    return run_dir / "points" / f"{runner._point_name(point)}-{key[:12]}"


def _plan(spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every point of the sweep, in grid order: index, point, parameters, key."""
    points = runner._grid_points(spec["grid"])
    plan = []
    for index, point in enumerate(points):
        params = {**spec["base_parameters"], **point}
        key = point_key(spec["notebook_sha"], params, spec["smoke"], spec["version"])
        plan.append({"index": index, "point": point, "parameters": params, "key": key})
    return plan


def _load_result(point_dir: Path, key: str) -> dict[str, Any] | None:
    """The stored result of a finished point with this key, or None (missing, partial, other key)."""
    path = point_dir / "result.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if data.get("key") == key else None


def _store(point_dir: Path, entry: Mapping[str, Any], payload: Mapping[str, Any]) -> dict[str, Any]:
    point_dir.mkdir(parents=True, exist_ok=True)
    if payload.get("notebook"):
        (point_dir / "notebook.ipynb").write_text(payload["notebook"], encoding="utf-8")
    row = dict(payload["row"])
    if row.get("record"):
        _write_json(point_dir / "record.json", row["record"])
    result = {"key": entry["key"], "index": entry["index"], "point": entry["point"], "row": row}
    _write_json(point_dir / "result.json", result)  # last: its presence means "finished"
    return result


# --------------------------------------------------------------------------- tables and plots


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_timing(name: str) -> bool:
    """Whether a metric name reads as a duration (``explorer_ms``, ``seconds``, ``fit_time``)."""
    return bool(_TIMING.search(name.lower()))


def varying_metrics(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str], timings: bool = False) -> list[str]:
    """The numeric ``metrics`` whose value differs between the successful ``rows`` (constants, such
    as a fixed ``k`` or ``num_gt``, tell nothing on a sweep plot); timings only when asked."""
    ok = [r for r in rows if r.get("status") == "ok"]
    out = []
    for m in metrics:
        values = {r[m] for r in ok if _is_number(r.get(m))}
        if len(values) > 1 and (timings or not is_timing(m)):
            out.append(m)
    return out


def _table_rows(spec: Mapping[str, Any], results: Sequence[Mapping[str, Any]]) -> tuple[list[dict], list[str]]:
    rows, metrics = [], []
    grid = list(spec["grid"])
    for res in results:
        r = res["row"]
        point = res["point"]
        flat = runner._flatten(r.get("record") or {})
        for key in flat:
            if key not in metrics and key not in point:
                metrics.append(key)
        cell = r.get("cell_index")
        error = runner._describe_failure(r) if r["status"] not in ("ok", "missing") else r.get("error", "")
        rows.append({**point, **{k: v for k, v in flat.items() if k not in point}, "status": r["status"],
                     "seconds": r.get("seconds", ""), "attempts": r.get("attempts", ""),
                     "cell": "" if cell is None else cell, "error": error})
    return rows, grid + metrics


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        for row in rows:
            writer.writerow({c: runner._cell(row.get(c)) for c in columns})
    return path


def _plot(rows: Sequence[Mapping[str, Any]], swept: Sequence[str], metrics: Sequence[str], path: Path,
          aggregated: Sequence[Mapping[str, Any]] | None = None, over: str | None = None) -> Path | None:
    """One panel per metric against the first swept parameter, a line per other combination; with
    ``aggregated`` rows (``aggregate_rows``), the mean with its 95% interval as error bars."""
    from matplotlib.figure import Figure

    if not metrics:
        return None
    by = [s for s in swept if s != over]
    x_name, others = (by[0], by[1:]) if by else (None, [])
    source = aggregated if aggregated is not None else [r for r in rows if r["status"] == "ok"]
    cols = min(3, len(metrics))
    fig = Figure(figsize=(4.2 * cols, 3.2 * math.ceil(len(metrics) / cols)), layout="constrained")
    axes = fig.subplots(math.ceil(len(metrics) / cols), cols, squeeze=False).ravel()
    numeric_x = x_name is not None and all(_is_number(r[x_name]) for r in source)
    for ax, metric in zip(axes, metrics):
        y_key = f"{metric}_mean" if aggregated is not None else metric
        groups: dict[tuple, list] = {}
        for r in source:
            if _is_number(r.get(y_key)):
                groups.setdefault(tuple(str(r[o]) for o in others), []).append(r)
        for key, group in groups.items():
            if numeric_x:
                group = sorted(group, key=lambda r: r[x_name])
            xs = [(r[x_name] if numeric_x else str(r[x_name])) if x_name else "all" for r in group]
            ys = [r[y_key] for r in group]
            label = ", ".join(f"{o}={v}" for o, v in zip(others, key)) or None
            if aggregated is not None:
                low = [y - (r.get(f"{metric}_low") if _is_number(r.get(f"{metric}_low")) else y)
                       for y, r in zip(ys, group)]
                high = [(r.get(f"{metric}_high") if _is_number(r.get(f"{metric}_high")) else y) - y
                        for y, r in zip(ys, group)]
                ax.errorbar(xs, ys, yerr=[low, high], marker="o", capsize=3, label=label)
            else:
                ax.plot(xs, ys, marker="o", label=label)
        ax.set_title(metric, fontsize="medium")
        ax.set_xlabel(x_name or "")
        ax.set_ylabel(metric)
        if others and groups:
            ax.legend(fontsize="small")
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    title = f"sweep over {', '.join(swept)}"
    if aggregated is not None:
        title += f"\nmean and 95% interval over {over}"
    fig.suptitle(title)
    fig.savefig(path, dpi=100)
    return path


def _write_tables(run_dir: Path, spec: Mapping[str, Any], results: Sequence[Mapping[str, Any]],
                  aggregate: str | None, plot_timings: bool, name: str = "sweep") -> dict[str, Any]:
    rows, columns = _table_rows(spec, results)
    metrics = [c for c in columns if c not in spec["grid"]]
    table = _write_csv(run_dir / f"{name}.csv", rows, columns + ["status", "seconds", "attempts", "cell", "error"])
    ok_rows = [r for r in rows if r["status"] == "ok"]
    numeric = [m for m in metrics if any(_is_number(r.get(m)) for r in ok_rows)]
    plotted = varying_metrics(rows, numeric, plot_timings)
    aggregated, agg_path = None, None
    if aggregate:
        by = [g for g in spec["grid"] if g != aggregate]
        aggregated = aggregate_rows(ok_rows, by, numeric)
        agg_columns = by + ["n"] + [f"{m}_{f}" for m in numeric for f in ("mean", "std", "low", "high")]
        agg_path = _write_csv(run_dir / f"{name}_aggregate.csv", aggregated, agg_columns)
    plot = _plot(rows, list(spec["grid"]), plotted, run_dir / f"{name}.png", aggregated, aggregate)
    return {"table": table, "plot": plot, "rows": rows, "aggregate": agg_path, "aggregated": aggregated,
            "plotted": plotted}


# --------------------------------------------------------------------------- sweep and collect


def _write_spec(run_dir: Path, spec: Mapping[str, Any]) -> None:
    _write_json(run_dir / SPEC, spec)


def _read_spec(run_dir: Path) -> dict[str, Any]:
    path = run_dir / SPEC
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a sweep folder: no {SPEC} in it")
    return json.loads(path.read_text(encoding="utf-8"))


def _check_aggregate(aggregate: str | None, grid: Mapping[str, Any]) -> None:
    if aggregate is not None and aggregate not in grid:
        raise ValueError(f"aggregate={aggregate!r} is not a swept parameter (swept: {', '.join(grid)}); "
                         f"sweep it, e.g. -p {aggregate} 0 1 2")


def sweep(
    notebook: str | Path,
    grid: Mapping[str, Sequence[Any]],
    out_dir: str | Path | None = None,
    parallel: int = 1,
    base_parameters: Mapping[str, Any] | None = None,
    smoke: bool = False,
    kernel_name: str = "python3",
    cell_timeout: float | None = None,
    progress: bool = True,
    executor: str = "local",
    scheduler: Any = None,
    shard: str | tuple[int, int] | None = None,
    force: bool = False,
    aggregate: str | None = None,
    plot_timings: bool = False,
    allow_unknown_parameters: bool = False,
) -> runner.SweepResult:
    """Execute ``notebook`` once per point of the cartesian ``grid`` and tabulate the records.

    Args:
        notebook: a path, stem or number (``"01"``).
        grid: parameter name -> values, e.g. ``{"anchor_stride": [8, 16], "seed": [0, 1, 2]}``.
        out_dir: default ``runs/sweep-<stem>-<timestamp>``; rerun with the same folder to resume.
        parallel: local worker slots (``executor="local"``), each pinned to a device.
        base_parameters: injected at every point (the grid wins on a clash).
        smoke: set the notebook's ``smoke`` parameter.
        executor: ``"local"`` or ``"dask"`` (then ``scheduler``: ``tcp://HOST:PORT`` or a Client).
        shard: ``"i/n"`` or ``(i, n)``: run only that deterministic slice of the grid.
        force: rerun points whose results are stored.
        aggregate: a swept parameter (usually ``"seed"``) to average over: ``sweep_aggregate.csv``
            gets mean, std, 95% interval and n per setting, and the plot shows the intervals.
        plot_timings: also plot metrics that are durations (left out by default).
        allow_unknown_parameters: a name the notebook does not declare is skipped (with a warning)
            instead of a ``ParameterError`` before anything runs.
    Returns:
        ``SweepResult``: ``sweep.csv`` (or ``shard-I-of-N.csv``) has one row per point: swept
        parameters, flattened record values, status, seconds, attempts, cell, error;
        ``failed`` counts the points that failed.
    """
    from tqdm.auto import tqdm

    path = runner.resolve_notebook(notebook)
    runner._grid_points(grid)  # validates the grid
    grid = {k: list(v) for k, v in grid.items()}
    shard = parse_shard(shard)
    _check_aggregate(aggregate, grid)
    if executor == "local":
        pool: Any = LocalExecutor(parallel)
    elif executor == "dask":
        if scheduler is None:
            raise ValueError("executor='dask' needs scheduler: the cluster's address, e.g. tcp://HOST:8786")
        pool = None  # connected below, once the work is known
    else:
        raise ValueError(f"executor must be 'local' or 'dask', got {executor!r}")
    declared = runner.notebook_parameters(path)
    # Check once here, not once per point: names, and the type of every value of the grid.
    base = dict(base_parameters or {})
    runner.select_parameters(path, {**base, **runner._grid_points(grid)[0]}, smoke, declared,
                             allow_unknown=allow_unknown_parameters)
    problems = [f"{path.stem}: {problem}" for name, values in grid.items() if name in declared
                for v in values for _, problem in [runner.check_parameter_value(name, v, declared[name])] if problem]
    if problems:
        raise runner.ParameterError(problems[0] if len(problems) == 1 else "\n  " + "\n  ".join(problems))
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = runner._fresh_run_dir(out_dir if out_dir is not None else Path("runs") / f"sweep-{path.stem}-{stamp}")
    spec = {"notebook": str(path), "notebook_sha": notebook_hash(path), "grid": grid, "base_parameters": base,
            "smoke": bool(smoke), "version": _VERSION, "aggregate": aggregate}
    _write_spec(run_dir, spec)

    full = _plan(spec)
    plan = [full[k] for k in shard_indices(len(full), shard)]
    results: dict[int, dict[str, Any]] = {}
    tasks = []
    for entry in plan:
        point_dir = _point_dir(run_dir, entry["point"], entry["key"])
        stored = None if force else _load_result(point_dir, entry["key"])
        if stored is not None and stored["row"]["status"] == "ok":
            results[entry["index"]] = stored
            continue
        if point_dir.exists():
            shutil.rmtree(point_dir)  # partial outputs of an interrupted point, or an earlier failure
        tasks.append({"allow_unknown": allow_unknown_parameters,
                      "notebook": str(path), "notebook_sha": spec["notebook_sha"], "parameters": entry["parameters"],
                      "smoke": bool(smoke), "kernel_name": kernel_name, "cell_timeout": cell_timeout,
                      "key": entry["key"], "index": entry["index"], "point": entry["point"]})
    if results:
        runner._log(f"{len(results)} of {len(plan)} points already done in {run_dir}; running {len(tasks)}")

    bar = tqdm(total=len(tasks), desc=f"sweep {path.stem}", disable=not progress or not tasks, file=sys.stderr)

    def on_done(task: Mapping[str, Any], payload: Mapping[str, Any]) -> None:
        entry = next(e for e in plan if e["index"] == task["index"])
        stored = _store(_point_dir(run_dir, entry["point"], entry["key"]), entry, payload)
        results[entry["index"]] = stored
        if stored["row"]["status"] != "ok":
            runner._log(runner._describe_failure(stored["row"]))
        bar.update(1)

    if tasks:
        if pool is None:
            pool = DaskExecutor(scheduler)
        try:
            pool.run(tasks, on_done)
        finally:
            bar.close()
    ordered = [results[e["index"]] for e in plan]
    name = "sweep" if shard is None else f"shard-{shard[0]}-of-{shard[1]}"
    out = _write_tables(run_dir, spec, ordered, aggregate, plot_timings, name)
    failed = sum(r["status"] != "ok" for r in out["rows"])
    return runner.SweepResult(table_path=out["table"], plot_path=out["plot"], rows=out["rows"], ok=failed == 0,
                              out_dir=run_dir, failed=failed, ran=len(tasks), aggregate_path=out["aggregate"],
                              plotted=out["plotted"])


def collect(dirs: str | Path | Sequence[str | Path], out_dir: str | Path | None = None,
            aggregate: str | None = None, plot_timings: bool = False) -> runner.SweepResult:
    """Merge the points that shards stored in ``dirs`` into one ``sweep.csv`` (and plot, aggregate).

    The first folder's ``sweep.json`` says what the sweep is; every point is looked up in each
    folder by its content key; points no shard finished are rows with ``status="missing"``.
    The tables go to ``out_dir`` (default: the first folder). ``aggregate`` defaults to the one
    the sweep was run with.
    """
    dirs = [Path(d) for d in ([dirs] if isinstance(dirs, (str, Path)) else dirs)]
    if not dirs:
        raise ValueError("collect needs at least one sweep folder")
    for d in dirs:
        if not d.is_dir():
            raise FileNotFoundError(f"no sweep folder {d}")
    spec = _read_spec(dirs[0])
    aggregate = aggregate if aggregate is not None else spec.get("aggregate")
    _check_aggregate(aggregate, spec["grid"])
    results = []
    for entry in _plan(spec):
        found = None
        for d in dirs:
            found = _load_result(_point_dir(d, entry["point"], entry["key"]), entry["key"])
            if found is not None:
                break
        if found is None:
            found = {"key": entry["key"], "index": entry["index"], "point": entry["point"],
                     "row": {"notebook": Path(spec["notebook"]).stem, "status": "missing", "record": {},
                             "error": "no shard has finished this point"}}
        results.append(found)
    run_dir = Path(out_dir) if out_dir is not None else dirs[0]
    run_dir.mkdir(parents=True, exist_ok=True)
    if run_dir != dirs[0]:
        _write_spec(run_dir, spec)
    out = _write_tables(run_dir, spec, results, aggregate, plot_timings)
    failed = sum(r["status"] != "ok" for r in out["rows"])
    return runner.SweepResult(table_path=out["table"], plot_path=out["plot"], rows=out["rows"], ok=failed == 0,
                              out_dir=run_dir, failed=failed, ran=0, aggregate_path=out["aggregate"],
                              plotted=out["plotted"])
