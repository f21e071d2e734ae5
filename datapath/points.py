"""Recovery points of a replica: every version of its content stays reachable through undo logs.

A replica is one disk changed in place (logs applied, resyncs). Each completed change makes a new
*version* of its content: the initial copy is version 1, each applied log and each resync adds one.
Before change v touches the replica, the bytes it will overwrite, as they are at version v-1, are
stored as the undo log `<replica>.vNNNNNNNN.undo` (the `.hrl` format, so every record is checksummed
and the whole is sealed). The content at version k is then the replica overlaid with the undo logs of
versions k+1 up to the current one, the oldest winning for a byte: the oldest undo covering a byte
was taken before the first change after k that touched it, so it holds the byte as it was at k.

The writers (datapath/replication.py) keep one invariant: while the replica is at version v-1, every
byte outside the ranges of undo v holds its version v-1 content. So an undo already stored for the
change being made (a rerun after a crash: the replica may hold part of the change) is never
rewritten for the ranges it has; it is only extended with ranges it lacks, read from the replica.
An undo for the version after the current one is such an interrupted change, and reading any version
overlays it too.

Every version also has its chunk manifest `<replica>.vNNNNNNNN.manifest` (datapath/manifest.py's
binary form), so a point can be checked against what it held when it was made without touching the
source disk.
"""
from __future__ import annotations

import heapq
import os
import re
import tempfile
import time
import uuid
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice, takewhile
from types import TracebackType
from typing import TYPE_CHECKING, BinaryIO

from datapath.copy import copy_disk
from datapath.endpoint import SECTOR, DiskEndpoint
from datapath.errors import LogCorruptError, NonRecoverableError, SizeMismatchError
from datapath.manifest import (
    DEFAULT_CHUNK_SIZE,
    Manifest,
    ManifestFormatError,
    ReadAhead,
    WindowPlan,
    chunk_hash,
    compute_manifest,
    diff_manifests,
)
from datapath.replog import (
    HEADER_SIZE,
    MAX_RECORD_DATA,
    RECORD_HEADER_SIZE,
    RECORD_OVERHEAD,
    LogDiskMismatchError,
    LogReader,
    LogWriter,
)
from sites.storage.base import ObjectNotFoundError

if TYPE_CHECKING:
    from datapath.replication import ReplicaDisk, ReplicaState

Progress = Callable[[int, int], None]
"""on_progress(bytes_done, bytes_total)"""

Range = tuple[int, int]
"""[start, end) on the disk."""

_VERSION_OBJECT = re.compile(r"v(\d{8,})\.(undo|manifest)")
# Ranges of an undo closer than this are read from the replica in one request (a page blob read
# costs a round trip; reading a gap this small costs less).
_READ_GAP = 64 * 1024
_READ_WINDOW = MAX_RECORD_DATA


class PointUnavailableError(NonRecoverableError):
    """A version of a replica cannot be read: its undo logs or manifest are gone (pruned), or it is not
    a version the replica has (yet)."""


class PointMismatchError(NonRecoverableError):
    """What was read or copied from a recovery point does not match the manifest stored with it."""


# ---- what is stored ----------------------------------------------------------------------------
@dataclass(frozen=True)
class StoredVersions:
    undo: frozenset[int]
    manifests: frozenset[int]


def stored_versions(replica: ReplicaDisk) -> StoredVersions:
    """The versions whose undo log and manifest objects exist (one listing)."""
    prefix = f"{replica.name}."
    undo, manifests = set(), set()
    for name in replica.storage.list_objects(f"{prefix}v"):
        match = _VERSION_OBJECT.fullmatch(name[len(prefix):])
        if match:
            (undo if match[2] == "undo" else manifests).add(int(match[1]))
    return StoredVersions(frozenset(undo), frozenset(manifests))


def delete_all_versions(replica: ReplicaDisk) -> None:
    """Delete every undo log and manifest of the replica: for a copy starting from scratch, after
    which no earlier content can be rebuilt. Oldest first, so a crash leaves a chain that is still
    consistent (its oldest points gone first)."""
    stored = stored_versions(replica)
    for version in sorted(stored.undo):
        replica.storage.delete_object(replica.undo_name(version))
    for version in sorted(stored.manifests):
        replica.storage.delete_object(replica.manifest_name(version))


