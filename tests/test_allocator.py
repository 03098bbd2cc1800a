"""replacer.train.allocator: freed large blocks stay on the heap for the next step instead of being unmapped."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import pytest
import torch

from replacer.train import allocator


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _mapped_bytes() -> int:
    """Bytes glibc holds in separate mappings (blocks above its mmap threshold)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    try:
        mallinfo2 = libc.mallinfo2
    except AttributeError:
        pytest.skip("glibc without mallinfo2 (older than 2.33)")
    mallinfo2.restype = _MallInfo2
    return mallinfo2().hblkhd


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator only")
def test_a_training_sized_tensor_comes_from_the_heap_after_tuning():
    assert allocator.keep_freed_memory() is None
    before = _mapped_bytes()
    block = torch.empty(24 * 1024 * 1024 // 4)  # 24 MiB: a quickstart site's gate buffer is 25 MB
    block.fill_(1.0)
    assert _mapped_bytes() - before < 24 * 1024 * 1024  # not a fresh mapping: glibc's default would map it
    del block


def test_opting_out_leaves_the_allocator_alone(monkeypatch):
    monkeypatch.setenv("REPLACER_KEEP_FREED_MEMORY", "0")
    assert allocator.keep_freed_memory.__wrapped__() == "REPLACER_KEEP_FREED_MEMORY=0"
