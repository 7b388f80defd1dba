"""glibc malloc settings for CPU inference, applied by the bulk-detection actors and the inference
benchmarks (never at import).

PyTorch's CPU tensors come from malloc. glibc serves every block above its mmap threshold (at most
32 MiB) with a fresh mmap and unmaps it on free, so each large activation (an SSDLite batch of 16 has
50 MB ones) is page-faulted in again on every forward pass: an out-of-place ReLU over 52 MB took 40 ms
that way and 5 ms with the memory kept; SSDLite320 batch-16 inference went from 318 to 233 ms, SSD300
from 1476 to 1274 ms (one thread). Keeping freed blocks in the heap is what jemalloc/tcmalloc, often
preloaded for PyTorch on CPU, do too. The cost: the process keeps its peak heap instead of returning it.
Training is left alone: a short SSDLite training run (tests/test_engine.py, data-loader workers) took
65 s with these settings against 51 s without.

Set SSD_MALLOC_TUNING=0 to leave malloc as it is.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

_applied: bool | None = None


def tune_allocator() -> bool:
    """Serve large blocks from the heap and keep freed memory for reuse (glibc on Linux). Idempotent;
    True when the settings are in effect."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("SSD_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # not glibc: musl's mallopt accepts the calls, does nothing
        return False
    # No mmap for large blocks (they come from the heap), and never trim the heap below 2 GiB.
    _applied = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    if not _applied:
        log.debug("mallopt refused the allocator settings; malloc left as it is")
    return _applied
