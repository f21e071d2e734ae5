"""The one interface every disk the data path touches offers: a local raw or VHD file, a point-in-time
snapshot view of a protected disk, a replica page blob in Azure, a replica file in a local directory.

Copy, manifest, resync and log apply are written against `DiskEndpoint` only, so every combination of
source and target works, and a test on one backend exercises the same code as on the other.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

SECTOR = 512


@runtime_checkable
class DiskEndpoint(Protocol):
    name: str
    """Human-readable identity for messages (a path, or `container/blob`)."""

    size: int
    """Virtual size in bytes (the guest-visible size, without any VHD footer)."""

    alignment: int
    """Offsets and lengths of `write`/`write_zeros` must be multiples of this (1 for files, 512 for
    page blobs). The last write may end at `size`."""

    def read_into(self, offset: int, buf: memoryview) -> int:
        """Fill `buf` with the bytes at `offset` (zeros for holes); return len(buf). Reads past `size`
        raise ValueError."""
        ...

    def write(self, offset: int, data: bytes | memoryview) -> None:
        """Write `data` at `offset`. May be asynchronous (several requests in flight); `flush` waits for
        all and raises the first error. Never keeps a reference to `data` after returning."""
        ...

    def write_zeros(self, offset: int, length: int) -> None:
        """Make the range read as zeros, freeing space where the target can (hole punch, clear pages)."""
        ...

    def data_extents(self, offset: int = 0, length: int | None = None) -> Iterator[tuple[int, int]]:
        """(offset, length) ranges inside [offset, offset+length) that may hold non-zero data, in order.
        Conservative: everything outside them reads as zeros; inside them, zeros are possible."""
        ...

    def flush(self) -> None:
        """Wait for in-flight writes and make them durable."""
        ...

    def close(self) -> None:
        ...
