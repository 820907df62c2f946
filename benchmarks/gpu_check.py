"""One command to check rpnlab on a GPU machine that has CUDA and torch but no internet.

    make wheelhouse     # on a connected machine: python benchmarks/gpu_check.py wheelhouse
    make gpu-check      # on the GPU machine:     python benchmarks/gpu_check.py run

``wheelhouse`` downloads the project's Python dependencies, except torch and torchvision (the GPU
machine has its own CUDA build), into ``wheelhouse/`` with ``pip download``; copy the repository
with that folder to the GPU machine.

``run`` then, each step with its own time limit so that the whole stays within about 8 minutes:

1. installs what is missing from ``wheelhouse/`` (``pip install --no-index --find-links``; never
   torch, never from the internet), skipped when the folder is absent or with ``--no-install``;
2. runs the test suite with ``RPNLAB_TEST_DEVICE=cuda`` (tests taking the ``device`` fixture run
   on the GPU; the notebooks are left to step 4);
3. runs ``benchmarks/bench_ops.py --device cuda --amp --quick``;
4. runs two notebooks smoke-sized with ``device=cuda`` (``rpnlab run``);

and writes one report, ``runs/gpu-check/report.md`` (each step's command, status, time and the tail
of its output), plus the benchmark's CSV/JSON beside it. Without a GPU it says so at the top of the
report, skips the CUDA tests and notebooks, and runs only a two-repeat CPU benchmark, so a dry run
takes about a minute (``--cpu`` runs every step on the CPU instead, for trying the script).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pip carries the same parser
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
# Not downloaded or installed: the GPU machine brings its own CUDA build of these.
PROVIDED = {"torch", "torchvision", "torchaudio"}
NOTEBOOKS = ("04", "06")


def _name(requirement: str) -> str:
    for sep in "<>=!~[; ":
        requirement = requirement.split(sep)[0]
    return requirement.strip().lower()


def requirements(extras: tuple[str, ...] = ("dev",)) -> list[str]:
    """The project's dependencies (and extras) from pyproject.toml, without torch and torchvision."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += project.get("optional-dependencies", {}).get(extra, [])
    return [r for r in reqs if _name(r) not in PROVIDED]


def wheelhouse(dest: Path) -> int:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--dest", str(dest), *requirements()]
    print(" ".join(cmd), flush=True)
    rc = subprocess.call(cmd)
    pulled = sorted(p.name for p in dest.iterdir() if _name(p.name.replace("_", "-").split("-")[0]) in PROVIDED)
    if pulled:
        print(f"note: a dependency pulled {pulled}; delete them, the GPU machine has its own torch")
    return rc


class Report:
    def __init__(self, path: Path):
        self.path, self.lines, self.failed = path, [], []

    def step(self, title: str, cmd: list[str] | None, timeout: int, env: dict | None = None, skip: str = ""):
        print(f"== {title}", flush=True)
        if skip:
            self.lines += [f"## {title}", "", f"SKIPPED: {skip}", ""]
            print(f"   skipped: {skip}", flush=True)
            return
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, check=False, cwd=ROOT, env={**os.environ, **(env or {})}, timeout=timeout,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            status, out = ("ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"), proc.stdout
        except subprocess.TimeoutExpired as e:
            status = f"FAILED (over its {timeout} s limit)"
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        took = time.perf_counter() - start
        if not status.startswith("ok"):
            self.failed.append(title)
        tail = "\n".join(out.strip().splitlines()[-40:])
        self.lines += [f"## {title}", "", f"`{' '.join(cmd)}`", "", f"{status}, {took:.0f} s", "",
                       "```", tail, "```", ""]
        print(f"   {status}, {took:.0f} s", flush=True)

    def write(self, header: list[str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        verdict = "every step passed" if not self.failed else f"failed: {', '.join(self.failed)}"
        self.path.write_text("\n".join([*header, f"Result: {verdict}", "", *self.lines]))
        print(f"report: {self.path} ({verdict})")


def run(args) -> int:
    import torch

    has_gpu = torch.cuda.is_available()
    device = "cuda" if has_gpu else "cpu"
    out = Path(args.out)
    report = Report(out / "report.md")
    gpu = torch.cuda.get_device_name(0) if has_gpu else "none found"
    header = [
        "# rpnlab GPU check", "",
        (
            f"{datetime.now().isoformat(timespec='seconds')}; torch {torch.__version__}, CUDA "
            f"{torch.version.cuda}, GPU: {gpu}"
        ),
        "",
    ]
    if not has_gpu:
        header += ["**No GPU found: nothing below ran on a GPU.** " + (
            "Every step ran on the CPU (--cpu)." if args.cpu else
            "CUDA tests and notebooks skipped; a two-repeat CPU benchmark only."), ""]
        print("no GPU found" + ("; running every step on the CPU (--cpu)" if args.cpu else
                                "; skipping the CUDA steps"), flush=True)
    full = has_gpu or args.cpu
    py = sys.executable

    wheels = Path(args.wheelhouse)
    missing_wheels = not wheels.is_dir()
    report.step(
        "install dependencies from the wheel folder",
        [py, "-m", "pip", "install", "--no-index", "--find-links", str(wheels), *requirements()], 240,
        skip="--no-install" if args.no_install else (f"{wheels}/ not found (make wheelhouse)" if missing_wheels else ""),
    )
    report.step(
        f"test suite on {device}",
        [py, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "--ignore=tests/test_notebooks.py",
         "--ignore=tests/test_jupyterlab.py", *(["-n", "2"] if not has_gpu else [])],
        300, env={"RPNLAB_TEST_DEVICE": device, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"},
        skip="" if full else "no GPU (the CPU suite is `make test`)",
    )
    bench = [py, "benchmarks/bench_ops.py", "--device", device, "--out", str(out), "--markdown",
             str(out / f"bench_ops_{device}.md")]
    bench += ["--amp", "--quick"] if full else ["--quick", "--repeats", "2", "--only", "targets"]
    report.step(f"benchmark tables on {device}", bench, 180, env={"PYTHONPATH": str(ROOT)})
    report.step(
        f"notebooks {', '.join(NOTEBOOKS)} smoke-sized, device={device}",
        [py, "-m", "rpnlab", "run", *NOTEBOOKS, "--smoke", "-p", "device", device, "--out",
         str(out / "notebooks"), "--no-progress"],
        180, env={"PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"},
        skip="" if full else "no GPU",
    )
    table = out / f"bench_ops_{device}.md"
    if table.exists():
        report.lines += ["## benchmark table", "", table.read_text()]
    report.write(header)
    return 1 if report.failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("wheelhouse", help="download the dependencies (not torch) into a folder")
    w.add_argument("--dest", default="wheelhouse")
    r = sub.add_parser("run", help="install from the folder, then tests, benchmark and notebooks on CUDA")
    r.add_argument("--wheelhouse", default="wheelhouse")
    r.add_argument("--no-install", action="store_true", help="skip the install step")
    r.add_argument("--cpu", action="store_true", help="without a GPU, run every step on the CPU anyway")
    r.add_argument("--out", default="runs/gpu-check")
    args = parser.parse_args(argv)
    if args.command == "wheelhouse":
        return wheelhouse(Path(args.dest))
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
