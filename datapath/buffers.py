"""Buffers for moving disk data.

A `bytearray` of a few MiB starts 16 bytes into a page, and reading into it runs at about a fifth of the
speed of reading into a page-aligned buffer on these CPUs. Anonymous mmaps are always page aligned, so
every bulk read in the data path goes into one of these, allocated once and reused (fresh allocations
cost page faults).
"""
from __future__ import annotations

import mmap


def aligned_buffer(size: int) -> mmap.mmap:
    """An anonymous, zero-filled, page-aligned read/write buffer of `size` bytes.

    Wrap it in `memoryview(...)` to slice without copying; release the views before `close()`."""
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"buffer size must be a positive number of bytes, got {size!r}")
    return mmap.mmap(-1, size)
