"""The tracker's fast path for a block device front end: a batch of queued writes committed at once
(`write_many`), and each seal's new log written over an acknowledged log's storage (the spare). Same
check as tests/test_tracker.py: the disk as it was, plus its sealed logs replayed, equals the disk now;
and a process killed at any point of a batch leaves what the next one finishes."""
from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from test_tracker import PROCESS_TIMEOUT, copy_data, data_of, logged_writes, make_disk, replay_logs, tracker_files

from datapath.errors import LogCorruptError
from datapath.logformat import MAX_RECORD_DATA, RECORD_OVERHEAD, LogHeader, LogState, LogWriter
from datapath.logreader import verify_log
from datapath.tracker import ReplicationTracker
from datapath.trackerstate import ControlFile, TrackerFiles, TrackerStateError

KIB = 1024
MIB = 1024 * KIB
DISK_SIZE = 16 * MIB

# Overlapping writes, one over MAX_RECORD_DATA (two records): the order on the disk matters.
# Two of them follow each other on the disk (one positioned write), as do the two records of the large one.
BATCH = [(0, 64 * KIB, 1), (32 * KIB, 64 * KIB, 2), (MIB, MAX_RECORD_DATA + 8 * KIB, 3), (16 * KIB, 4 * KIB, 4),
         (8 * MIB, 512, 5), (8 * MIB + 512, 1024, 6)]

# A writer killed at the `n`th disk write of its batch (1: after the commit, before any; 3, 5: midway),
# or at its commit (0: nothing of the batch is committed).
CRASHER = r"""
import os, sys
import datapath.disk, datapath.trackerstate
import datapath.tracker as tracker_module
from datapath.tracker import ReplicationTracker
from test_tracker_batches import batch_writes

disk, n = sys.argv[1], int(sys.argv[2])
tracker = ReplicationTracker(disk)
die = lambda *args, **kwargs: os._exit(17)
if n == 0:
    datapath.trackerstate.ControlFile.write = die
else:
    calls = []
    def dying(real):
        def write(self, offset, data):
            calls.append(offset)
            if len(calls) == n:
                os._exit(17)
            real(self, offset, data)
        return write
    datapath.disk.LocalDisk.write = dying(datapath.disk.LocalDisk.write)
    datapath.disk.LocalDisk.write_gathered = dying(datapath.disk.LocalDisk.write_gathered)
tracker.write_many(batch_writes())
"""


def batch_writes() -> list[tuple[int, bytes, bool]]:
    return [(offset, bytes([fill]) * length, False) for offset, length, fill in BATCH]


def expected_after_batch(before: bytes) -> bytes:
    data = bytearray(before)
    for offset, payload, _ in batch_writes():
        data[offset : offset + len(payload)] = payload
    return bytes(data)


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    return make_disk(tmp_path / "disk0.raw", "raw", DISK_SIZE)


def test_a_batch_is_logged_in_order_and_replays_to_the_same_disk(disk: Path, tmp_path: Path) -> None:
    original = copy_data(disk, tmp_path / "original.raw")
    with ReplicationTracker.enable(disk) as tracker:
        assert tracker.write_many(batch_writes()) == 7
        assert data_of(disk) == expected_after_batch(original.read_bytes())
        log = tracker.seal()
    assert [(offset, length) for _, offset, length, _ in logged_writes([log]).values()] == [
        (0, 64 * KIB), (32 * KIB, 64 * KIB), (MIB, MAX_RECORD_DATA), (MIB + MAX_RECORD_DATA, 8 * KIB),
        (16 * KIB, 4 * KIB), (8 * MIB, 512), (8 * MIB + 512, 1024)]
    replay_logs(original, [log], first_generation=1)
    assert original.read_bytes() == data_of(disk)


def test_append_many_writes_the_bytes_append_writes(tmp_path: Path) -> None:
    header = LogHeader(b"d" * 16, 3, 41, DISK_SIZE, created_ns=123)
    rng = random.Random(5)
    writes = [(rng.randrange(0, 1024) * 512, rng.randbytes(rng.randint(1, 256) * 512)) for _ in range(300)]
    files = []
    for name in ("one-by-one.hrl", "batched.hrl"):
        path = tmp_path / name
        path.write_bytes(header.encode())
        fd = os.open(path, os.O_RDWR)
        try:
            writer = LogWriter(fd, header, LogState.empty(header))
            if name == "batched.hrl":  # more records than one pwritev takes: several of them
                last = writer.append_many(writes)
            else:
                last = [writer.append(offset, data) for offset, data in writes][-1]
            writer.seal()
        finally:
            os.close(fd)
        files.append((path.read_bytes(), writer.state, last))
    assert files[0] == files[1]
    verify_log(tmp_path / "batched.hrl")


