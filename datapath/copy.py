"""The initial replication copy: every byte of a source disk to a target of the same size.

The stages overlap: a reader thread fills a ring of page-aligned buffers from the source, this thread
checksums each chunk (the manifest comes for free), a writer thread sends the chunks to the target,
and a flusher thread makes them durable while the writer goes on (a serial flush every 64 MiB would
cost a file target about a third of its speed).

Holes in the source are never read, and chunks of zeros are never sent as data: on a fresh (all-zero)
target they are left alone, which keeps a file target sparse; otherwise they become `write_zeros`.

The copy checkpoints: `on_progress(offset)` is called only with offsets below which everything has
been written and flushed, so a redelivered task can resume at the last offset it saw.
"""
from __future__ import annotations

import ctypes
import math
import os
import queue
import threading
import time
from dataclasses import dataclass

from datapath.disk import local_file_beneath
from datapath.endpoint import DiskEndpoint
from datapath.errors import AlignmentError, SizeMismatchError
from datapath.manifest import (
    DEFAULT_CHUNK_SIZE,
    HASH_SIZE,
    Manifest,
    Progress,
    ReadAhead,
    Window,
    check_chunk_size,
    chunk_count,
    chunk_hash,
    data_windows,
    is_zero,
    window_size,
    zero_chunk_hash,
)

DEFAULT_IO_SIZE = 4 * 1024 * 1024
# Flushing a file makes the writes durable at a cost; every 64 MiB keeps that cost small while a
# redelivered copy loses little.
DEFAULT_FLUSH_INTERVAL = 64 * 1024 * 1024
# Zeros at the edges of a data chunk are left out of its write in blocks of this size (filesystem blocks).
_TRIM_BLOCK = 4096
_SYNC_FILE_RANGE_WRITE = 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_libc.sync_file_range.restype = ctypes.c_int


@dataclass
class CopyResult:
    bytes_read: int
    """Bytes read from the source (holes are not read, not even inside a chunk)."""
    bytes_written: int
    """Disk data sent to the target with `write`."""
    zero_bytes_skipped: int
    """Bytes not sent as data because they are zeros: holes, zero chunks, and on a fresh target the
    zero blocks at the edges of data chunks. Left alone on a fresh target, made zero with
    `write_zeros` otherwise. bytes_written + zero_bytes_skipped = size - start_offset."""
    seconds: float
    manifest: Manifest | None
    """The source's chunk manifest, or None when the copy resumed mid-way (it did not see every chunk)."""


@dataclass(frozen=True)
class _Write:
    offset: int
    data: memoryview


@dataclass(frozen=True)
class _Zeros:
    offset: int
    length: int


_Operation = _Write | _Zeros


def copy_disk(
    source: DiskEndpoint,
    target: DiskEndpoint,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    start_offset: int = 0,
    target_is_zero: bool = True,
    on_progress: Progress | None = None,
    io_size: int = DEFAULT_IO_SIZE,
    flush_interval: int = DEFAULT_FLUSH_INTERVAL,
) -> CopyResult:
    """Copy `source` to `target` (same size) from `start_offset`, a multiple of `chunk_size`.

    `target_is_zero` says the target reads as zeros from `start_offset` on (a freshly created disk), so
    zero chunks need no request at all. Reads are `io_size` bytes (rounded down to whole chunks). The
    target is flushed about every `flush_interval` bytes and at the end; `on_progress(offset)` is called
    (on this thread) after such flushes with the offset below which the target is complete and durable.

    The target's `flush` is called on one thread while its `write` runs on another (LocalDisk and the
    page-blob disk allow it); a flush then covers the writes that returned before it began."""
    _check_copy(source, target, chunk_size, start_offset, io_size, flush_interval)
    started = time.monotonic()
    size = source.size
    hashes = bytearray(zero_chunk_hash(chunk_size) * chunk_count(size, chunk_size))
    if size % chunk_size:
        hashes[-HASH_SIZE:] = zero_chunk_hash(size % chunk_size)
    stats = CopyResult(bytes_read=0, bytes_written=0, zero_bytes_skipped=0, seconds=0.0, manifest=None)
    trim_block = math.lcm(_TRIM_BLOCK, target.alignment) if target_is_zero else None
    reported = start_offset

    def report_durable() -> None:
        nonlocal reported
        if on_progress is not None and writer.durable > reported:
            reported = writer.durable
            on_progress(reported)

    size_of_window = window_size(chunk_size, io_size)
    plan = data_windows(source, chunk_size, size_of_window, start_offset)
    with ReadAhead([source], plan, size_of_window) as reader:
        writer = _TargetWriter(target, reader, start_offset, flush_interval)
        try:
            position = start_offset
            for window in reader:
                if window.offset > position:
                    writer.submit(_hole_operations(position, window.offset, target_is_zero), window.offset)
                    stats.zero_bytes_skipped += window.offset - position
                stats.bytes_read += window.bytes_read
                operations = _chunk_operations(window, chunk_size, trim_block, hashes, stats)
                writer.submit(operations, window.end, window)
                position = window.end
                writer.raise_if_failed()
                report_durable()
            if position < size:
                writer.submit(_hole_operations(position, size, target_is_zero), size)
                stats.zero_bytes_skipped += size - position
            writer.finish()
            report_durable()  # a flush that completed after the last window still counts
        except BaseException:
            writer.abort()
            raise
    if writer.durable < size:  # unless the writer's last flush already covered the end
        target.flush()
    if on_progress is not None and size > reported:
        on_progress(size)
    stats.seconds = time.monotonic() - started
    if start_offset == 0:
        stats.manifest = Manifest(size, chunk_size, bytes(hashes))
    return stats


