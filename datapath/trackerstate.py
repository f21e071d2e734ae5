"""The replication tracker's state on disk: the files it keeps beside a tracked disk and its control file.

Files beside a tracked disk `disk0.vhd` (layouts in docs/formats.md):

- `disk0.vhd.ctl`: the control file and the cross-process lock (flock). Two checksummed slots written
  alternately, so a crash mid-update leaves the previous state readable. It holds the active
  generation, the active log's writer state (next sequence number, record count, data bytes, digest,
  end), how much of that log has reached the disk, the snapshot state, and a seal in progress.
- `disk0.vhd.hrl`: the active log, taking new writes.
- `disk0.vhd.00000007.hrl`: sealed logs waiting to be shipped and acknowledged.
- `disk0.vhd.hrl.new`: the next active log while a seal is being committed.
- `disk0.vhd.hrl.spare`: the storage of the last acknowledged log, kept to become the next active log
  (its stale records, all of lower sequence numbers, lie past the committed end and are overwritten):
  writing over allocated blocks costs a fraction of allocating them (on tmpfs a fresh log's page
  allocation was most of a write's cost), as databases recycle their write-ahead log segments.
- `disk0.vhd.snap`, `disk0.vhd.snapmap`: a copy-on-write snapshot: preserved old contents (a sparse
  file with the disk's offsets) and one byte per snapshot block, non-zero once it is preserved.
- `disk0.vhd.resync`: why the disk needs a resync, while the control file's resync-required flag is set
  (the flag is the truth; the text only explains it).

The tracker (datapath/tracker.py) reads and writes the control file under its flock; the snapshot's
writer and reader (datapath/snapshot.py) use the snapshot files.
"""
from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import mmh3

from datapath.buffers import write_fully
from datapath.errors import NonRecoverableError
from datapath.logformat import LogState

_CONTROL_MAGIC = b"ASRCTL1\0"
_CONTROL_VERSION = 1
# magic, version, flags, snapshot block, counter, disk id, disk size, generation, first seq, next seq,
# records, data bytes, digest, log end, applied end, snapshot generation, sealing generation
_CONTROL_FIELDS = struct.Struct("<8sHHIQ16sQQQQQQ16sQQQQ")
_CONTROL_SLOT = 256
_COUNTER = struct.Struct("<Q")
_COUNTER_OFFSET = 16
_FLAG_DISABLED = 1
# Added after version 1 files existed: they have the bit clear, which reads as "not required".
_FLAG_RESYNC_REQUIRED = 2


class NotTrackedError(NonRecoverableError):
    """The disk is not (or no longer) enabled for replication tracking."""


class TrackerStateError(NonRecoverableError):
    """The tracker's files are damaged or inconsistent: disable, enable and resynchronize the disk."""


@dataclass(frozen=True)
class ControlState:
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
    resync_required: bool = False
    """The logs may lack writes the disk has (the tracker service stopped uncleanly): shipping them
    cannot bring the replica in line; only a resync from a snapshot taken after this can. The reason
    is in the side file `TrackerFiles.resync_reason`."""

    def evolve(self, **changes: object) -> ControlState:
        """`dataclasses.replace`, without its per-field introspection: a write makes several of these,
        and `replace` alone cost a tenth of a 64 KiB write's time."""
        state = object.__new__(ControlState)
        state.__dict__.update(self.__dict__)
        state.__dict__.update(changes)
        return state

    @property
    def flags(self) -> int:
        return (_FLAG_DISABLED if self.disabled else 0) | (_FLAG_RESYNC_REQUIRED if self.resync_required else 0)

    def encode(self) -> bytes:
        fields = _CONTROL_FIELDS.pack(
            _CONTROL_MAGIC, _CONTROL_VERSION, self.flags, self.snapshot_block,
            self.counter, self.disk_id, self.disk_size, self.generation, self.first_seq, self.log.next_seq,
            self.log.records, self.log.data_bytes, self.log.digest, self.log.end, self.applied_end,
            self.snapshot_generation, self.sealing,
        )
        return fields + mmh3.mmh3_x64_128_digest(fields)

    @classmethod
    def decode(cls, slot: bytes) -> ControlState | None:
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
            bool(flags & _FLAG_RESYNC_REQUIRED),
        )


class ControlFile:
    def __init__(self, path: Path, fd: int):
        self.path = path
        self.fd = fd

    @classmethod
    def open(cls, path: Path, disk_path: Path) -> ControlFile:
        try:
            return cls(path, os.open(path, os.O_RDWR))
        except FileNotFoundError:
            raise NotTrackedError(
                f"disk {disk_path} is not enabled for replication tracking (no {path.name})"
            ) from None

    def read(self) -> ControlState:
        raw = os.pread(self.fd, 2 * _CONTROL_SLOT, 0)
        slots = [raw[:_CONTROL_SLOT], raw[_CONTROL_SLOT : 2 * _CONTROL_SLOT]]
        # The slot claiming the higher counter first: decoding (checksum included) is most of a read's
        # cost, and the other slot is needed only when that one is torn.
        # (The file ends after the second slot's used bytes: a slot may be shorter than _CONTROL_SLOT.)
        slots.sort(key=lambda slot: _COUNTER.unpack_from(slot, _COUNTER_OFFSET)[0]
                   if len(slot) >= _COUNTER_OFFSET + _COUNTER.size else -1, reverse=True)
        for slot in slots:
            control = ControlState.decode(slot)
            if control is not None:
                return control
        raise TrackerStateError(f"tracker control file {self.path} is damaged: no valid state slot")

    def write(self, control: ControlState, *, fsync: bool = False) -> ControlState:
        """Store `control` in the slot not holding the current state; return it as stored."""
        control = control.evolve(counter=control.counter + 1)
        write_fully(self.fd, [control.encode()], (control.counter % 2) * _CONTROL_SLOT)
        if fsync:
            os.fsync(self.fd)
        return control

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class TrackerFiles:
    """Paths of the files a tracker keeps beside its disk."""

    def __init__(self, disk_path: Path):
        self.disk = disk_path
        self.directory = disk_path.parent
        name = disk_path.name
        self.control = disk_path.with_name(f"{name}.ctl")
        self.active = disk_path.with_name(f"{name}.hrl")
        self.next_active = disk_path.with_name(f"{name}.hrl.new")
        self.spare = disk_path.with_name(f"{name}.hrl.spare")
        self.snapshot_data = disk_path.with_name(f"{name}.snap")
        self.snapshot_map = disk_path.with_name(f"{name}.snapmap")
        self.resync_reason = disk_path.with_name(f"{name}.resync")
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
        fixed = [self.control, self.active, self.next_active, self.spare, self.snapshot_data, self.snapshot_map,
                 self.resync_reason]
        return fixed + [self.sealed(g) for g in self.sealed_generations()]

    def sync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