@pytest.mark.parametrize("killed_at", [0, 1, 3, 5])
def test_a_writer_killed_during_a_batch_leaves_all_of_it_or_none(disk: Path, tmp_path: Path, killed_at: int) -> None:
    original = copy_data(disk, tmp_path / "original.raw")
    before = original.read_bytes()
    with ReplicationTracker.enable(disk) as tracker:
        tracker.write(12 * MIB, b"\x77" * 4096)  # a write before the batch, applied and recorded
    crash = subprocess.run([sys.executable, "-c", CRASHER, str(disk), str(killed_at)], timeout=PROCESS_TIMEOUT,
                           env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert crash.returncode == 17
    expected = bytearray(before)
    expected[12 * MIB : 12 * MIB + 4096] = b"\x77" * 4096
    if killed_at:  # committed: the next process replays every record of the batch, in order
        expected = bytearray(expected_after_batch(bytes(expected)))
    with ReplicationTracker(disk) as tracker:
        assert tracker.read(0, DISK_SIZE) == bytes(expected)
        tracker.write(15 * MIB, b"\x99" * 512)
        log = tracker.seal()
    assert log.records == 1 + (7 if killed_at else 0) + 1
    expected[15 * MIB : 15 * MIB + 512] = b"\x99" * 512
    assert data_of(disk) == bytes(expected)
    replay_logs(original, [log], first_generation=1)
    assert original.read_bytes() == bytes(expected)


def test_the_next_log_is_written_over_an_acknowledged_ones_storage(disk: Path, tmp_path: Path) -> None:
    original = copy_data(disk, tmp_path / "original.raw")
    rng = random.Random(3)
    with ReplicationTracker.enable(disk) as tracker:
        tracker.write_many([(i * 256 * KIB, rng.randbytes(256 * KIB), False) for i in range(8)])
        first = tracker.seal()
        replay_logs(original, [first], first_generation=1)
        tracker.acknowledge(first.generation)
        files = TrackerFiles(disk)
        assert tracker_files(disk.parent) == ["disk0.raw.ctl", "disk0.raw.hrl", "disk0.raw.hrl.spare"]
        spare_inode = files.spare.stat().st_ino
        second = tracker.seal()  # the empty generation 2; generation 3 takes the spare's place
        assert files.active.stat().st_ino == spare_inode
        assert files.active.stat().st_size == first.size  # not truncated: the stale records stay past the end
        tracker.write(0, rng.randbytes(4096))
        tracker.write_zeroes(MIB, 512 * KIB)  # its data over stale records: a hole that reads zeros
        tracker.write_many([(4 * MIB, rng.randbytes(64 * KIB), True)])
        third = tracker.seal()
        assert third.size < first.size  # truncated at the seal
        verify_log(third.path)
        replay_logs(original, [second, third], first_generation=2)
        assert original.read_bytes() == data_of(disk)
        assert data_of(disk)[MIB : MIB + 512 * KIB] == bytes(512 * KIB)
        tracker.acknowledge(third.generation)
        assert files.spare.exists()
        tracker.disable()
    assert tracker_files(disk.parent) == []  # the spare went with the rest


def test_a_crash_after_the_spare_was_taken_but_before_the_seal_committed(disk: Path, tmp_path: Path) -> None:
    """The spare renamed to the next log, then the process died: that log is a leftover the next seal replaces."""
    original = copy_data(disk, tmp_path / "original.raw")
    with ReplicationTracker.enable(disk) as tracker:
        tracker.write(0, b"\1" * 8192)
        tracker.acknowledge(tracker.seal().generation)
        tracker.write(8192, b"\2" * 8192)
    files = TrackerFiles(disk)
    os.rename(files.spare, files.next_active)  # the seal's first step, and nothing after it
    with ReplicationTracker(disk) as tracker:
        tracker.write(16384, b"\3" * 512)
        log = tracker.seal()
        assert (log.generation, log.records) == (2, 2)
    with open(original, "r+b") as f:  # generation 1, acknowledged (its log is gone): what it held
        f.write(b"\1" * 8192)
    replay_logs(original, [log], first_generation=2)
    assert original.read_bytes() == data_of(disk)


def test_the_spare_keeps_at_most_its_cap_of_an_acknowledged_log(disk: Path) -> None:
    """The spare is space the host's disk holds beyond the unsent logs: a long acknowledged log is cut to the
    tracker's cap (the host's ASR_TRACKER_SPARE_MAX); with a cap of 0 no spare is kept (one kept before goes)."""
    with ReplicationTracker.enable(disk) as enabled:
        enabled.write(0, b"\x44" * 4096)
        enabled.acknowledge(enabled.seal().generation)
        assert TrackerFiles(disk).spare.exists()
    with ReplicationTracker(disk, spare_max_bytes=MIB) as tracker:
        tracker.write_many([(i * 256 * KIB, bytes([i + 1]) * 256 * KIB, False) for i in range(12)])
        log = tracker.seal()
        assert log.size > 3 * MIB
        tracker.acknowledge(log.generation)
        assert TrackerFiles(disk).spare.stat().st_size == MIB
        tracker.seal()  # the next log is written over the cut spare
        tracker.write(0, b"\x55" * 4096)
        last = tracker.seal()
        verify_log(last.path)
        tracker.acknowledge(last.generation)
    with ReplicationTracker(disk, spare_max_bytes=0) as tracker:
        assert TrackerFiles(disk).spare.exists()
        tracker.write(0, b"\x66" * 4096)
        tracker.acknowledge(tracker.seal().generation)
        assert tracker_files(disk.parent) == ["disk0.raw.ctl", "disk0.raw.hrl"]
        tracker.write(4096, b"\x77" * 4096)
        verify_log(tracker.seal().path)
    for bad in (-1, 1.5, "1G"):
        with pytest.raises(ValueError, match="spare_max_bytes"):
            ReplicationTracker(disk, spare_max_bytes=bad)


def test_a_last_commit_that_is_not_whole_records_or_fails_its_checksum_is_refused(disk: Path) -> None:
    """What the next process replays is the committed range the disk may lack, checked first: a control file
    whose applied end falls inside a record, or a record in that range whose checksum fails, is refused, the
    disk left as it was."""
    with ReplicationTracker.enable(disk) as tracker:
        tracker.write_many([(0, b"\x11" * 4096, False), (8192, b"\x22" * 4096, False)])
    files = TrackerFiles(disk)
    control_file = ControlFile.open(files.control, disk)
    try:
        state = control_file.read()
        unapplied = state.log.end - 2 * (RECORD_OVERHEAD + 4096)
        control_file.write(state.evolve(applied_end=unapplied + 512))  # inside the batch's first record
        before = data_of(disk)
        with pytest.raises(TrackerStateError, match="are not whole records"):
            ReplicationTracker(disk).write(0, b"\x33" * 512)
        assert data_of(disk) == before
        control_file.write(state.evolve(applied_end=unapplied))
        with open(files.active, "r+b") as log:  # one byte of the batch's second record's data
            log.seek(state.log.end - 4096)
            log.write(b"\x23")
        with pytest.raises(LogCorruptError, match="checksum mismatch"):
            ReplicationTracker(disk).write(0, b"\x33" * 512)
    finally:
        os.close(control_file.fd)


@pytest.mark.parametrize(("raw", "expected"), [(None, 256 * MIB), ("", 256 * MIB), ("0", 0), ("1G", 1024 * MIB),
                                               ("64m", 64 * MIB)])
def test_a_host_agents_trackers_keep_the_spare_its_setting_says(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                raw: str | None, expected: int) -> None:
    """ASR_TRACKER_SPARE_MAX, read by the host's tracker opener (sites/host/tracking.py) for each tracker."""
    from sites.host import Host
    from workflows import settings

    if raw is None:
        monkeypatch.delenv("ASR_TRACKER_SPARE_MAX", raising=False)
    else:
        monkeypatch.setenv("ASR_TRACKER_SPARE_MAX", raw)
    host = Host(tmp_path / "host1", "host1")
    host.create_vm("app01", [("disk0", "1M", "raw")])
    host.enable_tracking("app01")
    assert settings.tracker_spare_max() == expected
    with host.tracker("app01", "disk0") as tracker:
        assert tracker.spare_max_bytes == expected


@pytest.mark.parametrize("raw", ["big", "-1M", "inf", "2P"])
def test_a_bad_spare_setting_names_the_variable(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    from workflows import settings

    monkeypatch.setenv("ASR_TRACKER_SPARE_MAX", raw)
    with pytest.raises(ValueError, match="ASR_TRACKER_SPARE_MAX"):
        settings.tracker_spare_max()
