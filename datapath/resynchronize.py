"""The resynchronize step: bring a replica whose log chain broke back in line with its disk, sending only
the blocks that differ (datapath/resync.py compares and copies), as a new version whose undo log keeps the
earlier ones readable. A step of the replication process of datapath/replication.py, resumable like its
others."""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from datapath.endpoint import DiskEndpoint
from datapath.errors import NonRecoverableError, SizeMismatchError
from datapath.logapply import MAX_TARGET_WRITE
from datapath.manifest import DEFAULT_CHUNK_SIZE, ReadAhead, split_ranges
from datapath.points import manifest_if_root, settled_manifest, store_manifest
from datapath.replication import Progress, ReplicaDisk, ReplicaState
from datapath.resync import sync_disks
from datapath.tracker import ReplicationTracker
from datapath.undolog import Range, merge_ranges, record_undo


@dataclass
class ResyncReport:
    bytes_sent: int
    """Disk data sent to the replica."""
    bytes_zeroed: int
    """Replica ranges cleared because the source holds zeros there (a command, no data sent)."""
    blocks_sent: int
    hash_bytes: int
    chunks_compared: int
    chunks_sent: int
    seconds: float
    first_generation: int
    version: int = 0
    """The replica's version after the resync."""
    manifest_root: str = ""
    """Root of that version's manifest (the snapshot's content)."""
    damaged_chunks: list[int] = field(default_factory=list)
    """Chunks where the replica did not hold the content its previous version's manifest records
    (bit rot, writes from outside): the resync repaired them."""
    lost_chunks: list[int] = field(default_factory=list)
    """Those damaged chunks whose earlier content could not be rebuilt (the disk also changed there
    since): the earlier versions that read them fail `verify_point` and `restore_point`. In the other
    damaged chunks the snapshot holds exactly the previous version's content, so earlier versions
    stay right."""
    replica_read_whole: bool = True
    """The replica was checksummed from its bytes, all of it; False when its side came from the stored
    manifest of its current version and only the differing chunks were read."""
    why_read_whole: str = ""
    """Why the stored manifest could not stand for the replica, when it was read whole."""


class RecordingTarget:
    """A DiskEndpoint that reads from the real target but only records the ranges written to it: a
    sync run through it finds what would change without changing anything."""

    def __init__(self, target: DiskEndpoint):
        self.target = target
        self.name = target.name
        self.size = target.size
        self.alignment = target.alignment
        self.writes: list[tuple[int, int]] = []
        """(offset, length) of each range that would be written with data."""
        self.zeros: list[tuple[int, int]] = []
        """(offset, length) of each range that would be made zero."""

    def read_into(self, offset: int, buf: memoryview) -> int:
        return self.target.read_into(offset, buf)

    def data_extents(self, offset: int = 0, length: int | None = None) -> Iterator[tuple[int, int]]:
        return self.target.data_extents(offset, length)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self.writes.append((offset, memoryview(data).nbytes))

    def write_zeros(self, offset: int, length: int) -> None:
        self.zeros.append((offset, length))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def ranges(self) -> list[Range]:
        """Every range that would change, as [start, end)."""
        return [(offset, offset + length) for offset, length in self.writes + self.zeros]


