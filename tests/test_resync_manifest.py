"""The resync's replica side from the stored manifest of its current version (datapath/replication.py,
`resynchronize`; datapath/points.py, `settled_manifest`): on an encrypted local recovery storage whose
replica disk counts what is read from it, the replica is read only in the chunks the source changed when
its manifest is settled, and whole when the manifest is missing, not the recorded one, or a change after
it was interrupted. Every resync ends with the replica equal to the source, byte for byte."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

import datapath.replication as replication
import datapath.resynchronize
from datapath.compare import first_difference
from datapath.disk import open_disk
from datapath.points import load_manifest, store_manifest, verify_point
from datapath.replication import ReplicaDisk, initial_copy, replicate_cycle, ship_pending_logs
from datapath.resynchronize import resynchronize
from sites.host import Host
from sites.storage.encrypted import EncryptedStorage
from sites.storage.keys import write_kek_file
from sites.storage.local import LocalDirectoryStorage
from tests.instrumented_disks import InstrumentedDisk

MiB = 1 << 20
BLOCK = 4096
DISK_SIZE = 16 * MiB
CHANGED_CHUNKS = (2, 9, 13)


class CountingStorage(LocalDirectoryStorage):
    """A local recovery storage whose replica disks record every read (`disks`, in order opened)."""

    def __init__(self, root: Path):
        super().__init__(root)
        self.disks: list[InstrumentedDisk] = []

    def open_disk(self, name: str) -> InstrumentedDisk:
        disk = InstrumentedDisk(super().open_disk(name))
        self.disks.append(disk)
        return disk

    def reads_since(self, mark: int) -> list[tuple[int, int]]:
        return [read for disk in self.disks[mark:] for read in disk.reads]


@pytest.fixture
def site(tmp_path):
    counting = CountingStorage(tmp_path / "recovery-site")
    storage = EncryptedStorage(counting, write_kek_file(tmp_path / "storage.kek"))
    host = Host(tmp_path / "host1", "host1")
    machine = host.create_vm("app01", [("disk0", DISK_SIZE, "raw")])
    host.write_initial_data(machine, seed=61, fraction=1.0)
    host.enable_tracking(machine)
    [disk] = machine.disks
    tracker = host.tracker(machine, disk.name)
    replica = ReplicaDisk(storage, ReplicaDisk.name_for(host.name, machine.name, disk.name))
    initial_copy(tracker, replica)
    replicate_cycle(tracker, replica)  # version 2, from a log: its manifest made by the apply
    yield counting, storage, disk, tracker, replica
    tracker.close()


def change_source(tracker, seed: int, chunks=CHANGED_CHUNKS) -> None:
    """A few 4 KiB writes through the tracker in each of `chunks`."""
    rng = random.Random(seed)
    for chunk in chunks:
        for block in rng.sample(range(MiB // BLOCK), 3):
            tracker.write(chunk * MiB + block * BLOCK, rng.randbytes(BLOCK))


def chunks_read(reads: list[tuple[int, int]]) -> set[int]:
    return {chunk for offset, length in reads for chunk in range(offset // MiB, (offset + length - 1) // MiB + 1)}


def assert_replica_is_source(storage, replica, disk) -> None:
    with open_disk(disk.path) as source, storage.open_disk(replica.name) as target:
        assert first_difference(source, target) is None
        a, b = bytearray(source.size), bytearray(source.size)
        source.read_into(0, memoryview(a))
        target.read_into(0, memoryview(b))
        assert a == b


def test_a_settled_manifest_spares_reading_the_replica_but_where_the_source_changed(site):
    counting, storage, disk, tracker, replica = site
    change_source(tracker, seed=62)
    mark = len(counting.disks)

    report = resynchronize(tracker, replica)

    assert not report.replica_read_whole and report.why_read_whole == ""
    read = counting.reads_since(mark)
    assert read and chunks_read(read) == set(CHANGED_CHUNKS)
    # Each changed chunk read twice: compared block by block, then kept in the undo log.
    assert sum(length for _, length in read) == 2 * len(CHANGED_CHUNKS) * MiB
    assert report.chunks_sent == len(CHANGED_CHUNKS) and report.blocks_sent == 3 * len(CHANGED_CHUNKS)
    assert report.damaged_chunks == report.lost_chunks == []
    assert_replica_is_source(storage, replica, disk)
    assert load_manifest(replica, report.version).root_hex == report.manifest_root
    for version in range(1, report.version + 1):
        assert verify_point(replica, version).ok, version


def test_damage_in_a_changed_chunk_is_found_from_the_bytes_read(site):
    counting, storage, disk, tracker, replica = site
    rng = random.Random(63)
    with storage.open_disk(replica.name) as target:  # bit rot in a block the guest does not write
        target.write(9 * MiB + 200 * BLOCK, rng.randbytes(BLOCK))
        target.flush()
    change_source(tracker, seed=64)

    report = resynchronize(tracker, replica)

    assert not report.replica_read_whole
    assert report.damaged_chunks == report.lost_chunks == [9]
    assert_replica_is_source(storage, replica, disk)
    # What the earlier versions held at the damaged block is gone, and their check says where.
    check = verify_point(replica, report.version - 1)
    assert not check.ok and check.first_bad_chunk == 9


@pytest.mark.parametrize("manifest", ["missing", "another root", "state root differs"])
def test_without_the_recorded_manifest_the_replica_is_read_whole(site, manifest):
    counting, storage, disk, tracker, replica = site
    state = replica.load_state()
    if manifest == "missing":
        storage.delete_object(replica.manifest_name(state.version))
    elif manifest == "another root":  # a valid manifest, of other content
        store_manifest(replica, state.version, load_manifest(replica, state.version).with_chunk_hashes({0: bytes(16)}))
    else:
        state.manifest_root = "00" * 16
        replica.save_state(state)
    change_source(tracker, seed=65)
    mark = len(counting.disks)

    report = resynchronize(tracker, replica)

    assert report.replica_read_whole and f"version {state.version}" in report.why_read_whole
    assert chunks_read(counting.reads_since(mark)) == set(range(DISK_SIZE // MiB))
    assert report.chunks_sent == len(CHANGED_CHUNKS)
    assert_replica_is_source(storage, replica, disk)


class Crash(Exception):
    pass


def crash(*args, **kwargs):
    raise Crash


def test_an_apply_interrupted_after_writing_makes_the_replica_read_whole(site, monkeypatch):
    """The replica is then ahead of its state's manifest. A block the interrupted log wrote and the guest
    then wrote back as it was matches that manifest on the source side: only reading the replica finds it."""
    counting, storage, disk, tracker, replica = site
    offset = 5 * MiB + 17 * BLOCK
    with open_disk(disk.path) as source:
        original = bytearray(BLOCK)
        source.read_into(offset, memoryview(original))
    tracker.write(offset, random.Random(66).randbytes(BLOCK))
    tracker.seal()
    ship_pending_logs(tracker, replica)

    with monkeypatch.context() as patch:  # the apply stops after its writes, before the manifest and state
        patch.setattr(replication, "store_manifest", crash)
        with pytest.raises(Crash):
            replication.apply_shipped_logs(replica)
    state = replica.load_state()
    tracker.write(offset, bytes(original))  # the guest puts the block back; that log is lost
    change_source(tracker, seed=67)

    report = resynchronize(tracker, replica)

    assert report.replica_read_whole and f"version {state.version + 1}" in report.why_read_whole
    assert report.chunks_sent == len(CHANGED_CHUNKS) + 1  # chunk 5 too: the replica held the log's block
    assert_replica_is_source(storage, replica, disk)


def test_a_resync_interrupted_half_way_is_finished_reading_the_replica_whole(site, monkeypatch):
    counting, storage, disk, tracker, replica = site
    change_source(tracker, seed=68)

    with monkeypatch.context() as patch:  # stops after its writes, before the manifest and state
        patch.setattr(datapath.resynchronize, "store_manifest", crash)
        with pytest.raises(Crash):
            resynchronize(tracker, replica)
    report = resynchronize(tracker, replica)

    assert report.replica_read_whole and "in progress" in report.why_read_whole
    assert_replica_is_source(storage, replica, disk)
    # A resync of a replica settled again trusts its manifest once more.
    change_source(tracker, seed=69, chunks=(0,))
    assert not resynchronize(tracker, replica).replica_read_whole
    assert_replica_is_source(storage, replica, disk)
