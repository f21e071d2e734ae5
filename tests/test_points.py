"""Recovery points on both recovery backends: every version of a replica can be read, checked and
restored byte for byte, across log applies, idle cycles, resyncs of a damaged replica and crashes; a
tampered undo log is refused before anything is written; pruned versions are gone for good.

Each version's expected content is the source disk's content right after the cycle that made it,
read from the disk file itself, never through the code under test."""
from __future__ import annotations

import random
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from datapath.disk import create_disk, open_disk
from datapath.errors import LogCorruptError, NonRecoverableError
from datapath.logformat import MAX_RECORD_DATA
from datapath.logreader import LogDiskMismatchError
from datapath.manifest import compute_manifest
from datapath.points import (
    PointMismatchError,
    PointUnavailableError,
    available_versions,
    open_point,
    point_manifest,
    prune_versions,
    restore_point,
    stored_versions,
    verify_point,
)
from datapath.replication import ReplicaDisk, apply_shipped_logs, initial_copy, replicate_cycle, ship_pending_logs
from datapath.resynchronize import resynchronize
from sites.host import Host

MiB = 1 << 20
BLOCK = 4096
DISK_SIZE = 8 * MiB


def disk_bytes(path) -> bytes:
    """The virtual content of a local raw or VHD image (a VHD's footer left out)."""
    with open_disk(path) as disk:
        buf = bytearray(disk.size)
        disk.read_into(0, memoryview(buf))
    return bytes(buf)


def endpoint_bytes(endpoint) -> bytes:
    buf = bytearray(endpoint.size)
    endpoint.read_into(0, memoryview(buf))
    return bytes(buf)


def first_difference(a: bytes, b: bytes) -> int | None:
    if a == b:
        return None
    return next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)


@dataclass
class Protected:
    host: Host
    machine: object
    disk: object
    other_disk: object
    tracker: object
    replica: ReplicaDisk
    storage: object
    workdir: Path
    expected: dict[int, bytes]
    """Version -> the source content it must hold."""

    def record(self, version: int) -> None:
        self.expected[version] = disk_bytes(self.disk.path)

    def cycle(self) -> int:
        report = replicate_cycle(self.tracker, self.replica)
        state = self.replica.load_state()
        assert report.version == state.version and report.manifest_root == state.manifest_root
        self.record(state.version)
        return state.version

    def write(self, offset: int, data: bytes) -> None:
        self.tracker.write(offset, data)

    def replica_bytes(self) -> bytes:
        target = self.storage.open_disk(self.replica.name)
        try:
            return endpoint_bytes(target)
        finally:
            target.close()

    def damage_replica(self, writes: list[tuple[int, bytes]]) -> None:
        target = self.storage.open_disk(self.replica.name)
        try:
            for offset, data in writes:
                target.write(offset, data)
            target.flush()
        finally:
            target.close()

    def restore(self, version: int):
        """Restore `version` into a fresh local VHD; return the result and the VHD's content."""
        path = self.workdir / f"restored-v{version}-{uuid.uuid4().hex[:8]}.vhd"
        create_disk(path, DISK_SIZE, "vhd")
        with open_disk(path, writable=True) as target:
            result = restore_point(self.replica, version, target)
        return result, disk_bytes(path)


@pytest.fixture
def protected(storage, tmp_path):
    host = Host(tmp_path / "host1", "host1")
    machine = host.create_vm("app01", [("disk0", DISK_SIZE, "vhd"), ("disk1", DISK_SIZE, "raw")])
    host.write_initial_data(machine, seed=11, fraction=0.5)
    host.enable_tracking(machine)
    disk, other = machine.disks
    tracker = host.tracker(machine, disk.name)
    replica = ReplicaDisk(storage, ReplicaDisk.name_for(host.name, machine.name, disk.name))
    state = initial_copy(tracker, replica)
    assert state.version == 1 and state.manifest_root
    point = Protected(host, machine, disk, other, tracker, replica, storage, tmp_path, {})
    point.record(1)
    yield point
    host.stop_workload(machine)
    tracker.close()


