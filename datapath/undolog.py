"""Undo logs: how every version of a replica's content (datapath/points.py) stays readable while the
replica changes in place; `PointDisk` reads the replica as it was at an earlier version.

The initial copy is version 1; each applied log and each resync adds one. Before change v touches the
replica, the bytes it will overwrite, as they are at version v-1, are stored as the undo log
`<replica>.vNNNNNNNN.undo` (the `.hrl` format, so every record is checksummed and the whole is sealed).
The content at version k is then the replica overlaid with the undo logs of versions k+1 up to the
current one, the oldest winning for a byte: the oldest undo covering a byte was taken before the first
change after k that touched it, so it holds the byte as it was at k.

The writers (datapath/replication.py) keep one invariant: while the replica is at version v-1, every
byte outside the ranges of undo v holds its version v-1 content. So an undo already stored for the
change being made (a rerun after a crash: the replica may hold part of the change) is never
rewritten for the ranges it has; it is only extended with ranges it lacks, read from the replica.
An undo for the version after the current one is such an interrupted change, and reading any version
overlays it too.
"""
from __future__ import annotations

import heapq
import os
import tempfile
import uuid
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice, takewhile
from types import TracebackType
from typing import TYPE_CHECKING, BinaryIO

from datapath.endpoint import SECTOR, DiskEndpoint
from datapath.errors import LogCorruptError, NonRecoverableError
from datapath.logformat import HEADER_SIZE, MAX_RECORD_DATA, RECORD_HEADER_SIZE, RECORD_OVERHEAD, LogWriter
from datapath.logreader import LogDiskMismatchError, LogReader
from datapath.manifest import DEFAULT_CHUNK_SIZE, ReadAhead, WindowPlan, chunk_hash
from sites.storage.base import ObjectNotFoundError

if TYPE_CHECKING:
    from datapath.replication import ReplicaDisk, ReplicaState

Range = tuple[int, int]
"""[start, end) on the disk."""

# Ranges of an undo closer than this are read from the replica in one request (a page blob read
# costs a round trip; reading a gap this small costs less).
_READ_GAP = 64 * 1024
_READ_WINDOW = MAX_RECORD_DATA


