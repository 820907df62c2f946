"""Reference results anyone can regenerate: notebook 09's tables run end to end, written and read back.

``run_tables`` runs the ablations of ``rpnlab.lab.ablations`` over seeds with the synthetic
presets (read from ``synthetic_model_config`` / ``synthetic_train_config``, never copied);
``summaries`` turns the tidy rows into one row per setting (mean, 95% interval);
``write_results`` writes them as CSV + Markdown with figures and a ``ablations_meta.json``
(machine, device, versions, seeds, wall times); ``read_reference`` reads such a folder back, so
notebook 09 can show a fresh run beside the committed CPU reference (``docs/results/``).
``benchmarks/results.py`` (``make results``) is the command line.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rpnlab.config import DataConfig, ModelConfig, TrainConfig
from rpnlab.lab import ablations as ab

__all__ = ["TABLES", "ablation_configs", "beside_reference", "read_reference", "run_tables", "summaries",
           "write_results"]

# How each table is summarised: the setting's key, its measured metrics, the per-setting keys
# kept beside them (they do not vary with the seed).
TABLES: dict[str, dict[str, Any]] = {
    "anchors": {"by": "setting", "metrics": (*ab.RECALL_KEYS, "map_50"), "pairs": "ar_300",
                "keep": ("k", "coverage_50", "coverage_70", "mean_best_iou", "paper_map")},
    "lambda": {"by": "lambda", "metrics": (*ab.RECALL_KEYS, "box_share", "map_50"), "pairs": "ar_300",
               "keep": ("balance", "paper_balance", "paper_map")},
    "proposals": {"by": "setting", "metrics": ("ar", "recall_50", "recall_70", "mean_proposals", "map_50"),
                  "pairs": "ar",
                  "keep": ("variant", "test_proposals", "paper_map")},
    "recall_iou": {"by": "curve", "metrics": ("recall",), "keep": ("test_proposals", "iou")},
}
DEFAULT_SETTING = "3 scales, 3 ratios"  # the models Table 2's variants and Figure 4 are measured on


def ablation_configs(num_train: int = 400, num_val: int = 150, epochs: int = 2, schedule: str = "rpn",
                     device: str = "auto", out_dir: str = "runs/ablations",
                     data_seed: int = 0) -> tuple[DataConfig, TrainConfig, ModelConfig]:
    """``(data_cfg, train_cfg, base_model_cfg)`` of the ablations: the synthetic presets with
    ``epochs`` epochs of ``num_train`` images, ``schedule`` ``"rpn"`` (RPN alone) or ``"joint"``
    (the detector). The data are fixed by ``data_seed``; each run's seed is set by the seed loop."""
    from rpnlab.detector.model import synthetic_model_config
    from rpnlab.engine.train import synthetic_train_config

    if schedule not in ("rpn", "joint"):
        raise ValueError(f"schedule={schedule!r} is invalid: expected 'rpn' (proposal recall) or 'joint' (mAP too)")
    data_cfg = DataConfig(num_train=num_train, num_val=num_val, seed=data_seed).validate()
    # float32 (amp off), as the committed reference run in docs/results: a fresh run is compared
    # with it setting by setting, and bf16 would be one more difference between the two.
    train_cfg = synthetic_train_config(schedule=schedule, epochs=epochs, device=device, out_dir=str(out_dir),
                                       amp="off")
    return data_cfg, train_cfg, synthetic_model_config()


