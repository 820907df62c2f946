"""Where a sweep's points run: local worker processes pinned to a device, or a Dask cluster.

A *point* is one execution of a notebook with one parameter set. It is described by a JSON-able
task dict (``notebook``, ``notebook_sha``, ``parameters``, ``smoke``, ``kernel_name``,
``cell_timeout``, ``key``, ``index``, ``point``; ``notebook_text`` for remote workers) and run by
:func:`run_point`, which executes it in a worker process (``python -m rpnlab.lab.point_worker
--serve``, kept by the calling thread for its next point, so papermill is imported once) inside a
scratch folder and returns ``{"row": ..., "notebook": text}``. The caller stores the result; nothing of a point reaches the sweep folder before it has finished, so
an interrupted point leaves no partial result behind.

A point whose worker process dies (killed, out of memory) is retried once in a fresh one; a second loss is
recorded as a failed point (``error_name="WorkerLost"``). A failing notebook is a failed row,
not an exception: the other points go on.

Executors:

- :class:`LocalExecutor` (``--executor local``): ``parallel`` slots on this machine, each running
  its points one after another in worker processes pinned to one device: GPUs round-robin through
  ``CUDA_VISIBLE_DEVICES`` when there are any, and the CPU threads split between the slots
  (``OMP_NUM_THREADS``/``MKL_NUM_THREADS``).
- :class:`DaskExecutor` (``--executor dask --scheduler tcp://HOST:PORT``): each point is a task on
  a Dask distributed cluster (``dask scheduler`` + ``dask worker``, dask-jobqueue on SLURM/PBS,
  dask-kubernetes). Workers advertise GPUs as resources (``dask worker ... --resources GPU=1``
  with ``CUDA_VISIBLE_DEVICES`` set per worker); a point whose ``device`` parameter is CUDA asks
  for ``{"GPU": 1}``. The notebook's text travels with the task, so workers need rpnlab
  installed but no shared file system. A Dask worker lost mid-task is rescheduled by the
  scheduler (its ``allowed-failures``); when Dask gives up the point is recorded as failed.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rpnlab.lab.records import write_text_atomic

__all__ = [
    "DaskExecutor",
    "LocalExecutor",
    "WorkerProcess",
    "close_thread_workers",
    "notebook_hash",
    "point_resources",
    "run_point",
    "slot_environments",
    "visible_gpus",
]

OnDone = Callable[[Mapping[str, Any], Mapping[str, Any]], None]


# --------------------------------------------------------------------------- devices


def visible_gpus() -> list[str]:
    """GPU ids this process may use: ``$CUDA_VISIBLE_DEVICES`` when set, else ``nvidia-smi -L``.

    Does not import torch or initialise CUDA (forked or spawned workers must do that themselves).
    """
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def slot_environments(parallel: int, gpus: Sequence[str] | None = None,
                      cpus: int | None = None) -> list[dict[str, str]]:
    """Environment overrides for each of ``parallel`` local slots: one device per slot.

    With GPUs, slot ``s`` sees only ``gpus[s % len(gpus)]``; the CPU threads are always split
    evenly (at least one per slot) so that the slots' kernels do not fight over the cores.
    """
    gpus = visible_gpus() if gpus is None else list(gpus)
    threads = str(max(1, (cpus or _cpu_count()) // parallel))
    envs = []
    for slot in range(parallel):
        env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "RPNLAB_WORKER_SLOT": str(slot)}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
        envs.append(env)
    return envs


def point_resources(parameters: Mapping[str, Any]) -> dict[str, int]:
    """Dask resources a point asks for: one GPU when its ``device`` parameter names CUDA."""
    device = parameters.get("device")
    return {"GPU": 1} if isinstance(device, str) and device.startswith("cuda") else {}


# --------------------------------------------------------------------------- one point


def notebook_hash(path: str | Path) -> str:
    """sha256 of what a notebook executes: its cells' types and sources (not outputs or metadata)."""
    nb = json.loads(Path(path).read_text(encoding="utf-8"))
    h = hashlib.sha256()
    for cell in nb.get("cells", []):
        source = cell.get("source", "")
        h.update(json.dumps([cell.get("cell_type"), "".join(source) if isinstance(source, list) else source])
                 .encode())
    return h.hexdigest()



def _write_json(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=1, allow_nan=False, default=str) + "\n")


