"""Replication logs (`.hrl`): every write made to a protected disk, in order, verifiable record by record.

The byte layout is specified in docs/formats.md. In short: an 80-byte file header (disk id, generation,
first sequence number, block size, disk size), then WRITE records (header, data, 128-bit mmh3 checksum
over both), then one SEAL record carrying the record count, last sequence number, data bytes and a
hash chain over every record checksum. Nothing follows the seal.

This module holds the layout and `LogWriter`, which appends records; the tracker keeps a writer's
`LogState` in its control file so that any process can continue or seal the active log. Reading and
verifying a log: datapath/logreader.py; applying one to a replica: datapath/logapply.py.
"""
from __future__ import annotations

import os
import struct
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import mmh3

from datapath._writepath import ffi as _ffi
from datapath._writepath import lib as _lib
from datapath.buffers import write_fully
from datapath.disk import punch_hole
from datapath.endpoint import SECTOR
from datapath.errors import AlignmentError
from datapath.private import FILE_MODE

MAGIC = b"ASRHRL1\0"
FORMAT_VERSION = 1

# magic, version, header size, block size, disk id, generation, first seq, disk size, created (ns)
HEADER_FIELDS = struct.Struct("<8sHHI16sQQQQ")
CHECKSUM_SIZE = 16
HEADER_SIZE = HEADER_FIELDS.size + CHECKSUM_SIZE

# type, data length, sequence number, disk offset
RECORD_HEADER = struct.Struct("<IIQQ")
RECORD_HEADER_SIZE = RECORD_HEADER.size
RECORD_OVERHEAD = RECORD_HEADER_SIZE + CHECKSUM_SIZE
WRITE = 1
SEAL = 2

# records, last sequence number, data bytes, log digest
SEAL_PAYLOAD = struct.Struct("<QQQ16s")
SEAL_RECORD_SIZE = RECORD_HEADER_SIZE + SEAL_PAYLOAD.size + CHECKSUM_SIZE

MAX_RECORD_DATA = 4 * 1024 * 1024
"""Largest data length of one WRITE record; the tracker splits larger writes. Bounds every reader's
buffer regardless of what a (corrupt) length field claims."""

_MIN_BLOCK_SIZE = SECTOR
_MAX_BLOCK_SIZE = 64 * 1024


def log_digest_step(digest: bytes, record_checksum: bytes) -> bytes:
    """The log digest after one more record: a hash chain, so a writer's whole running state is 16
    bytes that another process can pick up from the tracker's control file."""
    return mmh3.mmh3_x64_128_digest(digest + record_checksum)


@dataclass(frozen=True)
class LogHeader:
    disk_id: bytes
    generation: int
    first_seq: int
    disk_size: int
    block_size: int = SECTOR
    created_ns: int = 0
    version: int = FORMAT_VERSION

    def encode(self) -> bytes:
        fields = HEADER_FIELDS.pack(
            MAGIC, self.version, HEADER_SIZE, self.block_size, self.disk_id, self.generation,
            self.first_seq, self.disk_size, self.created_ns,
        )
        return fields + mmh3.mmh3_x64_128_digest(fields)

    @property
    def checksum(self) -> bytes:
        """The header checksum; also the first link of the log digest chain."""
        return self.encode()[-CHECKSUM_SIZE:]

    @property
    def disk_label(self) -> str:
        return str(uuid.UUID(bytes=self.disk_id))

    def check_valid(self) -> None:
        """ValueError unless the fields make a log that readers accept."""
        problems = []
        if len(self.disk_id) != 16:
            problems.append(f"disk id must be 16 bytes, got {len(self.disk_id)}")
        if not (_MIN_BLOCK_SIZE <= self.block_size <= _MAX_BLOCK_SIZE) or self.block_size & (self.block_size - 1):
            problems.append(f"block size {self.block_size} is not a power of two in [512, 65536]")
        if self.generation < 1:
            problems.append(f"generation {self.generation} is below 1")
        if self.first_seq < 1:
            problems.append(f"first sequence number {self.first_seq} is below 1")
        if self.disk_size <= 0 or self.disk_size % max(self.block_size, 1):
            problems.append(f"disk size {self.disk_size} is not a positive multiple of the block size")
        if problems:
            raise ValueError("invalid replication log header: " + "; ".join(problems))