def load_manifest(replica: ReplicaDisk, version: int) -> Manifest | None:
    """The stored manifest of `version`, None when there is none."""
    name = replica.manifest_name(version)
    try:
        raw = replica.storage.read_object(name)
    except ObjectNotFoundError:
        return None
    return Manifest.from_bytes(raw, name=name)


def store_manifest(replica: ReplicaDisk, version: int, manifest: Manifest) -> None:
    replica.storage.put_object(replica.manifest_name(version), manifest.to_bytes())


def reads_as_zeros(endpoint: DiskEndpoint) -> bool:
    """True when the disk has no data extent at all, so every byte reads as zero (one request)."""
    return next(iter(endpoint.data_extents()), None) is None


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
    for before, after in zip(records, records[1:]):
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
    view = memoryview(data)
    for position in range(0, len(view), MAX_RECORD_DATA):
        writer.append(offset + position, view[position:position + MAX_RECORD_DATA])


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
        for window, group in zip(reader, groups):
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


def _current_state(replica: ReplicaDisk, version: int) -> ReplicaState:
    """The replica's state, when `version` is one of its versions (PointUnavailableError otherwise)."""
    state = replica.load_state()
    current = state.version if state is not None else 0
    if current < 1:
        raise PointUnavailableError(
            f"replica {replica.name} has no recovery point (version {version} asked): its initial copy "
            f"is not complete"
        )
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= current:
        raise PointUnavailableError(
            f"replica {replica.name} has no version {version!r}: its versions run from 1 to {current}"
        )
    return state


def open_point(replica: ReplicaDisk, version: int) -> PointDisk:
    """The replica's content at `version`, read-only: the replica overlaid with the undo logs of the
    versions after it (each downloaded and verified first: a damaged one raises LogCorruptError naming
    it). Close it to remove the spooled logs.

    The view is stable only while no log is applied to the replica and no resync runs on it."""
    state = _current_state(replica, version)
    current = state.version
    stored = stored_versions(replica)
    missing = [later for later in range(version + 1, current + 1) if later not in stored.undo]
    if missing:
        raise PointUnavailableError(
            f"version {version} of replica {replica.name} is no longer available: the undo log of "
            f"version {missing[-1]} is gone (pruned)"
        )
    # An undo for the next version is a change interrupted half-way: the replica may hold part of it.
    interrupted = [current + 1] if current + 1 in stored.undo else []
    layers: list[UndoLog] = []
    try:
        for later in [*range(version + 1, current + 1), *interrupted]:
            layer = fetch_undo(replica, later, state)
            if layer is None:
                raise PointUnavailableError(
                    f"version {version} of replica {replica.name} is no longer available: the undo log of "
                    f"version {later} was deleted while it was being read"
                )
            layers.append(layer)
        base = replica.storage.open_disk(replica.name)
    except BaseException:
        for layer in layers:
            layer.close()
        raise
    if base.size != state.size:
        base.close()
        for layer in layers:
            layer.close()
        raise SizeMismatchError(f"replica {replica.name} is {base.size} bytes but its state says {state.size}")
    return PointDisk(base, layers, name=f"{replica.name} at version {version}")


def point_manifest(replica: ReplicaDisk, version: int) -> Manifest:
    """The manifest stored with `version` (PointUnavailableError when it is gone or not a version)."""
    state = _current_state(replica, version)
    manifest = load_manifest(replica, version)
    if manifest is None:
        raise PointUnavailableError(
            f"version {version} of replica {replica.name} is no longer available: its manifest is gone (pruned)"
        )
    if manifest.size != state.size:
        raise ManifestFormatError(
            f"{replica.manifest_name(version)}: describes a {manifest.size}-byte disk, the replica is {state.size}"
        )
    return manifest


