"""Applying a replication log (datapath/logformat.py) to a replica: `apply_log` verifies the whole log and
only then writes it, coalesced, onto the replica disk."""
from __future__ import annotations

import os
import time
from bisect import bisect_right
from dataclasses import dataclass
from typing import BinaryIO

from datapath.buffers import aligned_buffer
from datapath.endpoint import DiskEndpoint
from datapath.errors import LogCorruptError, LogOutOfSequenceError
from datapath.logformat import MAX_RECORD_DATA
from datapath.logreader import READ_BUFFER_SIZE, LogReader, check_log_identity, log_file_name, seekable_log

DEFAULT_APPLY_WINDOW = 32 * 1024 * 1024
"""Bytes of final disk content `apply_log` gathers before writing them out in offset order."""
MAX_TARGET_WRITE = 4 * 1024 * 1024
"""Largest single write issued to a target: one Put Page carries at most 4 MiB."""


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
    log_name = log_file_name(log)
    # One read buffer serves both passes. Buffers here are freed when the last view of them goes (an
    # explicit close would fail while a record's view is still referenced from a traceback).
    buffer = memoryview(aligned_buffer(READ_BUFFER_SIZE))
    with seekable_log(log) as f:
        log_start = f.tell()
        reader = LogReader(f, log_name=log_name, disk_name=disk_name, buffer=buffer)
        header = reader.header
        check_log_identity(reader, disk_id, target.size)
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
