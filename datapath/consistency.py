"""The end-to-end consistency check: a replica compared with its source at the same generation, and only
the chunks that drifted sent again.

Every other check trusts something: verify trusts the stored manifests, apply trusts the logs, the logs
trust that every write went through the tracker. This one trusts nothing but the bytes. The source is a
snapshot (its content is every write up to the generation before the snapshot's), the replica is at that
same generation (the workflow applies the logs up to it first), and both are checksummed from their bytes
(datapath.manifest): chunks whose checksums differ have drifted, whatever the cause:

- a write that bypassed the tracker (the source changed, no log says so);
- a bug anywhere along the path (a log applied wrong, a copy that skipped a range);
- the recovery storage's own corruption (the replica no longer holds what its manifest records).

Only the drifted chunks are repaired, and inside them only the differing blocks (datapath.resync's
two-level compare with both manifests given). The repair is a new version of the replica at the same
generation, like a resync: the bytes it overwrites go to that version's undo log first, so earlier
recovery points stay readable. Where the replica had been damaged (it did not hold its own recorded
content) and the source holds exactly that recorded content, the damaged bytes are not kept: the earlier
versions then read the right bytes back (as `resynchronize` does).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from datapath.endpoint import DiskEndpoint
from datapath.errors import NonRecoverableError, SizeMismatchError
from datapath.manifest import DEFAULT_CHUNK_SIZE, compute_manifest, diff_manifests
from datapath.points import manifest_if_root, store_manifest
from datapath.replication import ReplicaDisk, ReplicaState
from datapath.resync import sync_disks
from datapath.resynchronize import RecordingTarget, copy_recorded
from datapath.undolog import merge_ranges, record_undo

Progress = Callable[[int, int], None]


@dataclass
class ConsistencyReport:
    generation: int
    """The generation both sides were compared at: every write up to its end."""
    chunk_size: int
    chunks_compared: int
    drifted_chunks: list[int] = field(default_factory=list)
    """Chunks where the replica differed from the source, ascending."""
    drifted_ranges: list[tuple[int, int]] = field(default_factory=list)
    """The drifted chunks as [start, end) byte ranges, consecutive chunks joined."""
    damaged_chunks: list[int] = field(default_factory=list)
    """Drifted chunks where the replica did not even hold its own recorded content (storage corruption,
    or a write to the replica from outside)."""
    bytes_sent: int = 0
    """Source data written to the replica by the repair."""
    bytes_zeroed: int = 0
    version: int = 0
    """The replica's version after the check (one more than before when it repaired anything)."""
    manifest_root: str = ""
    seconds: float = 0.0

    def as_result(self) -> dict:
        return {"generation": self.generation, "chunk_size": self.chunk_size,
                "chunks_compared": self.chunks_compared, "drifted_chunks": self.drifted_chunks,
                "drifted_ranges": [list(r) for r in self.drifted_ranges], "damaged_chunks": self.damaged_chunks,
                "bytes_sent": self.bytes_sent, "bytes_zeroed": self.bytes_zeroed, "version": self.version,
                "manifest_root": self.manifest_root, "seconds": round(self.seconds, 3)}


def check_replica(
    source: DiskEndpoint,
    replica: ReplicaDisk,
    state: ReplicaState,
    *,
    generation: int,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    on_progress: Progress | None = None,
) -> ConsistencyReport:
    """Compare `replica` (whose `state` the caller checked against the database) with `source`, the
    disk's content at the end of `generation`, and repair the chunks that drifted. The replica must be at
    that generation (NonRecoverableError otherwise: the comparison would report every write in between as
    drift). Saves the replica's new state when it repaired anything."""
    started = time.monotonic()
    if state.applied_generation != generation:
        raise NonRecoverableError(
            f"replica {replica.name} is at generation {state.applied_generation}, the source snapshot at "
            f"generation {generation}: they cannot be compared; run the check again"
        )
    if source.size != state.size:
        raise SizeMismatchError(f"replica {replica.name} is {state.size} bytes, its source {source.size}")
    total = 2 * state.size
    source_manifest = compute_manifest(
        source, chunk_size, on_progress=None if on_progress is None else lambda done: on_progress(done, total))
    target = replica.storage.open_disk(replica.name)
    try:
        replica_manifest = compute_manifest(
            target, chunk_size,
            on_progress=None if on_progress is None else lambda done: on_progress(state.size + done, total))
        drifted = diff_manifests(source_manifest, replica_manifest)
        report = ConsistencyReport(
            generation=generation, chunk_size=chunk_size, chunks_compared=source_manifest.chunk_count,
            drifted_chunks=drifted, version=state.version, manifest_root=state.manifest_root or "")
        if drifted:
            extents = (source_manifest.chunk_extent(index) for index in drifted)  # (offset, length)
            report.drifted_ranges = merge_ranges(((offset, offset + length) for offset, length in extents),
                                                 align=chunk_size, size=state.size)
            _repair(source, target, replica, state, source_manifest, replica_manifest, report)
    finally:
        target.close()
    report.seconds = time.monotonic() - started
    return report


def _repair(source, target, replica: ReplicaDisk, state: ReplicaState, source_manifest, replica_manifest,
            report: ConsistencyReport) -> None:
    """Send the differing blocks of the drifted chunks as a new version of the replica."""
    version = state.version + 1
    recorded = manifest_if_root(replica, state.version, state.manifest_root)  # a changed one is not relied on
    if recorded is not None and recorded.chunk_size != source_manifest.chunk_size:
        recorded = None
    damaged = [] if recorded is None else [
        index for index in report.drifted_chunks if replica_manifest.chunk_hash(index) != recorded.chunk_hash(index)]
    report.damaged_chunks = damaged
    # Found without writing first (both manifests given: only the drifted chunks are read again), so the
    # bytes the repair overwrites can be saved as the version's undo log before they are.
    recorder = RecordingTarget(target)
    result = sync_disks(source, recorder, chunk_size=source_manifest.chunk_size,
                        source_manifest=source_manifest, target_manifest=replica_manifest)

    def keep_chunk(index: int, digest: bytes) -> bool:
        # Damaged bytes the source writes back as they were recorded need no undo: the earlier versions
        # then read the recorded content.
        return not (index in damaged and source_manifest.chunk_hash(index) == recorded.chunk_hash(index))

    if state.version >= 1:
        record_undo(replica, state, version, recorder.ranges(), keep_chunk=keep_chunk,
                    chunk_size=source_manifest.chunk_size)
    copy_recorded(source, target, recorder)
    store_manifest(replica, version, source_manifest)
    state.version = version
    state.manifest_root = source_manifest.root_hex
    replica.save_state(state)
    report.bytes_sent = result.bytes_sent
    report.bytes_zeroed = result.bytes_zeroed
    report.version = version
    report.manifest_root = source_manifest.root_hex
