"""The relay's C heap: memory a pass freed goes back to the system (glibc), nothing happens elsewhere.

Each case runs in a fresh interpreter, so the heap it measures is its own.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from reconciler.relay import native_heap

GLIBC = native_heap._glibc() is not None

# 200 MB of 100 kB buffers, each followed by a small one that stays: freeing the big ones leaves holes
# below the top of the heap, which free() alone does not give back.
_FRAGMENT = """
import re, sys
from pathlib import Path
from reconciler.relay import native_heap

def rss_mb():
    return int(re.search(r"VmRSS:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024

kept, big = [], []
for n in range(2000):
    big.append(bytearray(100_000))
    kept.append(bytearray(1_000))
before = rss_mb()
del big
freed = rss_mb()
released = native_heap.release_free_memory() if sys.argv[1] == "release" else False
print(before, freed, rss_mb(), released)
"""


def _run(mode: str) -> tuple[float, float, float, str]:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(_FRAGMENT), mode], capture_output=True, text=True,
                         check=True, timeout=120).stdout.split()
    return float(out[0]), float(out[1]), float(out[2]), out[3]


@pytest.mark.skipif(not GLIBC, reason="glibc only: elsewhere release_free_memory does nothing")
def test_memory_freed_below_the_top_of_the_heap_goes_back_only_when_released() -> None:
    before, freed, after, released = _run("release")
    assert before - freed < 50  # free() alone kept the holes
    assert freed - after > 150 and released == "True"  # malloc_trim gave them back
    _, kept_freed, kept_after, _ = _run("keep")
    assert kept_freed - kept_after < 50  # without the call nothing moves


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_arenas_are_limited_on_glibc() -> None:
    assert native_heap.limit_arenas(native_heap.ARENAS) is True


@pytest.mark.skipif(GLIBC, reason="only where the C library is not glibc")
def test_elsewhere_both_do_nothing() -> None:
    assert native_heap.limit_arenas() is False and native_heap.release_free_memory() is False
