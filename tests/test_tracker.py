"""The replication tracker on real raw and VHD files, with the guest's writes made in separate
processes while this process seals, snapshots and acknowledges, as the host agent does.

The check every test ends with: the disk as it was when tracking started, plus every sealed log
replayed in generation order, equals the disk now, byte for byte."""
from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import mmh3
import pytest

from datapath.disk import create_disk, open_disk
from datapath.errors import AlignmentError, NonRecoverableError
from datapath.logapply import apply_log
from datapath.logformat import HEADER_SIZE, MAX_RECORD_DATA
from datapath.logreader import LogReader, verify_log
from datapath.snapshot import SNAPSHOT_BLOCK, SnapshotError
from datapath.tracker import RESYNC_THRESHOLD, ReplicationTracker, SealedLog
from datapath.trackerstate import NotTrackedError, TrackerStateError

KIB = 1024
MIB = 1024 * KIB
DISK_SIZE = 16 * MIB
PROCESS_TIMEOUT = 60
QEMU_TIMEOUT = 30

# The guest: random aligned writes through its own tracker, each journaled once it returned.
WRITER = r"""
import os, random, sys
import mmh3
from datapath.tracker import ReplicationTracker

disk, journal, count, seed, stop = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
rng = random.Random(seed)
tracker = ReplicationTracker(disk)
with open(journal, "w", buffering=1) as out:
    written = 0
    while written < count and not os.path.exists(stop):
        length = rng.randint(1, 64) * 512
        offset = rng.randrange(0, tracker.disk_size - length + 1) // 512 * 512
        data = rng.randbytes(length)
        seq = tracker.write(offset, data)
        out.write(f"{seq} {offset} {length} {mmh3.mmh3_x64_128_digest(data).hex()}\n")
        written += 1
"""

# A guest that dies at one chosen point of its first write (or seal), as a crash would leave things.
CRASHER = r"""
import os, sys
import datapath.disk, datapath.trackerstate
from datapath.tracker import ReplicationTracker

disk, point = sys.argv[1], sys.argv[2]
tracker = ReplicationTracker(disk)
die = lambda *args, **kwargs: os._exit(17)
if point == "mid-seal":
    os.rename = die
    tracker.seal()
else:
    if point == "before-commit":
        datapath.trackerstate.ControlFile.write = die
    else:
        datapath.disk.LocalDisk.write = die
    tracker.write(1 * 1024 * 1024, b"\xab" * 8192)
"""


# ---- helpers -------------------------------------------------------------------------------------
def make_disk(path: Path, fmt: str = "raw", size: int = DISK_SIZE, seed: int = 11) -> Path:
    create_disk(path, size, fmt)
    with open_disk(path, writable=True) as disk:
        disk.write(0, random.Random(seed).randbytes(size))
    return path


def copy_data(disk: Path, to: Path) -> Path:
    """The disk's data region as a raw image."""
    with open_disk(disk) as source:
        size = source.size
    with open(disk, "rb") as src, open(to, "wb") as dst:
        dst.write(src.read(size))
    return to


def data_of(disk: Path) -> bytes:
    with open_disk(disk) as source:
        size = source.size
    with open(disk, "rb") as f:
        return f.read(size)


def replay_logs(image: Path, logs: list[SealedLog], first_generation: int) -> None:
    with open_disk(image, writable=True) as target:
        for generation, log in enumerate(logs, start=first_generation):
            assert log.generation == generation
            apply_log(log.path, target, expected_generation=generation)


@pytest.fixture
def start_writer(tmp_path: Path) -> Iterator[Callable[..., tuple[subprocess.Popen, Path, Path]]]:
    """Starts guest writer processes; any still running when the test ends (it failed) is killed."""
    started: list[subprocess.Popen] = []

    def start(disk: Path, count: int, seed: int) -> tuple[subprocess.Popen, Path, Path]:
        journal, stop = tmp_path / f"journal-{seed}.txt", tmp_path / f"stop-{seed}"
        process = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(disk), str(journal), str(count), str(seed), str(stop)])
        started.append(process)
        return process, journal, stop

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=PROCESS_TIMEOUT)


def wait_for(process: subprocess.Popen) -> None:
    assert process.wait(timeout=PROCESS_TIMEOUT) == 0


def journal_lines(journal: Path) -> int:
    return journal.read_text().count("\n") if journal.exists() else 0


