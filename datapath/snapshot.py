"""The copy-on-write snapshot of a tracked disk: the disk as it was when the snapshot was taken, readable
while writes go on.

Its files beside the disk (datapath/trackerstate.py) are committed in the tracker's control file. Before
a write changes a snapshot block not preserved yet, `CopyOnWrite` copies the block's old contents into
the snapshot file and marks it; `SnapshotView` reads the disk with the preserved blocks over it.
"""
from __future__ import annotations

import errno
import io
import os
import re
from collections.abc import Iterator
from pathlib import Path

from datapath.buffers import aligned_buffer, write_fully
from datapath.disk import LocalDisk, open_disk
from datapath.errors import NonRecoverableError
from datapath.private import FILE_MODE
from datapath.trackerstate import ControlFile, ControlState, TrackerFiles, TrackerStateError, unlink_quietly

SNAPSHOT_BLOCK = 64 * 1024
"""Copy-on-write granularity of a snapshot."""

_PRESERVE_CHUNK = 1024 * 1024


class SnapshotError(NonRecoverableError):
    """No snapshot exists, or it was deleted while its view was being read."""


def create_snapshot_files(files: TrackerFiles, disk_size: int) -> None:
    """Create the empty snapshot files of a disk of `disk_size` bytes, durably; the caller then commits
    the snapshot in the control file."""
    block_count = -(-disk_size // SNAPSHOT_BLOCK)
    for path, size in ((files.snapshot_data, disk_size), (files.snapshot_map, block_count)):
        unlink_quietly(path)  # a previous create that crashed before committing
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, FILE_MODE)  # the disk's old bytes: private
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)
    files.sync_directory()


def delete_snapshot_files(files: TrackerFiles) -> None:
    unlink_quietly(files.snapshot_data)
    unlink_quietly(files.snapshot_map)


