"""Replication of one protected disk to the recovery site, step by step.

Each function is one resumable step of the reference product's process, so a workflow task can call it,
crash, be redelivered and call it again:

- `initial_copy`: snapshot the disk, copy the point-in-time view to the replica (checkpointed), delete
  the snapshot. Writes made meanwhile go to the replication log, starting at the snapshot's generation.
- `ship_pending_logs`: upload every sealed log the recovery side has not yet applied.
- `apply_shipped_logs`: on the recovery side, apply shipped logs in generation order and record each.
- `acknowledge_applied`: on the host, delete the sealed logs the recovery side has applied.
- `resynchronize` (datapath/resynchronize.py): like the initial copy, but only blocks that differ are sent
  (two-level checksums).

The replica's progress lives in a small state object beside the replica disk
(`<host>/<vm>/<disk>.vhd.state.json`), written after each step completes: it is the recovery side's truth about
which generation it holds, so the host never has to be trusted about what was applied.

Every completed change of the replica's content is a new *version* (datapath/points.py): the initial
copy is version 1, each applied log and each resync adds one. Before a change touches the replica, the
bytes it overwrites are stored as that version's undo log, and once it is complete its manifest is
stored, so every earlier version stays readable and checkable until it is pruned.
"""
from __future__ import annotations

import json
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import BinaryIO

from datapath.copy import DEFAULT_FLUSH_INTERVAL, CopyResult, copy_disk
from datapath.errors import (
    LogCorruptError,
    LogOutOfSequenceError,
    NonRecoverableError,
    ObjectAuthenticationError,
)
from datapath.logapply import MAX_TARGET_WRITE, apply_log
from datapath.logreader import LogDiskMismatchError, LogReader
from datapath.manifest import (
    DEFAULT_CHUNK_SIZE,
    Manifest,
    ReadAhead,
    chunk_hash,
    compute_manifest,
    split_ranges,
)
from datapath.points import (
    PointMismatchError,
    delete_all_versions,
    load_manifest,
    reads_as_zeros,
    store_manifest,
)
from datapath.tracker import ReplicationTracker
from datapath.undolog import Range, merge_ranges, record_undo
from sites.storage.base import ObjectNotFoundError, RecoveryStorage, validate_name

Progress = Callable[[int, int], None]
"""on_progress(bytes_done, bytes_total)"""

# Checkpoints are written at most this often: each is a storage round trip.
CHECKPOINT_INTERVAL_S = 2.0


@dataclass
class ReplicaState:
    """What the recovery side holds for one disk."""

    disk_id: str
    size: int
    applied_generation: int = 0
    """Every write up to the end of this log generation is in the replica."""
    initial_copy_done: bool = False
    copy_started_generation: int = 0
    """The snapshot (initial copy or resync) the copy in progress was taken at: logs from this
    generation on hold the writes made after it."""
    copy_checkpoint: int = 0
    """Offset below which the copy in progress is flushed to the replica."""
    manifest_root: str | None = None
    """Root of the manifest of the current version (None only before the initial copy completes)."""
    version: int = 0
    """The version of the replica's content: 1 after the initial copy, one more per applied log and
    per resync. 0 until the initial copy completes."""
    updated_at: float = field(default_factory=time.time)


class ReplicaDisk:
    """The replica of one protected disk on a recovery storage: its disk, its state, its shipped logs."""

    def __init__(self, storage: RecoveryStorage, name: str):
        self.storage = storage
        self.name = validate_name(name)

    @staticmethod
    def name_for(host: str, vm: str, disk: str) -> str:
        """Where a disk's replica lives: one folder per host and VM (VM names are unique per host only),
        always a fixed VHD whatever the source's format."""
        return validate_name(f"{host}/{vm}/{disk}.vhd")

    @property
    def state_name(self) -> str:
        return f"{self.name}.state.json"

    def log_name(self, generation: int) -> str:
        return f"{self.name}.{generation:08d}.hrl"

    def undo_name(self, version: int) -> str:
        """The undo log of `version`: the bytes its change overwrote, as they were at version - 1."""
        return f"{self.name}.v{version:08d}.undo"

    def manifest_name(self, version: int) -> str:
        return f"{self.name}.v{version:08d}.manifest"

    def load_state(self) -> ReplicaState | None:
        try:
            raw = self.storage.read_object(self.state_name)
        except ObjectNotFoundError:
            return None
        return ReplicaState(**json.loads(raw))

    def save_state(self, state: ReplicaState) -> None:
        state.updated_at = time.time()
        self.storage.put_object(self.state_name, json.dumps(asdict(state), sort_keys=True).encode())

    def shipped_generations(self) -> list[int]:
        prefix = f"{self.name}."
        generations = []
        for obj in self.storage.list_objects(prefix):
            tail = obj[len(prefix):]
            if tail.endswith(".hrl") and tail[:-4].isdigit():
                generations.append(int(tail[:-4]))
        return sorted(generations)