def _check_copy(
    source: DiskEndpoint, target: DiskEndpoint, chunk_size: int, start_offset: int, io_size: int, flush_interval: int
) -> None:
    if source.size != target.size:
        raise SizeMismatchError(
            f"cannot copy {source.name} ({source.size} bytes) to {target.name} ({target.size} bytes): "
            f"the disks must have the same size"
        )
    check_chunk_size(chunk_size)
    if chunk_size % target.alignment:
        raise AlignmentError(
            f"chunk size {chunk_size} is not a multiple of {target.name}'s write alignment {target.alignment}"
        )
    if not isinstance(start_offset, int) or not 0 <= start_offset <= source.size:
        raise ValueError(f"start offset {start_offset!r} is outside {source.name} [0, {source.size}]")
    if start_offset % chunk_size:
        raise AlignmentError(
            f"cannot resume the copy of {source.name} at offset {start_offset}: not a multiple of the "
            f"chunk size {chunk_size}"
        )
    if io_size <= 0 or flush_interval <= 0:
        raise ValueError(f"io size ({io_size}) and flush interval ({flush_interval}) must be positive")


def _hole_operations(start: int, end: int, target_is_zero: bool) -> list[_Operation]:
    return [] if target_is_zero else [_Zeros(start, end - start)]


def _chunk_operations(
    window: Window, chunk_size: int, trim_block: int | None, hashes: bytearray, stats: CopyResult
) -> list[_Operation]:
    """Hash the window's chunks into `hashes` and turn them into target requests, adjacent ones of a
    kind merged: data chunks become writes, zero chunks write_zeros. With `trim_block` (a fresh target)
    zero chunks need nothing, and a data chunk is written only from its first to its last non-zero
    block of that size: where a source extent begins or ends inside a chunk, the rest stays a hole."""
    view = window.view
    spans: list[list] = []  # [is_data, start, end] relative to the window
    for pos in range(0, window.length, chunk_size):
        chunk = view[pos:pos + chunk_size]
        digest = chunk_hash(chunk)
        slot = (window.offset + pos) // chunk_size * HASH_SIZE
        hashes[slot:slot + HASH_SIZE] = digest
        # The hash only nominates zero chunks; a memcmp confirms, so no collision can drop data.
        if digest == zero_chunk_hash(len(chunk)) and is_zero(chunk):
            stats.zero_bytes_skipped += len(chunk)
            if trim_block is None:
                _add_span(spans, False, pos, pos + len(chunk))
            continue
        start, end = _nonzero_span(chunk, trim_block) if trim_block else (0, len(chunk))
        stats.bytes_written += end - start
        stats.zero_bytes_skipped += len(chunk) - (end - start)
        _add_span(spans, True, pos + start, pos + end)
    return [_Write(window.offset + start, view[start:end]) if is_data else _Zeros(window.offset + start, end - start)
            for is_data, start, end in spans]


def _add_span(spans: list[list], is_data: bool, start: int, end: int) -> None:
    if spans and spans[-1][0] == is_data and spans[-1][2] == start:
        spans[-1][2] = end
    else:
        spans.append([is_data, start, end])


