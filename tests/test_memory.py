"""Memory accounting from /proc/self/status: its parts, a sampled peak, and why not ru_maxrss."""

import json
import mmap
import subprocess
import sys
import time

import numpy as np
import pytest

from rpnlab.engine.memory import PeakMemory, memory_status, parse_status

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")

STATUS = """Name:\tpython
VmHWM:\t  204800 kB
VmRSS:\t  102400 kB
RssAnon:\t   51200 kB
RssFile:\t   50176 kB
RssShmem:\t    1024 kB
Threads:\t2
"""


def test_parse_status_reads_the_parts_in_mb():
    assert parse_status(STATUS) == {"hwm_mb": 200.0, "rss_mb": 100.0, "anon_mb": 50.0, "file_mb": 49.0,
                                    "shmem_mb": 1.0}
    with pytest.raises(ValueError, match="RssAnon"):
        parse_status(STATUS.replace("RssAnon", "Other"))


def test_the_parts_add_up_and_an_allocation_shows_in_the_anonymous_peak():
    now = memory_status()
    assert abs(now["anon_mb"] + now["file_mb"] + now["shmem_mb"] - now["rss_mb"]) < 1
    with PeakMemory(interval=0.005) as mem:
        # 96 MB of fresh private pages, every one written: a private anonymous mapping of its own,
        # not the heap (np.ones there once reused pages an earlier test in the worker had freed
        # but glibc kept resident, and the anonymous memory did not grow at all)
        block = mmap.mmap(-1, 96 * 2**20, flags=mmap.MAP_PRIVATE)
        pages = np.frombuffer(block, dtype=np.uint8)
        pages[:] = 1
        # Keep it until the sampling thread has read the status once more (on a busy machine it
        # may not run for a while: a fixed 50 ms once missed it in CI), at most 5 s.
        deadline = time.monotonic() + 5.0
        while mem.peak["anon_mb"] - mem.start["anon_mb"] < 80 and time.monotonic() < deadline:
            time.sleep(0.01)
        del pages
        block.close()
    grown = mem.peak["anon_mb"] - mem.start["anon_mb"]
    assert 80 < grown < 200, grown
    assert mem.peak["rss_mb"] >= mem.start["rss_mb"] + 80


def test_a_child_process_reports_its_own_peak_not_its_parents():
    with PeakMemory():
        block = np.ones(200 * 2**20 // 8)  # the parent once held 200 MB more
        code = ("import json, resource; from rpnlab.engine.memory import memory_status; "
                "print(json.dumps([memory_status()['hwm_mb'], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        del block
    hwm, maxrss = json.loads(out)
    assert hwm < memory_status()["hwm_mb"] - 150  # the child's own address space
    assert maxrss > hwm  # ru_maxrss carried the parent's peak over exec
