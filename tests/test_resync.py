"""Two-level resynchronization between real raw and VHD files: only the damaged blocks are sent (counted
exactly), zeros become hole punches, and the result is checked byte for byte and against rsync."""
from __future__ import annotations

import random
import re
import shutil
import subprocess

import mmh3
import pytest
from instrumented_disks import (
    KIB,
    MIB,
    InstrumentedDisk,
    allocated_bytes,
    assert_same_content,
    file_bytes,
    file_digest,
)

from datapath.compare import first_difference
from datapath.copy import copy_disk
from datapath.disk import create_disk, open_disk
from datapath.errors import AlignmentError, NonRecoverableError, SizeMismatchError
from datapath.manifest import HASH_SIZE, compute_manifest, zero_chunk_hash
from datapath.resync import block_hashes, sync_disks

BLOCK = 4 * KIB
RSYNC_TIMEOUT = 30


def random_disk(path, size, fmt="raw", seed=1):
    create_disk(path, size, fmt)
    with open_disk(path, writable=True) as disk:
        disk.write(0, random.Random(seed).randbytes(size))
    return path


def clone(source_path, target_path, fmt):
    """The target as an exact copy of the source, in another format."""
    with open_disk(source_path) as source:
        create_disk(target_path, source.size, fmt)
        with open_disk(target_path, writable=True) as target:
            copy_disk(source, target)
    return target_path


def damage(path, writes):
    with open_disk(path, writable=True) as disk:
        for offset, data in writes:
            disk.write(offset, data)


def synced(source_path, target_path, **options):
    with open_disk(source_path) as source, open_disk(target_path, writable=True) as target:
        counted = InstrumentedDisk(target, alignment=options.pop("alignment", None))
        result = sync_disks(source, counted, **options)
        assert first_difference(source, target) is None
        rehashed = compute_manifest(target, result.target_manifest.chunk_size)
        assert result.target_root == result.source_root == rehashed.root
    assert_same_content(source_path, target_path, result.target_manifest.size)
    return result, counted


