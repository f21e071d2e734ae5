"""Replication of one protected disk to the recovery site, step by step.

Each function is one resumable step of the reference product's process, so a workflow task can call it,
crash, be redelivered and call it again:

- `initial_copy`: snapshot the disk, copy the point-in-time view to the replica (checkpointed), delete
  the snapshot. Writes made meanwhile go to the replication log, starting at the snapshot's generation.
- `ship_pending_logs`: upload every sealed log the recovery side has not yet applied.
- `apply_shipped_logs`: on the recovery side, apply shipped logs in generation order and record each.
- `acknowledge_applied`: on the host, delete the sealed logs the recovery side has applied.
- `resynchronize`: like the initial copy, but only blocks that differ are sent (two-level checksums).

The replica's progress lives in a small state object beside the replica disk
(`<host>/<vm>/<disk>.vhd.state.json`), written after each step completes: it is the recovery side's truth about
which generation it holds, so the host never has to be trusted about what was applied.
"""
from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from datapath.copy import DEFAULT_FLUSH_INTERVAL, copy_disk
from datapath.errors import LogOutOfSequenceError, NonRecoverableError, SizeMismatchError
from datapath.manifest import DEFAULT_CHUNK_SIZE
from datapath.replog import apply_log
from datapath.resync import sync_disks
from datapath.tracker import ReplicationTracker
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


def _checkpointer(replica: ReplicaDisk, state: ReplicaState, on_progress: Progress | None):
    last_saved = [time.monotonic()]

    def checkpoint(offset: int) -> None:
        state.copy_checkpoint = offset
        now = time.monotonic()
        if now - last_saved[0] >= CHECKPOINT_INTERVAL_S:
            replica.save_state(state)
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
) -> ReplicaState:
    """Copy a point-in-time view of the disk to the replica; resumes from the last checkpoint.

    `flush_interval` is how much is copied between checkpoints a redelivered copy can resume from.
    Idempotent: when the state says the copy is done, it only makes sure the snapshot is gone."""
    disk_id = tracker.disk_id.hex()
    state = replica.load_state()
    if state is not None and state.disk_id != disk_id:
        raise NonRecoverableError(
            f"replica {replica.name} belongs to disk {state.disk_id}, not {disk_id}: refusing to overwrite it"
        )
    if state is not None and state.initial_copy_done:
        tracker.delete_snapshot()
        return state

    first_generation = tracker.create_snapshot()  # returns the existing snapshot's generation on a retry
    replica.storage.create_disk(replica.name, tracker.disk_size)
    if state is None or state.copy_started_generation != first_generation:
        # A copy of an older snapshot (the host lost it) cannot be resumed: start over.
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
            # A fresh replica is all zeros; a resumed one may hold stale bytes past the checkpoint.
            target_is_zero=state.copy_checkpoint == 0,
            on_progress=_checkpointer(replica, state, on_progress),
        )
    finally:
        source.close()
        target.close()

    state.copy_checkpoint = state.size
    state.initial_copy_done = True
    state.applied_generation = first_generation - 1
    state.manifest_root = result.manifest.root_hex if result.manifest is not None else None
    replica.save_state(state)
    tracker.delete_snapshot()
    # Logs sealed before the snapshot hold writes the copy already contains.
    tracker.acknowledge(first_generation - 1)
    return state


def ship_pending_logs(tracker: ReplicationTracker, replica: ReplicaDisk) -> list[int]:
    """Upload the sealed logs not yet on the recovery side; return the generations uploaded.

    A log that is already there is not uploaded again (a redelivered step costs nothing)."""
    already = set(replica.shipped_generations())
    state = replica.load_state()
    applied = state.applied_generation if state else 0
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


