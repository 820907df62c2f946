"""Regenerate the reference results of notebook 09 (the paper's ablations) on this machine.

    python benchmarks/results.py                 # the full tables, 3 seeds, into docs/results/
    python benchmarks/results.py --quick         # tiny sizes (a minute), into runs/results-quick/
    python benchmarks/results.py --schedule joint --device cuda   # the detector too: mAP per setting

``make results`` runs the first line. Each setting of Table 8 (anchors) and Table 9 (lambda) is
trained over every seed with the synthetic presets (``rpnlab.lab.results.ablation_configs``);
Table 2's test-time variants and Figure 4 are measured on the default anchors' models. Written:
tidy CSVs (every seed, and mean / std / 95% interval per setting), Markdown, figures and
``ablations_meta.json`` (machine, device, versions, seeds, parameters, wall times, load average).
Wall times depend on the machine's load; the tables do not (same seeds, same data, same counts).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from rpnlab.engine.devices import describe_environment, resolve_device
from rpnlab.lab import results

ROOT = Path(__file__).resolve().parents[1]


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the pipeline, not the paper")
    p.add_argument("--out", default=None, help="folder (default docs/results, or runs/results-quick with --quick)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (>= 3 for intervals)")
    p.add_argument("--tables", nargs="+", default=list(results.TABLES), choices=list(results.TABLES))
    p.add_argument("--schedule", default="rpn", choices=["rpn", "joint"],
                   help="rpn: the RPN alone, scored by proposal recall; joint: the detector, mAP too")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (default 2; 1 with --quick)")
    p.add_argument("--num-train", type=int, default=None, help="training images (default 400; 16 with --quick)")
    p.add_argument("--num-val", type=int, default=None, help="validation images (default 150; 8 with --quick)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if len(set(args.seeds)) < 2:
        p.error(f"--seeds {args.seeds}: give at least 2 distinct seeds (3 or more for a useful interval)")
    for name in ("epochs", "num_train", "num_val", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} {value} must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    epochs = args.epochs or (1 if args.quick else 2)
    num_train = args.num_train or (16 if args.quick else 400)
    num_val = args.num_val or (8 if args.quick else 150)
    out = Path(args.out or (ROOT / ("runs/results-quick" if args.quick else "docs/results")))
    device = str(resolve_device(args.device))

    import tempfile

    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    load_start = os.getloadavg()
    start, cpu_start = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory(prefix="rpnlab-results-") as tmp:
        data_cfg, train_cfg, model_cfg = results.ablation_configs(num_train, num_val, epochs, args.schedule, device,
                                                                  tmp)

        def progress(table, row):
            shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
                     if k in ("setting", "seed", "ar_300", "recall_70", "map_50", "train_seconds")}
            print(f"[{time.perf_counter() - start:6.0f} s] {table}: {shown}", flush=True)

        tables = results.run_tables(args.tables, args.seeds, data_cfg, train_cfg, model_cfg, progress=progress)
    env = describe_environment(device)
    meta = {
        "started": started,
        "wall_seconds": round(time.perf_counter() - start, 1),
        # CPU seconds of this process: on a busy machine the wall time grows, this does not.
        "cpu_seconds": round(time.process_time() - cpu_start, 1),
        "seconds_per_table": {k: round(v, 1) for k, v in tables.pop("seconds").items()},
        "load_average_start": [round(v, 2) for v in load_start],
        "load_average_end": [round(v, 2) for v in os.getloadavg()],
        "machine": env["platform"], "cpu": env["device_name"], "cpu_count": env["cpu_count"],
        "torch_threads": torch.get_num_threads(), "device": device,
        "python": env["python"], "torch": env["torch"], "torchvision": env["torchvision"], "git_commit": _git_commit(),
        "seeds": args.seeds, "schedule": args.schedule, "epochs": epochs, "num_train": num_train, "num_val": num_val,
        "batch_size": train_cfg.batch_size, "lr": train_cfg.lr, "quick": args.quick,
        "command": " ".join(["python", "benchmarks/results.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    written = results.write_results(tables, out, meta)
    print(f"wrote {len(written)} files into {out} in {meta['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
