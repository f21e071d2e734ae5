"""The replication tracker: every write to a protected disk goes to its replication log first.

The files it keeps beside a tracked disk, its control file among them, are described in
datapath/trackerstate.py; its copy-on-write snapshot is in datapath/snapshot.py.

The guest's process writes through one tracker object while the host agent's process seals, ships,
acknowledges and snapshots through another. Every operation runs under the flock and starts by
re-reading the control file, so each process sees the other's rotations and snapshots at once.

A write is (1) its record appended after the active log's committed end, (2) the control file
updated to include it (the commit point), (3) the old contents preserved if a snapshot needs them,
(4) the disk written, (5) the control file updated to say the disk has it. A crash before (2) leaves
the disk unchanged and the record is overwritten by the next one; a crash after (2) is finished by
the next process to take the lock, which replays the committed records the disk may lack. So the
disk never holds a write its log lacks, and the log never holds one the disk will not get.

The writes a block device front end has queued go as one batch (`write_many`): (1) for all of them
(one positioned write), one commit (2), then (3) and (4) for each in order. What the disk may lack
after a crash is then the records of the last commit, all of them replayed in order (`_replay_unapplied`):
the range from the control file's applied end to the log's end.

Step (5) is not a control update of its own: it rides on the next one the same tracker object makes
(the next write's commit, a seal, a flush), which halves the control updates of a stream of writes.
Until then the control file says the last commit's records may be missing from the disk, which is
only ever true of those, so the replay above stays "the last commit"; another process (or this one
after a restart) replays them, rewriting bytes the disk already holds, which changes nothing.
"""
from __future__ import annotations

import fcntl
import os
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from datapath.buffers import aligned_buffer
from datapath.disk import LocalDisk, open_disk
from datapath.durable import replace_file
from datapath.endpoint import SECTOR
from datapath.errors import AlignmentError
from datapath.logformat import (
    HEADER_SIZE,
    MAX_RECORD_DATA,
    LogHeader,
    LogState,
    LogWriter,
)
from datapath.logreader import read_log_header, read_records_between, read_seal
from datapath.private import FILE_MODE
from datapath.snapshot import (
    SNAPSHOT_BLOCK,
    CopyOnWrite,
    SnapshotError,
    SnapshotView,
    create_snapshot_files,
    delete_snapshot_files,
)
from datapath.trackerstate import (
    ControlFile,
    ControlState,
    NotTrackedError,
    TrackerFiles,
    TrackerStateError,
    unlink_quietly,
)

RESYNC_THRESHOLD = 0.5
"""Unsent logs at this fraction of the disk size or more: the disk needs resynchronization."""
SPARE_MAX_BYTES = 256 * 1024 * 1024
"""By default, the most of an acknowledged log's storage kept as the spare (TrackerFiles.spare): the host's
space a disk holds beyond its unsent logs. Past it a new log allocates as it grows, as every log did before.
A host agent's trackers take ASR_TRACKER_SPARE_MAX (workflows/settings.py) instead; 0 keeps no spare."""


@dataclass(frozen=True)
class SealedLog:
    path: Path
    generation: int
    first_seq: int
    last_seq: int
    records: int
    data_bytes: int
    size: int


def _contiguous_runs(records: list[tuple[int, memoryview]]) -> list[tuple[int, list[memoryview]]]:
    """The records as runs of consecutive ones that follow each other on the disk (a guest's
    sequential writes): each run is one positioned write. Order is kept, so overlaps resolve as before."""
    runs: list[tuple[int, list[memoryview]]] = []
    end = -1
    for offset, chunk in records:
        if offset == end:
            runs[-1][1].append(chunk)
        else:
            runs.append((offset, [chunk]))
        end = offset + chunk.nbytes
    return runs