def apply_shipped_logs(replica: ReplicaDisk, *, disk_name: str = "") -> ApplyReport:
    """Apply every shipped log after the replica's generation, in order, recording each in the state.

    A gap (a log missing between the replica's generation and a later shipped one) raises
    LogOutOfSequenceError: delta replication is broken and the disk needs resynchronization."""
    state = replica.load_state()
    if state is None or not state.initial_copy_done:
        raise NonRecoverableError(
            f"replica {replica.name} has no completed initial copy: logs cannot be applied to it"
        )
    report = ApplyReport()
    started = time.monotonic()
    for generation in replica.shipped_generations():
        if generation <= state.applied_generation:
            replica.storage.delete_object(replica.log_name(generation))  # applied before a crash
            continue
        if generation != state.applied_generation + 1:
            raise LogOutOfSequenceError(
                f"replica {replica.name}: next log to apply is generation {state.applied_generation + 1}, "
                f"but the recovery site has generation {generation}; the disk needs resynchronization"
            )
        with tempfile.TemporaryFile() as spool:
            replica.storage.get_object(replica.log_name(generation), spool)
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
        state.applied_generation = generation
        state.manifest_root = None  # the replica changed; a manifest is recomputed when asked for
        replica.save_state(state)
        replica.storage.delete_object(replica.log_name(generation))
        report.applied.append(generation)
        report.records += applied.records
        report.data_bytes += applied.data_bytes
    report.seconds = time.monotonic() - started
    return report


def acknowledge_applied(tracker: ReplicationTracker, replica: ReplicaDisk) -> int:
    """Delete on the host the sealed logs the recovery side has applied; return that generation."""
    state = replica.load_state()
    if state is None or not state.initial_copy_done:
        return 0
    tracker.acknowledge(state.applied_generation)
    return state.applied_generation


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


def resynchronize(
    tracker: ReplicationTracker,
    replica: ReplicaDisk,
    *,
    on_progress: Progress | None = None,
) -> ResyncReport:
    """Bring a replica whose log chain broke back in line, sending only the blocks that differ.

    Like the initial copy it works on a snapshot, so the guest keeps writing; logs from the snapshot's
    generation on are then applied as usual. Logs already shipped for the broken chain are dropped."""
    disk_id = tracker.disk_id.hex()
    if not replica.storage.disk_exists(replica.name):
        raise NonRecoverableError(f"replica {replica.name} does not exist: enable protection again")
    state = replica.load_state() or ReplicaState(disk_id=disk_id, size=tracker.disk_size)
    if state.size != tracker.disk_size:
        raise SizeMismatchError(
            f"replica {replica.name} is {state.size} bytes but disk {tracker.disk_id.hex()} is {tracker.disk_size}"
        )
    first_generation = tracker.create_snapshot()
    state.initial_copy_done = False
    state.copy_started_generation = first_generation
    replica.save_state(state)
    for generation in replica.shipped_generations():
        replica.storage.delete_object(replica.log_name(generation))

    source = tracker.snapshot_view()
    target = replica.storage.open_disk(replica.name)
    try:
        result = sync_disks(source, target, on_progress=on_progress)
    finally:
        source.close()
        target.close()
    state.initial_copy_done = True
    state.applied_generation = first_generation - 1
    state.copy_checkpoint = state.size
    state.manifest_root = result.source_root.hex()
    replica.save_state(state)
    tracker.delete_snapshot()
    tracker.acknowledge(first_generation - 1)
    return ResyncReport(
        bytes_sent=result.bytes_sent,
        bytes_zeroed=result.bytes_zeroed,
        blocks_sent=result.blocks_sent,
        hash_bytes=result.hash_bytes,
        chunks_compared=result.chunks_compared,
        chunks_sent=result.chunks_sent,
        seconds=result.seconds,
        first_generation=first_generation,
    )


def replicate_cycle(tracker: ReplicationTracker, replica: ReplicaDisk) -> ApplyReport:
    """One delta-replication cycle for one disk: seal, ship, apply, acknowledge.

    Always seals, even when the disk had no writes: every disk advances its generation every cycle."""
    tracker.seal()
    ship_pending_logs(tracker, replica)
    report = apply_shipped_logs(replica)
    acknowledge_applied(tracker, replica)
    return report