def test_random_block_damage_sends_exactly_the_damaged_blocks(tmp_path):
    size, chunk = 128 * MIB, 512 * KIB  # 256 chunks; 1% of them damaged
    source_path = random_disk(tmp_path / "src.raw", size)
    target_path = clone(source_path, tmp_path / "dst.vhd", "vhd")
    rng = random.Random(42)
    chunks = rng.sample(range(size // chunk), 3)
    damaged_blocks = set()
    for index in chunks:
        for block in rng.sample(range(chunk // BLOCK), rng.randint(1, 6)):
            damaged_blocks.add(index * chunk // BLOCK + block)
    per_chunk = chunk // BLOCK
    damaged_blocks |= {chunks[0] * per_chunk + 10, chunks[0] * per_chunk + 11}  # adjacent: one write
    damage(target_path, [(block * BLOCK, rng.randbytes(BLOCK)) for block in damaged_blocks])

    result, target = synced(source_path, target_path, chunk_size=chunk)
    assert result.bytes_sent == len(damaged_blocks) * BLOCK
    assert result.blocks_sent == len(damaged_blocks)
    assert result.chunks_sent == 3 and result.chunks_compared == 256
    assert result.bytes_zeroed == 0
    assert result.hash_bytes == 256 * HASH_SIZE + 3 * (chunk // BLOCK) * HASH_SIZE
    run_starts = {block for block in damaged_blocks if block - 1 not in damaged_blocks or block % per_chunk == 0}
    assert {offset // BLOCK for offset, _ in target.writes} == run_starts
    assert len(target.writes) == len(run_starts)
    assert sum(length for _, length in target.writes) == result.bytes_sent


def test_unaligned_damage_spanning_blocks_and_chunks(tmp_path):
    size = 16 * MIB
    source_path = random_disk(tmp_path / "src.vhd", size, "vhd", seed=2)
    target_path = clone(source_path, tmp_path / "dst.raw", "raw")
    damage(target_path, [
        (5 * BLOCK - 50, b"\xaa" * 100),  # spans blocks 4 and 5 of chunk 0
        (3 * MIB - 10, b"\xbb" * 20),  # spans the last block of chunk 2 and the first of chunk 3
    ])
    result, target = synced(source_path, target_path)
    assert result.bytes_sent == 4 * BLOCK and result.blocks_sent == 4 and result.chunks_sent == 3
    assert sorted(target.writes) == [(4 * BLOCK, 2 * BLOCK), (3 * MIB - BLOCK, BLOCK), (3 * MIB, BLOCK)]


def test_source_zeros_become_zeros_on_the_target(tmp_path):
    size = 32 * MIB
    source_path = random_disk(tmp_path / "src.raw", size, seed=3)
    target_path = clone(source_path, tmp_path / "dst.raw", "raw")
    with open_disk(source_path, writable=True) as source:
        source.write_zeros(8 * MIB, 4 * MIB)  # a hole
        source.write(20 * MIB + BLOCK, bytes(2 * BLOCK))  # written zeros
    allocated_before = allocated_bytes(target_path)
    result, target = synced(source_path, target_path)
    assert result.bytes_sent == 0 and target.writes == []
    assert result.bytes_zeroed == 4 * MIB + 2 * BLOCK and result.blocks_sent == 4 * MIB // BLOCK + 2
    # One request per chunk for the hole, one for the two zero blocks.
    assert sorted(target.zeroings) == [(offset, MIB) for offset in range(8 * MIB, 12 * MIB, MIB)] + [
        (20 * MIB + BLOCK, 2 * BLOCK)]
    assert file_bytes(target_path, 8 * MIB, 4 * MIB) == bytes(4 * MIB)
    assert allocated_bytes(target_path) <= allocated_before - 4 * MIB


def test_identical_disks_send_nothing(tmp_path):
    source_path = random_disk(tmp_path / "src.raw", 16 * MIB, seed=4)
    target_path = clone(source_path, tmp_path / "dst.vhd", "vhd")
    result, target = synced(source_path, target_path)
    assert (result.bytes_sent, result.bytes_zeroed, result.chunks_sent, result.blocks_sent) == (0, 0, 0, 0)
    assert result.hash_bytes == 16 * HASH_SIZE
    assert target.writes == [] and target.zeroings == []


def test_different_sizes_change_nothing(tmp_path):
    source_path = random_disk(tmp_path / "src.raw", 16 * MIB, seed=5)
    target_path = random_disk(tmp_path / "dst.vhd", 17 * MIB, "vhd", seed=6)
    before = file_digest(target_path)
    with open_disk(source_path) as source, open_disk(target_path, writable=True) as target:
        with pytest.raises(SizeMismatchError, match="dst.vhd"):
            sync_disks(source, target)
    assert file_digest(target_path) == before


def test_page_aligned_target(tmp_path):
    size = 8 * MIB
    source_path = random_disk(tmp_path / "src.vhd", size, "vhd", seed=7)
    target_path = clone(source_path, tmp_path / "dst.vhd", "vhd")
    damage(target_path, [(512 * 9 + 510, b"\x01\x02\x03"), (size - 1, b"\x04")])
    result, target = synced(source_path, target_path, block_size=512, alignment=512)
    assert result.bytes_sent == 3 * 512
    assert sorted(target.writes) == [(512 * 9, 1024), (size - 512, 512)]
    before = file_digest(target_path)
    with open_disk(source_path) as source, open_disk(target_path, writable=True) as raw_target:
        with pytest.raises(AlignmentError, match="alignment 4096"):
            sync_disks(source, InstrumentedDisk(raw_target, alignment=4096), block_size=512)
        with pytest.raises(ValueError, match="block size"):
            sync_disks(source, raw_target, block_size=3 * 512)
    assert file_digest(target_path) == before


def test_short_last_chunk_and_block(tmp_path):
    size = 8 * MIB + 1536  # the last chunk is 1536 bytes, a short 4 KiB block
    source_path = random_disk(tmp_path / "src.raw", size, seed=8)
    target_path = clone(source_path, tmp_path / "dst.raw", "raw")
    damage(target_path, [(size - 1, b"\xff")])
    result, target = synced(source_path, target_path)
    assert result.bytes_sent == 1536 and target.writes == [(8 * MIB, 1536)]


def test_failback_direction_with_changes_on_both_sides(tmp_path):
    """Recovery → primary: the replica ran the workload after failover, the primary holds writes the
    replica never got. Syncing the replica onto the primary undoes the latter and brings the former."""
    size = 24 * MIB
    primary = random_disk(tmp_path / "primary.vhd", size, "vhd", seed=9)
    replica = clone(primary, tmp_path / "replica.vhd", "vhd")
    rng = random.Random(10)
    damage(replica, [(3 * MIB, rng.randbytes(3 * BLOCK)), (17 * MIB + 5, rng.randbytes(10))])
    damage(primary, [(9 * MIB, rng.randbytes(BLOCK)), (3 * MIB + BLOCK, rng.randbytes(BLOCK))])
    result, _ = synced(replica, primary)
    # Blocks 0-2 of chunk 3 (one of them also changed on the primary), one in chunk 9, one in chunk 17.
    assert result.bytes_sent == (3 + 1 + 1) * BLOCK and result.chunks_sent == 3


def test_given_manifests_read_only_differing_chunks(tmp_path):
    size = 32 * MIB
    source_path = random_disk(tmp_path / "src.raw", size, seed=11)
    target_path = clone(source_path, tmp_path / "dst.raw", "raw")
    damage(target_path, [(6 * MIB + 3, b"x"), (30 * MIB, b"y")])
    with open_disk(source_path) as source, open_disk(target_path, writable=True) as target:
        source_manifest, target_manifest = compute_manifest(source), compute_manifest(target)
        counted_source, counted_target = InstrumentedDisk(source), InstrumentedDisk(target)
        result = sync_disks(counted_source, counted_target,
                            source_manifest=source_manifest, target_manifest=target_manifest)
        assert first_difference(source, target) is None
    assert counted_source.bytes_read == counted_target.bytes_read == 2 * MIB
    assert result.target_manifest == source_manifest
    with open_disk(source_path) as source, open_disk(target_path, writable=True) as target:
        with pytest.raises(SizeMismatchError, match="manifest given"):
            sync_disks(source, target, chunk_size=2 * MIB, source_manifest=source_manifest)


def test_stale_source_manifest_is_refused(tmp_path):
    size = 16 * MIB
    source_path = random_disk(tmp_path / "src.raw", size, seed=12)
    target_path = clone(source_path, tmp_path / "dst.raw", "raw")
    with open_disk(source_path) as source:
        stale = compute_manifest(source)
    damage(source_path, [(5 * MIB, b"new")])
    damage(target_path, [(5 * MIB + 100, b"old")])
    before = file_digest(target_path)
    with open_disk(source_path) as source, open_disk(target_path, writable=True) as target:
        with pytest.raises(NonRecoverableError, match="chunk 5 .* stale"):
            sync_disks(source, target, source_manifest=stale)
    assert file_digest(target_path) == before


def test_block_hashes(tmp_path):
    size = 4 * MIB + 1536
    path = tmp_path / "d.raw"
    create_disk(path, size)
    data = random.Random(13).randbytes(MIB)
    damage(path, [(MIB, data), (4 * MIB, b"\x01" * 1536)])
    with open_disk(path) as disk:
        counted = InstrumentedDisk(disk)
        assert block_hashes(counted, 0, MIB, BLOCK) == zero_chunk_hash(BLOCK) * 256
        assert counted.reads == []  # a chunk in a hole is not read
        expected = b"".join(mmh3.hash_bytes(data[pos:pos + BLOCK]) for pos in range(0, MIB, BLOCK))
        assert block_hashes(counted, 1, MIB, BLOCK) == expected
        assert block_hashes(disk, 4, MIB, BLOCK) == mmh3.hash_bytes(b"\x01" * 1536)
        with pytest.raises(IndexError, match="chunk 5"):
            block_hashes(disk, 5, MIB, BLOCK)


def test_progress_covers_every_pass(tmp_path):
    size = 16 * MIB
    source_path = random_disk(tmp_path / "src.raw", size, seed=14)
    target_path = clone(source_path, tmp_path / "dst.raw", "raw")
    damage(target_path, [(7 * MIB, b"z")])
    seen = []
    with open_disk(source_path) as source, open_disk(target_path, writable=True) as target:
        sync_disks(source, target, on_progress=lambda done, total: seen.append((done, total)))
    assert {total for _, total in seen} == {3 * size}
    dones = [done for done, _ in seen]
    assert dones == sorted(set(dones)) and dones[-1] == 3 * size


def rsync_literal_bytes(source, target) -> int:
    command = ["rsync", "--inplace", "--no-whole-file", "--ignore-times", "--stats", str(source), str(target)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=RSYNC_TIMEOUT, check=True)
    return int(re.search(r"Literal data: ([\d,]+) bytes", proc.stdout)[1].replace(",", ""))


def test_sends_less_than_rsync_for_scattered_small_writes(tmp_path):
    size = 64 * MIB
    source_path = random_disk(tmp_path / "src.raw", size, seed=15)
    ours, theirs = tmp_path / "ours.raw", tmp_path / "theirs.raw"
    shutil.copyfile(source_path, ours)
    rng = random.Random(16)
    writes = [(rng.randrange(size // BLOCK) * BLOCK, rng.randbytes(BLOCK)) for _ in range(5)]
    damage(ours, writes)
    shutil.copyfile(ours, theirs)
    result, _ = synced(source_path, ours)
    literal = rsync_literal_bytes(source_path, theirs)
    assert file_digest(theirs) == file_digest(source_path)
    assert result.bytes_sent == 5 * BLOCK < literal


@pytest.mark.azure
def test_sync_with_a_page_blob_both_ways(tmp_path, azure_storage):
    """Resync onto a page blob replica, then failback from it onto the primary file."""
    size = 8 * MIB
    primary = random_disk(tmp_path / "primary.vhd", size, "vhd", seed=17)
    azure_storage.create_disk("vm1/disk0.vhd", size)
    rng = random.Random(18)
    with open_disk(primary) as source, azure_storage.open_disk("vm1/disk0.vhd") as replica:
        copy_disk(source, replica)
        replica.write(3 * MIB + 512, rng.randbytes(1024))  # two sectors inside one 4 KiB block
        replica.write(5 * MIB, bytes(BLOCK))  # data the source has, zeroed on the replica
        replica.flush()
        resync = sync_disks(source, replica)
        assert first_difference(source, replica) is None
        assert resync.bytes_sent == 2 * BLOCK and resync.target_root == compute_manifest(replica).root

        replica.write(7 * MIB - BLOCK, rng.randbytes(2 * BLOCK))  # the workload ran after failover
        replica.write_zeros(MIB, MIB)
        replica.flush()
    with azure_storage.open_disk("vm1/disk0.vhd") as replica, open_disk(primary, writable=True) as target:
        failback = sync_disks(replica, target)
        assert first_difference(replica, target) is None
        read_back = bytearray(size)
        replica.read_into(0, memoryview(read_back))
    assert failback.bytes_sent == 2 * BLOCK and failback.bytes_zeroed == MIB
    assert file_bytes(primary, 0, size) == bytes(read_back)
