"""End to end through the data path, on both recovery backends: a multi-disk VM is protected while its
workload writes, logs are shipped and applied, broken chains are caught and resynchronized. Every check
is byte for byte against the source disk."""
from __future__ import annotations

import random
import time

import pytest

from datapath.compare import first_difference
from datapath.disk import open_disk
from datapath.errors import LogCorruptError, LogOutOfSequenceError
from datapath.replication import (
    ReplicaDisk,
    acknowledge_applied,
    apply_shipped_logs,
    initial_copy,
    replicate_cycle,
    ship_pending_logs,
)
from datapath.resynchronize import resynchronize
from sites.host import Host

MiB = 1 << 20


def replica_equals_source(storage, replica: ReplicaDisk, source_path) -> None:
    """Independent of first_difference's own logic: read both whole and compare bytes."""
    with open_disk(source_path) as source:
        target = storage.open_disk(replica.name)
        try:
            assert target.size == source.size
            assert first_difference(source, target) is None
            step = 4 * MiB
            a, b = bytearray(step), bytearray(step)
            for offset in range(0, source.size, step):
                n = min(step, source.size - offset)
                source.read_into(offset, memoryview(a)[:n])
                target.read_into(offset, memoryview(b)[:n])
                assert a[:n] == b[:n], f"replica {replica.name} differs in [{offset}, {offset + n})"
        finally:
            target.close()


@pytest.fixture
def vm(tmp_path):
    host = Host(tmp_path / "host1", "host1")
    machine = host.create_vm("app01", [("disk0", 24 * MiB, "vhd"), ("disk1", 16 * MiB, "raw")])
    host.write_initial_data(machine, seed=11, fraction=0.5)
    host.enable_tracking(machine)
    yield host, machine
    host.stop_workload(machine)


def replicas_for(storage, machine):
    return {d.name: ReplicaDisk(storage, ReplicaDisk.name_for(machine.host, machine.name, d.name))
            for d in machine.disks}


def test_protect_multi_disk_vm_while_workload_writes(storage, vm):
    host, machine = vm
    replicas = replicas_for(storage, machine)
    host.start_workload(machine, rate_mb_s=4.0, seed=5)
    time.sleep(0.3)  # the copy starts while the guest is already writing

    for disk in machine.disks:
        tracker = host.tracker(machine, disk.name)
        state = initial_copy(tracker, replicas[disk.name])
        assert state.initial_copy_done

    applied_records = 0
    for _ in range(3):
        time.sleep(0.3)
        for disk in machine.disks:
            report = replicate_cycle(host.tracker(machine, disk.name), replicas[disk.name])
            applied_records += report.records
    assert applied_records > 0, "the workload's writes must have reached the replicas through logs"

    host.stop_workload(machine)
    for disk in machine.disks:
        tracker = host.tracker(machine, disk.name)
        replicate_cycle(tracker, replicas[disk.name])
        assert tracker.pending_logs() == []
        replica_equals_source(storage, replicas[disk.name], disk.path)