def _notebook_for(task: Mapping[str, Any], work: Path) -> Path:
    """The notebook to execute: the task's path when this machine has that very notebook, else
    its text (sent by a remote client) written into the scratch folder."""
    path = Path(task["notebook"])
    if path.is_file() and notebook_hash(path) == task["notebook_sha"]:
        return path
    text = task.get("notebook_text")
    if not text:
        raise FileNotFoundError(f"notebook {path} is not on this machine ({socket.gethostname()}) "
                                "or differs from the sweep's, and the task carries no copy")
    copy = work / path.name
    copy.write_text(text, encoding="utf-8")
    return copy


class WorkerProcess:
    """A long-lived point worker (``python -m rpnlab.lab.point_worker --serve``) with one device's
    environment: it imports papermill once and then executes points one after another.

    ``run(spec, work)`` is True when the point finished (``work/result.json`` written) and False
    when the process was lost mid-point; the next ``run`` starts a fresh process.
    """

    def __init__(self, env: Mapping[str, str] | None = None):
        self.env = dict(env or {})
        self.proc: subprocess.Popen | None = None
        self._log = None

    def _start(self) -> None:
        if self._log is not None:
            self._log.close()
        self._log = tempfile.TemporaryFile("w+", encoding="utf-8")  # noqa: SIM115  closed in close()
        self.proc = subprocess.Popen([sys.executable, "-m", "rpnlab.lab.point_worker", "--serve"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                     env=_worker_env(self.env), text=True, bufsize=1)

    def run(self, spec: Path, work: Path) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        done = f"{DONE} {work}"
        try:
            self.proc.stdin.write(f"{spec}\t{work}\n")
            self.proc.stdin.flush()
            for line in self.proc.stdout:  # ends (EOF) when the worker dies
                if line.strip() == done:
                    return (work / "result.json").is_file()
        except (BrokenPipeError, OSError):
            pass
        self.proc.kill()
        self.proc.wait()
        return False

    def last_error(self) -> str:
        """The worker's exit status and the last line it wrote to stderr (after a loss)."""
        tail = ""
        if self._log is not None:
            self._log.seek(0)
            lines = [ln for ln in self._log.read().splitlines() if ln.strip()]
            tail = lines[-1][:200] if lines else ""
        code = self.proc.returncode if self.proc is not None else None
        return f"exit status {code}{': ' + tail if tail else ''}"

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()  # the serve loop ends at end of input
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
        self.proc = self._log = None


DONE = "rpnlab-point-done"
_threads = threading.local()


def _thread_worker(env: Mapping[str, str] | None) -> WorkerProcess:
    """This thread's worker process for ``env`` (a Dask worker thread or a local slot keeps one)."""
    workers = _threads.__dict__.setdefault("workers", {})
    key = tuple(sorted(dict(env or {}).items()))
    if key not in workers:
        workers[key] = WorkerProcess(env)
    return workers[key]


def close_thread_workers() -> None:
    """Stop the worker processes this thread started."""
    for worker in _threads.__dict__.pop("workers", {}).values():
        worker.close()


def run_point(task: Mapping[str, Any], env: Mapping[str, str] | None = None,
              attempts: int = 2, worker: WorkerProcess | None = None) -> dict[str, Any]:
    """Execute one point in a worker process (this thread's, kept for the next point, unless
    ``worker`` is given); retry once in a fresh process when the worker is lost.

    Returns ``{"row": execute_one's row + attempts/host, "notebook": executed notebook text}``.
    Never raises for a failing notebook or a lost worker: the row says ``status="failed"``.
    """
    worker = worker if worker is not None else _thread_worker(env)
    work = Path(tempfile.mkdtemp(prefix="rpnlab-point-"))
    try:
        try:
            notebook = _notebook_for(task, work)
        except FileNotFoundError as exc:
            return {"row": _failed_row(task, "FileNotFoundError", str(exc), 0), "notebook": ""}
        spec = work / "task.json"
        _write_json(spec, {k: v for k, v in task.items() if k != "notebook_text"} | {"notebook": str(notebook)})
        losses = []
        for attempt in range(1, attempts + 1):
            for name in ("result.json", "notebook.ipynb", "record.json"):
                (work / name).unlink(missing_ok=True)
            if worker.run(spec, work):
                row = json.loads((work / "result.json").read_text(encoding="utf-8"))
                break
            losses.append(worker.last_error())
        else:
            row = _failed_row(task, "WorkerLost", f"worker process lost {attempts} times ({'; '.join(losses)})",
                              attempts)
        row["attempts"] = attempt
        row["host"] = socket.gethostname()
        executed = work / "notebook.ipynb"
        return {"row": row, "notebook": executed.read_text(encoding="utf-8") if executed.is_file() else ""}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _worker_env(env: Mapping[str, str] | None) -> dict[str, str]:
    """This process's environment + the slot's, with this very rpnlab first on PYTHONPATH, so the
    worker and its kernel run the code that planned the sweep (not another installed copy)."""
    merged = {**os.environ, **dict(env or {})}
    here = str(Path(__file__).resolve().parents[2])
    paths = [p for p in merged.get("PYTHONPATH", "").split(os.pathsep) if p]
    merged["PYTHONPATH"] = os.pathsep.join([here] + [p for p in paths if p != here])
    return merged


def _failed_row(task: Mapping[str, Any], error_name: str, error: str, attempts: int) -> dict[str, Any]:
    return {"notebook": Path(task["notebook"]).stem, "status": "failed", "seconds": 0.0,
            "parameters": dict(task["parameters"]), "record": {}, "cell_index": None,
            "error_name": error_name, "error": f"{error_name}: {error}", "attempts": attempts,
            "host": socket.gethostname()}


# --------------------------------------------------------------------------- executors


class LocalExecutor:
    """``parallel`` slots on this machine, each pinned to a device (see :func:`slot_environments`)."""

    def __init__(self, parallel: int = 1, gpus: Sequence[str] | None = None):
        if not isinstance(parallel, int) or isinstance(parallel, bool) or parallel < 1:
            raise ValueError(f"parallel must be a positive int, got {parallel!r}")
        self.parallel = parallel
        self.envs = slot_environments(parallel, gpus)

    def run(self, tasks: Sequence[Mapping[str, Any]], on_done: OnDone) -> None:
        """Run every task; call ``on_done(task, payload)`` (in this thread) as each finishes."""
        todo: queue.Queue = queue.Queue()
        for task in tasks:
            todo.put(task)
        done: queue.Queue = queue.Queue()
        stop = threading.Event()

        def slot(env: Mapping[str, str]) -> None:
            try:
                while not stop.is_set():
                    try:
                        task = todo.get_nowait()
                    except queue.Empty:
                        return
                    try:
                        done.put((task, run_point(task, env)))
                    except BaseException as exc:  # noqa: BLE001  hand it to the main thread
                        done.put((task, exc))
            finally:
                close_thread_workers()

        threads = [threading.Thread(target=slot, args=(env,), daemon=True)
                   for env in self.envs[:max(1, len(tasks))]]
        for t in threads:
            t.start()
        try:
            for _ in range(len(tasks)):
                task, payload = done.get()
                if isinstance(payload, BaseException):
                    raise payload
                on_done(task, payload)
        finally:
            stop.set()


class DaskExecutor:
    """Each point a task on a Dask distributed cluster at ``scheduler`` (an address or a Client)."""

    def __init__(self, scheduler: Any):
        try:
            from distributed import Client
        except ImportError as exc:  # pragma: no cover - dask is a dependency
            raise ImportError("--executor dask needs dask's distributed package: pip install distributed") from exc
        if isinstance(scheduler, Client):
            self.client, self._own = scheduler, False
        elif isinstance(scheduler, str) and scheduler:
            try:
                self.client = Client(scheduler, timeout="20s")
            except OSError as exc:
                raise ConnectionError(f"--scheduler {scheduler}: no Dask scheduler answers there ({exc})") from exc
            self._own = True
        else:
            raise ValueError(f"scheduler must be a Dask address such as tcp://HOST:8786, got {scheduler!r}")

    def run(self, tasks: Sequence[Mapping[str, Any]], on_done: OnDone) -> None:
        from distributed import as_completed

        futures = {}
        for task in tasks:
            text = Path(task["notebook"]).read_text(encoding="utf-8")
            future = self.client.submit(run_point, {**task, "notebook_text": text},
                                        resources=point_resources(task["parameters"]) or None,
                                        key=f"rpnlab-point-{task['key']}", pure=False)
            futures[future] = task
        try:
            for future in as_completed(list(futures)):
                task = futures[future]
                try:
                    payload = future.result()
                except Exception as exc:  # noqa: BLE001  KilledWorker, a task that could not run
                    payload = {"row": _failed_row(task, type(exc).__name__, str(exc).splitlines()[0] if str(exc)
                                                  else "the Dask task failed", 0), "notebook": ""}
                on_done(task, payload)
        finally:
            for future in futures:
                future.cancel()
            if self._own:
                self.client.close()
