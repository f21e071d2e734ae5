"""Replication logs (`.hrl`): every write made to a protected disk, in order, verifiable record by record.

The byte layout is specified in docs/formats.md. In short: an 80-byte file header (disk id, generation,
first sequence number, block size, disk size), then WRITE records (header, data, 128-bit mmh3 checksum
over both), then one SEAL record carrying the record count, last sequence number, data bytes and a
hash chain over every record checksum. Nothing follows the seal.

`LogWriter` appends records; the tracker keeps a writer's `LogState` in its control file so that any
process can continue or seal the active log. `LogReader` streams and verifies a log; `apply_log`
verifies a whole log and only then writes it, coalesced, onto a replica disk.
"""
from __future__ import annotations

import os
import shutil
import struct
import tempfile
import time
import uuid
from bisect import bisect_right
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import mmh3

from datapath.buffers import aligned_buffer
from datapath.endpoint import SECTOR, DiskEndpoint
from datapath.errors import AlignmentError, LogCorruptError, LogOutOfSequenceError, NonRecoverableError

MAGIC = b"ASRHRL1\0"
FORMAT_VERSION = 1

# magic, version, header size, block size, disk id, generation, first seq, disk size, created (ns)
_HEADER_FIELDS = struct.Struct("<8sHHI16sQQQQ")
CHECKSUM_SIZE = 16
HEADER_SIZE = _HEADER_FIELDS.size + CHECKSUM_SIZE

# type, data length, sequence number, disk offset
_RECORD_HEADER = struct.Struct("<IIQQ")
RECORD_HEADER_SIZE = _RECORD_HEADER.size
RECORD_OVERHEAD = RECORD_HEADER_SIZE + CHECKSUM_SIZE
WRITE = 1
SEAL = 2

# records, last sequence number, data bytes, log digest
_SEAL_PAYLOAD = struct.Struct("<QQQ16s")
SEAL_RECORD_SIZE = RECORD_HEADER_SIZE + _SEAL_PAYLOAD.size + CHECKSUM_SIZE

MAX_RECORD_DATA = 4 * 1024 * 1024
"""Largest data length of one WRITE record; the tracker splits larger writes. Bounds every reader's
buffer regardless of what a (corrupt) length field claims."""

_MIN_BLOCK_SIZE = SECTOR
_MAX_BLOCK_SIZE = 64 * 1024
_READ_BUFFER_SIZE = 2 * MAX_RECORD_DATA
_SPOOL_CHUNK = 1024 * 1024

DEFAULT_APPLY_WINDOW = 32 * 1024 * 1024
"""Bytes of final disk content `apply_log` gathers before writing them out in offset order."""
MAX_TARGET_WRITE = 4 * 1024 * 1024
"""Largest single write issued to a target: one Put Page carries at most 4 MiB."""


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
        fields = _HEADER_FIELDS.pack(
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


@dataclass(frozen=True)
class LogRecord:
    index: int
    """1 for the first record after the header."""
    seq: int
    offset: int
    length: int
    data: memoryview
    """Valid only until the reader moves on to the next record."""


@dataclass(frozen=True)
class AppliedLog:
    generation: int
    first_seq: int
    last_seq: int
    records: int
    data_bytes: int
    """Bytes of record data in the log."""
    bytes_written: int
    """Bytes written to the target after coalescing (rewrites count once; alignment edges count)."""
    seconds: float


class LogDiskMismatchError(LogCorruptError):
    """A valid log, but of another disk (disk id) or of a disk of another size than the target."""


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
    ) -> LogWriter:
        """Create (or replace) the log file at `path` with a fresh header."""
        header = LogHeader(disk_id, generation, first_seq, disk_size, block_size, time.time_ns())
        header.check_valid()
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
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
        record_header = _RECORD_HEADER.pack(WRITE, length, state.next_seq, offset)
        hasher = mmh3.mmh3_x64_128(record_header)
        hasher.update(data)
        checksum = hasher.digest()
        write_fully(self._fd, [record_header, data, checksum], state.end)
        self.state = LogState(
            state.next_seq + 1,
            state.records + 1,
            state.data_bytes + length,
            log_digest_step(state.digest, checksum),
            state.end + RECORD_OVERHEAD + length,
        )
        return state.next_seq

    def seal(self, *, fsync: bool = True) -> LogSeal:
        """Append the SEAL record, drop anything after it (a torn record left by a crash) and fsync."""
        state = self.state
        payload = _SEAL_PAYLOAD.pack(state.records, state.next_seq - 1, state.data_bytes, state.digest)
        record = _RECORD_HEADER.pack(SEAL, len(payload), state.next_seq, 0) + payload
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