@contextmanager
def _directory_lock(directory: Path) -> Iterator[None]:
    """Serializes enable and disable of the disks in one folder; writes never take it."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class ReplicationTracker:
    """Tracks the writes of one protected disk (raw or fixed VHD) into replication logs.

    One object per process; its methods are thread-safe. `sync=True` makes every write durable
    (log, control and disk fsynced) before it returns; otherwise writes reach the OS and seals are
    durable. `spare_max_bytes`: how much of an acknowledged log's storage `acknowledge` keeps as the spare.
    """

    def __init__(self, disk_path: str | os.PathLike[str], *, sync: bool = False,
                 spare_max_bytes: int = SPARE_MAX_BYTES):
        if not isinstance(spare_max_bytes, int) or spare_max_bytes < 0:
            raise ValueError(f"spare_max_bytes must be a whole number of bytes, 0 or more, got {spare_max_bytes!r}")
        self.disk_path = Path(disk_path)
        self.sync = sync
        self.spare_max_bytes = spare_max_bytes
        self._files = TrackerFiles(self.disk_path)
        self._lock = threading.Lock()
        self._control_file = ControlFile.open(self._files.control, self.disk_path)
        self._disk: LocalDisk | None = None
        self._log_fd = -1
        self._log_header: LogHeader | None = None
        self._copy_on_write = CopyOnWrite(self._files)
        # (control counter, generation, log end) of the commit whose record this object wrote to the
        # disk, not yet recorded as applied (step 5 of the module docstring).
        self._applied_unrecorded: tuple[int, int, int] | None = None
        try:
            with self._locked() as control:
                self.disk_id: bytes = control.disk_id
                self.disk_size: int = control.disk_size
        except BaseException:
            self.close()
            raise

    # ---- enabling ------------------------------------------------------------------------------
    @classmethod
    def enable(
        cls, disk_path: str | os.PathLike[str], disk_id: bytes | None = None, *, sync: bool = False
    ) -> ReplicationTracker:
        """Start tracking a disk at generation 1 (sequence numbers from 1), or open its tracker if it
        is tracked already. `disk_id` (16 bytes, random by default) is stored in every log."""
        disk_path = Path(disk_path)
        if disk_id is not None and (not isinstance(disk_id, bytes) or len(disk_id) != 16):
            raise ValueError(f"disk id of {disk_path} must be 16 bytes, got {disk_id!r}")
        with open_disk(disk_path) as disk:
            disk_size = disk.size
        with _directory_lock(disk_path.parent):
            try:
                tracker = cls(disk_path, sync=sync)
            except NotTrackedError:
                pass
            else:
                if disk_id is not None and tracker.disk_id != disk_id:
                    tracker.close()
                    raise TrackerStateError(
                        f"disk {disk_path} is already tracked with disk id {uuid.UUID(bytes=tracker.disk_id)}, "
                        f"not {uuid.UUID(bytes=disk_id)}"
                    )
                return tracker
            cls._create_files(disk_path, disk_id or uuid.uuid4().bytes, disk_size)
        return cls(disk_path, sync=sync)

    @staticmethod
    def _create_files(disk_path: Path, disk_id: bytes, disk_size: int) -> None:
        files = TrackerFiles(disk_path)
        # Leftovers of an interrupted enable or disable mean nothing without a control file.
        for path in files.all_files():
            unlink_quietly(path)
        with LogWriter.create(
            files.active, disk_id=disk_id, generation=1, first_seq=1, disk_size=disk_size
        ) as log:
            log.sync()
            header = log.header
        control = ControlState(disk_id, disk_size, 1, 1, LogState.empty(header), HEADER_SIZE)
        staging = disk_path.with_name(f"{disk_path.name}.ctl.tmp")
        fd = os.open(staging, os.O_RDWR | os.O_CREAT | os.O_TRUNC, FILE_MODE)  # beside the disk: as private
        try:
            ControlFile(staging, fd).write(control, fsync=True)
        finally:
            os.close(fd)
        os.rename(staging, files.control)
        files.sync_directory()

    def disable(self) -> None:
        """Stop tracking: remove the control file, every log and the snapshot. Other processes'
        trackers of this disk fail with NotTrackedError from then on."""
        with _directory_lock(self.disk_path.parent):
            try:
                with self._locked() as control:
                    self._control_file.write(replace(control, disabled=True), fsync=True)
                    self._close_log()
                    self._copy_on_write.close()
                    for path in self._files.all_files():
                        unlink_quietly(path)
                    self._files.sync_directory()
            except NotTrackedError:
                pass
        self.close()

    def close(self) -> None:
        """Release this process's file descriptors; the disk stays tracked."""
        self._close_log()
        self._copy_on_write.close()
        if self._disk is not None:
            self._disk.close()
            self._disk = None
        self._control_file.close()

    def __enter__(self) -> ReplicationTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the guest's side ----------------------------------------------------------------------
    def write(self, offset: int, data: bytes | memoryview, *, fua: bool = False) -> int:
        """Log then write `data` at `offset`; return the record's sequence number (the last one when
        a write over MAX_RECORD_DATA is logged as several records, all in the same log). `fua`: durable
        (log, control and disk fsynced) before it returns, as every write is with `sync=True`."""
        return self.write_many([(offset, data, fua)])

    def write_many(self, writes: Sequence[tuple[int, bytes | memoryview, bool]]) -> int:
        """`write` of each (offset, data, fua) in order, as one batch: every record appended (one
        positioned write), one commit of the control file, then the disk written in order. A block
        device front end passes the writes it has queued, which saves per write the lock, the control
        file's read and write. A fua among them makes the whole batch durable before it returns.
        Returns the last sequence number."""
        records: list[tuple[int, memoryview]] = []
        durable = self.sync
        for offset, data, fua in writes:
            view = memoryview(data).cast("B")
            self._check_write(offset, view.nbytes)
            durable = durable or fua
            records += ((offset + start, view[start : start + MAX_RECORD_DATA])
                        for start in range(0, view.nbytes, MAX_RECORD_DATA))
        if not records:
            return 0
        with self._locked() as control:
            writer = self._active_writer(control)
            seq = writer.append_many(records)
            if durable:
                os.fdatasync(self._log_fd)
            # `control` says the previous records are applied (see `_locked`): recorded with this commit.
            control = self._control_file.write(control.evolve(log=writer.state), fsync=durable)
            if control.snapshot_generation:
                for offset, chunk in records:
                    self._write_disk(control, offset, chunk, chunk.nbytes, False)
            else:
                disk = self._writable_disk()
                for offset, chunks in _contiguous_runs(records):
                    if len(chunks) == 1:
                        disk.write(offset, chunks[0])
                    else:
                        disk.write_gathered(offset, chunks)
            if durable:
                self._writable_disk().flush()
            self._applied_unrecorded = (control.counter, control.generation, control.log.end)
        return seq

    def write_zeroes(self, offset: int, length: int, *, fua: bool = False) -> int:
        """Log then make [offset, offset+length) read as zeros (a hole where the filesystem can punch
        one). Logged as WRITE records of zeros, split at MAX_RECORD_DATA: the log format has no other
        record type, so logapply and every log reader replay them unchanged; their data is a hole in
        the log file (LogWriter.append_zeros), but it counts in the unsent bytes, as it will be shipped."""
        self._check_write(offset, length)
        durable = self.sync or fua
        with self._locked() as control:
            for start in range(0, length, MAX_RECORD_DATA):
                chunk = min(MAX_RECORD_DATA, length - start)
                control, seq = self._write_locked(control, offset + start, None, chunk, durable)
        return seq

    def trim(self, offset: int, length: int, *, fua: bool = False) -> int:
        """A discard: handled as `write_zeroes`. A discarded range could be left as it is, but the disk
        frees the space only if the hole is punched, and the replica must then read the same zeros."""
        return self.write_zeroes(offset, length, fua=fua)

    def flush(self) -> None:
        """Make every write made so far durable: the active log, the control file (its commit point)
        and the disk, fsynced."""
        with self._locked() as control:
            self._active_writer(control)
            os.fdatasync(self._log_fd)
            self._writable_disk().flush()
            self._control_file.write(control, fsync=True)  # also records the last write as applied

    def read(self, offset: int, length: int) -> bytes:
        """`length` bytes of the live disk at `offset`."""
        if not isinstance(offset, int) or not isinstance(length, int) or offset < 0 or length < 0 \
                or offset + length > self.disk_size:
            raise ValueError(
                f"disk {self.disk_path}: cannot read {length!r} bytes at offset {offset!r}: outside the "
                f"disk [0, {self.disk_size})"
            )
        buffer = aligned_buffer(max(length, 1))
        with self._locked(), memoryview(buffer) as view:
            self._writable_disk().read_into(offset, view[:length])
            return view[:length].tobytes()

    def _check_write(self, offset: int, length: int) -> None:
        if not isinstance(offset, int) or offset % SECTOR or length % SECTOR or length == 0:
            raise AlignmentError(
                f"disk {self.disk_path}: write of {length} bytes at offset {offset!r} is not a whole "
                f"number of {SECTOR}-byte sectors"
            )
        if offset < 0 or offset + length > self.disk_size:
            raise ValueError(
                f"disk {self.disk_path}: write of {length} bytes at offset {offset} is outside the disk "
                f"[0, {self.disk_size})"
            )

    def _write_locked(
        self, control: ControlState, offset: int, data: memoryview | None, length: int, durable: bool
    ) -> tuple[ControlState, int]:
        """One record: `data`, or `length` zero bytes when it is None."""
        writer = self._active_writer(control)
        seq = writer.append(offset, data) if data is not None else writer.append_zeros(offset, length)
        if durable:
            os.fdatasync(self._log_fd)
        # `control` says the previous record is applied (see `_locked`): recorded with this commit.
        control = self._control_file.write(control.evolve(log=writer.state), fsync=durable)
        self._write_disk(control, offset, data, length, durable)
        self._applied_unrecorded = (control.counter, control.generation, control.log.end)
        return control.evolve(applied_end=control.log.end), seq

    def _write_disk(
        self, control: ControlState, offset: int, data: memoryview | None, length: int, durable: bool
    ) -> None:
        disk = self._writable_disk()
        if control.snapshot_generation:
            self._copy_on_write.preserve(control, disk, offset, length)
        if data is None:
            disk.write_zeros(offset, length)
        else:
            disk.write(offset, data)
        if durable:
            disk.flush()

    # ---- the host agent's side -----------------------------------------------------------------
    @property
    def generation(self) -> int:
        """The active (unsealed) generation."""
        with self._locked() as control:
            return control.generation

    def seal(self) -> SealedLog:
        """Seal the active log and start the next generation with an empty one. Always produces a
        log, even one without records. Quick: the seal record is appended, nothing is copied."""
        with self._locked() as control:
            _, sealed = self._seal_locked(control)
        return sealed

    def pending_logs(self) -> list[SealedLog]:
        """The sealed logs not yet acknowledged, in generation order."""
        with self._locked():
            return [self._sealed_log(generation) for generation in self._files.sealed_generations()]

    def acknowledge(self, generation: int) -> None:
        """Delete the sealed logs up to and including `generation`: the recovery side applied them."""
        with self._locked() as control:
            if generation >= control.generation:
                raise ValueError(
                    f"disk {self.disk_path}: cannot acknowledge generation {generation}: generation "
                    f"{control.generation} is still active and later ones do not exist yet"
                )
            acknowledged = [sealed for sealed in self._files.sealed_generations() if sealed <= generation]
            if not acknowledged:
                return
            # The newest becomes the spare the next seal's log is written over (TrackerFiles.spare),
            # replacing an older spare, unless no spare is kept; the others are deleted.
            for sealed in acknowledged[:-1] if self.spare_max_bytes else acknowledged:
                os.unlink(self._files.sealed(sealed))
            if self.spare_max_bytes:
                os.rename(self._files.sealed(acknowledged[-1]), self._files.spare)
                if os.stat(self._files.spare).st_size > self.spare_max_bytes:
                    os.truncate(self._files.spare, self.spare_max_bytes)
            else:
                unlink_quietly(self._files.spare)
            self._files.sync_directory()

    def unsent_bytes(self) -> int:
        """Bytes of sealed pending logs plus the active log."""
        with self._locked() as control:
            sealed = sum(os.stat(self._files.sealed(g)).st_size for g in self._files.sealed_generations())
            return sealed + control.log.end

    def unsent_ratio(self) -> float:
        return self.unsent_bytes() / self.disk_size

    def needs_resync(self) -> bool:
        """True once unsent logs reach RESYNC_THRESHOLD of the disk size: shipping them would cost
        more than comparing the disks."""
        return self.unsent_ratio() >= RESYNC_THRESHOLD

    def _seal_locked(self, control: ControlState) -> tuple[ControlState, SealedLog]:
        writer = self._active_writer(control)
        seal = writer.seal()
        header = writer.header
        generation = control.generation
        with LogWriter.create(
            self._files.next_active,
            disk_id=control.disk_id,
            generation=generation + 1,
            first_seq=seal.last_seq + 1,
            disk_size=control.disk_size,
            recycle=self._files.spare,
        ) as next_log:
            next_log.sync()
            next_state = next_log.state
        control = self._control_file.write(
            replace(
                control,
                generation=generation + 1,
                first_seq=seal.last_seq + 1,
                log=next_state,
                applied_end=next_state.end,
                sealing=generation,
            ),
            fsync=True,
        )
        control = self._finish_seal(control)
        sealed = SealedLog(
            self._files.sealed(generation), generation, header.first_seq, seal.last_seq, seal.records,
            seal.data_bytes, seal.size,
        )
        return control, sealed

    def _finish_seal(self, control: ControlState) -> ControlState:
        """Rename the sealed log and put the next one in place. Repeatable after a crash at any point:
        the next log's file still existing means the renames are not done."""
        self._close_log()
        if self._files.next_active.exists():
            if self._files.active.exists():
                os.rename(self._files.active, self._files.sealed(control.sealing))
            os.rename(self._files.next_active, self._files.active)
        self._files.sync_directory()
        return self._control_file.write(replace(control, sealing=0), fsync=True)

    def _sealed_log(self, generation: int) -> SealedLog:
        path = self._files.sealed(generation)
        header = read_log_header(path, disk_name=self.disk_path.name)
        if header.generation != generation or header.disk_id != self.disk_id:
            raise TrackerStateError(
                f"sealed log {path} holds generation {header.generation} of disk "
                f"{uuid.UUID(bytes=header.disk_id)}, not generation {generation} of disk "
                f"{uuid.UUID(bytes=self.disk_id)}"
            )
        seal = read_seal(path, header, disk_name=self.disk_path.name)
        return SealedLog(
            path, generation, header.first_seq, seal.last_seq, seal.records, seal.data_bytes, seal.size
        )

    # ---- resync required -----------------------------------------------------------------------
    def mark_resync_required(self, reason: str) -> None:
        """The logs can no longer bring the replica in line (writes may have reached the disk without
        them): the host agent must resync instead of shipping, until a snapshot that clears it."""
        with self._locked() as control:
            self._write_reason(reason)
            self._control_file.write(replace(control, resync_required=True), fsync=True)

    def resync_required(self) -> str | None:
        """Why the disk needs a resync, or None when its logs are all it needs."""
        with self._locked() as control:
            if not control.resync_required:
                return None
            try:
                return self._files.resync_reason.read_text().strip() or "reason not recorded"
            except FileNotFoundError:
                return "reason not recorded"

    def clear_resync_required(self) -> None:
        """Forget a resync requirement (a resync copies from a snapshot: `create_snapshot(clears_resync=True)`
        clears it at the very moment the snapshot is taken, which is what resyncs use)."""
        with self._locked() as control:
            if control.resync_required:
                self._control_file.write(replace(control, resync_required=False), fsync=True)
            unlink_quietly(self._files.resync_reason)

    def _write_reason(self, reason: str) -> None:
        replace_file(self._files.resync_reason, (reason + "\n").encode())

    # ---- snapshot ------------------------------------------------------------------------------
    def create_snapshot(self, *, clears_resync: bool = False) -> int:
        """Take a copy-on-write snapshot; return the first generation whose logs hold exactly the
        writes made after it. The active log is sealed (it and earlier logs hold writes the snapshot
        already has; the caller acknowledges them once the snapshot is copied). If a snapshot
        exists, its generation is returned and nothing changes.

        `clears_resync`: the snapshot is the source of a full copy or resync, so a resync requirement
        ends with it, in the same control update: writes made after it are logged and shipped as
        usual. An existing snapshot clears nothing (the requirement may have come after it)."""
        with self._locked() as control:
            if control.snapshot_generation:
                return control.snapshot_generation
            control, _ = self._seal_locked(control)
            create_snapshot_files(self._files, control.disk_size)
            was_required = control.resync_required
            control = self._control_file.write(
                replace(control, snapshot_generation=control.generation, snapshot_block=SNAPSHOT_BLOCK,
                        resync_required=control.resync_required and not clears_resync),
                fsync=True,
            )
            if was_required and not control.resync_required:
                unlink_quietly(self._files.resync_reason)
            return control.snapshot_generation

    def delete_snapshot(self) -> None:
        """Drop the snapshot (the disk already holds every write); no error if there is none."""
        with self._locked() as control:
            if control.snapshot_generation:
                self._control_file.write(replace(control, snapshot_generation=0, snapshot_block=0), fsync=True)
            self._copy_on_write.close()
            delete_snapshot_files(self._files)

    def snapshot_view(self) -> SnapshotView:
        """A read-only endpoint of the disk as it was when the snapshot was taken."""
        with self._locked() as control:
            if not control.snapshot_generation:
                raise SnapshotError(f"disk {self.disk_path} has no snapshot: call create_snapshot() first")
            # Opened under the lock, so these are the files of this very snapshot.
            return SnapshotView(
                self._files, control.snapshot_generation, control.snapshot_block, control.disk_size
            )

    # ---- locking, recovery, files --------------------------------------------------------------
    @contextmanager
    def _locked(self) -> Iterator[ControlState]:
        """Hold the tracker lock with the current control state, after finishing whatever a crashed
        process left half done."""
        with self._lock:
            if self._control_file.fd < 0:
                raise NotTrackedError(f"the tracker of disk {self.disk_path} is closed")
            fcntl.flock(self._control_file.fd, fcntl.LOCK_EX)
            try:
                control = self._control_file.read()
                if control.applied_end < control.log.end and self._applied_unrecorded == (
                        control.counter, control.generation, control.log.end):
                    # This object wrote that record to the disk itself; nobody wrote the control file since.
                    control = control.evolve(applied_end=control.log.end)
                if control.disabled:
                    raise NotTrackedError(f"disk {self.disk_path} is no longer enabled for replication tracking")
                if control.sealing:
                    control = self._finish_seal(control)
                if control.applied_end < control.log.end:
                    control = self._replay_unapplied(control)
                yield control
            finally:
                fcntl.flock(self._control_file.fd, fcntl.LOCK_UN)

    def _replay_unapplied(self, control: ControlState) -> ControlState:
        """Write to the disk, in order, the committed records a crashed writer may not have written:
        those of its last commit (one batch), from `applied_end` to the log's end. Replaying one the
        disk has already rewrites the same bytes. The records must tile the range exactly and end at the
        last committed one (checked first), and each one's checksum and sequence number are verified
        before it is written: a damaged one stops the replay (the ones before it are committed data)."""
        self._active_writer(control)
        assert self._log_header is not None
        records = read_records_between(self._log_fd, control.applied_end, control.log.end, self._log_header,
                                       next_seq=control.log.next_seq, log_name=self._files.active.name)
        if records is None:
            raise TrackerStateError(
                f"active log {self._files.active}: the committed records from byte {control.applied_end} to "
                f"{control.log.end}, which may be missing from the disk, are not whole records"
            )
        for record in records:
            self._write_disk(control, record.offset, record.data, record.length, False)
        if self.sync:
            self._writable_disk().flush()
        return self._control_file.write(replace(control, applied_end=control.log.end))

    def _active_writer(self, control: ControlState) -> LogWriter:
        """A writer continuing the active log from the committed state in `control`."""
        if self._log_header is None or self._log_header.generation != control.generation:
            self._close_log()
            try:
                fd = os.open(self._files.active, os.O_RDWR)
            except FileNotFoundError:
                raise TrackerStateError(
                    f"active log {self._files.active} of generation {control.generation} is missing"
                ) from None
            try:
                with open(fd, "rb", buffering=0, closefd=False) as f:
                    header = read_log_header(f, disk_name=self.disk_path.name)
                if header.generation != control.generation or header.disk_id != control.disk_id:
                    raise TrackerStateError(
                        f"active log {self._files.active} holds generation {header.generation}, but the "
                        f"control file says generation {control.generation} is active"
                    )
            except BaseException:
                os.close(fd)
                raise
            self._log_fd, self._log_header = fd, header
        return LogWriter(self._log_fd, self._log_header, control.log, name=self._files.active.name)

    def _close_log(self) -> None:
        if self._log_fd >= 0:
            os.close(self._log_fd)
        self._log_fd = -1
        self._log_header = None

    def _writable_disk(self) -> LocalDisk:
        if self._disk is None:
            self._disk = open_disk(self.disk_path, writable=True)
        return self._disk