def resynchronize(
    tracker: ReplicationTracker,
    replica: ReplicaDisk,
    *,
    on_progress: Progress | None = None,
    recorded_generation: int | None = None,
    read_replica: bool = False,
) -> ResyncReport:
    """Bring a replica whose log chain broke back in line, sending only the blocks that differ.

    A rerun whose snapshot the state says was already copied does nothing; with `recorded_generation`
    (the generation the database records as applied) only when the database says so too (the resync
    recorded its snapshot's generation before it, `first_generation - 1`): a state edited to name the
    snapshot does not skip the resync.

    Like the initial copy it works on a snapshot, so the guest keeps writing; logs from the snapshot's
    generation on are then applied as usual. Logs already shipped for the broken chain are dropped.

    The resync is a new version, and earlier versions stay readable: the blocks that differ are found
    first without writing (a sync into a RecordingTarget), then the replica's bytes there are stored
    as the version's undo log, then those blocks are copied from the snapshot (read a second time:
    only the differing blocks, from a view that does not change). A rerun after a crash finds fewer
    blocks differing and keeps the undo log it already stored.

    The replica's side of the comparison is the stored manifest of its current version when that
    describes its bytes (`settled_manifest`: a completed version whose root the state, checked against
    the database, records, and no change after it has begun): the source snapshot is read whole, the
    replica (decrypted, possibly over the network) only in the chunks whose checksums differ. Otherwise
    (a first version, a manifest missing or not the recorded one, a change or resync interrupted half
    way) the replica is read whole, as both sides were before. In the chunks that are read, a replica
    whose bytes do not hash to the manifest's value is damage, recorded in `damaged_chunks` as before.
    The trade-off: damage in a chunk the source did not change since the replica's version (bit rot,
    a write from outside) is not seen by a resync that trusts the manifest, and stays; the consistency
    check (datapath/consistency.py, `asr check`) reads both sides whole and repairs it. `read_replica`
    reads the replica whole anyway (the workflow does when the recovery side's state disagreed with the
    database: something there was not as recorded)."""
    disk_id = tracker.disk_id.hex()
    if not replica.storage.disk_exists(replica.name):
        raise NonRecoverableError(f"replica {replica.name} does not exist: enable protection again")
    state = replica.load_state() or ReplicaState(disk_id=disk_id, size=tracker.disk_size)
    if state.disk_id != disk_id:
        raise NonRecoverableError(
            f"replica {replica.name} belongs to disk {state.disk_id}, not {disk_id}: refusing to overwrite it"
        )
    if state.size != tracker.disk_size:
        raise SizeMismatchError(
            f"replica {replica.name} is {state.size} bytes but disk {tracker.disk_id.hex()} is {tracker.disk_size}"
        )
    started = time.monotonic()
    first_generation = tracker.create_snapshot()
    if (state.initial_copy_done and state.copy_started_generation == first_generation
            and recorded_generation in (None, first_generation - 1)):
        # This snapshot was already copied (a rerun after the state was saved): nothing differs.
        tracker.delete_snapshot()
        tracker.acknowledge(first_generation - 1)
        return ResyncReport(
            bytes_sent=0, bytes_zeroed=0, blocks_sent=0, hash_bytes=0, chunks_compared=0, chunks_sent=0,
            seconds=time.monotonic() - started, first_generation=first_generation, version=state.version,
            manifest_root=state.manifest_root or "",
        )
    # Decided on the state as found: a resync interrupted earlier left it saying no completed copy.
    settled, why_read_whole = (None, "asked to read the replica whole") if read_replica else \
        settled_manifest(replica, state, DEFAULT_CHUNK_SIZE)
    state.initial_copy_done = False
    state.copy_started_generation = first_generation
    replica.save_state(state)
    for generation in replica.shipped_generations():
        replica.storage.delete_object(replica.log_name(generation))

    version = state.version + 1
    damaged: list[int] = []
    lost: list[int] = []
    source = tracker.snapshot_view()
    target = replica.storage.open_disk(replica.name)
    try:
        recorder = RecordingTarget(target)
        progress = _HeldBack(on_progress)
        result = sync_disks(source, recorder, chunk_size=DEFAULT_CHUNK_SIZE, target_manifest=settled,
                            on_progress=progress)
        if state.version >= 1:  # no undo for the first version: there is nothing before it
            # Only a stored manifest with the state's root (checked against the database) says what the
            # replica held; without one every changed block goes into the undo log.
            previous = settled or manifest_if_root(replica, state.version, state.manifest_root)
            if previous is not None and previous.chunk_size != result.target_manifest.chunk_size:
                previous = None

            def keep_chunk(index: int, digest: bytes) -> bool:
                """Whether the replica's old bytes in this chunk go into the undo log."""
                if previous is None or digest == previous.chunk_hash(index):
                    return True  # the replica holds the previous version here
                damaged.append(index)
                if result.target_manifest.chunk_hash(index) == previous.chunk_hash(index):
                    return False  # the snapshot holds the previous version here: the sync writes it back
                lost.append(index)
                return True

            record_undo(replica, state, version, recorder.ranges(), keep_chunk=keep_chunk,
                        chunk_size=result.target_manifest.chunk_size)
        copy_recorded(source, target, recorder)
    finally:
        source.close()
        target.close()
    manifest = result.target_manifest
    store_manifest(replica, version, manifest)
    state.initial_copy_done = True
    state.applied_generation = first_generation - 1
    state.copy_checkpoint = state.size
    state.version = version
    state.manifest_root = manifest.root_hex
    replica.save_state(state)
    tracker.delete_snapshot()
    tracker.acknowledge(first_generation - 1)
    progress.finish()
    return ResyncReport(
        bytes_sent=result.bytes_sent,
        bytes_zeroed=result.bytes_zeroed,
        blocks_sent=result.blocks_sent,
        hash_bytes=result.hash_bytes,
        chunks_compared=result.chunks_compared,
        chunks_sent=result.chunks_sent,
        seconds=time.monotonic() - started,
        first_generation=first_generation,
        version=version,
        manifest_root=manifest.root_hex,
        damaged_chunks=sorted(set(damaged)),
        lost_chunks=sorted(set(lost)),
        replica_read_whole=settled is None,
        why_read_whole=why_read_whole,
    )


def copy_recorded(source: DiskEndpoint, target: DiskEndpoint, recorded: RecordingTarget) -> None:
    """Carry out on `target` what the sync recorded: the data ranges copied from `source`, the zero
    ranges cleared."""
    data = [(start, end - start) for start, end in merge_ranges(
        ((offset, offset + length) for offset, length in recorded.writes), align=1, size=target.size)]
    with ReadAhead([source], split_ranges(data, MAX_TARGET_WRITE), MAX_TARGET_WRITE) as reader:
        for window in reader:
            target.write(window.offset, window.view)
            reader.release(window)
    for start, end in merge_ranges(((offset, offset + length) for offset, length in recorded.zeros),
                                   align=1, size=target.size):
        target.write_zeros(start, end - start)
    # Durable before the caller stores the version's manifest: a later resync trusts that manifest to
    # describe the replica's bytes without reading them.
    target.flush()


class _HeldBack:
    """Passes a sync's progress on, holding back its last step until the writes after it are done."""

    def __init__(self, on_progress: Progress | None):
        self._on_progress = on_progress
        self._total = 0

    def __call__(self, done: int, total: int) -> None:
        self._total = total
        if self._on_progress is not None:
            self._on_progress(min(done, total - 1), total)

    def finish(self) -> None:
        if self._on_progress is not None and self._total:
            self._on_progress(self._total, self._total)