def write_fully(fd: int, buffers: list[bytes | memoryview], position: int) -> None:
    """pwritev all of `buffers` at `position`, continuing after short writes."""
    views = [memoryview(b).cast("B") for b in buffers]
    while views:
        written = os.pwritev(fd, views, position)
        position += written
        while views and written >= views[0].nbytes:
            written -= views[0].nbytes
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]


class _LogContext:
    """Names the log and its disk in every error."""

    def __init__(self, log_name: str, disk_name: str):
        self.log_name = log_name
        self.disk = disk_name or "unknown"
        self._named = bool(disk_name)

    def identify(self, header: LogHeader) -> None:
        if not self._named:
            self.disk = header.disk_label

    def corrupt(self, detail: str, record: int | None = None, seq: int | None = None) -> LogCorruptError:
        return self.error(LogCorruptError, detail, record, seq)

    def error(
        self, cls: type[NonRecoverableError], detail: str, record: int | None = None, seq: int | None = None
    ) -> NonRecoverableError:
        where = f"replication log {self.log_name} of disk {self.disk}"
        if record is not None:
            where += f": record {record}" + (f" (seq {seq})" if seq is not None else "")
        if issubclass(cls, LogCorruptError):
            return cls(f"{where}: {detail}", disk=self.disk, record=record)
        return cls(f"{where}: {detail}")


def _parse_header(raw: bytes | memoryview, ctx: _LogContext) -> LogHeader:
    if len(raw) < HEADER_SIZE:
        raise ctx.corrupt(f"truncated header: {len(raw)} of {HEADER_SIZE} bytes")
    magic, version, header_size, block_size, disk_id, generation, first_seq, disk_size, created = (
        _HEADER_FIELDS.unpack_from(raw, 0)
    )
    if magic != MAGIC:
        raise ctx.corrupt(f"not a replication log (magic {bytes(magic)!r}, expected {MAGIC!r})")
    if mmh3.mmh3_x64_128_digest(raw[: _HEADER_FIELDS.size]) != bytes(raw[_HEADER_FIELDS.size : HEADER_SIZE]):
        raise ctx.corrupt("header checksum mismatch")
    if version != FORMAT_VERSION or header_size != HEADER_SIZE:
        raise ctx.corrupt(f"unsupported format version {version} (header size {header_size})")
    header = LogHeader(disk_id, generation, first_seq, disk_size, block_size, created, version)
    try:
        header.check_valid()
    except ValueError as exc:
        raise ctx.corrupt(str(exc)) from None
    ctx.identify(header)
    return header


def read_log_header(log: str | os.PathLike[str] | BinaryIO, *, disk_name: str = "") -> LogHeader:
    """The verified header of a log (a path, or a file positioned at the log's start)."""
    with ExitStack() as stack:
        f = stack.enter_context(open(log, "rb")) if isinstance(log, (str, os.PathLike)) else log
        ctx = _LogContext(_log_name(log), disk_name)
        return _parse_header(_read_up_to(f, HEADER_SIZE), ctx)


def read_seal(path: str | os.PathLike[str], header: LogHeader, *, disk_name: str = "") -> LogSeal:
    """The verified SEAL record at the end of a sealed log, without reading the records before it.

    Checks the seal's own checksum and its agreement with the header; `verify_log` checks the rest."""
    ctx = _LogContext(Path(path).name, disk_name)
    ctx.identify(header)
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        if size < HEADER_SIZE + SEAL_RECORD_SIZE:
            raise ctx.corrupt(f"too short ({size} bytes) to hold a SEAL record: not sealed")
        raw = os.pread(f.fileno(), SEAL_RECORD_SIZE, size - SEAL_RECORD_SIZE)
    rtype, length, next_seq, _ = _RECORD_HEADER.unpack_from(raw, 0)
    body = raw[: RECORD_HEADER_SIZE + _SEAL_PAYLOAD.size]
    if rtype != SEAL or length != _SEAL_PAYLOAD.size or mmh3.mmh3_x64_128_digest(body) != raw[len(body) :]:
        raise ctx.corrupt("no valid SEAL record at the end of the log: not sealed or damaged")
    records, last_seq, data_bytes, digest = _SEAL_PAYLOAD.unpack_from(raw, RECORD_HEADER_SIZE)
    if last_seq != header.first_seq + records - 1 or next_seq != last_seq + 1:
        raise ctx.corrupt(
            f"SEAL record (seq {next_seq}) says {records} records ending at seq {last_seq}, which does "
            f"not follow from the first seq {header.first_seq}",
            record=records + 1,
        )
    return LogSeal(records, last_seq, data_bytes, digest, size)