def wait_for_journal(journal: Path, lines: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + PROCESS_TIMEOUT
    while journal_lines(journal) < lines:
        assert process.poll() is None, "the writer exited early"
        assert time.monotonic() < deadline, "the writer made no progress"
        time.sleep(0.01)


def logged_writes(logs: list[SealedLog]) -> dict[int, tuple[int, int, int, str]]:
    """seq -> (generation, offset, length, data hash) over every sealed log, each seq exactly once."""
    found: dict[int, tuple[int, int, int, str]] = {}
    for log in logs:
        with open(log.path, "rb") as f:
            reader = LogReader(f)
            for record in reader.records():
                assert record.seq not in found, f"seq {record.seq} is in two logs"
                found[record.seq] = (log.generation, record.offset, record.length,
                                     mmh3.mmh3_x64_128_digest(record.data).hex())
    return found


def check_log_chain(logs: list[SealedLog], first_generation: int = 1, first_seq: int = 1) -> None:
    """Generations consecutive, sequence numbers consecutive across them."""
    for log in logs:
        assert (log.generation, log.first_seq) == (first_generation, first_seq)
        header, seal = verify_log(log.path)
        assert (header.generation, header.first_seq, seal.last_seq, seal.records) == (
            log.generation, log.first_seq, log.last_seq, log.records)
        assert log.last_seq == log.first_seq + log.records - 1
        first_generation, first_seq = log.generation + 1, log.last_seq + 1


def tracker_files(directory: Path) -> list[str]:
    """The files beside disk0 that are not the disk itself."""
    return sorted(p.name for p in directory.iterdir()
                  if p.name.startswith("disk0") and p.name not in ("disk0.raw", "disk0.vhd"))


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    return make_disk(tmp_path / "disk0.vhd", "vhd")


# ---- enabling ------------------------------------------------------------------------------------
def test_enable_is_idempotent_and_keeps_the_disk_id(disk: Path) -> None:
    disk_id = bytes(range(16))
    with ReplicationTracker.enable(disk, disk_id) as tracker:
        assert (tracker.generation, tracker.disk_id, tracker.disk_size) == (1, disk_id, DISK_SIZE)
        assert tracker.write(0, b"\1" * 512) == 1
    with ReplicationTracker.enable(disk) as again, ReplicationTracker(disk) as opened:
        assert again.disk_id == opened.disk_id == disk_id
        assert again.write(512, b"\2" * 512) == 2  # the same log goes on
    assert tracker_files(disk.parent) == ["disk0.vhd.ctl", "disk0.vhd.hrl"]
    with pytest.raises(TrackerStateError, match="already tracked with disk id"):
        ReplicationTracker.enable(disk, bytes(16))


def test_untracked_disk_is_refused_and_nothing_changes(disk: Path) -> None:
    before = disk.read_bytes()
    with pytest.raises(NotTrackedError, match=f"{disk}.*not enabled") as caught:
        ReplicationTracker(disk)
    assert isinstance(caught.value, NonRecoverableError)
    assert tracker_files(disk.parent) == []
    assert disk.read_bytes() == before


def test_disable_removes_every_file_and_stops_other_processes_trackers(disk: Path) -> None:
    tracker = ReplicationTracker.enable(disk)
    other = ReplicationTracker(disk)
    tracker.write(0, b"\1" * 4096)
    tracker.seal()
    tracker.create_snapshot()
    tracker.write(4096, b"\2" * 4096)
    assert len(tracker_files(disk.parent)) == 6  # ctl, active, two sealed, snapshot data and map
    tracker.disable()
    assert tracker_files(disk.parent) == []
    before = disk.read_bytes()
    with pytest.raises(NotTrackedError, match="no longer enabled"):
        other.write(0, b"\3" * 512)
    assert disk.read_bytes() == before
    other.close()
    # Tracking starts afresh.
    with ReplicationTracker.enable(disk) as fresh:
        assert fresh.generation == 1 and fresh.pending_logs() == []


# ---- writes --------------------------------------------------------------------------------------
@pytest.mark.parametrize("offset, length, error", [
    (100, 512, AlignmentError),
    (0, 1000, AlignmentError),
    (0, 0, AlignmentError),
    (DISK_SIZE, 512, ValueError),
    (DISK_SIZE - 512, 1024, ValueError),
    (-512, 512, ValueError),
])
def test_bad_write_is_refused_and_changes_nothing(disk: Path, offset: int, length: int,
                                                  error: type[Exception]) -> None:
    with ReplicationTracker.enable(disk) as tracker:
        tracker.write(0, b"\1" * 512)
        files = {name: (disk.parent / name).read_bytes() for name in tracker_files(disk.parent)}
        before = disk.read_bytes()
        with pytest.raises(error, match=str(disk)):
            tracker.write(offset, b"\2" * length)
        assert disk.read_bytes() == before
        assert {name: (disk.parent / name).read_bytes() for name in tracker_files(disk.parent)} == files
        assert tracker.seal().records == 1


@pytest.mark.parametrize("fmt", ["raw", "vhd"])
def test_writes_reach_the_disk_and_the_log(tmp_path: Path, fmt: str) -> None:
    disk = make_disk(tmp_path / f"disk0.{fmt}", fmt)
    initial = copy_data(disk, tmp_path / "initial.raw")
    footer = disk.read_bytes()[DISK_SIZE:]
    rng = random.Random(5)
    with ReplicationTracker.enable(disk, sync=True) as tracker:
        big = rng.randbytes(MAX_RECORD_DATA * 2 + 4096)  # logged as three records of one log
        first = tracker.write(0, rng.randbytes(4096))
        assert tracker.write(3 * MIB, big) == first + 3
        assert tracker.write(DISK_SIZE - 512, b"\xee" * 512) == first + 4
        assert tracker.read(3 * MIB, len(big)) == big
        sealed = tracker.seal()
        assert (sealed.generation, sealed.first_seq, sealed.last_seq, sealed.records) == (1, 1, 5, 5)
        assert sealed.data_bytes == 4096 + len(big) + 512
        assert sealed.path == tmp_path / f"disk0.{fmt}.00000001.hrl"
        assert tracker.pending_logs() == [sealed]
        replay_logs(initial, tracker.pending_logs(), 1)
    assert data_of(disk) == initial.read_bytes()
    assert disk.read_bytes()[DISK_SIZE:] == footer
    if fmt == "vhd":
        subprocess.run(["qemu-img", "compare", "-q", "-f", "vpc", "-F", "raw", str(disk), str(initial)],
                       check=True, timeout=QEMU_TIMEOUT)


def test_seal_always_produces_a_log(disk: Path) -> None:
    with ReplicationTracker.enable(disk) as tracker:
        logs = [tracker.seal() for _ in range(3)]
        assert [(log.generation, log.records, log.first_seq, log.last_seq) for log in logs] == [
            (1, 0, 1, 0), (2, 0, 1, 0), (3, 0, 1, 0)]
        assert tracker.generation == 4
        assert tracker.pending_logs() == logs
        check_log_chain(logs)


def test_writer_in_another_process_while_logs_are_sealed(disk: Path, tmp_path: Path, start_writer) -> None:
    initial = copy_data(disk, tmp_path / "initial.raw")
    host = ReplicationTracker.enable(disk)
    writer, journal, _ = start_writer(disk, count=3000, seed=1)
    seals = 0
    deadline = time.monotonic() + PROCESS_TIMEOUT
    while writer.poll() is None:
        assert time.monotonic() < deadline
        host.seal()
        seals += 1
        time.sleep(0.002)
    wait_for(writer)
    host.seal()
    logs = host.pending_logs()
    assert len(logs) == seals + 1 and seals >= 5
    check_log_chain(logs)
    assert sum(1 for log in logs if log.records) >= 3, "the writer's records should span several logs"

    journaled = {}
    for line in journal.read_text().splitlines():
        seq, offset, length, digest = line.split()
        journaled[int(seq)] = (int(offset), int(length), digest)
    found = logged_writes(logs)
    assert sorted(found) == list(range(1, 3001)) == sorted(journaled)
    assert {seq: entry[1:] for seq, entry in found.items()} == journaled

    replay_logs(initial, logs, 1)
    assert initial.read_bytes() == data_of(disk)
    host.close()


def test_a_killed_writer_leaves_disk_and_logs_in_agreement(disk: Path, tmp_path: Path, start_writer) -> None:
    initial = copy_data(disk, tmp_path / "initial.raw")
    with ReplicationTracker.enable(disk) as host:
        for seed in (2, 3, 4):
            writer, journal, _ = start_writer(disk, count=10**9, seed=seed)
            wait_for_journal(journal, 200 * seed, writer)
            writer.kill()
            writer.wait(timeout=PROCESS_TIMEOUT)
            host.seal()
        logs = host.pending_logs()
        check_log_chain(logs)
        assert sum(log.records for log in logs) >= 200 + 400 + 600
    replay_logs(initial, logs, 1)
    assert initial.read_bytes() == data_of(disk)


@pytest.mark.parametrize("point, disk_has_write, logged", [
    ("before-commit", False, False),
    ("before-disk-write", True, True),  # the next process finishes the write from the log
])
def test_crash_during_a_write(disk: Path, tmp_path: Path, point: str, disk_has_write: bool, logged: bool) -> None:
    initial = copy_data(disk, tmp_path / "initial.raw")
    ReplicationTracker.enable(disk).close()
    crash = subprocess.run([sys.executable, "-c", CRASHER, str(disk), point], timeout=PROCESS_TIMEOUT)
    assert crash.returncode == 17
    assert data_of(disk) == initial.read_bytes()  # the crashed write never reached the disk itself
    assert (tmp_path / "disk0.vhd.hrl").stat().st_size == HEADER_SIZE + 24 + 8192 + 16  # but its record did
    with ReplicationTracker(disk) as tracker:
        changed = tracker.read(MIB, 8192) == b"\xab" * 8192
        assert changed == disk_has_write
        tracker.write(MIB + 4096, b"\xcd" * 512)  # continues after (or over) the crashed record
        sealed = tracker.seal()
        assert sealed.records == (2 if logged else 1)
        replay_logs(initial, tracker.pending_logs(), 1)
    assert initial.read_bytes() == data_of(disk)


def test_crash_during_a_seal(disk: Path, tmp_path: Path) -> None:
    initial = copy_data(disk, tmp_path / "initial.raw")
    with ReplicationTracker.enable(disk) as tracker:
        tracker.write(0, b"\1" * 4096)
    crash = subprocess.run([sys.executable, "-c", CRASHER, str(disk), "mid-seal"], timeout=PROCESS_TIMEOUT)
    assert crash.returncode == 17
    assert "disk0.vhd.hrl.new" in tracker_files(disk.parent)
    with ReplicationTracker(disk) as tracker:
        assert tracker.generation == 2
        assert tracker_files(disk.parent) == ["disk0.vhd.00000001.hrl", "disk0.vhd.ctl", "disk0.vhd.hrl"]
        tracker.write(4096, b"\2" * 4096)
        tracker.seal()
        logs = tracker.pending_logs()
        check_log_chain(logs)
        assert [log.records for log in logs] == [1, 1]
        replay_logs(initial, logs, 1)
    assert initial.read_bytes() == data_of(disk)


# ---- acknowledging and the resync threshold ------------------------------------------------------
def test_acknowledge_deletes_applied_logs_only(disk: Path) -> None:
    with ReplicationTracker.enable(disk) as tracker:
        for i in range(4):
            tracker.write(i * 4096, b"\1" * 4096)
            tracker.seal()
        tracker.acknowledge(2)
        assert [log.generation for log in tracker.pending_logs()] == [3, 4]
        tracker.acknowledge(2)  # again: nothing more to delete
        tracker.acknowledge(0)
        with pytest.raises(ValueError, match="generation 5 is still active"):
            tracker.acknowledge(5)
        assert [log.generation for log in tracker.pending_logs()] == [3, 4]
        tracker.acknowledge(4)
        assert tracker.pending_logs() == []


def test_unsent_logs_at_half_the_disk_need_resync(tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "disk0.raw", size=8 * MIB)
    with ReplicationTracker.enable(disk) as tracker:
        assert RESYNC_THRESHOLD == 0.5
        assert tracker.unsent_bytes() == HEADER_SIZE and not tracker.needs_resync()
        chunk = b"\7" * (64 * KIB)
        while not tracker.needs_resync():
            before = tracker.unsent_ratio()
            assert before < 0.5
            tracker.write(0, chunk)
        assert 0.5 <= tracker.unsent_ratio() < 0.5 + 2 * len(chunk) / (8 * MIB)
        tracker.seal()  # sealed but unsent still counts
        assert tracker.needs_resync()
        assert tracker.unsent_bytes() == tracker.pending_logs()[0].size + HEADER_SIZE
        tracker.acknowledge(1)
        assert tracker.unsent_bytes() == HEADER_SIZE and not tracker.needs_resync()


# ---- snapshot ------------------------------------------------------------------------------------
def copy_view(view, target: Path, chunk: int) -> None:
    buffer = bytearray(chunk)
    with open_disk(target, writable=True) as out:
        for offset in range(0, view.size, chunk):
            with memoryview(buffer)[: min(chunk, view.size - offset)] as piece:
                view.read_into(offset, piece)
                out.write(offset, piece)


def test_snapshot_view_is_the_disk_at_snapshot_time_while_another_process_writes(disk: Path, tmp_path: Path,
                                                                                  start_writer) -> None:
    initial = copy_data(disk, tmp_path / "initial.raw")
    host = ReplicationTracker.enable(disk)
    writer, journal, stop = start_writer(disk, count=10**9, seed=7)
    wait_for_journal(journal, 300, writer)
    first_generation = host.create_snapshot()
    assert host.create_snapshot() == first_generation  # a retry finds the same snapshot
    at_snapshot = journal_lines(journal)

    # Two copies while the writer goes on: block-sized reads, and reads that split blocks.
    copy, second_copy = tmp_path / "copy.raw", tmp_path / "second-copy.raw"
    create_disk(copy, DISK_SIZE)
    create_disk(second_copy, DISK_SIZE)
    with host.snapshot_view() as view:
        assert (view.size, view.alignment) == (DISK_SIZE, 1)
        copy_view(view, copy, chunk=SNAPSHOT_BLOCK)
        copy_view(view, second_copy, chunk=100 * KIB + 512)
        during_copy = journal_lines(journal) - at_snapshot
        odd = bytearray(1000)  # alignment 1: any range
        view.read_into(12345, memoryview(odd))
    wait_for_journal(journal, at_snapshot + 300, writer)
    stop.touch()
    wait_for(writer)
    preserved = (tmp_path / "disk0.vhd.snapmap").read_bytes()
    host.delete_snapshot()
    assert tracker_files(disk.parent).count("disk0.vhd.snap") == 0
    host.seal()
    logs = host.pending_logs()
    check_log_chain(logs)
    assert during_copy > 0 and any(preserved), "the writer should have written during the copy"

    # The disk at snapshot time: the initial disk plus the logs sealed before the snapshot.
    at_snapshot_image = tmp_path / "at-snapshot.raw"
    at_snapshot_image.write_bytes(initial.read_bytes())
    replay_logs(at_snapshot_image, [log for log in logs if log.generation < first_generation], 1)
    assert copy.read_bytes() == at_snapshot_image.read_bytes()
    assert second_copy.read_bytes() == at_snapshot_image.read_bytes()
    assert bytes(odd) == copy.read_bytes()[12345:13345]

    # The copy plus the logs from the snapshot's generation on is the disk now.
    replay_logs(copy, [log for log in logs if log.generation >= first_generation], first_generation)
    assert copy.read_bytes() == data_of(disk)
    host.acknowledge(first_generation - 1)
    assert host.pending_logs()[0].generation == first_generation
    host.close()


def test_snapshot_view_fails_once_the_snapshot_is_deleted(disk: Path) -> None:
    with ReplicationTracker.enable(disk) as tracker, ReplicationTracker(disk) as other:
        generation = tracker.create_snapshot()
        assert generation == 2 and tracker.pending_logs()[0].generation == 1
        view = tracker.snapshot_view()
        before = tracker.read(0, 64 * KIB)
        other.write(0, b"\5" * 4096)
        buffer = bytearray(64 * KIB)
        view.read_into(0, memoryview(buffer))
        assert bytes(buffer) == before
        other.delete_snapshot()
        with pytest.raises(SnapshotError, match="deleted while it was being read"):
            view.read_into(0, memoryview(buffer))
        view.close()
        with pytest.raises(SnapshotError, match="no snapshot"):
            tracker.snapshot_view()
        tracker.delete_snapshot()  # idempotent
        assert tracker.create_snapshot() == 3  # a new snapshot, a new generation
        tracker.delete_snapshot()


def test_snapshot_of_a_sparse_disk_lists_preserved_blocks_as_extents(tmp_path: Path) -> None:
    disk = tmp_path / "disk0.raw"
    create_disk(disk, DISK_SIZE)  # all holes
    with ReplicationTracker.enable(disk) as tracker:
        tracker.write(MIB, b"\x11" * 8192)
        tracker.create_snapshot()
        tracker.write(MIB, b"\x22" * 4096)  # rewrites data the snapshot holds
        tracker.write(5 * MIB, b"\x33" * 4096)  # fills a hole the snapshot has
        with tracker.snapshot_view() as view:
            extents = list(view.data_extents())
            content = bytearray(DISK_SIZE)
            view.read_into(0, memoryview(content))
            assert list(view.data_extents(MIB + 4096, 100)) == [(MIB + 4096, 100)]
            assert list(view.data_extents(2 * MIB, MIB)) == []
        # The block that was a hole was marked but not copied.
        assert os.stat(tmp_path / "disk0.raw.snap").st_blocks * 512 < 2 * SNAPSHOT_BLOCK
        tracker.delete_snapshot()
    expected = bytearray(DISK_SIZE)
    expected[MIB:MIB + 8192] = b"\x11" * 8192
    assert content == expected
    # Both preserved blocks are listed, the one that was a hole too: extents are conservative.
    assert extents == [(MIB, SNAPSHOT_BLOCK), (5 * MIB, SNAPSHOT_BLOCK)]