@dataclass(frozen=True)
class LogState:
    """Where a log stands after its last record: enough for any process to append or seal."""

    next_seq: int
    records: int
    data_bytes: int
    digest: bytes
    end: int
    """File position just after the last record."""

    @classmethod
    def empty(cls, header: LogHeader) -> LogState:
        return cls(header.first_seq, 0, 0, header.checksum, HEADER_SIZE)


@dataclass(frozen=True)
class LogSeal:
    records: int
    last_seq: int
    data_bytes: int
    digest: bytes
    size: int
    """Size of the whole sealed log file."""


class LogWriter:
    """Appends WRITE records to a log file and seals it.

    Each append is one positioned write of header, data and checksum (the data is not copied), so a
    record reaches the OS before `append` returns. Nothing is fsynced before `seal`.
    """

    def __init__(self, fd: int, header: LogHeader, state: LogState, *, name: str = "", owns_fd: bool = False):
        header.check_valid()
        self._fd = fd
        self.header = header
        self.state = state
        self.name = name or f"log of disk {header.disk_label}"
        self._owns_fd = owns_fd

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        *,
        disk_id: bytes,
        generation: int,
        first_seq: int,
        disk_size: int,
        block_size: int = SECTOR,
        recycle: str | os.PathLike[str] | None = None,
    ) -> LogWriter:
        """Create (or replace) the log file at `path` with a fresh header. `recycle`: a file no longer
        needed (an acknowledged log of the same disk), renamed to `path` when it exists and written over
        from the start instead of truncated, so appends overwrite allocated blocks. What lies past the
        log's end is then stale records, all of lower sequence numbers than this log's: never part of
        the log (its end is the committed one, and `seal` truncates there)."""
        header = LogHeader(disk_id, generation, first_seq, disk_size, block_size, time.time_ns())
        header.check_valid()
        flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC
        if recycle is not None and os.path.exists(recycle):
            os.rename(recycle, path)
            flags &= ~os.O_TRUNC
        fd = os.open(path, flags, FILE_MODE)  # the guest's writes: private
        try:
            write_fully(fd, [header.encode()], 0)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, header, LogState.empty(header), name=Path(path).name, owns_fd=True)

    def append(self, offset: int, data: bytes | memoryview) -> int:
        """Append one WRITE record; return its sequence number."""
        length = memoryview(data).nbytes
        self._check_write(offset, length)
        state = self.state
        record_header, checksum = _write_record_parts(state, offset, length, data)
        write_fully(self._fd, [record_header, data, checksum], state.end)
        return self._committed(length, checksum)

    def append_many(self, writes: list[tuple[int, bytes | memoryview]]) -> int:
        """Append a WRITE record for each (offset, data), in order, with as few positioned writes as
        the system's vector limit allows; return the last sequence number. The state moves only once
        all are written: after an error the log's end is unchanged (the bytes past it are overwritten
        by the next append).

        Headers, checksums, digest chain and writes are made by the native extension (datapath/
        writepath_build.py) in one call without the GIL; tests/test_writepath.py checks they are byte for
        byte those of `append` (the Python reference) called for each."""
        if not writes:
            return self.state.next_seq - 1
        state = self.state
        count = len(writes)
        offsets = _ffi.new("uint64_t[]", count)
        lengths = _ffi.new("uint32_t[]", count)
        pointers = _ffi.new("unsigned char *[]", count)
        keep = []  # the buffers' cdata: alive until the call returns
        data_bytes = 0
        for i, (offset, data) in enumerate(writes):
            buffer = _ffi.from_buffer(data)
            length = len(buffer)
            self._check_write(offset, length)
            offsets[i], lengths[i], pointers[i] = offset, length, buffer
            keep.append(buffer)
            data_bytes += length
        digest = _ffi.new("unsigned char[16]", state.digest)
        checksums = _ffi.new("unsigned char[]", CHECKSUM_SIZE * count)
        result = _lib.asr_log_append(self._fd, state.end, state.next_seq, digest, count, offsets, lengths,
                                     pointers, checksums)
        if result < 0:
            raise OSError(-result, f"{self.name}: appending records: {os.strerror(-result)}")
        self.state = LogState(state.next_seq + count, state.records + count, state.data_bytes + data_bytes,
                              _ffi.buffer(digest)[:], state.end + count * RECORD_OVERHEAD + data_bytes)
        return self.state.next_seq - 1

    def append_zeros(self, offset: int, length: int) -> int:
        """Append one WRITE record of `length` zero bytes; return its sequence number. To every reader
        it is a WRITE record like any other, so logapply and the log readers need nothing new; here its
        data is left a hole in the log file (nothing is written there), so zeroing a large range costs
        the host no log space."""
        self._check_write(offset, length)
        state = self.state
        record_header, checksum = _write_record_parts(state, offset, length, _zeros(length))
        data_start = state.end + RECORD_HEADER_SIZE
        file_size = os.fstat(self._fd).st_size
        if data_start < file_size:
            # A torn record of a crashed writer, or a recycled log's stale ones, may lie there: the
            # hole must read as zeros. Punched where the filesystem can (nothing written).
            stale = min(length, file_size - data_start)
            if not punch_hole(self._fd, data_start, stale):
                write_fully(self._fd, [_zeros(stale)], data_start)
        write_fully(self._fd, [record_header], state.end)
        write_fully(self._fd, [checksum], data_start + length)
        return self._committed(length, checksum)

    def _committed(self, length: int, checksum: bytes) -> int:
        """Count the WRITE record of `length` data bytes just written after the log's end; its sequence number."""
        state = self.state
        self.state = _after_record(state, length, checksum)
        return state.next_seq

    def seal(self, *, fsync: bool = True) -> LogSeal:
        """Append the SEAL record, drop anything after it (a torn record left by a crash) and fsync."""
        state = self.state
        payload = SEAL_PAYLOAD.pack(state.records, state.next_seq - 1, state.data_bytes, state.digest)
        record = RECORD_HEADER.pack(SEAL, len(payload), state.next_seq, 0) + payload
        record += mmh3.mmh3_x64_128_digest(record)
        write_fully(self._fd, [record], state.end)
        size = state.end + len(record)
        os.ftruncate(self._fd, size)
        if fsync:
            os.fsync(self._fd)
        return LogSeal(state.records, state.next_seq - 1, state.data_bytes, state.digest, size)

    def sync(self) -> None:
        """fsync the log file."""
        os.fsync(self._fd)

    def close(self) -> None:
        if self._owns_fd and self._fd >= 0:
            os.close(self._fd)
        self._fd = -1

    def __enter__(self) -> LogWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_write(self, offset: int, length: int) -> None:
        block = self.header.block_size
        if offset % block or length % block:
            raise AlignmentError(
                f"{self.name}: write of {length} bytes at offset {offset} is not aligned to "
                f"{block}-byte blocks"
            )
        if length <= 0 or length > MAX_RECORD_DATA:
            raise ValueError(
                f"{self.name}: a record holds 1 to {MAX_RECORD_DATA} bytes of data, got {length}"
            )
        if offset < 0 or offset + length > self.header.disk_size:
            raise ValueError(
                f"{self.name}: write of {length} bytes at offset {offset} is outside the disk "
                f"[0, {self.header.disk_size})"
            )


_zero_block: memoryview | None = None


def _zeros(length: int) -> memoryview:
    """`length` (at most MAX_RECORD_DATA) zero bytes, from one read-only block made on first use."""
    global _zero_block
    if _zero_block is None:
        _zero_block = memoryview(bytes(MAX_RECORD_DATA))
    return _zero_block[:length]


def _after_record(state: LogState, length: int, checksum: bytes) -> LogState:
    """`state` after one more WRITE record of `length` data bytes with `checksum`."""
    return LogState(
        state.next_seq + 1,
        state.records + 1,
        state.data_bytes + length,
        log_digest_step(state.digest, checksum),
        state.end + RECORD_OVERHEAD + length,
    )


def _write_record_parts(state: LogState, offset: int, length: int, data: bytes | memoryview) -> tuple[bytes, bytes]:
    """The header and checksum of the WRITE record of `data` at `offset`, next in `state`."""
    record_header = RECORD_HEADER.pack(WRITE, length, state.next_seq, offset)
    hasher = mmh3.mmh3_x64_128(record_header)
    hasher.update(data)
    return record_header, hasher.digest()