def _nonzero_span(chunk: memoryview, block: int) -> tuple[int, int]:
    """[start, end) of `chunk` (which is not all zeros) from its first to its last non-zero block.

    Both edges are found by bisection over block boundaries, each step one memcmp of a prefix or
    suffix: where an extent starts or ends inside a chunk, the zeros there may be hundreds of blocks
    long, and testing them a block at a time cost a sparse copy a quarter of a second of CPU."""
    blocks = -(-len(chunk) // block)
    low, high = 0, 0 if not is_zero(chunk[:block]) else blocks - 1  # most chunks: data from the start
    # The first `low` blocks are zeros; the first `high + 1` are not.
    while low < high:
        middle = (low + high + 1) // 2
        if is_zero(chunk[:middle * block]):
            low = middle
        else:
            high = middle - 1
    start = low * block
    low = high = blocks  # most chunks: data to the end
    if is_zero(chunk[(blocks - 1) * block:]):
        low = start // block + 1
    # The blocks from `high` on are zeros; those from `low - 1` on are not.
    while low < high:
        middle = (low + high) // 2
        if is_zero(chunk[middle * block:]):
            high = middle
        else:
            low = middle + 1
    return start, min(high * block, len(chunk))


def _start_writeback(target: DiskEndpoint, offset: int, length: int) -> None:
    """Have the kernel start writing a local file target's new pages to the device now, without
    waiting for them. Left alone, they wait in the page cache for the next flush, and each flush then
    writes a burst of up to a flush interval; started as they are written, the writes reach the device
    in a steady stream beside the reads and each flush finds little left to do (writing 1 GiB here:
    0.49 s best instead of 0.66 s, one fsync at the end in both)."""
    local = local_file_beneath(target)
    if local is not None and _libc.sync_file_range(local.fileno(), offset, length, _SYNC_FILE_RANGE_WRITE) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"starting the writeback of {target.name} at {offset}+{length}: {os.strerror(error)}")


_FINISHED = object()


class _TargetWriter:
    """Two threads on the target side. The writer carries out each window's requests in order and
    releases the window; once `flush_interval` bytes were sent since the last flush it asks the
    flusher to flush the target, and writes on while that flush runs (a flush waits only for what was
    written before it began, so the offset it covers is exact). Counting bytes sent rather than
    offsets keeps a sparse disk from costing a flush per extent. `durable` is the offset below which
    everything is written and flushed.

    After an error the writer keeps releasing windows without writing, so the reader never waits on
    a buffer that will not come back; the caller sees the error at its next `raise_if_failed`."""

    def __init__(self, target: DiskEndpoint, reader: ReadAhead, start_offset: int, flush_interval: int):
        self._target = target
        self._reader = reader
        self._flush_interval = flush_interval
        self._writes: queue.SimpleQueue[tuple[list[_Operation], int, Window | None] | object] = queue.SimpleQueue()
        self._flushes: queue.SimpleQueue[int | object] = queue.SimpleQueue()
        self._flusher_idle = threading.Event()
        self._flusher_idle.set()
        self._unflushed = 0
        """Bytes sent since the last flush was requested."""
        self._error: BaseException | None = None
        self._error_lock = threading.Lock()
        self.durable = start_offset
        """Everything below this offset is written and flushed."""
        self._writer = threading.Thread(target=self._write_all, name="copy-writer", daemon=True)
        self._flusher = threading.Thread(target=self._flush_all, name="copy-flusher", daemon=True)
        self._writer.start()
        self._flusher.start()

    def submit(self, operations: list[_Operation], end: int, window: Window | None = None) -> None:
        self._writes.put((operations, end, window))

    def raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def finish(self) -> None:
        """Wait for every submitted request and flush in progress; raise the first error."""
        self.abort()
        self.raise_if_failed()

    def abort(self) -> None:
        self._writes.put(_FINISHED)
        self._writer.join()
        self._flushes.put(_FINISHED)
        self._flusher.join()

    def _fail(self, error: BaseException) -> None:
        with self._error_lock:
            if self._error is None:
                self._error = error

    def _write_all(self) -> None:
        while (item := self._writes.get()) is not _FINISHED:
            operations, end, window = item
            if self._error is None:
                try:
                    self._apply(operations)
                except BaseException as exc:  # raised by the copying thread
                    self._fail(exc)
            if window is not None:
                self._reader.release(window)
            self._unflushed += sum(len(op.data) if isinstance(op, _Write) else op.length for op in operations)
            if self._error is not None or not self._flusher_idle.is_set():
                continue
            if self._unflushed >= self._flush_interval:
                self._flusher_idle.clear()
                self._unflushed = 0
                self._flushes.put(end)
            elif self._unflushed == 0 and end - self.durable >= self._flush_interval:
                self.durable = end  # nothing sent since the last flush, which has completed

    def _apply(self, operations: list[_Operation]) -> None:
        for operation in operations:
            if isinstance(operation, _Write):
                self._target.write(operation.offset, operation.data)
                _start_writeback(self._target, operation.offset, len(operation.data))
            else:
                self._target.write_zeros(operation.offset, operation.length)

    def _flush_all(self) -> None:
        while (end := self._flushes.get()) is not _FINISHED:
            try:
                self._target.flush()
                self.durable = end
            except BaseException as exc:
                self._fail(exc)
            finally:
                self._flusher_idle.set()