Checkpointed = Callable[[int, int], None]
"""on_checkpoint(copy_started_generation, copy_checkpoint): a copy's checkpoint was saved."""


def _checkpointer(replica: ReplicaDisk, state: ReplicaState, on_progress: Progress | None,
                  on_checkpoint: Checkpointed | None = None):
    last_saved = [time.monotonic()]

    def checkpoint(offset: int) -> None:
        state.copy_checkpoint = offset
        now = time.monotonic()
        if now - last_saved[0] >= CHECKPOINT_INTERVAL_S:
            replica.save_state(state)
            if on_checkpoint is not None:
                on_checkpoint(state.copy_started_generation, offset)
            last_saved[0] = now
        if on_progress:
            on_progress(offset, state.size)

    return checkpoint


def initial_copy(
    tracker: ReplicationTracker,
    replica: ReplicaDisk,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    flush_interval: int = DEFAULT_FLUSH_INTERVAL,
    on_progress: Progress | None = None,
    recorded: tuple[int, int] | None = None,
    on_checkpoint: Checkpointed | None = None,
    on_copied: Callable[[CopyResult], None] | None = None,
) -> ReplicaState:
    """Copy a point-in-time view of the disk to the replica; resumes from the last checkpoint. The
    completed copy is version 1 of the replica, its manifest stored with it. `on_copied` hears what this
    call copied (bytes read, written, zero bytes skipped), when it copied.

    `flush_interval` is how much is copied between checkpoints a redelivered copy can resume from.
    Idempotent: when the state says the copy is done, it only makes sure the snapshot is gone.

    `recorded` is (copy_started_generation, copy_checkpoint) as the caller recorded them through
    `on_checkpoint` (the workflows: in the database), which is called with each checkpoint saved and with
    the replica's size just before the state says the copy is done. The state's checkpoint is then trusted
    only up to the recorded one of the same snapshot (0 for another), and a state saying the copy is done
    only when the recorded checkpoint says so too: a state edited on the storage cannot have part of the
    disk left uncopied."""
    disk_id = tracker.disk_id.hex()
    state = replica.load_state()
    if state is not None and state.disk_id != disk_id:
        raise NonRecoverableError(
            f"replica {replica.name} belongs to disk {state.disk_id}, not {disk_id}: refusing to overwrite it"
        )
    if state is not None and recorded is not None and not (state.version > 0 and not state.initial_copy_done):
        generation, checkpoint = recorded
        trusted = checkpoint if generation == state.copy_started_generation else 0
        if state.initial_copy_done and trusted < state.size:
            # Done by the state's word only: copied again, from where the caller's record says it got.
            state.initial_copy_done, state.version, state.manifest_root = False, 0, None
        state.copy_checkpoint = min(state.copy_checkpoint, trusted)
    if state is not None and state.initial_copy_done:
        tracker.delete_snapshot()
        return state
    if state is not None and state.version > 0:
        raise NonRecoverableError(
            f"replica {replica.name} holds recovery points (version {state.version}) and is being "
            f"resynchronized: finish the resynchronization, or disable protection to start over"
        )

    first_generation = tracker.create_snapshot()  # returns the existing snapshot's generation on a retry
    replica.storage.create_disk(replica.name, tracker.disk_size)
    if state is None or state.copy_started_generation != first_generation:
        # A copy of an older snapshot (the host lost it) cannot be resumed: start over. Versions left
        # by an earlier protection of this disk describe content this copy overwrites.
        delete_all_versions(replica)
        state = ReplicaState(disk_id=disk_id, size=tracker.disk_size, copy_started_generation=first_generation)
        replica.save_state(state)

    target = replica.storage.open_disk(replica.name)
    source = tracker.snapshot_view()
    try:
        result = copy_disk(
            source,
            target,
            chunk_size=chunk_size,
            flush_interval=flush_interval,
            start_offset=state.copy_checkpoint,
            # Zero chunks are skipped only on a replica that reads as zeros past the checkpoint: a
            # fresh one. A resumed copy, or one started over, may find stale bytes there.
            target_is_zero=state.copy_checkpoint == 0 and reads_as_zeros(target),
            on_progress=_checkpointer(replica, state, on_progress, on_checkpoint),
        )
        if on_copied is not None:
            on_copied(result)
        # A resumed copy did not see every chunk: the replica, now complete, is checksummed instead.
        manifest = result.manifest if result.manifest is not None else compute_manifest(target, chunk_size)
    finally:
        source.close()
        target.close()

    store_manifest(replica, 1, manifest)
    if on_checkpoint is not None:
        on_checkpoint(state.copy_started_generation, state.size)
    state.copy_checkpoint = state.size
    state.initial_copy_done = True
    state.applied_generation = first_generation - 1
    state.version = 1
    state.manifest_root = manifest.root_hex
    replica.save_state(state)
    tracker.delete_snapshot()
    # Logs sealed before the snapshot hold writes the copy already contains.
    tracker.acknowledge(first_generation - 1)
    return state


