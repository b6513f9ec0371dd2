"""The process's allocator, tuned for the store path: many buffers of 0.1-30 MiB made and freed every batch.

glibc serves an allocation above 128 KiB with a fresh mmap and unmaps it on free, so every 0.5 MiB target read,
npy member or batch is written through new pages: the page faults cost 5x the copy itself (on this project's
CPU machine: 1.0 GB/s into fresh memory, 5.8 GB/s into reused memory; bench/README.md). Raising the mmap
and trim thresholds keeps freed buffers in the heap for the next batch, which is what jemalloc or tcmalloc, often
preloaded under PyTorch data loaders, do as well.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest on 64-bit; larger buffers (whole shards) are still mapped
TRIM_THRESHOLD = 256 << 20  # free heap top the process keeps for reuse


def reuse_freed_memory() -> bool:
    """Keep freed buffers below 32 MiB for reuse (glibc only; FDPIPE_MALLOC=default opts out). True if applied.

    Called by the `fdpipe` command before anything allocates; DataLoader workers inherit it. A library user can call
    it too, or set MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ in the environment.
    """
    if os.environ.get("FDPIPE_MALLOC", "") == "default":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
