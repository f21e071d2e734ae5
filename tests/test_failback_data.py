"""Failback's data path on real disk images and both recovery-storage backends.

The recovery VM's disks (on a recovery host: written by its workload through the tracker after failover)
and the primary VM's disks (which diverged: writes the recovery side never saw) start from the same
content. What crosses between the sides goes through the recovery storage as objects; the staging image
must end byte for byte equal to the recovery disk, and only the swap may touch the primary disk.
"""
from __future__ import annotations

import hashlib
import random
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from datapath.disk import open_disk
from datapath.errors import LogCorruptError, PathOutsideRootError, SizeMismatchError
from datapath.failback import (
    DifferenceStats,
    apply_difference_log,
    failback_object,
    prepare_staging,
    write_difference_log,
    zero_manifest,
)
from datapath.manifest import Manifest, compute_manifest, diff_manifests, zero_chunk_hash
from datapath.replog import (
    HEADER_SIZE,
    RECORD_HEADER_SIZE,
    RECORD_OVERHEAD,
    SEAL_RECORD_SIZE,
    LogDiskMismatchError,
    read_log_header,
)
from sites.host import Host, VirtualMachine

MiB = 1 << 20
DISKS = [("os", 24 * MiB, "vhd"), ("data", 16 * MiB, "raw")]


