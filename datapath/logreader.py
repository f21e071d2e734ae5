"""Reading replication logs (`.hrl`, layout in datapath/logformat.py), verifying every record as it is read.

`LogReader` streams and verifies a log; `verify_log` reads and verifies a whole one. `read_log_header`,
`read_seal` and `read_record` read and verify a log's header, its seal or one record on their own.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import mmh3

from datapath.buffers import aligned_buffer
from datapath.errors import LogCorruptError, NonRecoverableError
from datapath.logformat import (
    CHECKSUM_SIZE,
    FORMAT_VERSION,
    HEADER_FIELDS,
    HEADER_SIZE,
    MAGIC,
    MAX_RECORD_DATA,
    RECORD_HEADER,
    RECORD_HEADER_SIZE,
    RECORD_OVERHEAD,
    SEAL,
    SEAL_PAYLOAD,
    SEAL_RECORD_SIZE,
    WRITE,
    LogHeader,
    LogSeal,
    log_digest_step,
)

READ_BUFFER_SIZE = 2 * MAX_RECORD_DATA
_SPOOL_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class LogRecord:
    index: int
    """1 for the first record after the header."""
    seq: int
    offset: int
    length: int
    data: memoryview
    """Valid only until the reader moves on to the next record."""


class LogDiskMismatchError(LogCorruptError):
    """A valid log, but of another disk (disk id) or of a disk of another size than the target."""


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
        HEADER_FIELDS.unpack_from(raw, 0)
    )
    if magic != MAGIC:
        raise ctx.corrupt(f"not a replication log (magic {bytes(magic)!r}, expected {MAGIC!r})")
    if mmh3.mmh3_x64_128_digest(raw[: HEADER_FIELDS.size]) != bytes(raw[HEADER_FIELDS.size : HEADER_SIZE]):
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
        ctx = _LogContext(log_file_name(log), disk_name)
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
    rtype, length, next_seq, _ = RECORD_HEADER.unpack_from(raw, 0)
    body = raw[: RECORD_HEADER_SIZE + SEAL_PAYLOAD.size]
    if rtype != SEAL or length != SEAL_PAYLOAD.size or mmh3.mmh3_x64_128_digest(body) != raw[len(body) :]:
        raise ctx.corrupt("no valid SEAL record at the end of the log: not sealed or damaged")
    records, last_seq, data_bytes, digest = SEAL_PAYLOAD.unpack_from(raw, RECORD_HEADER_SIZE)
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
    rtype, length, seq, offset = RECORD_HEADER.unpack(raw)
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


def read_records_between(fd: int, start: int, end: int, header: LogHeader, *, next_seq: int,
                         log_name: str = "") -> Iterator[LogRecord] | None:
    """The WRITE records of an open log lying exactly from byte `start` to `end`, the last one's sequence number
    `next_seq` - 1 (a tracker's last commit), each verified as it is read (LogCorruptError for a wrong checksum
    or sequence number); None when they do not tile the range as whole records."""
    position, count = start, 0
    while position < end:  # the headers first, to count the records: the first one's sequence number follows
        raw = os.pread(fd, RECORD_HEADER_SIZE, position)
        if len(raw) < RECORD_HEADER_SIZE:
            return None
        position += RECORD_OVERHEAD + RECORD_HEADER.unpack(raw)[1]
        count += 1
    if position != end or count == 0:
        return None

    def records() -> Iterator[LogRecord]:  # one at a time: a batch may hold many large writes
        position = start
        for seq in range(next_seq - count, next_seq):
            record = read_record(fd, position, header, expected_seq=seq, log_name=log_name)
            yield record
            position += RECORD_OVERHEAD + record.length

    return records()


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
        self._ctx = _LogContext(log_name or log_file_name(source), disk_name)
        if buffer is None:
            self._mmap = aligned_buffer(READ_BUFFER_SIZE)
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
            rtype, length, seq, offset = RECORD_HEADER.unpack_from(self._buf, self._start)
            if rtype == WRITE:
                if length == 0 or length % block or length > MAX_RECORD_DATA:
                    raise ctx.corrupt(
                        f"bad data length {length} (must be a multiple of {block} in [{block}, "
                        f"{MAX_RECORD_DATA}]) at byte {position}",
                        record=index,
                        seq=seq,
                    )
            elif rtype == SEAL:
                if length != SEAL_PAYLOAD.size:
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
        records, last_seq, sealed_bytes, sealed_digest = SEAL_PAYLOAD.unpack_from(body, RECORD_HEADER_SIZE)
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
    with seekable_log(log) as f:
        reader = LogReader(f, log_name=log_file_name(log), disk_name=disk_name)
        check_log_identity(reader, disk_id, disk_size)
        for _ in reader.records():
            pass
        assert reader.seal is not None
        return reader.header, reader.seal


def check_log_identity(reader: LogReader, disk_id: bytes | None, disk_size: int | None) -> None:
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


def log_file_name(log: object) -> str:
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
def seekable_log(log: str | os.PathLike[str] | BinaryIO) -> Iterator[BinaryIO]:
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