def read_record(fd: int, position: int, header: LogHeader, *, expected_seq: int, log_name: str = "") -> LogRecord:
    """The verified WRITE record at `position` of an open log: its checksum must match and its
    sequence number be `expected_seq`. The record's size in the log is RECORD_OVERHEAD + length."""
    ctx = _LogContext(log_name or f"fd {fd}", "")
    ctx.identify(header)
    index = expected_seq - header.first_seq + 1
    raw = os.pread(fd, RECORD_HEADER_SIZE, position)
    if len(raw) < RECORD_HEADER_SIZE:
        raise ctx.corrupt(f"truncated: no record header at byte {position}", record=index)
    rtype, length, seq, offset = _RECORD_HEADER.unpack(raw)
    if rtype != WRITE or length == 0 or length % header.block_size or length > MAX_RECORD_DATA:
        raise ctx.corrupt(f"no WRITE record at byte {position} (type {rtype}, length {length})", record=index)
    rest = os.pread(fd, length + CHECKSUM_SIZE, position + RECORD_HEADER_SIZE)
    if len(rest) < length + CHECKSUM_SIZE:
        raise ctx.corrupt(f"truncated: the record at byte {position} is cut short", record=index, seq=seq)
    hasher = mmh3.mmh3_x64_128(raw)
    hasher.update(memoryview(rest)[:length])
    if hasher.digest() != rest[length:]:
        raise ctx.corrupt("checksum mismatch", record=index, seq=seq)
    if seq != expected_seq:
        raise ctx.corrupt(f"sequence gap: expected seq {expected_seq}", record=index, seq=seq)
    if offset % header.block_size or offset + length > header.disk_size:
        raise ctx.corrupt(
            f"range [{offset}, {offset + length}) is outside the disk or unaligned", record=index, seq=seq
        )
    return LogRecord(index, seq, offset, length, memoryview(rest)[:length])


