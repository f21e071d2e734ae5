"""The tracker's operations for a block device front end (NBD): zeroing and discarding ranges, FUA
writes and flushes, and the resync-required flag. Same check as tests/test_tracker.py: the disk as it
was, plus its sealed logs replayed, equals the disk now."""
from __future__ import annotations

import os
import random
from dataclasses import replace
from pathlib import Path

import pytest
from test_tracker import copy_data, data_of, logged_writes, make_disk, replay_logs

from datapath.logformat import MAX_RECORD_DATA
from datapath.tracker import ReplicationTracker
from datapath.trackerstate import ControlFile, TrackerFiles

MIB = 1024 * 1024
DISK_SIZE = 16 * MIB


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    return make_disk(tmp_path / "disk0.raw", "raw", DISK_SIZE)


def test_zeroes_and_trims_are_logged_as_zero_writes_and_replay_to_the_same_disk(disk: Path, tmp_path: Path):
    original = copy_data(disk, tmp_path / "original.raw")
    with ReplicationTracker.enable(disk) as tracker:
        tracker.write(0, random.Random(1).randbytes(MIB), fua=True)
        # Over MAX_RECORD_DATA: split into records, as a large write is.
        last = tracker.write_zeroes(MIB, MAX_RECORD_DATA + 2 * MIB)
        tracker.trim(10 * MIB, 3 * 512)
        tracker.flush()
        log = tracker.seal()
    assert (log.records, last) == (4, 3)
    writes = logged_writes([log])
    assert [(offset, length) for _, offset, length, _ in writes.values()] == [
        (0, MIB), (MIB, MAX_RECORD_DATA), (MIB + MAX_RECORD_DATA, 2 * MIB), (10 * MIB, 1536)]
    data = data_of(disk)
    assert data[MIB : MIB + MAX_RECORD_DATA + 2 * MIB] == bytes(MAX_RECORD_DATA + 2 * MIB)
    assert data[10 * MIB : 10 * MIB + 1536] == bytes(1536)
    replay_logs(original, [log], first_generation=1)
    assert data_of(original) == data
    # The zeros cost the log no space: its data is a hole.
    assert os.stat(log.path).st_blocks * 512 < 2 * MIB


def test_zero_record_over_a_torn_record_still_verifies(disk: Path, tmp_path: Path):
    """A crashed writer's torn record past the committed end is overwritten; the zeros must not read it."""
    original = copy_data(disk, tmp_path / "original.raw")
    with ReplicationTracker.enable(disk) as tracker:
        tracker.write(0, b"\1" * 4096)
    files = TrackerFiles(disk)
    with open(files.active, "ab") as active:
        active.write(b"\xee" * 65536)  # what a writer killed before its commit leaves
    with ReplicationTracker(disk) as tracker:
        tracker.write_zeroes(8192, 32768)
        log = tracker.seal()
    replay_logs(original, [log], first_generation=1)
    assert data_of(original) == data_of(disk)


def test_resync_required_persists_until_a_snapshot_that_clears_it(disk: Path):
    with ReplicationTracker.enable(disk) as tracker:
        assert tracker.resync_required() is None
        tracker.mark_resync_required("tracker service stopped uncleanly (pid 42)")
    with ReplicationTracker(disk) as other:  # another process's view
        assert other.resync_required() == "tracker service stopped uncleanly (pid 42)"
        other.write(0, b"\2" * 512)  # writes go on
        other.create_snapshot()  # e.g. a consistency check's: not a copy source
        assert other.resync_required()
        other.delete_snapshot()
        other.create_snapshot(clears_resync=True)
        assert other.resync_required() is None
        assert not TrackerFiles(disk).resync_reason.exists()
        other.delete_snapshot()
        other.mark_resync_required("again")
        other.clear_resync_required()
        assert other.resync_required() is None


def test_control_files_written_before_the_flag_existed_read_as_not_required(disk: Path):
    with ReplicationTracker.enable(disk) as tracker:
        tracker.mark_resync_required("x")
    files = TrackerFiles(disk)
    control_file = ControlFile.open(files.control, disk)
    try:
        raw = bytearray(os.pread(control_file.fd, 512, 0))
        state = control_file.read()
        slot = (state.counter % 2) * 256
        # Bit 1 of the flags cleared (and the slot checksum made again): a file of before the flag.
        assert raw[slot + 10] & 2
        old = replace(state, resync_required=False)
        os.pwrite(control_file.fd, old.encode(), slot)
    finally:
        control_file.close()
    with ReplicationTracker(disk) as tracker:
        assert tracker.resync_required() is None
        assert tracker.generation == 1
