"""Chunk manifests of real sparse raw and VHD files: checksums checked against mmh3 of plain file reads,
holes never read, binary and JSON forms round-tripped and refused when damaged."""
from __future__ import annotations

import json
import random
import struct
import threading

import mmh3
import pytest
from instrumented_disks import GIB, KIB, MIB, FailingDisk, InstrumentedDisk, allocated_bytes, file_bytes

from datapath.disk import create_disk, open_disk
from datapath.errors import SizeMismatchError
from datapath.manifest import (
    DEFAULT_CHUNK_SIZE,
    HASH_SIZE,
    Manifest,
    ManifestFormatError,
    ReadAhead,
    compute_manifest,
    data_windows,
    diff_manifests,
    is_zero,
    zero_chunk_hash,
)


def expected_hashes(path, size: int, chunk_size: int) -> bytes:
    """Chunk checksums from a plain read of the file, independent of compute_manifest."""
    data = file_bytes(path, 0, size)
    return b"".join(mmh3.hash_bytes(data[pos:pos + chunk_size]) for pos in range(0, size, chunk_size))


def make_disk(path, size, fmt="raw", writes=()):
    create_disk(path, size, fmt)
    with open_disk(path, writable=True) as disk:
        for offset, data in writes:
            disk.write(offset, data)
        disk.flush()
    return path


def test_known_content_chunks_and_root(tmp_path):
    rng = random.Random(1)
    size = 16 * MIB
    path = make_disk(tmp_path / "d.vhd", size, "vhd", [
        (0, rng.randbytes(3 * MIB + 100)),
        (7 * MIB + 4096, rng.randbytes(5000)),
        (size - 700, rng.randbytes(700)),
    ])
    with open_disk(path) as disk:
        manifest = compute_manifest(disk)
    assert (manifest.size, manifest.chunk_size, manifest.chunk_count) == (size, DEFAULT_CHUNK_SIZE, 16)
    assert manifest.hashes == expected_hashes(path, size, DEFAULT_CHUNK_SIZE)
    assert manifest.chunk_hash(7) == mmh3.hash_bytes(file_bytes(path, 7 * MIB, MIB))
    root = mmh3.hash_bytes(struct.pack("<QQ", size, DEFAULT_CHUNK_SIZE) + manifest.hashes)
    assert manifest.root == root and manifest.root_hex == root.hex()


def test_zero_chunks_and_holes_hash_alike(tmp_path):
    size = 8 * MIB
    written_zeros = make_disk(tmp_path / "zeros.raw", size, writes=[(0, bytes(size))])
    sparse = make_disk(tmp_path / "sparse.raw", size)
    assert allocated_bytes(written_zeros) >= size and allocated_bytes(sparse) == 0
    with open_disk(written_zeros) as a, open_disk(sparse) as b:
        counted = InstrumentedDisk(b)
        zeros, holes = compute_manifest(a), compute_manifest(counted)
    assert zeros == holes
    assert zeros.hashes == zero_chunk_hash(MIB) * 8 == expected_hashes(sparse, size, MIB)
    assert counted.reads == []


