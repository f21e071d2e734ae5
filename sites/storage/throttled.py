"""A host's upload limit: the recovery storage as one host agent sees it, sending at most so many bytes per
second, all the agent's processes together (`ASR_HOST_UPLOAD_LIMIT`).

The limit is a generic cell rate algorithm shared through a small file under a lock: the file holds the time
(CLOCK_MONOTONIC, one clock for every process of the machine) at which the host's uplink is next free. A
sender books its bytes from then on and waits until its turn comes, so prefork children of one agent (and a
second agent of the same host) share one budget without talking to each other. An idle uplink earns no
credit: the first send after a pause goes at once, none goes faster than the rate afterwards.

Only what crosses the network counts: disk data written to a replica and objects stored. Zeros sent as
`write_zeros` (cleared pages) and every read are free.
"""
from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from datapath.endpoint import DiskEndpoint
from datapath.private import create_private_file
from sites.storage.base import RecoveryStorage


class UploadLimit:
    """At most `bytes_per_s` through every `UploadLimit` sharing `state_file`."""

    def __init__(self, bytes_per_s: int, state_file: Path, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        if bytes_per_s <= 0:
            raise ValueError(f"an upload limit must be positive, not {bytes_per_s}")
        self.bytes_per_s = bytes_per_s
        self.state_file = state_file
        self._clock = clock
        self._sleep = sleep
        create_private_file(state_file)

    def consume(self, length: int) -> float:
        """Book `length` bytes on the shared uplink and wait for their turn; returns the seconds waited."""
        if length <= 0:
            return 0.0
        fd = os.open(self.state_file, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            raw = os.pread(fd, 64, 0)
            now = self._clock()
            try:
                next_free = float(raw) if raw else now
            except ValueError:  # a torn or foreign file: start afresh rather than stall the host
                next_free = now
            start = max(now, next_free)
            booked = f"{start + length / self.bytes_per_s:.6f}".encode()
            os.pwrite(fd, booked.ljust(64), 0)
        finally:
            os.close(fd)  # also releases the lock
        wait = start - now
        if wait > 0:
            self._sleep(wait)
        return wait


class ThrottledStorage(RecoveryStorage):
    """`inner` with every byte it sends booked on `limit` first."""

    def __init__(self, inner: RecoveryStorage, limit: UploadLimit):
        self.inner = inner
        self.limit = limit
        self.description = f"{inner.description} (upload limited to {limit.bytes_per_s} bytes/s)"

    def create_disk(self, name: str, size: int) -> None:
        self.inner.create_disk(name, size)

    def open_disk(self, name: str) -> DiskEndpoint:
        return _ThrottledDisk(self.inner.open_disk(name), self.limit)

    def disk_exists(self, name: str) -> bool:
        return self.inner.disk_exists(name)

    def delete_disk(self, name: str) -> None:
        self.inner.delete_disk(name)

    def put_object(self, name: str, src: BinaryIO | bytes) -> int:
        if isinstance(src, bytes | bytearray | memoryview):
            self.limit.consume(len(src))
            return self.inner.put_object(name, src)
        return self.inner.put_object(name, _ThrottledReader(src, self.limit))

    def put_new_object(self, name: str, data: bytes) -> bool:
        self.limit.consume(len(data))
        return self.inner.put_new_object(name, data)

    def get_object(self, name: str, dst: BinaryIO) -> int:
        return self.inner.get_object(name, dst)

    def read_object(self, name: str) -> bytes:
        return self.inner.read_object(name)

    def object_exists(self, name: str) -> bool:
        return self.inner.object_exists(name)

    def delete_object(self, name: str) -> None:
        self.inner.delete_object(name)

    def list_objects(self, prefix: str = "") -> list[str]:
        return self.inner.list_objects(prefix)

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str):
        # What a backend offers beyond RecoveryStorage passes through: with ASR_STORAGE_ENCRYPTION=off this layer
        # is the outermost one the engine holds (tasks/recovery_storage.py).
        return getattr(self.inner, name)


class _ThrottledDisk:
    """A replica disk whose data writes wait for the host's uplink."""

    def __init__(self, inner: DiskEndpoint, limit: UploadLimit):
        self.inner = inner
        self.limit = limit
        self.name, self.size, self.alignment = inner.name, inner.size, inner.alignment

    def read_into(self, offset: int, buf: memoryview) -> int:
        return self.inner.read_into(offset, buf)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self.limit.consume(len(data))
        self.inner.write(offset, data)

    def write_zeros(self, offset: int, length: int) -> None:
        self.inner.write_zeros(offset, length)

    def data_extents(self, offset: int = 0, length: int | None = None) -> Iterator[tuple[int, int]]:
        return self.inner.data_extents(offset, length)

    def flush(self) -> None:
        self.inner.flush()

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


class _ThrottledReader:
    """A stream being uploaded, read no faster than the uplink allows."""

    def __init__(self, inner: BinaryIO, limit: UploadLimit):
        self.inner = inner
        self.limit = limit

    def read(self, size: int = -1) -> bytes:
        data = self.inner.read(size)
        self.limit.consume(len(data))
        return data

    def readinto(self, buffer) -> int:
        """As `read`, into `buffer` (defined here: delegated, it would send bytes the uplink never booked)."""
        readinto = getattr(self.inner, "readinto", None)
        if readinto is not None:
            got = readinto(buffer)
        else:
            with memoryview(buffer) as outer, outer.cast("B") as view:
                data = self.inner.read(len(view))
                got = len(data)
                view[:got] = data
        self.limit.consume(got)
        return got

    def __getattr__(self, name: str):
        return getattr(self.inner, name)