class CopyOnWrite:
    """The writing side of a snapshot, for one tracker object: preserves old contents before its writes."""

    def __init__(self, files: TrackerFiles):
        self._files = files
        self._fds: tuple[int, int] | None = None
        self._generation = 0
        self._buffer: memoryview | None = None

    def preserve(self, control: ControlState, disk: LocalDisk, offset: int, length: int) -> None:
        """Copy the snapshot blocks that [offset, offset+length) touches and that are not preserved
        yet into the snapshot file, then mark them. Preserve before mark, mark before the disk write:
        a reader that sees a mark finds the old contents complete."""
        data_fd, map_fd = self._open_files(control)
        block = control.snapshot_block
        first = offset // block
        marks = os.pread(map_fd, (offset + length - 1) // block - first + 1, first)
        if b"\0" not in marks:
            return
        if self._buffer is None:
            self._buffer = memoryview(aligned_buffer(_PRESERVE_CHUNK))
        for run in re.finditer(rb"\x00+", marks):
            start = (first + run.start()) * block
            end = min((first + run.end()) * block, control.disk_size)
            # A hole needs no copy: the snapshot file is sparse and reads as zeros there too.
            if next(disk.data_extents(start, end - start), None) is not None:
                for position in range(start, end, _PRESERVE_CHUNK):
                    chunk = self._buffer[: min(_PRESERVE_CHUNK, end - position)]
                    disk.read_into(position, chunk)
                    write_fully(data_fd, [chunk], position)
            write_fully(map_fd, [b"\1" * (run.end() - run.start())], first + run.start())

    def _open_files(self, control: ControlState) -> tuple[int, int]:
        if self._generation != control.snapshot_generation or self._fds is None:
            self.close()
            try:
                data_fd = os.open(self._files.snapshot_data, os.O_RDWR)
            except FileNotFoundError:
                raise TrackerStateError(f"snapshot file {self._files.snapshot_data} is missing") from None
            try:
                map_fd = os.open(self._files.snapshot_map, os.O_RDWR)
            except FileNotFoundError:
                os.close(data_fd)
                raise TrackerStateError(f"snapshot map {self._files.snapshot_map} is missing") from None
            self._fds = (data_fd, map_fd)
            self._generation = control.snapshot_generation
        return self._fds

    def close(self) -> None:
        if self._fds is not None:
            for fd in self._fds:
                os.close(fd)
            self._fds = None
            self._generation = 0


class SnapshotView:
    """The disk as it was when the snapshot was taken, as a read-only DiskEndpoint.

    Reads take no lock, yet are exact while another process writes. A writer (1) preserves a
    block's old contents, (2) marks the block, (3) writes the disk. A read (a) reads the disk, (b)
    reads the marks, (c) takes the preserved copy of every marked block instead. If (b) finds a
    block unmarked, the writer's (2) came after (b), so its (3) came after (a): the disk bytes read
    were the snapshot's. If (b) finds it marked, (1) is complete. Afterwards (d) the snapshot must
    still exist: once deleted, writes stop preserving and nothing read later could be trusted.
    """

    alignment = 1

    def __init__(self, files: TrackerFiles, generation: int, block: int, size: int):
        self.name = f"{files.disk} (snapshot at generation {generation})"
        self.size = size
        self.generation = generation
        self._block = block
        self._fds: list[int] = []
        self._disk: LocalDisk | None = None
        try:
            self._control_file = ControlFile(files.control, self._open(files.control))
            self._data_fd = self._open(files.snapshot_data)
            self._map_fd = self._open(files.snapshot_map)
            self._disk = open_disk(files.disk)
        except BaseException:
            self.close()
            raise

    def _open(self, path: Path) -> int:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise TrackerStateError(f"{self.name}: {path} is missing") from None
        self._fds.append(fd)
        return fd

    def read_into(self, offset: int, buf: memoryview) -> int:
        assert self._disk is not None
        with memoryview(buf) as outer, outer.cast("B") as view:
            length = view.nbytes
            if not isinstance(offset, int) or offset < 0 or offset + length > self.size:
                raise ValueError(
                    f"{self.name}: cannot read {length} bytes at offset {offset!r}: outside [0, {self.size})"
                )
            if length == 0:
                return 0
            self._disk.read_into(offset, view)
            first = offset // self._block
            marks = os.pread(self._map_fd, (offset + length - 1) // self._block - first + 1, first)
            for run in re.finditer(rb"[^\x00]+", marks):
                low = max(offset, (first + run.start()) * self._block)
                high = min(offset + length, (first + run.end()) * self._block)
                _pread_fully(self._data_fd, view[low - offset : high - offset], low)
            self._check_alive()
            return length

    def data_extents(self, offset: int = 0, length: int | None = None) -> Iterator[tuple[int, int]]:
        """The disk's extents now plus the preserved blocks. The disk's are listed first: a block
        changed before that listing is marked before it changed, so the marks read next include it."""
        assert self._disk is not None
        end = self.size if length is None else min(offset + length, self.size)
        disk_extents = [(start, start + size) for start, size in self._disk.data_extents(offset, end - offset)]
        preserved = list(self._preserved_extents(offset, end))
        self._check_alive()
        return _merge_extents(sorted(disk_extents + preserved))

    def _preserved_extents(self, offset: int, end: int) -> Iterator[tuple[int, int]]:
        if end <= offset:
            return
        block = self._block
        first, last = offset // block, (end - 1) // block
        step = 1 << 20
        for chunk_first in range(first, last + 1, step):
            marks = os.pread(self._map_fd, min(step, last + 1 - chunk_first), chunk_first)
            for run in re.finditer(rb"[^\x00]+", marks):
                yield max(offset, (chunk_first + run.start()) * block), min(end, (chunk_first + run.end()) * block)

    def _check_alive(self) -> None:
        control = self._control_file.read()
        if control.disabled or control.snapshot_generation != self.generation:
            raise SnapshotError(f"{self.name}: the snapshot was deleted while it was being read")

    def write(self, offset: int, data: bytes | memoryview) -> None:
        raise io.UnsupportedOperation(f"{self.name} is read-only")

    def write_zeros(self, offset: int, length: int) -> None:
        raise io.UnsupportedOperation(f"{self.name} is read-only")

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self._disk is not None:
            self._disk.close()
            self._disk = None
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def __enter__(self) -> SnapshotView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _merge_extents(ranges: list[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """(offset, length) of the union of sorted [start, end) ranges."""
    current: tuple[int, int] | None = None
    for start, end in ranges:
        if current is not None and start <= current[1]:
            current = (current[0], max(current[1], end))
            continue
        if current is not None:
            yield current[0], current[1] - current[0]
        current = (start, end)
    if current is not None:
        yield current[0], current[1] - current[0]


def _pread_fully(fd: int, view: memoryview, position: int) -> None:
    done = 0
    while done < view.nbytes:
        n = os.preadv(fd, [view[done:]], position + done)
        if n == 0:
            raise OSError(errno.EIO, f"unexpected end of file at byte {position + done}")
        done += n