def ship_pending_logs(
    tracker: ReplicationTracker, replica: ReplicaDisk, *, applied_generation: int | None = None,
    shipped_generation: int | None = None,
) -> list[int]:
    """Upload the sealed logs not yet on the recovery side; return the generations uploaded.

    `applied_generation` is what the replica holds as the caller knows it (the workflows pass the
    database's record, checked against the recovery side's state: datapath.statecheck); without it the
    recovery side's state is taken at its word. A log that is already there is not uploaded again (a
    redelivered step costs nothing), when it is one this engine shipped: up to `shipped_generation` (the
    database's record) when given. A log object above it was not put there by a Ship step that completed,
    and is replaced by the tracker's."""
    already = set(replica.shipped_generations())
    if shipped_generation is not None:
        already = {generation for generation in already if generation <= shipped_generation}
    if applied_generation is None:
        state = replica.load_state()
        applied_generation = state.applied_generation if state else 0
    applied = applied_generation
    shipped = []
    for log in tracker.pending_logs():
        if log.generation <= applied or log.generation in already:
            continue
        with open(log.path, "rb") as src:
            replica.storage.put_object(replica.log_name(log.generation), src)
        shipped.append(log.generation)
    return shipped


@dataclass
class ApplyReport:
    applied: list[int] = field(default_factory=list)
    records: int = 0
    data_bytes: int = 0
    seconds: float = 0.0
    version: int = 0
    """The replica's version after the call (one more per log applied)."""
    manifest_root: str = ""
    """Root of that version's manifest."""
    applied_generation: int = 0
    """The replica's generation after the call."""


def apply_shipped_logs(replica: ReplicaDisk, *, disk_name: str = "", up_to: int | None = None) -> ApplyReport:
    """Apply every shipped log after the replica's generation, in order, recording each in the state.
    With `up_to` (the generation the database records as shipped), a log object of a later generation is
    not applied: no Ship step that completed put it there.

    Each log makes a new version: it is verified whole first (a corrupt log changes nothing, not even
    the undo logs), then the bytes it will overwrite are stored as the version's undo log, then it is
    applied and the version's manifest stored (the previous one with the chunks it touched rehashed).

    A gap (a log missing between the replica's generation and a later shipped one) raises
    LogOutOfSequenceError: delta replication is broken and the disk needs resynchronization."""
    state = replica.load_state()
    if state is None or not state.initial_copy_done:
        raise NonRecoverableError(
            f"replica {replica.name} has no completed initial copy: logs cannot be applied to it"
        )
    report = ApplyReport()
    started = time.monotonic()
    manifest: Manifest | None = None  # of the current version, once loaded
    for generation in replica.shipped_generations():
        if generation <= state.applied_generation:
            replica.storage.delete_object(replica.log_name(generation))  # applied before a crash
            continue
        if up_to is not None and generation > up_to:
            break
        if generation != state.applied_generation + 1:
            raise LogOutOfSequenceError(
                f"replica {replica.name}: next log to apply is generation {state.applied_generation + 1}, "
                f"but the recovery site has generation {generation}; the disk needs resynchronization"
            )
        version = state.version + 1
        if manifest is None:
            manifest = _base_manifest(replica, state)
        with tempfile.TemporaryFile() as spool:
            try:
                replica.storage.get_object(replica.log_name(generation), spool)
            except ObjectAuthenticationError as forged:  # as a corrupt log: the disk is resynchronized
                raise LogCorruptError(str(forged), disk=disk_name or replica.name) from forged
            spool.seek(0)
            ranges = _verified_log_ranges(spool, replica, state, generation, disk_name or replica.name)
            if state.version >= 1:  # a replica from before versions has no version to go back to
                record_undo(replica, state, version, ranges)
            spool.seek(0)
            target = replica.storage.open_disk(replica.name)
            try:
                applied = apply_log(
                    spool,
                    target,
                    expected_generation=generation,
                    disk_id=bytes.fromhex(state.disk_id),
                    disk_name=disk_name or replica.name,
                )
            finally:
                target.close()
        manifest = _rehashed(replica, manifest, ranges)
        store_manifest(replica, version, manifest)
        state.applied_generation = generation
        state.version = version
        state.manifest_root = manifest.root_hex
        replica.save_state(state)
        replica.storage.delete_object(replica.log_name(generation))
        report.applied.append(generation)
        report.records += applied.records
        report.data_bytes += applied.data_bytes
    report.version = state.version
    report.manifest_root = state.manifest_root or ""
    report.applied_generation = state.applied_generation
    report.seconds = time.monotonic() - started
    return report


