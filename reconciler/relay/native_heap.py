"""The relay's C heap: fewer malloc arenas, and freed memory handed back to the system after a pass.

A full pass at 50,000 clients allocates and frees a few hundred MB. Python
gives small objects back to its own pools, but everything larger (dict
tables, lists, rendered files) comes from the C library's ``malloc``, and
glibc keeps what is freed inside the process: in one arena per thread that
allocates (up to eight per core), and at the top of each heap until
``malloc_trim`` is called. The relay's resident size then stays near its
largest pass, and the serving threads' arenas add their own share.

So a relay process limits glibc to :data:`ARENAS` arenas before it starts
its threads (``mallopt(M_ARENA_MAX)``), and returns free pages after each
full pass (``malloc_trim(0)``; ctypes releases the GIL for the call, so
check-ins are not held up). Measured in ``benchmarks/RESULTS.md``. On any
other C library (musl, macOS, Windows) both do nothing.
"""

from __future__ import annotations

import ctypes
import sys
from functools import cache

ARENAS = 2  # arenas glibc may use: the relay's threads mostly wait for the GIL, not for malloc
_M_ARENA_MAX = -8  # glibc's mallopt parameter number


@cache
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)  # the C library the interpreter runs on
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None
    return libc


def limit_arenas(arenas: int = ARENAS) -> bool:
    """Let glibc use at most ``arenas`` malloc arenas; call before starting threads. False: not glibc."""
    libc = _glibc()
    return libc is not None and libc.mallopt(_M_ARENA_MAX, arenas) == 1


def release_free_memory() -> bool:
    """Hand memory glibc holds free back to the system; True if some was. False also off glibc."""
    libc = _glibc()
    return libc is not None and libc.malloc_trim(0) == 1
