"""Byte-for-byte comparison of two disks' contents, whatever their formats or backends.

This is the check every data-moving path is held to, so it depends on no checksum: bytes are compared
with memcmp. Ranges that are holes on both disks read as zeros on both and are skipped unread.
"""
from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator

from datapath.endpoint import DiskEndpoint
from datapath.errors import SizeMismatchError
from datapath.manifest import DEFAULT_READ_SIZE, ReadAhead, split_ranges

# Comparisons copy one side this many bytes at a time (`bytes.startswith` takes the other side's
# memoryview as is and runs memcmp; comparing two memoryviews goes element by element, 50x slower).
_PIECE = 1024 * 1024
_NARROW_PIECE = 4096


def same_bytes(a: memoryview, b: memoryview) -> bool:
    """True when `a` and `b` hold the same bytes, at memcmp speed."""
    if len(a) != len(b):
        return False
    return all(a[pos:pos + _PIECE].tobytes().startswith(b[pos:pos + _PIECE]) for pos in range(0, len(a), _PIECE))


def first_difference(a: DiskEndpoint, b: DiskEndpoint, *, read_size: int = DEFAULT_READ_SIZE) -> int | None:
    """The offset of the first byte at which the contents of `a` and `b` differ, or None when they are
    equal. The disks must have the same size (SizeMismatchError otherwise)."""
    if a.size != b.size:
        raise SizeMismatchError(
            f"cannot compare {a.name} ({a.size} bytes) with {b.name} ({b.size} bytes): sizes differ"
        )
    ranges = _merged(heapq.merge(a.data_extents(), b.data_extents()))
    with ReadAhead([a, b], split_ranges(ranges, read_size), read_size) as reader:
        for window in reader:
            left, right = window.views
            if not same_bytes(left, right):
                return window.offset + _first_mismatch(left, right)
            reader.release(window)
    return None


def _first_mismatch(a: memoryview, b: memoryview) -> int:
    """The offset of the first differing byte of two views known to differ: narrowed down a piece at
    a time, then byte by byte within 4 KiB."""
    base = 0
    for piece_size in (_PIECE, _NARROW_PIECE):
        start = next(pos for pos in range(0, len(a), piece_size)
                     if not same_bytes(a[pos:pos + piece_size], b[pos:pos + piece_size]))
        base += start
        a, b = a[start:start + piece_size], b[start:start + piece_size]
    return base + next(i for i, (x, y) in enumerate(zip(a.tobytes(), b.tobytes(), strict=True)) if x != y)


def _merged(extents: Iterable[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """Coalesce sorted, possibly overlapping (offset, length) extents."""
    start = end = -1
    for offset, length in extents:
        if offset <= end:
            end = max(end, offset + length)
            continue
        if end > start:
            yield start, end - start
        start, end = offset, offset + length
    if end > start:
        yield start, end - start