class LogReader:
    """Streams the records of one log, verifying as it goes.

    For each record: the length is a positive multiple of the block size no larger than
    MAX_RECORD_DATA, the record is complete, its checksum matches, its sequence number follows the
    previous one, its range is block-aligned and inside the disk. After the last WRITE record the SEAL
    record must agree with what was read (count, last seq, data bytes, log digest), and nothing may
    follow it. Every failure is a LogCorruptError naming the log, the disk and the record.
    """

    def __init__(
        self,
        source: BinaryIO,
        *,
        log_name: str = "",
        disk_name: str = "",
        buffer: memoryview | None = None,
    ):
        self._f = source
        self._ctx = _LogContext(log_name or _log_name(source), disk_name)
        if buffer is None:
            self._mmap = aligned_buffer(_READ_BUFFER_SIZE)
            buffer = memoryview(self._mmap)
        if buffer.nbytes < RECORD_OVERHEAD + MAX_RECORD_DATA:
            raise ValueError(f"a log reader buffer needs at least {RECORD_OVERHEAD + MAX_RECORD_DATA} bytes")
        self._buf = buffer
        self._start = 0
        self._end = 0
        self._eof = False
        self.header = _parse_header(self._take(HEADER_SIZE), self._ctx)
        self.seal: LogSeal | None = None

    @property
    def log_name(self) -> str:
        return self._ctx.log_name

    @property
    def disk(self) -> str:
        return self._ctx.disk

    def error(self, cls: type[NonRecoverableError], detail: str) -> NonRecoverableError:
        """An error of class `cls` about this log as a whole."""
        return self._ctx.error(cls, detail)

    def records(self) -> Iterator[LogRecord]:
        """The WRITE records in order; when exhausted, `self.seal` holds the verified seal."""
        ctx, header = self._ctx, self.header
        block, disk_size = header.block_size, header.disk_size
        expected_seq = header.first_seq
        digest = header.checksum
        data_bytes = 0
        index = 0
        position = HEADER_SIZE
        while True:
            index += 1
            available = self._fill(RECORD_HEADER_SIZE)
            if available == 0:
                raise ctx.corrupt(
                    f"the log ends after {index - 1} records without a SEAL record: not sealed or "
                    f"truncated at a record boundary",
                    record=index,
                )
            if available < RECORD_HEADER_SIZE:
                raise ctx.corrupt(
                    f"truncated: the record header is cut short at byte {position + available}", record=index
                )
            rtype, length, seq, offset = _RECORD_HEADER.unpack_from(self._buf, self._start)
            if rtype == WRITE:
                if length == 0 or length % block or length > MAX_RECORD_DATA:
                    raise ctx.corrupt(
                        f"bad data length {length} (must be a multiple of {block} in [{block}, "
                        f"{MAX_RECORD_DATA}]) at byte {position}",
                        record=index,
                        seq=seq,
                    )
            elif rtype == SEAL:
                if length != _SEAL_PAYLOAD.size:
                    raise ctx.corrupt(f"bad SEAL record length {length} at byte {position}", record=index, seq=seq)
            else:
                raise ctx.corrupt(f"unknown record type {rtype} at byte {position}", record=index, seq=seq)
            size = RECORD_OVERHEAD + length
            if self._fill(size) < size:
                raise ctx.corrupt(
                    f"truncated: the record needs {size} bytes from byte {position} but the log ends "
                    f"at byte {position + self._end - self._start}",
                    record=index,
                    seq=seq,
                )
            body = self._buf[self._start : self._start + RECORD_HEADER_SIZE + length]
            checksum = mmh3.mmh3_x64_128_digest(body)
            if checksum != self._buf[self._start + RECORD_HEADER_SIZE + length : self._start + size].tobytes():
                raise ctx.corrupt("checksum mismatch", record=index, seq=seq)
            if seq != expected_seq:
                raise ctx.corrupt(
                    f"sequence gap: expected seq {expected_seq} after the previous record", record=index, seq=seq
                )
            self._start += size
            position += size
            if rtype == SEAL:
                self.seal = self._check_seal(body, index, expected_seq, data_bytes, digest, position)
                return
            if offset % block or offset + length > disk_size:
                raise ctx.corrupt(
                    f"range [{offset}, {offset + length}) is unaligned to {block} bytes or outside the "
                    f"disk [0, {disk_size})",
                    record=index,
                    seq=seq,
                )
            digest = log_digest_step(digest, checksum)
            data_bytes += length
            expected_seq += 1
            yield LogRecord(index, seq, offset, length, body[RECORD_HEADER_SIZE:])

    def _check_seal(
        self, body: memoryview, index: int, next_seq: int, data_bytes: int, digest: bytes, end: int
    ) -> LogSeal:
        ctx = self._ctx
        records, last_seq, sealed_bytes, sealed_digest = _SEAL_PAYLOAD.unpack_from(body, RECORD_HEADER_SIZE)
        found = (index - 1, next_seq - 1, data_bytes)
        if (records, last_seq, sealed_bytes) != found:
            raise ctx.corrupt(
                f"SEAL record says {records} records, last seq {last_seq}, {sealed_bytes} data bytes; the "
                f"log holds {found[0]} records, last seq {found[1]}, {found[2]} data bytes",
                record=index,
            )
        if sealed_digest != digest:
            raise ctx.corrupt("log digest mismatch: the records are not the ones that were sealed", record=index)
        if self._fill(1):
            raise ctx.corrupt(f"data after the SEAL record at byte {end}", record=index)
        return LogSeal(records, last_seq, data_bytes, digest, end)

    def _fill(self, n: int) -> int:
        """Make at least `n` bytes available at the read position unless the log ends first; return
        how many are available."""
        if self._end - self._start >= n or self._eof:
            return self._end - self._start
        if self._start + n > self._buf.nbytes:
            kept = self._end - self._start
            self._buf[:kept] = self._buf[self._start : self._end]
            self._start, self._end = 0, kept
        while self._end - self._start < n:
            got = self._f.readinto(self._buf[self._end :])
            if not got:
                self._eof = True
                break
            self._end += got
        return self._end - self._start

    def _take(self, n: int) -> memoryview:
        available = self._fill(n)
        view = self._buf[self._start : self._start + min(n, available)]
        self._start += view.nbytes
        return view


