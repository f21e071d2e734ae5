"""Real local disks with instruments attached, for the manifest, copy, resync and compare tests.

Each wrapper delegates every call to a real `LocalDisk` and only observes (what was read, written,
flushed) or enforces what another backend would (a page blob's 512-byte alignment, a failing device).
They are the same disks, not stand-ins: every byte still goes to and from a real file.
"""
from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from datapath.disk import LocalDisk

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB


class InstrumentedDisk:
    """A LocalDisk that records reads, writes, zeroings and flushes (thread-safe). With `alignment`,
    it takes writes only in whole units of that many bytes, as a page blob does (512)."""

    def __init__(self, disk: LocalDisk, *, alignment: int | None = None):
        self.disk = disk
        self.name = disk.name
        self.size = disk.size
        self.alignment = alignment or disk.alignment
        self.reads: list[tuple[int, int]] = []
        self.writes: list[tuple[int, int]] = []
        self.zeroings: list[tuple[int, int]] = []
        self.completed: list[tuple[int, int]] = []
        """Writes and zeroings as (offset, length), in the order they completed."""
        self.flushes = 0
        self.durable = 0
        """How many of `completed` a finished flush covers (those completed before it began)."""
        self._lock = threading.Lock()
        self._flushed = threading.Condition(self._lock)

    def wait_for_flushes(self, count: int, timeout: float = 10.0) -> None:
        with self._flushed:
            if not self._flushed.wait_for(lambda: self.flushes >= count, timeout):
                raise AssertionError(f"{self.name}: {count} flushes expected within {timeout} s, saw {self.flushes}")

    def durable_below(self, offset: int) -> bool:
        """Whether every completed request ending at or below `offset` is covered by a flush."""
        with self._lock:
            return all(index < self.durable for index, (start, length) in enumerate(self.completed)
                       if start + length <= offset)

    @property
    def bytes_read(self) -> int:
        return sum(length for _, length in self.reads)

    def read_into(self, offset: int, buf: memoryview) -> int:
        with self._lock:
            self.reads.append((offset, len(buf)))
        return self.disk.read_into(offset, buf)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self._check_alignment(offset, len(data))
        self.disk.write(offset, data)
        with self._lock:
            self.writes.append((offset, len(data)))
            self.completed.append((offset, len(data)))

    def write_zeros(self, offset: int, length: int) -> None:
        self._check_alignment(offset, length)
        self.disk.write_zeros(offset, length)
        with self._lock:
            self.zeroings.append((offset, length))
            self.completed.append((offset, length))

    def data_extents(self, offset: int = 0, length: int | None = None) -> Iterator[tuple[int, int]]:
        return self.disk.data_extents(offset, length)

    def flush(self) -> None:
        with self._lock:
            covered = len(self.completed)
        self.disk.flush()
        with self._lock:
            self.flushes += 1
            self.durable = max(self.durable, covered)
            self._flushed.notify_all()

    def close(self) -> None:
        self.disk.close()

    def _check_alignment(self, offset: int, length: int) -> None:
        end = offset + length
        if offset % self.alignment or (end % self.alignment and end != self.size):
            raise AssertionError(f"{self.name}: request {offset}+{length} breaks alignment {self.alignment}")


class FailingDisk(InstrumentedDisk):
    """A LocalDisk whose device fails: the `fail_at`-th read or write (counting from 1) raises `error`."""

    def __init__(self, disk: LocalDisk, *, fail_read_at: int = 0, fail_write_at: int = 0,
                 error: BaseException | None = None):
        super().__init__(disk)
        self.fail_read_at = fail_read_at
        self.fail_write_at = fail_write_at
        self.error = error or OSError(5, "Input/output error (injected)")

    def read_into(self, offset: int, buf: memoryview) -> int:
        if self.fail_read_at and len(self.reads) + 1 == self.fail_read_at:
            raise self.error
        return super().read_into(offset, buf)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        if self.fail_write_at and len(self.writes) + 1 == self.fail_write_at:
            raise self.error
        super().write(offset, data)


class GatedSource(InstrumentedDisk):
    """A source LocalDisk whose n-th read (counting from 1) waits until `target` has completed
    `gates[n]` flushes: the copy cannot outrun its checkpoints, so they are reported deterministically."""

    def __init__(self, disk: LocalDisk, target: InstrumentedDisk, gates: dict[int, int]):
        super().__init__(disk)
        self.target = target
        self.gates = gates

    def read_into(self, offset: int, buf: memoryview) -> int:
        flushes = self.gates.get(len(self.reads) + 1)
        if flushes:
            self.target.wait_for_flushes(flushes)
        return super().read_into(offset, buf)


def file_digest(path: Path) -> str:
    """sha256 of a whole file, footer included: proof that a file did not change."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_bytes(path: Path, offset: int = 0, length: int | None = None) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(-1 if length is None else length)


def allocated_bytes(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def assert_same_content(a: Path, b: Path, size: int) -> None:
    """Independent of the data path: plain file reads of the first `size` bytes of both files."""
    step = 8 * MIB
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for offset in range(0, size, step):
            n = min(step, size - offset)
            left, right = fa.read(n), fb.read(n)
            if left != right:
                first = next(i for i in range(n) if left[i] != right[i])
                raise AssertionError(f"{a} and {b} differ at offset {offset + first}")