def _base_manifest(replica: ReplicaDisk, state: ReplicaState) -> Manifest | None:
    """The stored manifest of the replica's current version, which the next version's is made from
    (None when none is stored: the next one is then checksummed whole). Its root must be the state's (which
    the workflows check against the database first): a manifest changed on the storage would otherwise
    carry its chunk hashes into every later version, and is refused before anything is written."""
    manifest = load_manifest(replica, state.version)
    if manifest is not None and manifest.root_hex != state.manifest_root:
        raise PointMismatchError(
            f"replica {replica.name}: the stored manifest of version {state.version} has root "
            f"{manifest.root_hex}, but the replica's state records {state.manifest_root}; the manifest was "
            f"changed on the recovery storage, nothing was applied, the disk needs resynchronization"
        )
    return manifest


# Record ranges are merged this often while a log is read, so memory follows the disk area a log
# touches rather than its number of records.
_MERGE_EVERY = 65536


def _verified_log_ranges(
    log: BinaryIO, replica: ReplicaDisk, state: ReplicaState, generation: int, disk_name: str
) -> list[Range]:
    """Verify a whole shipped log as `apply_log` will (every record, the seal, the disk it belongs
    to, its generation) and return the disk ranges its records write, merged."""
    reader = LogReader(log, log_name=replica.log_name(generation), disk_name=disk_name)
    header = reader.header
    disk_id = bytes.fromhex(state.disk_id)
    if header.disk_id != disk_id:
        raise reader.error(
            LogDiskMismatchError,
            f"the log belongs to disk id {header.disk_label}, not {uuid.UUID(bytes=disk_id)}",
        )
    if header.disk_size != state.size:
        raise reader.error(
            LogDiskMismatchError,
            f"the log is of a {header.disk_size}-byte disk but the replica is {state.size} bytes",
        )
    if header.generation != generation:
        raise reader.error(
            LogOutOfSequenceError,
            f"generation {header.generation} cannot be applied: the replica expects generation {generation} next",
        )
    ranges: list[Range] = []
    for record in reader.records():
        ranges.append((record.offset, record.offset + record.length))
        if len(ranges) >= _MERGE_EVERY:
            ranges = merge_ranges(ranges, size=state.size)
    return merge_ranges(ranges, size=state.size)


def _rehashed(replica: ReplicaDisk, previous: Manifest | None, ranges: list[Range]) -> Manifest:
    """The replica's manifest after a change that wrote `ranges`: `previous` (the manifest before it)
    with the chunks the change touched checksummed again from the replica; the whole replica
    checksummed when there is no previous manifest."""
    target = replica.storage.open_disk(replica.name)
    try:
        if previous is None:
            return compute_manifest(target)
        chunk_size = previous.chunk_size
        # The touched chunks, consecutive ones joined.
        runs = merge_ranges(ranges, align=chunk_size, size=target.size)
        extents = ((start, end - start) for start, end in runs)
        window = max(1, MAX_TARGET_WRITE // chunk_size) * chunk_size
        updates: dict[int, bytes] = {}
        with ReadAhead([target], split_ranges(extents, window), window) as reader:
            for piece in reader:
                for position in range(0, piece.length, chunk_size):
                    chunk = piece.view[position:position + chunk_size]
                    updates[(piece.offset + position) // chunk_size] = chunk_hash(chunk)
                reader.release(piece)
        return previous.with_chunk_hashes(updates)
    finally:
        target.close()


def acknowledge_applied(tracker: ReplicationTracker, replica: ReplicaDisk) -> int:
    """Delete on the host the sealed logs the recovery side's state says are applied; return that
    generation. (The workflows acknowledge what the database records as applied instead.)"""
    state = replica.load_state()
    if state is None or not state.initial_copy_done:
        return 0
    tracker.acknowledge(state.applied_generation)
    return state.applied_generation


def replicate_cycle(tracker: ReplicationTracker, replica: ReplicaDisk) -> ApplyReport:
    """One delta-replication cycle for one disk: seal, ship, apply, acknowledge.

    Always seals, even when the disk had no writes: every disk advances its generation every cycle."""
    tracker.seal()
    ship_pending_logs(tracker, replica)
    report = apply_shipped_logs(replica)
    acknowledge_applied(tracker, replica)
    return report