def run_tables(
    tables: Sequence[str],
    seeds: Sequence[int],
    data_cfg: DataConfig,
    train_cfg: TrainConfig,
    base_model_cfg: ModelConfig,
    lambdas: Sequence[float] = (0.1, 1.0, 3.0, 10.0, 100.0),
    counts: Sequence[int] = (100, 300, 1000),
    figure4_counts: Sequence[int] = (300, 1000, 2000),
    train_dataset=None,
    val_dataset=None,
    progress: Callable[[str, dict], Any] | None = None,
) -> dict[str, Any]:
    """Run the chosen ``tables`` (``"anchors"``, ``"lambda"``, ``"proposals"``, ``"recall_iou"``).

    ``"proposals"`` (Table 2's variants) and ``"recall_iou"`` (Figure 4) are measured on the
    ``DEFAULT_SETTING`` anchor models of every seed, so they need ``"anchors"`` (or train them).
    Returns ``{table: tidy rows (one per seed and setting)}`` plus ``"seconds"`` (wall time per table).
    """
    from rpnlab.data import build_dataset

    unknown = set(tables) - set(TABLES)
    if unknown or not tables:
        raise ValueError(f"tables={list(tables)} must be a non-empty subset of {list(TABLES)}")
    train_dataset = train_dataset if train_dataset is not None else build_dataset(data_cfg, "train")
    val_dataset = val_dataset if val_dataset is not None else build_dataset(data_cfg, "val")
    sizes, ratios = base_model_cfg.anchors.sizes[0], base_model_cfg.anchors.aspect_ratios[0]
    out: dict[str, Any] = {"seconds": {}}

    def note(table):
        return None if progress is None else (lambda row: progress(table, row))

    settings = ab.table8_settings(sizes, ratios)
    if "anchors" not in tables:  # the variants still need the default models
        settings = [s for s in settings if s["setting"] == DEFAULT_SETTING]
    need_models = "proposals" in tables or "recall_iou" in tables
    start = time.perf_counter()
    rows, kept = [], {}
    if "anchors" in tables or need_models:
        rows, kept = ab.anchor_rows(settings, seeds, data_cfg, train_cfg, base_model_cfg, val_dataset, train_dataset,
                                    keep=[DEFAULT_SETTING] if need_models else [], progress=note("anchors"))
    if "anchors" in tables:
        out["anchors"] = rows
        out["seconds"]["anchors"] = time.perf_counter() - start
    if "lambda" in tables:
        start = time.perf_counter()
        out["lambda"] = ab.lambda_rows(lambdas, seeds, data_cfg, train_cfg, base_model_cfg, val_dataset,
                                       train_dataset, progress=note("lambda"))
        out["seconds"]["lambda"] = time.perf_counter() - start
    if need_models:
        start = time.perf_counter()
        detector = train_cfg.schedule != "rpn"
        out["proposals"], out["recall_iou"] = [], []
        for (_, seed), model in kept.items():
            out["proposals"] += [{**r, "seed": seed} for r in
                                 ab.proposal_variants(model, val_dataset, counts, seed=seed, detector=detector)]
            out["recall_iou"] += [{"curve": f"top {r['test_proposals']}, IoU {r['iou']:g}", **r, "seed": seed}
                                  for r in ab.recall_vs_iou(model, val_dataset, figure4_counts)]
        out["seconds"]["proposals+recall_iou"] = time.perf_counter() - start
        for t in ("proposals", "recall_iou"):
            if t not in tables:
                out.pop(t)
    return out


def summaries(results: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """``{table: summarise(rows)}`` for every table in ``results`` (metrics a table lacks are skipped)."""
    out = {}
    for name, spec in TABLES.items():
        rows = results.get(name)
        if not rows:
            continue
        metrics = [m for m in spec["metrics"] if any(m in r for r in rows)]
        out[name] = ab.summarise(rows, spec["by"], metrics, keep=spec["keep"])
    return out


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: " ".join(f"{x:g}" for x in v) if isinstance(v, tuple) else v for k, v in r.items()})