def assert_version_is_right(point: Protected, version: int) -> None:
    """The version reads, checks and restores as exactly the content recorded for it."""
    expected = point.expected[version]
    with open_point(point.replica, version) as view:
        content = endpoint_bytes(view)
        assert first_difference(content, expected) is None, f"version {version} differs"
        # Extents are conservative: everything outside them is zero in the expected content.
        position = 0
        for start, length in [*view.data_extents(), (DISK_SIZE, 0)]:
            assert not any(expected[position:start]), f"version {version}: data in [{position}, {start}) missed"
            position = start + length
        with pytest.raises(NonRecoverableError, match="read-only"):
            view.write(0, bytes(BLOCK))
    stored = point_manifest(point.replica, version)
    check = verify_point(point.replica, version, expected_root=stored.root_hex)
    assert check.ok and check.first_bad_chunk is None and check.actual_root == stored.root_hex, check
    result, restored = point.restore(version)
    assert first_difference(restored, expected) is None, f"restore of version {version} differs"
    assert result.version == version and result.manifest_root == stored.root_hex
    assert 0 < result.bytes_copied <= DISK_SIZE


def scattered_writes(point: Protected, seed: int, chunks: range, count: int = 12) -> None:
    rng = random.Random(seed)
    for _ in range(count):
        chunk = rng.choice(chunks)
        offset = chunk * MiB + rng.randrange(0, MiB // 512 - 16) * 512
        point.write(offset, rng.randbytes(512 * rng.randint(1, 16)))


def test_every_version_reads_verifies_and_restores_byte_for_byte(protected):
    point = protected
    host, machine = point.host, point.machine

    # A guest workload writing for a while, stopped before the cycle so the version is exact.
    host.start_workload(machine, rate_mb_s=4.0, seed=5)
    time.sleep(0.3)
    host.stop_workload(machine, timeout=10)
    assert point.cycle() == 2

    rng = random.Random(3)
    point.write(MiB - 2048, rng.randbytes(8192))  # across a chunk boundary
    point.write(3 * MiB, rng.randbytes(BLOCK))
    point.write(3 * MiB, rng.randbytes(BLOCK))  # the same bytes twice in one log
    point.write(5 * MiB, bytes(2 * BLOCK))  # zeros over whatever was there
    assert point.cycle() == 3

    assert point.cycle() == 4  # no writes: still a version, the same content

    point.write(MiB, rng.randbytes(MAX_RECORD_DATA + 2 * MiB))  # more than one record's worth
    assert point.cycle() == 5

    host.start_workload(machine, rate_mb_s=4.0, seed=6)
    time.sleep(0.3)
    host.stop_workload(machine, timeout=10)
    assert point.cycle() == 6

    assert available_versions(point.replica) == range(1, 7)
    unchanged = [v for v in range(2, 7) if point.expected[v] == point.expected[v - 1]]
    assert unchanged == [4], "every cycle but the idle one changed the disk"
    for version in range(1, 7):
        assert_version_is_right(point, version)
    # Undo logs and manifests are not shipped logs: nothing is left to apply.
    stored = stored_versions(point.replica)
    assert stored.undo == set(range(2, 7)) and stored.manifests == set(range(1, 7))
    assert point.replica.shipped_generations() == []
    # The state's root is the current version's manifest, and that is the replica's content.
    replica = point.storage.open_disk(point.replica.name)
    try:
        assert compute_manifest(replica).root_hex == point.replica.load_state().manifest_root
    finally:
        replica.close()
    # A root other than the stored one fails the check, naming no chunk (the content is as stored).
    check = verify_point(point.replica, 3, expected_root="00" * 16)
    assert not check.ok and check.first_bad_chunk is None and check.expected_root == "00" * 16


def test_older_versions_stay_right_across_a_resync_of_a_damaged_replica(protected):
    point = protected
    scattered_writes(point, seed=21, chunks=range(0, 3))
    assert point.cycle() == 2
    scattered_writes(point, seed=22, chunks=range(0, 3))
    assert point.cycle() == 3

    # The replica is damaged where the guest writes no more, and a log is lost: the chain breaks.
    rng = random.Random(23)
    point.damage_replica([(6 * MiB + 5 * BLOCK, rng.randbytes(BLOCK)), (7 * MiB, rng.randbytes(3 * BLOCK))])
    scattered_writes(point, seed=24, chunks=range(0, 3))
    point.tracker.seal()
    [lost] = ship_pending_logs(point.tracker, point.replica)
    point.storage.delete_object(point.replica.log_name(lost))

    # Read whole: the damage lies where the source did not change, which a resync trusting the stored
    # manifest does not look at.
    report = resynchronize(point.tracker, point.replica, read_replica=True)
    assert report.version == 4 and report.damaged_chunks == [6, 7] and report.lost_chunks == []
    assert report.manifest_root == point_manifest(point.replica, 4).root_hex
    point.record(4)
    assert point.replica_bytes() == point.expected[4]
    scattered_writes(point, seed=25, chunks=range(0, 8))
    assert point.cycle() == 5
    for version in range(1, 6):
        assert_version_is_right(point, version)


def test_damage_where_the_disk_also_changed_is_reported_not_hidden(protected):
    point = protected
    scattered_writes(point, seed=31, chunks=range(0, 2))
    assert point.cycle() == 2
    # Chunk 4 is damaged at a block the guest never wrote, and the guest writes another block of it:
    # what the earlier versions held at the damaged block is gone.
    rng = random.Random(32)
    point.damage_replica([(4 * MiB + 10 * BLOCK, rng.randbytes(BLOCK))])
    point.write(4 * MiB + 100 * BLOCK, rng.randbytes(BLOCK))

    report = resynchronize(point.tracker, point.replica)
    assert report.damaged_chunks == [4] and report.lost_chunks == [4]
    point.record(3)
    assert_version_is_right(point, 3)
    for version in (1, 2):
        check = verify_point(point.replica, version)
        assert not check.ok and check.first_bad_chunk == 4, check
        with pytest.raises(PointMismatchError, match=f"chunk 4 .*version {version}|version {version}.*chunk 4"):
            point.restore(version)


def test_a_tampered_undo_log_is_refused_before_anything_is_written(protected):
    point = protected
    for seed in (41, 42, 43):
        scattered_writes(point, seed=seed, chunks=range(0, 8))
        point.cycle()
    name = point.replica.undo_name(3)
    original = point.storage.read_object(name)
    undo = bytearray(original)
    undo[len(undo) // 2] ^= 0x01
    point.storage.put_object(name, bytes(undo))

    for version in (1, 2):
        with pytest.raises(LogCorruptError, match=name.replace(".", r"\.")):
            open_point(point.replica, version)
    with pytest.raises(LogCorruptError, match="checksum"):
        verify_point(point.replica, 2)
    path = point.workdir / "untouched.vhd"
    create_disk(path, DISK_SIZE, "vhd")
    with open_disk(path, writable=True) as target:
        with pytest.raises(LogCorruptError):
            restore_point(point.replica, 1, target)
        assert list(target.data_extents()) == []
    assert not any(disk_bytes(path))
    for version in (3, 4):  # later versions do not need that undo log
        assert_version_is_right(point, version)

    point.storage.put_object(name, original[:-40])  # cut short: no seal
    with pytest.raises(LogCorruptError, match="truncated|not sealed"):
        open_point(point.replica, 2)


class Crash(Exception):
    pass


class CrashingDisk:
    """A real replica disk that takes `writes` writes, then the process "dies" at the next one."""

    def __init__(self, disk, writes: int):
        self.disk, self.writes = disk, writes
        self.name, self.size, self.alignment = disk.name, disk.size, disk.alignment

    def write(self, offset, data):
        if self.writes == 0:
            raise Crash(f"crash before writing {len(data)} bytes at {offset}")
        self.writes -= 1
        self.disk.write(offset, data)

    def write_zeros(self, offset, length):
        if self.writes == 0:
            raise Crash(f"crash before clearing {length} bytes at {offset}")
        self.writes -= 1
        self.disk.write_zeros(offset, length)

    def read_into(self, offset, buf):
        return self.disk.read_into(offset, buf)

    def data_extents(self, offset=0, length=None):
        return self.disk.data_extents(offset, length)

    def flush(self):
        self.disk.flush()

    def close(self):
        self.disk.flush()
        self.disk.close()


def crash_after_writes(monkeypatch, storage, writes: int) -> None:
    real_open = storage.open_disk
    monkeypatch.setattr(storage, "open_disk", lambda name: CrashingDisk(real_open(name), writes))


def test_crash_between_undo_and_apply_then_apply_again(protected, monkeypatch):
    point = protected
    scattered_writes(point, seed=51, chunks=range(0, 8))
    assert point.cycle() == 2
    # Writes far apart, so the apply makes several requests and the crash lands between them.
    for chunk in range(8):
        point.write(chunk * MiB + BLOCK, random.Random(chunk).randbytes(2 * BLOCK))
    point.tracker.seal()
    ship_pending_logs(point.tracker, point.replica)
    before = point.replica_bytes()

    with monkeypatch.context() as patch:
        crash_after_writes(patch, point.storage, writes=3)
        with pytest.raises(Crash):
            apply_shipped_logs(point.replica)
    state = point.replica.load_state()
    assert state.version == 2
    undo = point.storage.read_object(point.replica.undo_name(3))
    assert point.replica_bytes() != before, "the crash must leave part of the log applied"
    # Version 2 still reads right: the interrupted change's undo log covers what it wrote.
    assert_version_is_right(point, 2)

    report = apply_shipped_logs(point.replica)
    assert report.version == 3
    assert point.storage.read_object(point.replica.undo_name(3)) == undo, "the undo log must not be rewritten"
    point.record(3)
    assert point.replica_bytes() == point.expected[3]
    for version in (1, 2, 3):
        assert_version_is_right(point, version)


def test_crash_during_an_apply_then_a_resync_instead(protected, monkeypatch):
    """The log is lost after the crash: the resync that follows extends the interrupted undo log."""
    point = protected
    for chunk in range(0, 8, 2):
        point.write(chunk * MiB, random.Random(chunk).randbytes(BLOCK))
    point.tracker.seal()
    ship_pending_logs(point.tracker, point.replica)
    with monkeypatch.context() as patch:
        crash_after_writes(patch, point.storage, writes=1)
        with pytest.raises(Crash):
            apply_shipped_logs(point.replica)
    for chunk in range(1, 8, 2):
        point.write(chunk * MiB + 3 * BLOCK, random.Random(chunk).randbytes(BLOCK))

    report = resynchronize(point.tracker, point.replica)
    assert report.version == 2 and report.damaged_chunks == []
    point.record(2)
    for version in (1, 2):
        assert_version_is_right(point, version)


def test_crash_during_a_resync_then_resync_again(protected, monkeypatch):
    point = protected
    scattered_writes(point, seed=61, chunks=range(0, 8))
    assert point.cycle() == 2
    rng = random.Random(62)
    point.damage_replica([(5 * MiB + 7 * BLOCK, rng.randbytes(BLOCK))])
    for chunk in (0, 1, 2, 3, 4, 6, 7):  # not 5: its earlier content is then the snapshot's
        point.write(chunk * MiB + 50 * BLOCK, rng.randbytes(BLOCK))
    point.tracker.seal()  # a log that never ships: the chain is broken

    with monkeypatch.context() as patch:
        crash_after_writes(patch, point.storage, writes=2)
        with pytest.raises(Crash):
            resynchronize(point.tracker, point.replica)
    assert point.replica.load_state().version == 2
    undo = point.storage.read_object(point.replica.undo_name(3))

    report = resynchronize(point.tracker, point.replica)
    assert report.version == 3 and report.damaged_chunks == [5] and report.lost_chunks == []
    assert point.storage.read_object(point.replica.undo_name(3)) == undo, "the undo log must not be rewritten"
    point.record(3)
    assert point.replica_bytes() == point.expected[3]
    for version in (1, 2, 3):
        assert_version_is_right(point, version)
    # Run again once complete (the state saved, the snapshot gone): a new resync, nothing to send.
    again = resynchronize(point.tracker, point.replica)
    assert again.version == 4 and again.bytes_sent == again.bytes_zeroed == 0
    point.record(4)
    assert_version_is_right(point, 2)


def test_pruned_versions_are_gone_and_the_rest_still_right(protected):
    point = protected
    for seed in range(71, 75):
        scattered_writes(point, seed=seed, chunks=range(0, 8))
        point.cycle()
    assert available_versions(point.replica) == range(1, 6)

    assert prune_versions(point.replica, 3) == [2, 3]
    assert prune_versions(point.replica, 3) == []
    assert available_versions(point.replica) == range(3, 6)
    stored = stored_versions(point.replica)
    assert stored.undo == {4, 5} and stored.manifests == {3, 4, 5}
    for version in (1, 2):
        with pytest.raises(PointUnavailableError, match=f"version {version} of replica {point.replica.name}"):
            open_point(point.replica, version)
        with pytest.raises(PointUnavailableError, match=point.replica.name):
            point_manifest(point.replica, version)
        with pytest.raises(PointUnavailableError):
            verify_point(point.replica, version)
    for version in (3, 4, 5):
        assert_version_is_right(point, version)
    for version in (0, 6):
        with pytest.raises(PointUnavailableError, match=f"no version {version}"):
            open_point(point.replica, version)
    with pytest.raises(NonRecoverableError, match="current version is 5"):
        prune_versions(point.replica, 6)
    assert available_versions(point.replica) == range(3, 6)


def test_a_corrupt_or_foreign_log_changes_nothing(protected):
    point = protected
    scattered_writes(point, seed=81, chunks=range(0, 8))
    assert point.cycle() == 2
    before = (point.replica_bytes(), point.replica.load_state(), stored_versions(point.replica))

    scattered_writes(point, seed=82, chunks=range(0, 8))
    point.tracker.seal()
    [generation] = ship_pending_logs(point.tracker, point.replica)
    name = point.replica.log_name(generation)
    log = bytearray(point.storage.read_object(name))
    log[len(log) // 2] ^= 0x40
    point.storage.put_object(name, bytes(log))
    with pytest.raises(LogCorruptError, match="record"):
        apply_shipped_logs(point.replica, disk_name="disk0")

    # The other disk's sealed log, shipped under this disk's name.
    with point.host.tracker(point.machine, point.other_disk.name) as other:
        other.write(0, bytes(range(256)) * 16)
        other.seal()
        [foreign] = other.pending_logs()
        point.storage.put_object(name, foreign.path.read_bytes())
    with pytest.raises(LogDiskMismatchError, match="disk id"):
        apply_shipped_logs(point.replica)

    after = (point.replica_bytes(), point.replica.load_state(), stored_versions(point.replica))
    assert after[0] == before[0]
    assert (after[1].version, after[1].applied_generation, after[1].manifest_root) == \
           (before[1].version, before[1].applied_generation, before[1].manifest_root)
    assert after[2] == before[2], "no undo log nor manifest for a version that was refused"
    assert_version_is_right(point, 2)


def test_a_resumed_initial_copy_and_a_fresh_start_over_old_versions(storage, tmp_path):
    host = Host(tmp_path / "host1", "host1")
    machine = host.create_vm("app01", [("disk0", DISK_SIZE, "vhd")])
    host.write_initial_data(machine, seed=91, fraction=0.5)
    host.enable_tracking(machine)
    disk = machine.disks[0]
    replica = ReplicaDisk(storage, ReplicaDisk.name_for(host.name, machine.name, disk.name))
    with host.tracker(machine, disk.name) as tracker:
        import datapath.replication as replication

        def crash(done, total):
            raise Crash

        saved, replication.CHECKPOINT_INTERVAL_S = replication.CHECKPOINT_INTERVAL_S, 0
        try:
            with pytest.raises(Crash):
                initial_copy(tracker, replica, flush_interval=2 * MiB, on_progress=crash)
            assert 0 < replica.load_state().copy_checkpoint < DISK_SIZE
            state = initial_copy(tracker, replica, flush_interval=2 * MiB)
        finally:
            replication.CHECKPOINT_INTERVAL_S = saved
        assert state.version == 1
        with open_disk(disk.path) as source:
            assert point_manifest(replica, 1).root_hex == compute_manifest(source).root_hex == state.manifest_root
        assert verify_point(replica, 1).ok

        tracker.write(MiB, random.Random(92).randbytes(BLOCK))
        replicate_cycle(tracker, replica)
        # Protection is removed but for the state (an interrupted clean-up), then enabled again: the
        # new copy starts over, over a replica holding data where the source has none.
        storage.delete_object(replica.state_name)
        target = storage.open_disk(replica.name)
        hole = next(chunk for chunk in range(8) if not any(disk_bytes(disk.path)[chunk * MiB:(chunk + 1) * MiB]))
        target.write(hole * MiB, random.Random(93).randbytes(MiB))
        target.flush()
        target.close()
        state = initial_copy(tracker, replica)
    assert state.version == 1
    assert stored_versions(replica).undo == set() and stored_versions(replica).manifests == {1}
    target = storage.open_disk(replica.name)
    try:
        assert endpoint_bytes(target) == disk_bytes(disk.path)
    finally:
        target.close()
    assert verify_point(replica, 1).ok