def available_versions(replica: ReplicaDisk) -> range:
    """The versions that can still be opened: the current one and those whose chain of undo logs up to
    it is complete."""
    state = replica.load_state()
    if state is None or state.version < 1:
        return range(0)
    undo = stored_versions(replica).undo
    lowest = state.version
    while lowest > 1 and lowest in undo:
        lowest -= 1
    return range(lowest, state.version + 1)


def prune_versions(replica: ReplicaDisk, keep_from: int) -> list[int]:
    """Make the versions before `keep_from` unavailable: delete the undo logs of versions up to
    `keep_from` and the manifests of versions before it. Idempotent; returns the versions whose undo
    log was deleted. Oldest first, so an interrupted prune leaves a complete chain behind."""
    state = replica.load_state()
    if state is not None and keep_from > state.version:
        raise NonRecoverableError(
            f"cannot prune replica {replica.name} before version {keep_from}: its current version is "
            f"{state.version}, which always stays available"
        )
    stored = stored_versions(replica)
    deleted = []
    for version in sorted(version for version in stored.undo if version <= keep_from):
        replica.storage.delete_object(replica.undo_name(version))
        deleted.append(version)
    for version in sorted(version for version in stored.manifests if version < keep_from):
        replica.storage.delete_object(replica.manifest_name(version))
    return deleted


# ---- checking and restoring --------------------------------------------------------------------
@dataclass
class PointCheck:
    version: int
    expected_root: str
    """The root the point must have: the one given, else the stored manifest's."""
    actual_root: str
    """The root of the content read at that version."""
    ok: bool
    first_bad_chunk: int | None
    """The first chunk whose content differs from the stored manifest (None when none does)."""
    seconds: float


def verify_point(
    replica: ReplicaDisk, version: int, expected_root: str | None = None, on_progress: Progress | None = None
) -> PointCheck:
    """Checksum the replica's content at `version` and compare it with the manifest stored with that
    version (and with `expected_root`, when given, e.g. the root a recovery point recorded). Reads
    only the recovery site."""
    started = time.monotonic()
    stored = point_manifest(replica, version)
    with open_point(replica, version) as point:
        actual = compute_manifest(point, stored.chunk_size, on_progress=_offsets_to(on_progress, point.size))
    differing = diff_manifests(stored, actual)
    expected = stored.root_hex if expected_root is None else expected_root
    return PointCheck(
        version=version,
        expected_root=expected,
        actual_root=actual.root_hex,
        ok=not differing and actual.root_hex == expected,
        first_bad_chunk=differing[0] if differing else None,
        seconds=time.monotonic() - started,
    )


@dataclass
class RestoreResult:
    version: int
    bytes_copied: int
    """Disk data written to the target (zero chunks and holes are not sent)."""
    manifest_root: str
    """The root of what was written; equal to the version's stored manifest root."""
    seconds: float


def restore_point(
    replica: ReplicaDisk, version: int, target: DiskEndpoint, *, on_progress: Progress | None = None
) -> RestoreResult:
    """Copy the replica's content at `version` to `target` (a disk of the same size). Every undo log
    is verified before the first byte is written. PointMismatchError when what was copied does not
    match the version's stored manifest: the target is then not to be trusted."""
    started = time.monotonic()
    stored = point_manifest(replica, version)
    with open_point(replica, version) as point:
        result = copy_disk(point, target, chunk_size=stored.chunk_size, target_is_zero=reads_as_zeros(target),
                           on_progress=_offsets_to(on_progress, point.size))
    copied = result.manifest
    assert copied is not None  # a copy from offset 0 sees every chunk
    if copied.root != stored.root:
        chunk = diff_manifests(stored, copied)[0]
        raise PointMismatchError(
            f"restoring version {version} of replica {replica.name} to {target.name}: chunk {chunk} (offset "
            f"{chunk * stored.chunk_size}) differs from the version's manifest (root {copied.root_hex}, "
            f"expected {stored.root_hex}); the copy is not to be trusted"
        )
    return RestoreResult(version, result.bytes_written, copied.root_hex, time.monotonic() - started)


def _offsets_to(on_progress: Progress | None, total: int) -> Callable[[int], None] | None:
    if on_progress is None:
        return None
    return lambda offset: on_progress(offset, total)