def _parse(value: str) -> Any:
    if value == "":
        return None
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def write_results(results: Mapping[str, Any], out: str | Path, meta: Mapping[str, Any]) -> dict[str, Path]:
    """Write ``results`` (``run_tables``) into folder ``out`` -> ``{name: path}`` of what was written.

    Per table: ``ablations_<table>_runs.csv`` (every seed), ``ablations_<table>.csv`` (mean, std,
    95% interval per setting), a figure ``ablations_<table>.png``; ``ablations.md`` (every table
    as mean ± interval beside the paper, the pairs that differ, the meta data) and
    ``ablations_meta.json``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    summary = summaries(results)
    lines = ["# Ablations: reference results", "",
             "Written by `make results` (`benchmarks/results.py`); regenerate on your machine and compare.", "",
             "| | |", "|---|---|"]
    for k, v in meta.items():
        lines.append(f"| {k} | {json.dumps(v) if isinstance(v, (dict, list)) else v} |")
    for name, rows in summary.items():
        spec = TABLES[name]
        _write_csv(out / f"ablations_{name}_runs.csv", results[name])
        _write_csv(out / f"ablations_{name}.csv", rows)
        written[f"{name}_runs"], written[name] = out / f"ablations_{name}_runs.csv", out / f"ablations_{name}.csv"
        metrics = [m for m in spec["metrics"] if f"{m}_mean" in rows[0]]
        if name == "recall_iou":
            fig = ab.plot_recall_vs_iou(results[name])
        else:
            fig = ab.plot_intervals(rows, spec["by"], [spec["pairs"], "recall_70"],
                                    title=f"{name}: mean ± 95% interval over seeds")
        fig.savefig(out / f"ablations_{name}.png", dpi=100, bbox_inches="tight")
        written[f"{name}_figure"] = out / f"ablations_{name}.png"
        if name == "recall_iou":
            continue
        keep = [k for k in spec["keep"] if k not in ("variant", "test_proposals")]
        lines += ["", f"## {name}", "", ab.summary_markdown(rows, spec["by"], metrics, keep=keep), ""]
        pairs = ab.differing_pairs(rows, spec["by"], spec["pairs"])
        differ = [p for p in pairs if p["differ"]]
        lines.append(f"Pairs whose {spec['pairs']} intervals do not overlap: {len(differ)} of {len(pairs)}.")
        lines += [f"- {p['higher']} > {p['b'] if p['higher'] == p['a'] else p['a']}" for p in differ]
        lines.append(f"\n![{name}](ablations_{name}.png)")
    (out / "ablations.md").write_text("\n".join(lines) + "\n")
    (out / "ablations_meta.json").write_text(json.dumps(dict(meta), indent=1, default=str) + "\n")
    written.update(markdown=out / "ablations.md", meta=out / "ablations_meta.json")
    return written


def read_reference(folder: str | Path) -> dict[str, Any]:
    """Read a ``write_results`` folder -> ``{table: summary rows, "meta": dict}`` (tables it lacks
    are absent; an absent folder gives ``{}``)."""
    folder = Path(folder)
    out: dict[str, Any] = {}
    if not folder.is_dir():
        return out
    for name in TABLES:
        path = folder / f"ablations_{name}.csv"
        if path.is_file():
            with path.open(newline="") as f:
                out[name] = [{k: _parse(v) for k, v in row.items()} for row in csv.DictReader(f)]
    if (folder / "ablations_meta.json").is_file():
        out["meta"] = json.loads((folder / "ablations_meta.json").read_text())
    return out


def beside_reference(fresh: Sequence[Mapping[str, Any]], reference: Sequence[Mapping[str, Any]] | None, by: str,
                     metric: str, paper_key: str | None = "paper_map", digits: int = 3) -> list[dict[str, Any]]:
    """One row per setting of ``fresh``: ``by``, this run's ``metric`` (mean ± interval), the
    reference's (``-`` where it has no such setting), and the paper's number."""
    ref = {str(r[by]): r for r in reference or []}

    def cell(r):
        if r is None or r.get(f"{metric}_mean") is None:
            return "-"
        return ab.format_interval(float(r[f"{metric}_mean"]), float(r[f"{metric}_low"]), float(r[f"{metric}_high"]),
                                  digits)

    rows = []
    for r in fresh:
        other = ref.get(str(r[by]))
        row = {by: r[by], f"{metric} (this run)": cell(r), f"{metric} (reference)": cell(other)}
        if paper_key:
            p = r.get(paper_key)
            row[paper_key] = None if p is None or (isinstance(p, float) and math.isnan(p)) else p
        rows.append(row)
    return rows
