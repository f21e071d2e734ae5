"""The replication tracker: every write to a protected disk goes to its replication log first.

Files beside a tracked disk `disk0.vhd` (layouts in docs/formats.md):

- `disk0.vhd.ctl`: the control file and the cross-process lock (flock). Two checksummed slots written
  alternately, so a crash mid-update leaves the previous state readable. It holds the active
  generation, the active log's writer state (next sequence number, record count, data bytes, digest,
  end), how much of that log has reached the disk, the snapshot state, and a seal in progress.
- `disk0.vhd.hrl`: the active log, taking new writes.
- `disk0.vhd.00000007.hrl`: sealed logs waiting to be shipped and acknowledged.
- `disk0.vhd.hrl.new`: the next active log while a seal is being committed.
- `disk0.vhd.snap`, `disk0.vhd.snapmap`: a copy-on-write snapshot: preserved old contents (a sparse
  file with the disk's offsets) and one byte per snapshot block, non-zero once it is preserved.

The guest's process writes through one tracker object while the host agent's process seals, ships,
acknowledges and snapshots through another. Every operation runs under the flock and starts by
re-reading the control file, so each process sees the other's rotations and snapshots at once.

A write is (1) its record appended after the active log's committed end, (2) the control file
updated to include it (the commit point), (3) the old contents preserved if a snapshot needs them,
(4) the disk written, (5) the control file updated to say the disk has it. A crash before (2) leaves
the disk unchanged and the record is overwritten by the next one; a crash after (2) is finished by
the next process to take the lock, which replays the committed records the disk may lack. So the
disk never holds a write its log lacks, and the log never holds one the disk will not get.
"""
from __future__ import annotations

import errno
import fcntl
import io
import os
import re
import struct
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import mmh3

from datapath.buffers import aligned_buffer
from datapath.disk import LocalDisk, open_disk
from datapath.endpoint import SECTOR
from datapath.errors import AlignmentError, NonRecoverableError
from datapath.replog import (
    HEADER_SIZE,
    MAX_RECORD_DATA,
    RECORD_OVERHEAD,
    LogHeader,
    LogState,
    LogWriter,
    read_log_header,
    read_record,
    read_seal,
    write_fully,
)

RESYNC_THRESHOLD = 0.5
"""Unsent logs at this fraction of the disk size or more: the disk needs resynchronization."""

SNAPSHOT_BLOCK = 64 * 1024
"""Copy-on-write granularity of a snapshot."""

_PRESERVE_CHUNK = 1024 * 1024

_CONTROL_MAGIC = b"ASRCTL1\0"
_CONTROL_VERSION = 1
# magic, version, flags, snapshot block, counter, disk id, disk size, generation, first seq, next seq,
# records, data bytes, digest, log end, applied end, snapshot generation, sealing generation
_CONTROL_FIELDS = struct.Struct("<8sHHIQ16sQQQQQQ16sQQQQ")
_CONTROL_SLOT = 256
_FLAG_DISABLED = 1


class NotTrackedError(NonRecoverableError):
    """The disk is not (or no longer) enabled for replication tracking."""


class TrackerStateError(NonRecoverableError):
    """The tracker's files are damaged or inconsistent: disable, enable and resynchronize the disk."""


class SnapshotError(NonRecoverableError):
    """No snapshot exists, or it was deleted while its view was being read."""


@dataclass(frozen=True)
class SealedLog:
    path: Path
    generation: int
    first_seq: int
    last_seq: int
    records: int
    data_bytes: int
    size: int