def virtual_bytes(path: Path) -> bytes:
    with open_disk(path) as disk:
        data = bytearray(disk.size)
        disk.read_into(0, memoryview(data))
        return bytes(data)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def chunks_with_data(path: Path) -> set[int]:
    with open_disk(path) as disk:
        return {index for start, length in disk.data_extents()
                for index in range(start // MiB, -(-(start + length) // MiB))}


@dataclass
class Failover:
    recovery: Host
    recovery_vm: VirtualMachine
    primary: Host
    primary_vm: VirtualMachine
    zeroed: dict[str, int]
    """Per disk, a chunk the recovery side overwrote with zeros (data, not a hole) where the primary
    has data."""
    primary_only: dict[str, int]
    """Per disk, a chunk that is a hole on the recovery side, where only the primary wrote."""


@pytest.fixture
def failover(tmp_path: Path) -> Failover:
    """Both sites after a failover: the recovery VM ran (its guest writing through the tracker) and
    the primary diverged (writes the recovery side never saw)."""
    recovery = Host(tmp_path / "recovery", "rhv01")
    primary = Host(tmp_path / "primary", "hv01")
    recovery_vm = recovery.create_vm("app01", DISKS)
    primary_vm = primary.create_vm("app01", DISKS)
    for host, vm in ((recovery, recovery_vm), (primary, primary_vm)):
        host.write_initial_data(vm, seed=1, fraction=0.5)  # the same content on both sides at failover
    for a, b in zip(recovery_vm.disks, primary_vm.disks, strict=True):
        assert virtual_bytes(a.path) == virtual_bytes(b.path)

    recovery.enable_tracking(recovery_vm)
    recovery.start_workload(recovery_vm, rate_mb_s=0.3, write_sizes=(4096, 32768), seed=9)
    time.sleep(0.6)
    recovery.shut_down(recovery_vm)
    assert all(d["writes"] > 0 for d in recovery.workload_stats(recovery_vm)["disks"].values())

    zeroed, primary_only = {}, {}
    rng = random.Random(5)
    for recovered, disk in zip(recovery_vm.disks, primary_vm.disks, strict=True):
        with recovery.tracker(recovery_vm, recovered) as tracker:
            zeroed[disk.name] = next(i for i in range(disk.size // MiB) if tracker.read(i * MiB, MiB) != bytes(MiB))
            tracker.write(zeroed[disk.name] * MiB, bytes(MiB))
        primary_only[disk.name] = min(set(range(disk.size // MiB)) - chunks_with_data(recovered.path))
        with open_disk(disk.path, writable=True) as image:
            image.write(primary_only[disk.name] * MiB + 4096, rng.randbytes(8192))
            for _ in range(3):
                image.write(rng.randrange(0, disk.size - 65536, 512), rng.randbytes(rng.randrange(512, 65536, 512)))
            image.flush()
        assert virtual_bytes(recovered.path) != virtual_bytes(disk.path)
    return Failover(recovery, recovery_vm, primary, primary_vm, zeroed, primary_only)


def disk_id_of(disk) -> bytes:
    return uuid.UUID(disk.id).bytes


def ship_and_apply(storage, name: str, log_path: Path, staging_path: Path, disk_id: bytes, tmp_path: Path):
    """The log's trip through the recovery storage, then applied on the primary side."""
    assert storage.put_object(name, log_path.open("rb")) == log_path.stat().st_size
    with tempfile.TemporaryFile(dir=tmp_path) as received:
        storage.get_object(name, received)
        received.seek(0)
        with open_disk(staging_path, writable=True) as staging:
            return apply_difference_log(received, staging, disk_id=disk_id)


def test_minimize_downtime_sends_only_differing_chunks_and_staging_equals_the_recovery_disk(
        storage, failover, tmp_path):
    recovery_vm, primary, primary_vm = failover.recovery_vm, failover.primary, failover.primary_vm
    for recovered, disk in zip(recovery_vm.disks, primary_vm.disks, strict=True):
        primary_before = sha256_of(disk.path)
        staging_path = primary.staging_path(primary_vm, disk)
        progress: list[int] = []
        staged = prepare_staging(staging_path, disk.size, disk.format, copy_from=disk.path, on_progress=progress.append)
        assert virtual_bytes(staging_path) == virtual_bytes(disk.path) and progress[-1] == disk.size
        with open_disk(staging_path) as image:
            assert image.format == disk.format and compute_manifest(image) == staged

        # The staging manifest crosses to the recovery side, which logs what differs from it.
        manifest_name = failback_object(primary.name, primary_vm.name, disk.name, "manifest")
        storage.put_object(manifest_name, staged.to_bytes())
        against = Manifest.from_bytes(storage.read_object(manifest_name), name=manifest_name)
        log_path = tmp_path / f"{disk.name}.hrl"
        with open_disk(recovered.path) as source:
            recovered_manifest = compute_manifest(source)
            stats = write_difference_log(source, log_path, disk_id=disk_id_of(disk), against=against)
        differing = diff_manifests(recovered_manifest, staged)
        assert isinstance(stats, DifferenceStats)
        assert stats.chunks_compared == disk.size // MiB and stats.chunks_sent == len(differing)
        assert 0 < stats.chunks_sent < stats.chunks_compared
        assert stats.source_root == recovered_manifest.root_hex
        assert stats.bytes_in_log == log_path.stat().st_size < disk.size
        assert stats.bytes_in_log == HEADER_SIZE + stats.chunks_sent * (RECORD_OVERHEAD + MiB) + SEAL_RECORD_SIZE
        header = read_log_header(log_path)
        assert (header.generation, header.first_seq, header.block_size, header.disk_id, header.disk_size) == (
            1, 1, 512, disk_id_of(disk), disk.size)
        # Chunks that are zeros on the recovery side, as data or as a hole, are sent as zeros.
        for chunk in (failover.zeroed[disk.name], failover.primary_only[disk.name]):
            assert chunk in differing and recovered_manifest.chunk_hash(chunk) == zero_chunk_hash(MiB)

        log_name = failback_object(primary.name, primary_vm.name, disk.name, "hrl")
        applied = ship_and_apply(storage, log_name, log_path, staging_path, disk_id_of(disk), tmp_path)
        assert applied.records == stats.chunks_sent and applied.generation == 1
        assert virtual_bytes(staging_path) == virtual_bytes(recovered.path), f"staging of {disk.name} differs"
        with open_disk(staging_path) as image:
            assert compute_manifest(image).root_hex == stats.source_root
        # Applying again (a redelivered step) is harmless; the primary disk was never touched.
        ship_and_apply(storage, log_name, log_path, staging_path, disk_id_of(disk), tmp_path)
        assert virtual_bytes(staging_path) == virtual_bytes(recovered.path)
        assert sha256_of(disk.path) == primary_before


def test_full_download_logs_every_data_chunk_and_staging_equals_the_recovery_disk(storage, failover, tmp_path):
    recovery_vm, primary, primary_vm = failover.recovery_vm, failover.primary, failover.primary_vm
    for recovered, disk in zip(recovery_vm.disks, primary_vm.disks, strict=True):
        staging_path = primary.staging_path(primary_vm, disk)
        staging_path.write_bytes(b"left over from a crashed attempt")
        staged = prepare_staging(staging_path, disk.size, disk.format, copy_from=None)
        assert staged == zero_manifest(disk.size)
        with open_disk(staging_path) as image:
            assert image.format == disk.format and list(image.data_extents()) == []

        log_path = tmp_path / f"{disk.name}.full.hrl"
        progress: list[int] = []
        with open_disk(recovered.path) as source:
            recovered_manifest = compute_manifest(source)
            stats = write_difference_log(source, log_path, disk_id=disk_id_of(disk), against=None,
                                         on_progress=progress.append)
        data_chunks = [i for i in range(recovered_manifest.chunk_count)
                       if recovered_manifest.chunk_hash(i) != zero_chunk_hash(MiB)]
        assert stats.chunks_sent == len(data_chunks) and stats.chunks_compared == disk.size // MiB
        assert failover.zeroed[disk.name] not in data_chunks and failover.primary_only[disk.name] not in data_chunks
        assert progress == sorted(progress) and progress[-1] == disk.size
        assert stats.source_root == recovered_manifest.root_hex

        applied = ship_and_apply(storage, failback_object(primary.name, primary_vm.name, disk.name, "full.hrl"),
                                 log_path, staging_path, disk_id_of(disk), tmp_path)
        assert applied.data_bytes == len(data_chunks) * MiB
        assert virtual_bytes(staging_path) == virtual_bytes(recovered.path), f"staging of {disk.name} differs"


def test_a_tampered_or_foreign_log_changes_nothing(storage, failover, tmp_path):
    recovery_vm, primary, primary_vm = failover.recovery_vm, failover.primary, failover.primary_vm
    recovered, disk = recovery_vm.disks[1], primary_vm.disks[1]
    staging_path = primary.staging_path(primary_vm, disk)
    staged = prepare_staging(staging_path, disk.size, disk.format, copy_from=disk.path)
    log_path = tmp_path / "data.hrl"
    with open_disk(recovered.path) as source:
        write_difference_log(source, log_path, disk_id=disk_id_of(disk), against=staged)
    name = failback_object(primary.name, primary_vm.name, disk.name, "hrl")
    staging_before = sha256_of(staging_path)

    tampered = bytearray(log_path.read_bytes())
    tampered[HEADER_SIZE + RECORD_HEADER_SIZE + 1000] ^= 0x40  # one bit of the first record's data
    tampered_path = tmp_path / "tampered.hrl"
    tampered_path.write_bytes(bytes(tampered))
    with pytest.raises(LogCorruptError, match="checksum mismatch"):
        ship_and_apply(storage, name, tampered_path, staging_path, disk_id_of(disk), tmp_path)
    assert sha256_of(staging_path) == staging_before

    truncated_path = tmp_path / "truncated.hrl"
    truncated_path.write_bytes(log_path.read_bytes()[:-100])
    with pytest.raises(LogCorruptError):
        ship_and_apply(storage, name, truncated_path, staging_path, disk_id_of(disk), tmp_path)
    assert sha256_of(staging_path) == staging_before

    other_disk = primary_vm.disks[0]
    with pytest.raises(LogDiskMismatchError, match=f"not {other_disk.id}"):
        ship_and_apply(storage, name, log_path, staging_path, disk_id_of(other_disk), tmp_path)
    assert sha256_of(staging_path) == staging_before

    # The genuine log still applies.
    ship_and_apply(storage, name, log_path, staging_path, disk_id_of(disk), tmp_path)
    assert virtual_bytes(staging_path) == virtual_bytes(recovered.path)


def test_replace_disk_swaps_in_the_recovered_content_and_discard_leaves_the_primary_as_it_was(failover, tmp_path):
    recovery_vm, primary, primary_vm = failover.recovery_vm, failover.primary, failover.primary_vm
    os_recovered, data_recovered = recovery_vm.disks
    os_disk, data_disk = primary_vm.disks
    primary.enable_tracking(primary_vm)  # protected again before failback: the swap must wait for disable
    primary_before = {d.name: sha256_of(d.path) for d in primary_vm.disks}

    for recovered, disk in ((os_recovered, os_disk), (data_recovered, data_disk)):
        staging_path = primary.staging_path(primary_vm, disk)
        staged = prepare_staging(staging_path, disk.size, disk.format, copy_from=disk.path)
        log_path = tmp_path / f"{disk.name}.hrl"
        with open_disk(recovered.path) as source:
            write_difference_log(source, log_path, disk_id=disk_id_of(disk), against=staged)
        with open_disk(staging_path, writable=True) as staging:
            apply_difference_log(log_path, staging, disk_id=disk_id_of(disk))

    # Failback cancelled for the data disk: its staging goes, the disk stays byte for byte.
    primary.discard_staging(primary_vm, "data")
    primary.discard_staging(primary_vm, "data")
    assert not primary.staging_path(primary_vm, "data").exists()
    assert sha256_of(data_disk.path) == primary_before["data"]

    with primary.tracker(primary_vm, "os") as tracker:
        tracker.disable()
    assert primary.replace_disk(primary_vm, "os", primary.staging_path(primary_vm, "os")) is True
    assert virtual_bytes(os_disk.path) == virtual_bytes(os_recovered.path)
    assert not primary.staging_path(primary_vm, "os").exists()
    assert primary.replace_disk(primary_vm, "os", primary.staging_path(primary_vm, "os")) is False
    assert virtual_bytes(os_disk.path) == virtual_bytes(os_recovered.path)
    assert sha256_of(data_disk.path) == primary_before["data"]
    assert primary.get_vm("app01").disk("os").id == os_disk.id  # the same disk, new content


def test_bad_inputs_are_refused_and_create_nothing(failover, tmp_path):
    recovery_vm, primary, primary_vm = failover.recovery_vm, failover.primary, failover.primary_vm
    disk = primary_vm.disks[1]
    staging_path = primary.staging_path(primary_vm, disk)
    with pytest.raises(SizeMismatchError, match=f"{disk.path}"):
        prepare_staging(staging_path, disk.size + MiB, disk.format, copy_from=disk.path)
    with pytest.raises(ValueError, match="unknown disk format 'vhdx'"):
        prepare_staging(staging_path, disk.size, "vhdx", copy_from=disk.path)
    assert not staging_path.exists()

    log_path = tmp_path / "data.hrl"
    with open_disk(recovery_vm.disks[0].path) as source, pytest.raises(SizeMismatchError):
        write_difference_log(source, log_path, disk_id=disk_id_of(disk), against=zero_manifest(disk.size))
    assert list(tmp_path.glob("*.hrl*")) + list(tmp_path.glob(".*.hrl*")) == []

    assert failback_object("hv01", "app01", "os", "hrl") == "failback/hv01/app01/os.hrl"
    for bad in (("hv01", "..", "os", "hrl"), ("hv01", "app01", "os/../../x", "hrl"), ("", "app01", "os", "hrl")):
        with pytest.raises(PathOutsideRootError):
            failback_object(*bad)