def test_disk_without_writes_in_a_cycle_still_advances(storage, vm):
    host, machine = vm
    replicas = replicas_for(storage, machine)
    for disk in machine.disks:
        initial_copy(host.tracker(machine, disk.name), replicas[disk.name])
    busy, idle = machine.disks
    generations_before = {d.name: replicas[d.name].load_state().applied_generation for d in machine.disks}

    busy_tracker = host.tracker(machine, busy.name)
    rng = random.Random(3)
    for _ in range(20):
        busy_tracker.write(rng.randrange(0, busy.size // 4096) * 4096, rng.randbytes(4096))
    for disk in machine.disks:  # the idle disk comes second: a loop that stops early would miss it
        replicate_cycle(host.tracker(machine, disk.name), replicas[disk.name])

    for disk in machine.disks:
        state = replicas[disk.name].load_state()
        assert state.applied_generation == generations_before[disk.name] + 1, disk.name
        replica_equals_source(storage, replicas[disk.name], disk.path)


def _protected(storage, host, machine):
    replicas = replicas_for(storage, machine)
    for disk in machine.disks:
        initial_copy(host.tracker(machine, disk.name), replicas[disk.name])
    disk = machine.disks[0]
    return disk, host.tracker(machine, disk.name), replicas[disk.name]


def _write_some(tracker, size, seed, count=10):
    rng = random.Random(seed)
    for _ in range(count):
        tracker.write(rng.randrange(0, size // 512 - 16) * 512, rng.randbytes(512 * rng.randint(1, 16)))


def _replica_bytes(storage, replica):
    target = storage.open_disk(replica.name)
    try:
        buf = bytearray(target.size)
        target.read_into(0, memoryview(buf))
        return bytes(buf)
    finally:
        target.close()


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_shipped_log_changes_nothing_then_resync_heals(storage, vm, damage):
    host, machine = vm
    disk, tracker, replica = _protected(storage, host, machine)
    _write_some(tracker, disk.size, seed=21)
    tracker.seal()
    [generation] = ship_pending_logs(tracker, replica)
    name = replica.log_name(generation)
    log = bytearray(storage.read_object(name))
    if damage == "flip":
        log[len(log) // 2] ^= 0x40
    else:
        del log[len(log) - 37:]
    storage.put_object(name, bytes(log))
    before_disk, before_state = _replica_bytes(storage, replica), replica.load_state()

    with pytest.raises(LogCorruptError) as err:
        apply_shipped_logs(replica, disk_name=disk.name)
    assert disk.name in str(err.value) and "record" in str(err.value)
    assert _replica_bytes(storage, replica) == before_disk
    assert replica.load_state().applied_generation == before_state.applied_generation

    report = resynchronize(tracker, replica)
    sent = report.bytes_sent + report.bytes_zeroed
    assert 0 < sent <= 10 * 16 * 512 + 10 * 4096  # only the blocks the lost log touched
    replicate_cycle(tracker, replica)
    replica_equals_source(storage, replica, disk.path)


def test_log_out_of_sequence_is_refused_then_resync_heals(storage, vm):
    host, machine = vm
    disk, tracker, replica = _protected(storage, host, machine)
    for seed in (31, 32, 33):
        _write_some(tracker, disk.size, seed=seed)
        tracker.seal()
    shipped = ship_pending_logs(tracker, replica)
    assert len(shipped) == 3
    storage.delete_object(replica.log_name(shipped[0]))  # the first of them is lost in transit
    before = _replica_bytes(storage, replica)
    with pytest.raises(LogOutOfSequenceError) as err:
        apply_shipped_logs(replica)
    assert str(shipped[1]) in str(err.value)
    assert _replica_bytes(storage, replica) == before

    resynchronize(tracker, replica)
    replicate_cycle(tracker, replica)
    replica_equals_source(storage, replica, disk.path)


def test_applying_again_is_harmless(storage, vm):
    host, machine = vm
    disk, tracker, replica = _protected(storage, host, machine)
    _write_some(tracker, disk.size, seed=41)
    tracker.seal()
    ship_pending_logs(tracker, replica)
    first = apply_shipped_logs(replica)
    assert len(first.applied) == 1
    # A redelivered ship and apply (the host has not acknowledged yet) change nothing.
    assert ship_pending_logs(tracker, replica) == []
    assert apply_shipped_logs(replica).applied == []
    acknowledge_applied(tracker, replica)
    assert tracker.pending_logs() == []
    replica_equals_source(storage, replica, disk.path)


def test_resync_after_random_damage_sends_only_damaged_blocks(storage, vm):
    host, machine = vm
    disk, tracker, replica = _protected(storage, host, machine)
    replicate_cycle(tracker, replica)
    rng = random.Random(51)
    target = storage.open_disk(replica.name)
    damaged = sorted(rng.sample(range(disk.size // 4096), 12))
    for block in damaged:
        target.write(block * 4096, rng.randbytes(4096))
    target.flush()
    target.close()

    # The replica's stored manifest is settled, so a resync compares the source with it: damage where the
    # source did not change is not seen (the consistency check's job), and nothing is sent.
    trusting = resynchronize(tracker, replica)
    assert not trusting.replica_read_whole and trusting.blocks_sent == 0 and trusting.damaged_chunks == []
    with open_disk(disk.path) as source, storage.open_disk(replica.name) as target:
        assert first_difference(source, target) is not None
    replicate_cycle(tracker, replica)

    report = resynchronize(tracker, replica, read_replica=True)
    assert report.replica_read_whole
    assert report.damaged_chunks == sorted({b * 4096 // MiB for b in damaged})
    # Damage where the source holds zeros is cleared, not sent: both count, nothing else does.
    assert report.blocks_sent == len(damaged)
    assert report.bytes_sent + report.bytes_zeroed == len(damaged) * 4096
    assert report.chunks_sent == len({b * 4096 // MiB for b in damaged})
    replicate_cycle(tracker, replica)
    replica_equals_source(storage, replica, disk.path)


def test_initial_copy_resumes_from_its_checkpoint(storage, vm):
    host, machine = vm
    disk = machine.disks[0]
    tracker = host.tracker(machine, disk.name)
    replica = ReplicaDisk(storage, ReplicaDisk.name_for(host.name, machine.name, disk.name))

    class Interrupted(Exception):
        pass

    seen = []

    def crash_midway(done, total):
        seen.append((done, total))
        raise Interrupted  # at the first durable checkpoint

    import datapath.replication as replication

    saved_interval = replication.CHECKPOINT_INTERVAL_S
    replication.CHECKPOINT_INTERVAL_S = 0  # save every checkpoint, so the crash leaves one behind
    try:
        with pytest.raises(Interrupted):
            initial_copy(tracker, replica, flush_interval=2 * MiB, on_progress=crash_midway)
        checkpoint = replica.load_state().copy_checkpoint
        assert seen and 0 < checkpoint < disk.size, f"no checkpoint before the end: {seen}"
        resumed = []
        initial_copy(tracker, replica, flush_interval=2 * MiB,
                     on_progress=lambda done, total: resumed.append(done))
    finally:
        replication.CHECKPOINT_INTERVAL_S = saved_interval
    assert resumed and min(resumed) > checkpoint, "the second copy must start past the checkpoint"
    replicate_cycle(tracker, replica)
    replica_equals_source(storage, replica, disk.path)