def verify_log(
    log: str | os.PathLike[str] | BinaryIO,
    *,
    disk_name: str = "",
    disk_id: bytes | None = None,
    disk_size: int | None = None,
) -> tuple[LogHeader, LogSeal]:
    """Read a whole log and verify every record and the seal; return its header and seal."""
    with _seekable_log(log) as f:
        reader = LogReader(f, log_name=_log_name(log), disk_name=disk_name)
        _check_identity(reader, disk_id, disk_size)
        for _ in reader.records():
            pass
        assert reader.seal is not None
        return reader.header, reader.seal


def apply_log(
    log: str | os.PathLike[str] | BinaryIO,
    target: DiskEndpoint,
    *,
    expected_generation: int,
    disk_id: bytes | None = None,
    disk_name: str = "",
    window: int = DEFAULT_APPLY_WINDOW,
) -> AppliedLog:
    """Apply a sealed log to `target`: verify all of it first, then write it coalesced.

    A log that fails verification (corrupt, truncated, unsealed, of another disk or size, out of
    sequence) raises before a single byte reaches the target. Records are replayed in order with the
    last write to a byte winning, so applying a log again, or after a crash half-way, gives the same
    disk. Writes go out in offset order, aligned to `target.alignment`, at most MAX_TARGET_WRITE
    bytes each, from a window of at most `window` bytes of final content; then `target.flush()`.
    A stream `log` that cannot seek is spooled to a temporary file first.
    """
    if window < MAX_RECORD_DATA:
        raise ValueError(f"apply window must be at least {MAX_RECORD_DATA} bytes, got {window}")
    started = time.monotonic()
    log_name = _log_name(log)
    # One read buffer serves both passes. Buffers here are freed when the last view of them goes (an
    # explicit close would fail while a record's view is still referenced from a traceback).
    buffer = memoryview(aligned_buffer(_READ_BUFFER_SIZE))
    with _seekable_log(log) as f:
        log_start = f.tell()
        reader = LogReader(f, log_name=log_name, disk_name=disk_name, buffer=buffer)
        header = reader.header
        _check_identity(reader, disk_id, target.size)
        if header.generation != expected_generation:
            raise reader.error(
                LogOutOfSequenceError,
                f"generation {header.generation} cannot be applied: the replica expects generation "
                f"{expected_generation} next",
            )
        for _ in reader.records():
            pass
        seal = reader.seal
        assert seal is not None

        f.seek(log_start)
        reader = LogReader(f, log_name=log_name, disk_name=disk_name, buffer=buffer)
        if reader.header != header:
            raise reader.error(LogCorruptError, "the log changed between verification and apply")
        coalescer = _Coalescer(target, window)
        for record in reader.records():
            coalescer.add(record.offset, record.data)
        coalescer.flush()
    target.flush()
    return AppliedLog(
        generation=header.generation,
        first_seq=header.first_seq,
        last_seq=seal.last_seq,
        records=seal.records,
        data_bytes=seal.data_bytes,
        bytes_written=coalescer.bytes_written,
        seconds=time.monotonic() - started,
    )


def _check_identity(reader: LogReader, disk_id: bytes | None, disk_size: int | None) -> None:
    header = reader.header
    if disk_id is not None and header.disk_id != disk_id:
        raise reader.error(
            LogDiskMismatchError,
            f"the log belongs to disk id {header.disk_label}, not {uuid.UUID(bytes=disk_id)}",
        )
    if disk_size is not None and header.disk_size != disk_size:
        raise reader.error(
            LogDiskMismatchError,
            f"the log is of a {header.disk_size}-byte disk but the target is {disk_size} bytes",
        )


