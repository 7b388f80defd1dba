"""The malloc settings: large tensors come from the heap (no per-block mmap) once tuned, and not before."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = r"""
import ctypes, json, sys
import torch
from ssd_core.allocator import tune_allocator

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
tuned = tune_allocator() if sys.argv[1] == "tune" else False
before = libc.mallinfo2().hblks  # blocks mapped so far (some at import, before any tuning)
big = torch.empty(64 * 2**20, dtype=torch.uint8)  # 64 MiB: above glibc's largest mmap threshold
mapped = libc.mallinfo2().hblks - before
del big
print(json.dumps({"tuned": tuned, "mapped_blocks": mapped, "again": tune_allocator()}))
"""


def _probe(mode: str, **env: str) -> dict:
    result = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                            env={**os.environ, **env}, timeout=120)
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings are Linux-only")
def test_tuned_allocator_serves_large_tensors_from_the_heap():
    plain = _probe("plain")
    assert plain["mapped_blocks"] == 1  # glibc's default: a fresh mapping for the large block
    tuned = _probe("tune")
    assert tuned["tuned"] is True and tuned["again"] is True
    assert tuned["mapped_blocks"] == 0


def test_opt_out_leaves_malloc_alone():
    result = _probe("tune", SSD_MALLOC_TUNING="0")
    assert result["tuned"] is False and result["again"] is False
    if sys.platform.startswith("linux"):
        assert result["mapped_blocks"] == 1