# ---- ranges ------------------------------------------------------------------------------------
def merge_ranges(ranges: Iterable[Range], *, align: int = SECTOR, size: int | None = None) -> list[Range]:
    """[start, end) ranges widened to `align`, clipped to `size`, sorted, overlapping or touching
    ones joined."""
    spans = sorted(
        (start - start % align, -(-end // align) * align if size is None else min(-(-end // align) * align, size))
        for start, end in ranges if end > start
    )
    merged: list[Range] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            if end > merged[-1][1]:
                merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def subtract_ranges(ranges: list[Range], covered: list[Range]) -> list[Range]:
    """The parts of `ranges` outside `covered`; both sorted and disjoint. A part never spans two of
    `ranges`."""
    pieces: list[Range] = []
    first = 0
    for start, end in ranges:
        while first < len(covered) and covered[first][1] <= start:
            first += 1
        cursor = start
        index = first
        while index < len(covered) and covered[index][0] < end:
            low, high = covered[index]
            if low > cursor:
                pieces.append((cursor, low))
            cursor = max(cursor, high)
            index += 1
        if cursor < end:
            pieces.append((cursor, end))
    return pieces


def _coalesce(ranges: Iterable[Range]) -> Iterator[Range]:
    """Sorted, possibly overlapping ranges joined where they overlap or touch."""
    start = end = -1
    for low, high in ranges:
        if low <= end:
            end = max(end, high)
            continue
        if end > start:
            yield start, end
        start, end = low, high
    if end > start:
        yield start, end


# ---- undo logs ---------------------------------------------------------------------------------
@dataclass(eq=False)
class UndoLog:
    """A verified undo log, spooled in a temporary file: the bytes of its ranges at the version
    before its own."""

    version: int
    name: str
    file: BinaryIO = field(repr=False)
    records: list[tuple[int, int, int]] = field(repr=False)
    """(start, end, position of the data in `file`), sorted by start, disjoint."""

    @property
    def ranges(self) -> list[Range]:
        return [(start, end) for start, end, _ in self.records]

    def pieces(self) -> Iterator[tuple[int, bytes]]:
        """(offset, data) of every record, in offset order."""
        for start, end, position in self.records:
            data = bytearray(end - start)
            _pread_fully(self.file.fileno(), memoryview(data), position, self.name)
            yield start, data

    def close(self) -> None:
        self.file.close()


def fetch_undo(replica: ReplicaDisk, version: int, state: ReplicaState) -> UndoLog | None:
    """Download and verify the undo log of `version`; None when it does not exist. A damaged one, or
    one of another disk or version, raises LogCorruptError naming it."""
    name = replica.undo_name(version)
    spool = tempfile.TemporaryFile(prefix="undo-")
    try:
        try:
            replica.storage.get_object(name, spool)
        except ObjectNotFoundError:
            spool.close()
            return None
        spool.flush()
        spool.seek(0)
        return UndoLog(version, name, spool, _verified_records(spool, name, replica.name, version, state))
    except BaseException:
        spool.close()
        raise


def _verified_records(
    spool: BinaryIO, name: str, replica_name: str, version: int, state: ReplicaState
) -> list[tuple[int, int, int]]:
    reader = LogReader(spool, log_name=name, disk_name=replica_name)
    header = reader.header
    disk_id = bytes.fromhex(state.disk_id)
    if header.disk_id != disk_id or header.disk_size != state.size:
        raise reader.error(
            LogDiskMismatchError,
            f"the undo log is of disk id {header.disk_label} ({header.disk_size} bytes), not of this "
            f"replica's disk {uuid.UUID(bytes=disk_id)} ({state.size} bytes)",
        )
    if header.generation != version:
        raise reader.error(LogCorruptError, f"the undo log holds version {header.generation}, not {version}")
    records = []
    position = HEADER_SIZE
    for record in reader.records():  # every record and the seal verified before any is used
        records.append((record.offset, record.offset + record.length, position + RECORD_HEADER_SIZE))
        position += RECORD_OVERHEAD + record.length
    records.sort()
    for before, after in zip(records, records[1:], strict=False):
        if after[0] < before[1]:
            raise reader.error(LogCorruptError, f"the undo log's ranges overlap at offset {after[0]}")
    return records


def store_undo(
    replica: ReplicaDisk,
    version: int,
    state: ReplicaState,
    pieces: Iterable[tuple[int, bytes | memoryview]],
    *,
    existing: Iterable[tuple[int, bytes | memoryview]] | None = None,
) -> bool:
    """Write the undo log of `version` from (offset, data) pieces (disjoint, 512-byte aligned) into a
    temporary file, then store it as one object (atomic on every backend). `existing` are the records
    of the undo log already stored, written first: with them, it is replaced only when `pieces` adds
    some. Returns whether the log was stored."""
    added = 0
    with tempfile.TemporaryDirectory(prefix="undo-") as folder:
        path = os.path.join(folder, "undo.hrl")
        with LogWriter.create(path, disk_id=bytes.fromhex(state.disk_id), generation=version, first_seq=1,
                              disk_size=state.size) as writer:
            for offset, data in existing or ():
                _append(writer, offset, data)
            for offset, data in pieces:
                _append(writer, offset, data)
                added += 1
            writer.seal(fsync=False)
        if existing is not None and not added:
            return False
        with open(path, "rb") as log:
            replica.storage.put_object(replica.undo_name(version), log)
    return True


def _append(writer: LogWriter, offset: int, data: bytes | memoryview) -> None:
    """One record per MAX_RECORD_DATA bytes of `data`, appended by the native part without the GIL, so the
    read-ahead thread reading (and decrypting) the next pieces runs meanwhile."""
    view = memoryview(data)
    writer.append_many([(offset + position, view[position:position + MAX_RECORD_DATA])
                        for position in range(0, len(view), MAX_RECORD_DATA)])


def record_undo(
    replica: ReplicaDisk,
    state: ReplicaState,
    version: int,
    ranges: Iterable[Range],
    *,
    keep_chunk: Callable[[int, bytes], bool] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> None:
    """Store undo `version`: the replica's bytes in `ranges` as they are at version-1, before the
    change making `version` writes them.

    An undo already stored for `version` (the same change run again after a crash) keeps what it
    has: the replica may already hold new bytes in its ranges. Only ranges it lacks are added, read
    from the replica, where they still hold version-1 content; with none to add nothing is written.

    With `keep_chunk`, the replica is read in whole chunks of `chunk_size` (as version-1 reads them:
    the existing undo overlaid) and `keep_chunk(index, chunk hash)` says whether the new ranges inside
    each are kept; the resync drops chunks whose old content it will write back itself."""
    existing = fetch_undo(replica, version, state)
    try:
        wanted = merge_ranges(ranges, size=state.size)
        fresh = subtract_ranges(wanted, list(_coalesce(existing.ranges)) if existing else [])
        if existing is not None and not fresh:
            return
        # The replica with the existing undo over it reads as version-1 wherever undo `version` may need.
        view = PointDisk(replica.storage.open_disk(replica.name), [existing] if existing else [],
                         name=f"{replica.name} before version {version}", owns_layers=False)
        try:
            if keep_chunk is None:
                new_pieces = _range_pieces(view, fresh)
            else:
                new_pieces = _chunk_pieces(view, fresh, chunk_size, keep_chunk)
            # What the existing undo has is kept as it is; it is stored again only with more.
            store_undo(replica, version, state, new_pieces, existing=existing.pieces() if existing else None)
        finally:
            view.close()
    finally:
        if existing is not None:
            existing.close()


def _range_pieces(endpoint: DiskEndpoint, ranges: list[Range]) -> Iterator[tuple[int, memoryview]]:
    """The bytes of `ranges`, read in windows of nearby ranges (one request each)."""
    groups: list[list[Range]] = []
    for start, end in ranges:
        for low in range(start, end, _READ_WINDOW):
            high = min(end, low + _READ_WINDOW)
            group = groups[-1] if groups else None
            if group and low - group[-1][1] <= _READ_GAP and high - group[0][0] <= _READ_WINDOW:
                group.append((low, high))
            else:
                groups.append([(low, high)])
    plan = [WindowPlan(group[0][0], group[-1][1] - group[0][0]) for group in groups]
    with ReadAhead([endpoint], plan, _READ_WINDOW) as reader:
        for window, group in zip(reader, groups, strict=False):
            for low, high in group:
                yield low, window.view[low - window.offset:high - window.offset]
            reader.release(window)


def _chunk_pieces(
    endpoint: DiskEndpoint, ranges: list[Range], chunk_size: int, keep_chunk: Callable[[int, bytes], bool]
) -> Iterator[tuple[int, memoryview]]:
    """The bytes of `ranges`, chunk by chunk, for the chunks `keep_chunk` keeps."""
    by_chunk: dict[int, list[Range]] = {}
    for start, end in ranges:
        for index in range(start // chunk_size, (end - 1) // chunk_size + 1):
            low, high = max(start, index * chunk_size), min(end, (index + 1) * chunk_size)
            by_chunk.setdefault(index, []).append((low, high))
    plan = [WindowPlan(index * chunk_size, min(chunk_size, endpoint.size - index * chunk_size))
            for index in sorted(by_chunk)]
    with ReadAhead([endpoint], plan, chunk_size) as reader:
        for window in reader:
            index = window.offset // chunk_size
            if keep_chunk(index, chunk_hash(window.view)):
                for low, high in by_chunk[index]:
                    yield low, window.view[low - window.offset:high - window.offset]
            reader.release(window)


def _pread_fully(fd: int, view: memoryview, position: int, name: str) -> None:
    done = 0
    while done < len(view):
        read = os.preadv(fd, [view[done:]], position + done)
        if read == 0:
            raise LogCorruptError(f"undo log {name}: its spooled copy ends at byte {position + done}")
        done += read


# ---- reading a version -------------------------------------------------------------------------
class PointDisk:
    """A read-only DiskEndpoint: a replica disk overlaid with undo logs, the first layer given winning
    for a byte (layers oldest first). Reads of the undo ranges come from the spooled logs."""

    def __init__(self, base: DiskEndpoint, layers: list[UndoLog], *, name: str, owns_layers: bool = True):
        self.name = name
        self.size = base.size
        self.alignment = base.alignment
        self._base = base
        self._layers = layers
        self._owns_layers = owns_layers
        entries: list[tuple[int, int, int, int]] = []  # start, end, fd, position of the data
        covered: list[Range] = []
        for layer in layers:
            fd = layer.file.fileno()
            starts = [start for start, _, _ in layer.records]
            fresh = subtract_ranges(layer.ranges, covered)
            for low, high in fresh:
                start, _, position = layer.records[bisect_right(starts, low) - 1]
                entries.append((low, high, fd, position + low - start))
            covered = list(_coalesce(heapq.merge(covered, fresh)))
        entries.sort()
        self._starts = [entry[0] for entry in entries]
        self._ends = [entry[1] for entry in entries]
        self._entries = entries

    def __repr__(self) -> str:
        return f"PointDisk({self.name!r}, {len(self._entries)} undo ranges)"

    @property
    def inner(self) -> DiskEndpoint:
        """The replica disk, read at the same offsets (datapath.disk.local_file_beneath)."""
        return self._base

    def __enter__(self) -> PointDisk:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def read_into(self, offset: int, buf: memoryview) -> int:
        with memoryview(buf) as outer, outer.cast("B") as view:
            length = len(view)
            end = offset + length
            if not isinstance(offset, int) or offset < 0 or end > self.size:
                raise ValueError(f"{self.name}: cannot read {length} bytes at offset {offset}: outside the "
                                 f"disk [0, {self.size})")
            hits = []
            from_undo = 0
            index = bisect_right(self._ends, offset)
            while index < len(self._entries) and self._starts[index] < end:
                start, stop, fd, position = self._entries[index]
                low, high = max(start, offset), min(stop, end)
                hits.append((low, high, fd, position + low - start))
                from_undo += high - low
                index += 1
            if from_undo < length:
                # One request for the whole range (a page blob read is a round trip); the undo
                # ranges inside it are then overwritten.
                self._base.read_into(offset, view)
            for low, high, fd, position in hits:
                _pread_fully(fd, view[low - offset:high - offset], position, self.name)
            return length

    def data_extents(self, offset: int = 0, length: int | None = None) -> Iterator[tuple[int, int]]:
        if not isinstance(offset, int) or not 0 <= offset <= self.size:
            raise ValueError(f"{self.name}: extent offset {offset!r} is outside [0, {self.size}]")
        end = self.size if length is None else min(offset + length, self.size)
        base = ((start, start + size) for start, size in self._base.data_extents(offset, end - offset))
        first = bisect_right(self._ends, offset)
        undo = ((max(start, offset), min(stop, end))
                for start, stop, _, _ in takewhile(lambda entry: entry[0] < end, islice(self._entries, first, None)))
        for start, stop in _coalesce(heapq.merge(base, undo)):
            yield start, stop - start

    def write(self, offset: int, data: bytes | memoryview) -> None:
        raise NonRecoverableError(f"{self.name} is read-only: a recovery point is never written")

    def write_zeros(self, offset: int, length: int) -> None:
        raise NonRecoverableError(f"{self.name} is read-only: a recovery point is never written")

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self._base.close()
        if self._owns_layers:
            for layer in self._layers:
                layer.close()


