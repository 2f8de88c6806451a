"""Keep freed memory in the process instead of handing it back to the kernel after every batch.

glibc's malloc serves large blocks (above a threshold that adapts from 128 KiB up to 32 MiB) with mmap and
unmaps them when they are freed; a forward pass at 224 px allocates activations far larger than that, so
every batch mapped them afresh and page-faulted them in. On the 2-core VM of bench/RESULTS.md that kernel work
was half of a CPU worker's time: 256 particles at 224 px took 8.5 s of user and 8.8 s of system CPU; with
freed memory kept, 8.4 s and 0.3 s, and the model's rate doubled. The cost is memory: a model process at
224 px, batch 32, peaked at 1.6 GiB instead of 1.0 GiB (the heap does not reuse blocks as tightly as fresh
mappings) and keeps it between batches.

Nothing is changed where malloc is not glibc's, or where the user tuned it with glibc's own variables
(`GLIBC_VARIABLES`): setting one, e.g. `MALLOC_TRIM_THRESHOLD_=131072` (glibc's default), opts out.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
KEEP_BYTES = 1 << 30
GLIBC_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")

_applied = False


def retain_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds to 1 GiB for this process (and the processes it forks).
    True when they are set, now or before."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux") or any(name in os.environ for name in GLIBC_VARIABLES):
        return False
    try:
        libc = ctypes.CDLL(None)
        if not hasattr(libc, "gnu_get_libc_version"):
            return False  # musl and others: their mallopt does not take these
        ok = libc.mallopt(M_MMAP_THRESHOLD, KEEP_BYTES) == 1 and libc.mallopt(M_TRIM_THRESHOLD, KEEP_BYTES) == 1
    except (OSError, AttributeError):
        return False
    if ok:
        log.info("malloc keeps freed memory for the next batch (glibc mmap and trim thresholds 1 GiB)")
    _applied = ok
    return ok
