"""The process's allocator, tuned for the store path: many buffers of 0.1 MiB to 0.1 GiB made and freed every batch.

glibc serves an allocation above 128 KiB with a fresh mmap and unmaps it on free, so every 0.5 MiB target read,
npy member or batch is written through new pages: the page faults cost 5x the copy itself (on this project's
CPU machine: 1.0 GB/s into fresh memory, 5.8 GB/s into reused memory; bench/README.md). Raising the mmap
and trim thresholds keeps freed buffers in the heap for the next batch, which is what jemalloc or tcmalloc, often
preloaded under PyTorch data loaders, do as well.

The threshold is 1 GiB, not the 32 MiB glibc's dynamic threshold stops at: an extraction's batches on the CPU are
larger (64 views of 224 px in float32 are 38 MiB, their CLIP-L targets in float16 33 MiB, a shard's 67 MiB), and
glibc 2.36 takes it (a float16 conversion of such a batch: 23 ms into fresh pages, 11 ms into reused ones). A
glibc that refuses it gets 32 MiB.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 1 << 30  # blocks up to this come from the heap and are reused after free
MMAP_THRESHOLD_FALLBACK = 32 << 20  # the most older glibc accepts on 64-bit
TRIM_THRESHOLD = 512 << 20  # free heap top the process keeps for reuse


def reuse_freed_memory() -> bool:
    """Keep freed buffers below 1 GiB for reuse (glibc only; FDPIPE_MALLOC=default opts out). True if applied.

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
    mmap = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) or bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_FALLBACK))
    return mmap and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