class _Coalescer:
    """Gathers the final bytes of the ranges a run of records touches, then writes them in order.

    The touched ranges are kept as disjoint sorted intervals over one arena buffer. A record
    overwrites the parts of existing intervals it covers in place and adds intervals only for what
    is new, so no byte is copied more than once per record; touching intervals are joined only when
    written out.
    """

    def __init__(self, target: DiskEndpoint, window: int):
        self._target = target
        self._alignment = max(1, target.alignment)
        self._piece = max(self._alignment, MAX_TARGET_WRITE // self._alignment * self._alignment)
        self._arena = memoryview(aligned_buffer(window))
        self._out = memoryview(aligned_buffer(self._piece))
        self._used = 0
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._slots: list[int] = []
        self.bytes_written = 0

    def add(self, offset: int, data: memoryview) -> None:
        end = offset + data.nbytes
        if self._used + data.nbytes > self._arena.nbytes:
            self.flush()
        starts, ends, slots, arena = self._starts, self._ends, self._slots, self._arena
        first = bisect_right(ends, offset)  # the first interval ending after `offset`
        last = first
        new_starts, new_ends, new_slots = [], [], []
        cursor = offset
        while last < len(starts) and starts[last] < end:
            start, stop, slot = starts[last], ends[last], slots[last]
            if cursor < start:
                self._place(cursor, start, offset, data, new_starts, new_ends, new_slots)
            low, high = max(start, offset), min(stop, end)
            arena[slot + low - start : slot + high - start] = data[low - offset : high - offset]
            new_starts.append(start)
            new_ends.append(stop)
            new_slots.append(slot)
            cursor = high
            last += 1
        if cursor < end:
            self._place(cursor, end, offset, data, new_starts, new_ends, new_slots)
        starts[first:last] = new_starts
        ends[first:last] = new_ends
        slots[first:last] = new_slots

    def _place(self, start: int, stop: int, offset: int, data: memoryview, starts: list, ends: list, slots: list):
        self._arena[self._used : self._used + stop - start] = data[start - offset : stop - offset]
        starts.append(start)
        ends.append(stop)
        slots.append(self._used)
        self._used += stop - start

    def flush(self) -> None:
        """Write every gathered interval; intervals whose aligned extents touch go out as one run."""
        starts, ends = self._starts, self._ends
        size, alignment = self._target.size, self._alignment
        first = 0
        while first < len(starts):
            run_start = starts[first] // alignment * alignment
            run_end = min(-(-ends[first] // alignment) * alignment, size)
            last = first + 1
            while last < len(starts) and starts[last] // alignment * alignment <= run_end:
                run_end = max(run_end, min(-(-ends[last] // alignment) * alignment, size))
                last += 1
            self._write_run(run_start, run_end, first, last)
            first = last
        self._starts, self._ends, self._slots = [], [], []
        self._used = 0

    def _write_run(self, run_start: int, run_end: int, first: int, last: int) -> None:
        """Write [run_start, run_end) in pieces; bytes no interval covers (alignment edges) are the
        target's own, read back first."""
        starts, ends, slots, arena, out = self._starts, self._ends, self._slots, self._arena, self._out
        k = first
        piece_start = run_start
        while piece_start < run_end:
            piece_end = min(piece_start + self._piece, run_end)
            cursor = piece_start
            while k < last and starts[k] < piece_end:
                low, high = max(starts[k], piece_start), min(ends[k], piece_end)
                if cursor < low:
                    self._target.read_into(cursor, out[cursor - piece_start : low - piece_start])
                source = slots[k] - starts[k]
                out[low - piece_start : high - piece_start] = arena[source + low : source + high]
                cursor = high
                if ends[k] > piece_end:
                    break
                k += 1
            if cursor < piece_end:
                self._target.read_into(cursor, out[cursor - piece_start : piece_end - piece_start])
            self._target.write(piece_start, out[: piece_end - piece_start])
            self.bytes_written += piece_end - piece_start
            piece_start = piece_end


def _log_name(log: object) -> str:
    if isinstance(log, (str, os.PathLike)):
        return Path(log).name
    name = getattr(log, "name", None)
    return Path(name).name if isinstance(name, (str, os.PathLike)) else "<stream>"


def _read_up_to(f: BinaryIO, n: int) -> bytes:
    chunks, total = [], 0
    while total < n:
        chunk = f.read(n - total)
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


@contextmanager
def _seekable_log(log: str | os.PathLike[str] | BinaryIO) -> Iterator[BinaryIO]:
    """A seekable binary file for a log: the path opened, the stream itself, or a spooled copy of a
    stream that cannot seek."""
    if isinstance(log, (str, os.PathLike)):
        with open(log, "rb", buffering=0) as f:
            yield f
    elif log.seekable():
        yield log
    else:
        with tempfile.TemporaryFile() as spool:
            shutil.copyfileobj(log, spool, _SPOOL_CHUNK)
            spool.seek(0)
            yield spool