@dataclass(frozen=True)
class _Control:
    disk_id: bytes
    disk_size: int
    generation: int
    first_seq: int
    """First sequence number of the active generation."""
    log: LogState
    """The active log's committed state."""
    applied_end: int
    """Records of the active log before this position have reached the disk."""
    snapshot_generation: int = 0
    """0, or the generation the snapshot was taken at (its id)."""
    snapshot_block: int = 0
    sealing: int = 0
    """0, or the generation whose seal is committed but whose files are not yet renamed."""
    disabled: bool = False
    counter: int = 0

    def encode(self) -> bytes:
        fields = _CONTROL_FIELDS.pack(
            _CONTROL_MAGIC, _CONTROL_VERSION, _FLAG_DISABLED if self.disabled else 0, self.snapshot_block,
            self.counter, self.disk_id, self.disk_size, self.generation, self.first_seq, self.log.next_seq,
            self.log.records, self.log.data_bytes, self.log.digest, self.log.end, self.applied_end,
            self.snapshot_generation, self.sealing,
        )
        return fields + mmh3.mmh3_x64_128_digest(fields)

    @classmethod
    def decode(cls, slot: bytes) -> _Control | None:
        """The control state in a slot, or None if the slot is empty or torn."""
        size = _CONTROL_FIELDS.size
        if len(slot) < size + 16 or mmh3.mmh3_x64_128_digest(slot[:size]) != slot[size : size + 16]:
            return None
        (magic, version, flags, snapshot_block, counter, disk_id, disk_size, generation, first_seq, next_seq,
         records, data_bytes, digest, log_end, applied_end, snapshot_generation, sealing) = _CONTROL_FIELDS.unpack(
            slot[:size]
        )
        if magic != _CONTROL_MAGIC or version != _CONTROL_VERSION:
            return None
        return cls(
            disk_id, disk_size, generation, first_seq, LogState(next_seq, records, data_bytes, digest, log_end),
            applied_end, snapshot_generation, snapshot_block, sealing, bool(flags & _FLAG_DISABLED), counter,
        )


class _ControlFile:
    def __init__(self, path: Path, fd: int):
        self.path = path
        self.fd = fd

    @classmethod
    def open(cls, path: Path, disk_path: Path) -> _ControlFile:
        try:
            return cls(path, os.open(path, os.O_RDWR))
        except FileNotFoundError:
            raise NotTrackedError(
                f"disk {disk_path} is not enabled for replication tracking (no {path.name})"
            ) from None

    def read(self) -> _Control:
        raw = os.pread(self.fd, 2 * _CONTROL_SLOT, 0)
        slots = [_Control.decode(raw[i * _CONTROL_SLOT : (i + 1) * _CONTROL_SLOT]) for i in (0, 1)]
        valid = [slot for slot in slots if slot is not None]
        if not valid:
            raise TrackerStateError(f"tracker control file {self.path} is damaged: no valid state slot")
        return max(valid, key=lambda control: control.counter)

    def write(self, control: _Control, *, fsync: bool = False) -> _Control:
        """Store `control` in the slot not holding the current state; return it as stored."""
        control = replace(control, counter=control.counter + 1)
        write_fully(self.fd, [control.encode()], (control.counter % 2) * _CONTROL_SLOT)
        if fsync:
            os.fsync(self.fd)
        return control

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _TrackerFiles:
    """Paths of the files a tracker keeps beside its disk."""

    def __init__(self, disk_path: Path):
        self.disk = disk_path
        self.directory = disk_path.parent
        name = disk_path.name
        self.control = disk_path.with_name(f"{name}.ctl")
        self.active = disk_path.with_name(f"{name}.hrl")
        self.next_active = disk_path.with_name(f"{name}.hrl.new")
        self.snapshot_data = disk_path.with_name(f"{name}.snap")
        self.snapshot_map = disk_path.with_name(f"{name}.snapmap")
        self._sealed_pattern = re.compile(re.escape(name) + r"\.(\d{8,})\.hrl")

    def sealed(self, generation: int) -> Path:
        return self.disk.with_name(f"{self.disk.name}.{generation:08d}.hrl")

    def sealed_generations(self) -> list[int]:
        generations = []
        for entry in os.scandir(self.directory):
            match = self._sealed_pattern.fullmatch(entry.name)
            if match:
                generations.append(int(match.group(1)))
        return sorted(generations)

    def all_files(self) -> list[Path]:
        fixed = [self.control, self.active, self.next_active, self.snapshot_data, self.snapshot_map]
        return fixed + [self.sealed(g) for g in self.sealed_generations()]

    def sync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextmanager
def _directory_lock(directory: Path) -> Iterator[None]:
    """Serializes enable and disable of the disks in one folder; writes never take it."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class ReplicationTracker:
    """Tracks the writes of one protected disk (raw or fixed VHD) into replication logs.

    One object per process; its methods are thread-safe. `sync=True` makes every write durable
    (log, control and disk fsynced) before it returns; otherwise writes reach the OS and seals are
    durable.
    """

    def __init__(self, disk_path: str | os.PathLike[str], *, sync: bool = False):
        self.disk_path = Path(disk_path)
        self.sync = sync
        self._files = _TrackerFiles(self.disk_path)
        self._lock = threading.Lock()
        self._control_file = _ControlFile.open(self._files.control, self.disk_path)
        self._disk: LocalDisk | None = None
        self._log_fd = -1
        self._log_header: LogHeader | None = None
        self._snapshot_fds: tuple[int, int] | None = None
        self._snapshot_generation = 0
        self._preserve_buffer: memoryview | None = None
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
        files = _TrackerFiles(disk_path)
        # Leftovers of an interrupted enable or disable mean nothing without a control file.
        for path in files.all_files():
            _unlink_quietly(path)
        with LogWriter.create(
            files.active, disk_id=disk_id, generation=1, first_seq=1, disk_size=disk_size
        ) as log:
            log.sync()
            header = log.header
        control = _Control(disk_id, disk_size, 1, 1, LogState.empty(header), HEADER_SIZE)
        staging = disk_path.with_name(f"{disk_path.name}.ctl.tmp")
        fd = os.open(staging, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _ControlFile(staging, fd).write(control, fsync=True)
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
                    self._close_snapshot()
                    for path in self._files.all_files():
                        _unlink_quietly(path)
                    self._files.sync_directory()
            except NotTrackedError:
                pass
        self.close()

    def close(self) -> None:
        """Release this process's file descriptors; the disk stays tracked."""
        self._close_log()
        self._close_snapshot()
        if self._disk is not None:
            self._disk.close()
            self._disk = None
        self._control_file.close()

    def __enter__(self) -> ReplicationTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the guest's side ----------------------------------------------------------------------
    def write(self, offset: int, data: bytes | memoryview) -> int:
        """Log then write `data` at `offset`; return the record's sequence number (the last one when
        a write over MAX_RECORD_DATA is logged as several records, all in the same log)."""
        view = memoryview(data).cast("B")
        self._check_write(offset, view.nbytes)
        with self._locked() as control:
            for start in range(0, view.nbytes, MAX_RECORD_DATA):
                control, seq = self._write_locked(control, offset + start, view[start : start + MAX_RECORD_DATA])
        return seq

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

    def _write_locked(self, control: _Control, offset: int, data: memoryview) -> tuple[_Control, int]:
        writer = self._active_writer(control)
        seq = writer.append(offset, data)
        if self.sync:
            os.fdatasync(self._log_fd)
        control = self._control_file.write(replace(control, log=writer.state), fsync=self.sync)
        self._write_disk(control, offset, data)
        control = self._control_file.write(replace(control, applied_end=control.log.end))
        return control, seq

    def _write_disk(self, control: _Control, offset: int, data: memoryview) -> None:
        disk = self._writable_disk()
        if control.snapshot_generation:
            self._preserve(control, offset, data.nbytes)
        disk.write(offset, data)
        if self.sync:
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
            deleted = False
            for sealed in self._files.sealed_generations():
                if sealed <= generation:
                    os.unlink(self._files.sealed(sealed))
                    deleted = True
            if deleted:
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

    def _seal_locked(self, control: _Control) -> tuple[_Control, SealedLog]:
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

    def _finish_seal(self, control: _Control) -> _Control:
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

    # ---- snapshot ------------------------------------------------------------------------------
    def create_snapshot(self) -> int:
        """Take a copy-on-write snapshot; return the first generation whose logs hold exactly the
        writes made after it. The active log is sealed (it and earlier logs hold writes the snapshot
        already has; the caller acknowledges them once the snapshot is copied). If a snapshot
        exists, its generation is returned and nothing changes."""
        with self._locked() as control:
            if control.snapshot_generation:
                return control.snapshot_generation
            control, _ = self._seal_locked(control)
            block_count = -(-control.disk_size // SNAPSHOT_BLOCK)
            new_files = ((self._files.snapshot_data, control.disk_size), (self._files.snapshot_map, block_count))
            for path, size in new_files:
                _unlink_quietly(path)  # a previous create that crashed before committing
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                try:
                    os.ftruncate(fd, size)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            self._files.sync_directory()
            control = self._control_file.write(
                replace(control, snapshot_generation=control.generation, snapshot_block=SNAPSHOT_BLOCK), fsync=True
            )
            return control.snapshot_generation

    def delete_snapshot(self) -> None:
        """Drop the snapshot (the disk already holds every write); no error if there is none."""
        with self._locked() as control:
            if control.snapshot_generation:
                self._control_file.write(replace(control, snapshot_generation=0, snapshot_block=0), fsync=True)
            self._close_snapshot()
            _unlink_quietly(self._files.snapshot_data)
            _unlink_quietly(self._files.snapshot_map)

    def snapshot_view(self) -> SnapshotView:
        """A read-only endpoint of the disk as it was when the snapshot was taken."""
        with self._locked() as control:
            if not control.snapshot_generation:
                raise SnapshotError(f"disk {self.disk_path} has no snapshot: call create_snapshot() first")
            # Opened under the lock, so these are the files of this very snapshot.
            return SnapshotView(
                self._files, control.snapshot_generation, control.snapshot_block, control.disk_size
            )

    def _preserve(self, control: _Control, offset: int, length: int) -> None:
        """Copy the snapshot blocks that [offset, offset+length) touches and that are not preserved
        yet into the snapshot file, then mark them. Preserve before mark, mark before the disk write:
        a reader that sees a mark finds the old contents complete."""
        data_fd, map_fd = self._snapshot_files(control)
        block = control.snapshot_block
        first = offset // block
        marks = os.pread(map_fd, (offset + length - 1) // block - first + 1, first)
        if b"\0" not in marks:
            return
        disk = self._writable_disk()
        if self._preserve_buffer is None:
            self._preserve_buffer = memoryview(aligned_buffer(_PRESERVE_CHUNK))
        for run in re.finditer(rb"\x00+", marks):
            start = (first + run.start()) * block
            end = min((first + run.end()) * block, control.disk_size)
            # A hole needs no copy: the snapshot file is sparse and reads as zeros there too.
            if next(disk.data_extents(start, end - start), None) is not None:
                for position in range(start, end, _PRESERVE_CHUNK):
                    chunk = self._preserve_buffer[: min(_PRESERVE_CHUNK, end - position)]
                    disk.read_into(position, chunk)
                    write_fully(data_fd, [chunk], position)
            write_fully(map_fd, [b"\1" * (run.end() - run.start())], first + run.start())

    def _snapshot_files(self, control: _Control) -> tuple[int, int]:
        if self._snapshot_generation != control.snapshot_generation or self._snapshot_fds is None:
            self._close_snapshot()
            try:
                data_fd = os.open(self._files.snapshot_data, os.O_RDWR)
            except FileNotFoundError:
                raise TrackerStateError(f"snapshot file {self._files.snapshot_data} is missing") from None
            try:
                map_fd = os.open(self._files.snapshot_map, os.O_RDWR)
            except FileNotFoundError:
                os.close(data_fd)
                raise TrackerStateError(f"snapshot map {self._files.snapshot_map} is missing") from None
            self._snapshot_fds = (data_fd, map_fd)
            self._snapshot_generation = control.snapshot_generation
        return self._snapshot_fds

    def _close_snapshot(self) -> None:
        if self._snapshot_fds is not None:
            for fd in self._snapshot_fds:
                os.close(fd)
            self._snapshot_fds = None
            self._snapshot_generation = 0

    # ---- locking, recovery, files --------------------------------------------------------------
    @contextmanager
    def _locked(self) -> Iterator[_Control]:
        """Hold the tracker lock with the current control state, after finishing whatever a crashed
        process left half done."""
        with self._lock:
            if self._control_file.fd < 0:
                raise NotTrackedError(f"the tracker of disk {self.disk_path} is closed")
            fcntl.flock(self._control_file.fd, fcntl.LOCK_EX)
            try:
                control = self._control_file.read()
                if control.disabled:
                    raise NotTrackedError(f"disk {self.disk_path} is no longer enabled for replication tracking")
                if control.sealing:
                    control = self._finish_seal(control)
                if control.applied_end < control.log.end:
                    control = self._replay_unapplied(control)
                yield control
            finally:
                fcntl.flock(self._control_file.fd, fcntl.LOCK_UN)

    def _replay_unapplied(self, control: _Control) -> _Control:
        """Write to the disk the committed record a crashed writer may not have written. Each record
        is committed and written before the next is appended, so there is exactly one, the last."""
        self._active_writer(control)
        assert self._log_header is not None
        record = read_record(
            self._log_fd, control.applied_end, self._log_header, expected_seq=control.log.next_seq - 1,
            log_name=self._files.active.name,
        )
        if control.applied_end + RECORD_OVERHEAD + record.length != control.log.end:
            raise TrackerStateError(
                f"active log {self._files.active}: more than one committed record (from byte "
                f"{control.applied_end} to {control.log.end}) is missing from the disk"
            )
        self._write_disk(control, record.offset, record.data)
        return self._control_file.write(replace(control, applied_end=control.log.end))

    def _active_writer(self, control: _Control) -> LogWriter:
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


class SnapshotView:
    """The disk as it was when the snapshot was taken, as a read-only DiskEndpoint.

    Reads take no lock, yet are exact while another process writes. A writer (1) preserves a
    block's old contents, (2) marks the block, (3) writes the disk. A read (a) reads the disk, (b)
    reads the marks, (c) takes the preserved copy of every marked block instead. If (b) finds a
    block unmarked, the writer's (2) came after (b), so its (3) came after (a): the disk bytes read
    were the snapshot's. If (b) finds it marked, (1) is complete. Afterwards (d) the snapshot must
    still exist: once deleted, writes stop preserving and nothing read later could be trusted.
    """

    alignment = 1

    def __init__(self, files: _TrackerFiles, generation: int, block: int, size: int):
        self.name = f"{files.disk} (snapshot at generation {generation})"
        self.size = size
        self.generation = generation
        self._block = block
        self._fds: list[int] = []
        self._disk: LocalDisk | None = None
        try:
            self._control_file = _ControlFile(files.control, self._open(files.control))
            self._data_fd = self._open(files.snapshot_data)
            self._map_fd = self._open(files.snapshot_map)
            self._disk = open_disk(files.disk)
        except BaseException:
            self.close()
            raise

    def _open(self, path: Path) -> int:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise TrackerStateError(f"{self.name}: {path} is missing") from None
        self._fds.append(fd)
        return fd

    def read_into(self, offset: int, buf: memoryview) -> int:
        assert self._disk is not None
        with memoryview(buf) as outer, outer.cast("B") as view:
            length = view.nbytes
            if not isinstance(offset, int) or offset < 0 or offset + length > self.size:
                raise ValueError(
                    f"{self.name}: cannot read {length} bytes at offset {offset!r}: outside [0, {self.size})"
                )
            if length == 0:
                return 0
            self._disk.read_into(offset, view)
            first = offset // self._block
            marks = os.pread(self._map_fd, (offset + length - 1) // self._block - first + 1, first)
            for run in re.finditer(rb"[^\x00]+", marks):
                low = max(offset, (first + run.start()) * self._block)
                high = min(offset + length, (first + run.end()) * self._block)
                _pread_fully(self._data_fd, view[low - offset : high - offset], low)
            self._check_alive()
            return length

    def data_extents(self, offset: int = 0, length: int | None = None) -> Iterator[tuple[int, int]]:
        """The disk's extents now plus the preserved blocks. The disk's are listed first: a block
        changed before that listing is marked before it changed, so the marks read next include it."""
        assert self._disk is not None
        end = self.size if length is None else min(offset + length, self.size)
        disk_extents = [(start, start + size) for start, size in self._disk.data_extents(offset, end - offset)]
        preserved = list(self._preserved_extents(offset, end))
        self._check_alive()
        return _merge_extents(sorted(disk_extents + preserved))

    def _preserved_extents(self, offset: int, end: int) -> Iterator[tuple[int, int]]:
        if end <= offset:
            return
        block = self._block
        first, last = offset // block, (end - 1) // block
        step = 1 << 20
        for chunk_first in range(first, last + 1, step):
            marks = os.pread(self._map_fd, min(step, last + 1 - chunk_first), chunk_first)
            for run in re.finditer(rb"[^\x00]+", marks):
                yield max(offset, (chunk_first + run.start()) * block), min(end, (chunk_first + run.end()) * block)

    def _check_alive(self) -> None:
        control = self._control_file.read()
        if control.disabled or control.snapshot_generation != self.generation:
            raise SnapshotError(f"{self.name}: the snapshot was deleted while it was being read")

    def write(self, offset: int, data: bytes | memoryview) -> None:
        raise io.UnsupportedOperation(f"{self.name} is read-only")

    def write_zeros(self, offset: int, length: int) -> None:
        raise io.UnsupportedOperation(f"{self.name} is read-only")

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self._disk is not None:
            self._disk.close()
            self._disk = None
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def __enter__(self) -> SnapshotView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _merge_extents(ranges: list[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """(offset, length) of the union of sorted [start, end) ranges."""
    current: tuple[int, int] | None = None
    for start, end in ranges:
        if current is not None and start <= current[1]:
            current = (current[0], max(current[1], end))
            continue
        if current is not None:
            yield current[0], current[1] - current[0]
        current = (start, end)
    if current is not None:
        yield current[0], current[1] - current[0]


def _pread_fully(fd: int, view: memoryview, position: int) -> None:
    done = 0
    while done < view.nbytes:
        n = os.preadv(fd, [view[done:]], position + done)
        if n == 0:
            raise OSError(errno.EIO, f"unexpected end of file at byte {position + done}")
        done += n
