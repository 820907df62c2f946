"""How much memory this process holds, as Linux counts it: the resident total and its two parts.

``/proc/self/status`` splits the resident set ``VmRSS`` into

* ``RssFile``: pages of mapped files, above all shared libraries. A CUDA build of torch and
  torchvision maps several hundred MB of library code; those pages are shared with every other
  process that maps the same files and the kernel can drop them under pressure (they are read
  back from disk), so they are not memory the program chose to use;
* ``RssAnon``: memory the process itself allocated: the heap, tensors, Python objects, and the
  library pages it wrote to (relocated data). This is the part a program controls;
* ``RssShmem``: shared memory (DataLoader workers hand batches over through it).

``VmHWM`` is the kernel's record of the peak ``VmRSS`` since the process started (or since
``reset_peak``); the anonymous part has no such record, so ``PeakMemory`` samples it.

Why not ``resource.getrusage(...).ru_maxrss``: when a process starts another with fork + exec
(``subprocess``), Linux carries the parent's peak into the child's ``ru_maxrss``, so a child
started by a parent that once held 900 MB reports at least 900 MB whatever it does itself.
``VmHWM`` belongs to the new process's own address space.

Linux only: elsewhere ``memory_status`` raises ``OSError``.
"""

from __future__ import annotations

import threading
from pathlib import Path

__all__ = ["PeakMemory", "memory_status", "parse_status", "reset_peak"]

_FIELDS = {"VmRSS": "rss_mb", "VmHWM": "hwm_mb", "RssAnon": "anon_mb", "RssFile": "file_mb", "RssShmem": "shmem_mb"}
_STATUS = Path("/proc/self/status")


def parse_status(text: str) -> dict[str, float]:
    """The memory lines of a ``/proc/<pid>/status`` text -> MB (MiB): ``rss_mb``, ``hwm_mb``,
    ``anon_mb``, ``file_mb``, ``shmem_mb``. Raises ``ValueError`` naming the first field missing."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in _FIELDS:
            number, *unit = rest.split()
            if unit != ["kB"]:
                raise ValueError(f"/proc status line {line!r}: expected a size in kB")
            values[_FIELDS[key]] = int(number) / 1024
    missing = [key for key, name in _FIELDS.items() if name not in values]
    if missing:
        raise ValueError(f"/proc status text has no {missing[0]} line (Linux >= 4.5 reports it)")
    return values


def memory_status() -> dict[str, float]:
    """This process's memory now, in MB: ``parse_status`` of ``/proc/self/status``."""
    try:
        return parse_status(_STATUS.read_text())
    except FileNotFoundError as exc:
        raise OSError(f"{_STATUS} not found: memory accounting needs Linux") from exc


def reset_peak() -> bool:
    """Restart the kernel's peak (``VmHWM``) from the current resident size; ``False`` when the
    kernel does not allow it (``/proc/self/clear_refs``, Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class PeakMemory:
    """The peak of each part of the resident memory while the ``with`` block runs, in MB.

    A thread reads ``/proc/self/status`` every ``interval`` seconds; ``peak`` holds the highest
    ``rss_mb``, ``anon_mb``, ``file_mb`` and ``shmem_mb`` seen (a spike shorter than ``interval``
    can be missed for the parts; ``rss_mb`` also takes the kernel's exact ``VmHWM`` at the end, which
``reset=True`` restarts at the block's start; with ``reset=False`` it is the peak since the process
began).
    ``start`` holds the values when the block began::

        with PeakMemory() as mem:
            train(...)
        mem.peak["anon_mb"] - mem.start["anon_mb"]   # what training allocated at most
    """

    def __init__(self, interval: float = 0.01, reset: bool = True):
        if not interval > 0:
            raise ValueError(f"interval={interval!r} is invalid: expected seconds > 0")
        self.interval, self.reset = interval, reset
        self.start: dict[str, float] = {}
        self.peak: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        now = memory_status()
        for key in ("rss_mb", "anon_mb", "file_mb", "shmem_mb"):
            self.peak[key] = max(self.peak.get(key, 0.0), now[key])

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self):
        if self.reset:
            reset_peak()
        self.start = memory_status()
        self.peak = {}
        self._sample()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="PeakMemory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        self.peak["rss_mb"] = max(self.peak["rss_mb"], memory_status()["hwm_mb"])
