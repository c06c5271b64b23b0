"""Keep the process's peak memory flat while it streams big S3 parts.

minio-py builds each 16 MiB multipart part as a bytes object (plus transient copies) in
several threads. glibc's malloc serves such blocks with mmap at first, but its *dynamic*
threshold then rises above 16 MiB and later parts land in per-thread heap arenas, which
fragment and hold on to freed memory: peak RSS crept from ~120 to ~150 MiB over a 1 GB
backup. Pinning the threshold keeps every large block an mmap that free() returns to the
kernel at once. No library exposes mallopt(), hence ctypes; anything but glibc is left alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util

_M_MMAP_THRESHOLD = -3  # from <malloc.h>
_THRESHOLD_BYTES = 1024 * 1024


def return_large_buffers_to_os() -> bool:
    """Best effort; True when glibc accepted the fixed mmap threshold."""
    with contextlib.suppress(OSError, AttributeError, TypeError):
        name = ctypes.util.find_library("c")
        if name:
            libc = ctypes.CDLL(name)
            return bool(libc.mallopt(_M_MMAP_THRESHOLD, _THRESHOLD_BYTES))
    return False
