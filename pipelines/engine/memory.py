"""Process-wide memory settings the engine's peak RSS depends on.

glibc gives each thread that contends for malloc its own arena (up to 8 per core), and freed
memory stays in the arena it came from. The engine allocates from its decode threads,
torch's and OpenVINO's threads, so one photo batch's buffers end up spread over several
arenas, each keeping its high-water mark. One arena: peak RSS over 300 real-mix photos 1,223 MB
instead of 1,310 MB, 6.27 s instead of 6.46 s (same run, `/proc` readings in the engine
process; the bench's side-by-side figures are in the README).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_ARENA_MAX = -8  # glibc's mallopt parameter number


def limit_malloc_arenas(arenas: int) -> bool:
    """Cap glibc's malloc arenas for threads created from now on; False where the C library
    is not glibc (musl, macOS), which is left as it is."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_ARENA_MAX, arenas))
    except (OSError, AttributeError):
        return False