def test_sparse_2gib_disk_reads_only_its_data(tmp_path):
    size = 2 * GIB
    rng = random.Random(2)
    writes = [(5 * MIB + 12345, rng.randbytes(4096)), (1500 * MIB, rng.randbytes(2 * MIB)),
              (size - 512, rng.randbytes(512))]
    path = make_disk(tmp_path / "big.vhd", size, "vhd", writes)
    with open_disk(path) as disk:
        counted = InstrumentedDisk(disk)
        manifest = compute_manifest(counted)
    # Only the data's filesystem blocks are read: not the holes, not even inside the chunks.
    assert sum(len(data) for _, data in writes) <= counted.bytes_read <= allocated_bytes(path)
    assert manifest.chunk_count == 2048
    for offset, data in writes:
        for index in range(offset // MIB, (offset + len(data) - 1) // MIB + 1):
            assert manifest.chunk_hash(index) == mmh3.hash_bytes(file_bytes(path, index * MIB, MIB))
    differing = {i for i in range(2048) if manifest.chunk_hash(i) != zero_chunk_hash(MIB)}
    assert differing == {5, 1500, 1501, 2047}


@pytest.mark.parametrize("size, chunk_size", [(8 * MIB + 3 * 512, MIB), (8 * MIB, 3 * MIB), (4096, 64 * KIB)])
def test_last_chunk_may_be_short(tmp_path, size, chunk_size):
    path = make_disk(tmp_path / "d.raw", size, writes=[(size - 1024, random.Random(3).randbytes(1024))])
    with open_disk(path) as disk:
        manifest = compute_manifest(disk, chunk_size, read_size=2 * MIB)
    assert manifest.chunk_count == -(-size // chunk_size)
    assert manifest.hashes == expected_hashes(path, size, chunk_size)
    assert manifest.chunk_extent(manifest.chunk_count - 1)[1] == size - (manifest.chunk_count - 1) * chunk_size


def test_read_size_does_not_change_the_result(tmp_path):
    rng = random.Random(4)
    writes = [(i * MIB + 17, rng.randbytes(300 * KIB)) for i in (0, 3, 4, 9)]
    path = make_disk(tmp_path / "d.raw", 12 * MIB, writes=writes)
    with open_disk(path) as disk:
        manifests = {compute_manifest(disk, 512 * KIB, read_size=read).root for read in (512 * KIB, 3 * MIB, 64 * MIB)}
    assert len(manifests) == 1


def merged(ranges):
    out = []
    for low, high in ranges:
        if out and out[-1][1] == low:
            out[-1] = (out[-1][0], high)
        else:
            out.append((low, high))
    return out


def test_data_windows_cover_the_data_in_bounded_chunk_aligned_windows(tmp_path):
    size, chunk, window = 64 * MIB, MIB, 8 * MIB
    writes = [(100, b"a" * 10), (3 * MIB - 5, b"b" * 10), (10 * MIB + 4096, b"c" * (20 * MIB)),
              (40 * MIB, b"d" * 4096), (40 * MIB + 8192, b"e" * 4096), (size - 512, b"f" * 512)]
    path = make_disk(tmp_path / "d.raw", size, writes=writes)
    with open_disk(path) as disk:
        plan = list(data_windows(disk, chunk, window))
        extents = merged((offset, offset + length) for offset, length in disk.data_extents())
        with ReadAhead([disk], iter(plan), window) as reader:
            read_back = []
            for got in reader:
                read_back.append((got.offset, got.view.tobytes()))
                reader.release(got)
    previous_end = 0
    for planned in plan:
        assert planned.offset % chunk == 0 and 0 < planned.length <= window
        assert planned.offset >= previous_end and planned.offset + planned.length <= size
        assert all(planned.offset <= low < high <= planned.offset + planned.length for low, high in planned.extents)
        previous_end = planned.offset + planned.length
    assert merged(extent for planned in plan for extent in planned.extents) == extents
    touched = {index for low, high in extents for index in range(low // chunk, (high - 1) // chunk + 1)}
    assert {index for planned in plan for index in range(planned.offset // chunk,
                                                         (planned.offset + planned.length) // chunk)} == touched
    for offset, data in read_back:  # holes zero-filled, data read
        assert data == file_bytes(path, offset, len(data))


def test_progress_is_monotonic_and_ends_at_size(tmp_path):
    path = make_disk(tmp_path / "d.raw", 32 * MIB, writes=[(i * MIB, b"x" * 100) for i in range(0, 32, 3)])
    offsets = []
    with open_disk(path) as disk:
        compute_manifest(disk, on_progress=offsets.append, read_size=4 * MIB)
    assert offsets == sorted(offsets) and offsets[-1] == 32 * MIB and len(offsets) > 2


def test_read_error_is_raised_and_the_reader_stops(tmp_path):
    path = make_disk(tmp_path / "d.raw", 16 * MIB, writes=[(0, b"\x01" * (16 * MIB))])
    threads_before = threading.active_count()
    with open_disk(path) as disk:
        failing = FailingDisk(disk, fail_read_at=3)
        with pytest.raises(OSError, match="injected"):
            compute_manifest(failing, read_size=MIB)
    assert threading.active_count() == threads_before


def test_bad_chunk_size_is_refused(tmp_path):
    path = make_disk(tmp_path / "d.raw", MIB)
    with open_disk(path) as disk:
        for bad in (0, -512, 1000, 1.5):
            with pytest.raises(ValueError, match="chunk size"):
                compute_manifest(disk, bad)


def sample_manifest(tmp_path) -> Manifest:
    rng = random.Random(5)
    path = make_disk(tmp_path / "s.raw", 5 * MIB + 512, writes=[(MIB + 3, rng.randbytes(MIB)), (5 * MIB, b"end")])
    with open_disk(path) as disk:
        return compute_manifest(disk)


def test_json_and_binary_round_trip(tmp_path):
    manifest = sample_manifest(tmp_path)
    doc = json.loads(manifest.to_json())
    assert doc["root"] == manifest.root_hex and len(doc["hashes"]) == manifest.chunk_count == 6
    assert Manifest.from_json(manifest.to_json()) == manifest
    data = manifest.to_bytes()
    assert len(data) == 56 + 6 * HASH_SIZE
    assert Manifest.from_bytes(data) == manifest
    assert Manifest.from_bytes(memoryview(data)) == manifest


def flip(data: bytes, position: int, mask: int) -> bytes:
    damaged = bytearray(data)
    damaged[position] ^= mask
    return bytes(damaged)


@pytest.mark.parametrize("damage", [
    pytest.param(lambda data: data[:-1], id="truncated"),
    pytest.param(lambda data: data + b"\0", id="extended"),
    pytest.param(lambda data: data[:40], id="header-only"),
    pytest.param(lambda data: b"", id="empty"),
    pytest.param(lambda data: flip(data, 60, 0x01), id="garbled-hash"),
    pytest.param(lambda data: flip(data, 16, 0x02), id="garbled-size"),  # same chunk count, other root
    pytest.param(lambda data: flip(data, 32, 0x01), id="garbled-chunk-count"),
    pytest.param(lambda data: b"NOTAMNFS" + data[8:], id="wrong-magic"),
])
def test_damaged_binary_manifest_is_refused(tmp_path, damage):
    data = sample_manifest(tmp_path).to_bytes()
    with pytest.raises(ManifestFormatError, match="vm1/disk0.manifest"):
        Manifest.from_bytes(damage(data), name="vm1/disk0.manifest")


def test_damaged_json_manifest_is_refused(tmp_path):
    manifest = sample_manifest(tmp_path)
    doc = json.loads(manifest.to_json())
    cases = [
        "not json",
        json.dumps(doc | {"root": "00" * 16}),
        json.dumps(doc | {"hashes": doc["hashes"][:-1]}),
        json.dumps(doc | {"hashes": ["zz" * 16] + doc["hashes"][1:]}),
        json.dumps(doc | {"size": doc["size"] + 512}),
        json.dumps(doc | {"format": "other"}),
    ]
    for text in cases:
        with pytest.raises(ManifestFormatError, match="m.json"):
            Manifest.from_json(text, name="m.json")


def test_manifest_refuses_inconsistent_fields():
    with pytest.raises(ManifestFormatError, match="needs 32 bytes"):
        Manifest(2 * MIB, MIB, b"\0" * 16)


def test_diff_manifests(tmp_path):
    rng = random.Random(6)
    base = rng.randbytes(10 * MIB)
    changed = bytearray(base)
    for offset in (0, 3 * MIB + 5, 3 * MIB + 9, 9 * MIB + MIB - 1):
        changed[offset] ^= 0xFF
    a = make_disk(tmp_path / "a.raw", 10 * MIB, writes=[(0, base)])
    b = make_disk(tmp_path / "b.vhd", 10 * MIB, "vhd", writes=[(0, bytes(changed))])
    with open_disk(a) as da, open_disk(b) as db:
        ma, mb = compute_manifest(da), compute_manifest(db)
    assert diff_manifests(ma, mb) == [0, 3, 9]
    assert diff_manifests(ma, ma) == []
    with pytest.raises(SizeMismatchError):
        diff_manifests(ma, Manifest(11 * MIB, MIB, ma.hashes + ma.chunk_hash(0)))
    with pytest.raises(SizeMismatchError):
        diff_manifests(ma, Manifest(10 * MIB, 2 * MIB, ma.hashes[:5 * HASH_SIZE]))


def test_diff_of_many_chunks_finds_each_difference():
    rng = random.Random(7)
    count = 5000
    hashes = rng.randbytes(count * HASH_SIZE)
    changed_at = sorted(rng.sample(range(count), 40))
    other = bytearray(hashes)
    for index in changed_at:
        other[index * HASH_SIZE + 7] ^= 0x10
    a, b = Manifest(count * MIB, MIB, hashes), Manifest(count * MIB, MIB, bytes(other))
    assert diff_manifests(a, b) == changed_at


def test_is_zero_is_exact():
    block = bytearray(3 * MIB + 5)
    assert is_zero(block)
    block[-1] = 1
    assert not is_zero(block)
    assert not is_zero(memoryview(block)[2 * MIB:])
    assert is_zero(memoryview(block)[:-1])
