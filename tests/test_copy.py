"""The initial replication copy between real raw and fixed-VHD files, checked byte for byte three ways:
the data path's own compare, plain file reads, and qemu-img compare."""
from __future__ import annotations

import random
import subprocess
import threading

import pytest
from instrumented_disks import (
    KIB,
    MIB,
    FailingDisk,
    GatedSource,
    InstrumentedDisk,
    allocated_bytes,
    assert_same_content,
    file_bytes,
    file_digest,
)

from datapath.compare import first_difference
from datapath.copy import copy_disk
from datapath.disk import create_disk, open_disk
from datapath.errors import AlignmentError, LowDiskSpaceError, SizeMismatchError
from datapath.manifest import compute_manifest

QEMU_TIMEOUT = 30


class CrashAfter(Exception):
    """Stands for a worker dying after it saw a checkpoint."""


def qemu_fmt(path) -> str:
    return "vpc" if str(path).endswith(".vhd") else "raw"


def qemu_identical(a, b) -> bool:
    proc = subprocess.run(["qemu-img", "compare", "-f", qemu_fmt(a), "-F", qemu_fmt(b), str(a), str(b)],
                          capture_output=True, text=True, timeout=QEMU_TIMEOUT)
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode == 0


# The bytes make_source writes (random data and zeros), and what a copy of its disk writes to a fresh
# target: the non-zero data rounded out to 4 KiB blocks.
DATA_OF_SOURCE = (3 * MIB + 700) + 4 * MIB + 9 * KIB + 2 * MIB + 1024
WRITTEN_OF_SOURCE = (3 * MIB + 4 * KIB) + 12 * KIB + 2 * MIB + 4 * KIB


def make_source(path, size, fmt, seed=1):
    """Random data, a run of written zeros, and holes: every kind of chunk a copy meets."""
    rng = random.Random(seed)
    create_disk(path, size, fmt)
    with open_disk(path, writable=True) as disk:
        disk.write(0, rng.randbytes(3 * MIB + 700))
        disk.write(5 * MIB, bytes(4 * MIB))  # allocated zeros
        disk.write(11 * MIB + 512, rng.randbytes(9 * KIB))
        disk.write(size - 4 * MIB, rng.randbytes(2 * MIB))
        disk.write(size - 1024, rng.randbytes(1024))
        disk.flush()
    return path


@pytest.mark.parametrize("source_fmt, target_fmt", [("raw", "vhd"), ("vhd", "raw"), ("vhd", "vhd")])
def test_copy_between_formats(tmp_path, source_fmt, target_fmt):
    size = 24 * MIB
    source_path = make_source(tmp_path / f"src.{source_fmt}", size, source_fmt)
    target_path = tmp_path / f"dst.{target_fmt}"
    create_disk(target_path, size, target_fmt)
    with open_disk(source_path) as source, open_disk(target_path, writable=True) as target:
        result = copy_disk(source, target)
        assert first_difference(source, target) is None
        source_manifest = compute_manifest(source)
        target_manifest = compute_manifest(target)
    assert_same_content(source_path, target_path, size)
    assert qemu_identical(source_path, target_path)
    assert result.manifest == source_manifest == target_manifest
    assert result.bytes_written == WRITTEN_OF_SOURCE
    assert result.bytes_written + result.zero_bytes_skipped == size
    # Data and written zeros are read, holes are not (not even inside a chunk).
    assert DATA_OF_SOURCE <= result.bytes_read <= allocated_bytes(source_path)


def test_sparse_source_keeps_target_sparse(tmp_path):
    size = 64 * MIB
    source_path = make_source(tmp_path / "src.raw", size, "raw")
    target_path = tmp_path / "dst.vhd"
    create_disk(target_path, size, "vhd")
    with open_disk(source_path) as source, open_disk(target_path, writable=True) as target:
        counted = InstrumentedDisk(source)
        result = copy_disk(counted, target)
    assert_same_content(source_path, target_path, size)
    # The written zeros (4 MiB), the holes, and the zeros around data inside chunks stay unallocated.
    assert result.bytes_written == WRITTEN_OF_SOURCE
    assert allocated_bytes(target_path) <= result.bytes_written + 64 * KIB
    assert allocated_bytes(target_path) <= allocated_bytes(source_path) - 4 * MIB + 64 * KIB
    assert DATA_OF_SOURCE <= counted.bytes_read == result.bytes_read <= allocated_bytes(source_path)


def test_zeros_around_data_inside_chunks_are_not_written(tmp_path):
    size = 8 * MIB
    source_path = tmp_path / "src.raw"
    create_disk(source_path, size)
    rng = random.Random(7)
    with open_disk(source_path, writable=True) as disk:
        disk.write(700 * KIB + 100, rng.randbytes(600 * KIB - 100))
        disk.write(5 * MIB - 10, rng.randbytes(20))
    target_path = tmp_path / "dst.vhd"
    create_disk(target_path, size, "vhd")
    with open_disk(source_path) as source, open_disk(target_path, writable=True) as target:
        counted = InstrumentedDisk(target, alignment=512)
        result = copy_disk(source, counted)
        assert first_difference(source, target) is None
    # From the first to the last non-zero 4 KiB block, merged across the chunk boundary.
    assert counted.writes == [(700 * KIB, 600 * KIB), (5 * MIB - 4 * KIB, 8 * KIB)]
    assert result.bytes_written == 608 * KIB
    assert allocated_bytes(target_path) <= 608 * KIB + 4 * KIB
    assert_same_content(source_path, target_path, size)


def test_trimmed_writes_span_exactly_the_non_zero_blocks_of_each_chunk(tmp_path):
    """Data at random sector offsets inside chunks, some at the very edges: each chunk is written from
    its first to its last non-zero 4 KiB block, found here block by block."""
    size, chunk_size, block = 16 * MIB, MIB, 4 * KIB
    rng = random.Random(11)
    content = bytearray(size)
    for index in range(size // chunk_size):
        base = index * chunk_size
        offsets = [0, chunk_size - 1, *(rng.randrange(chunk_size) for _ in range(3))]
        for offset in rng.sample(offsets, rng.randint(1, 3)):
            length = min(rng.choice([1, 100, 4 * KIB, 70 * KIB]), chunk_size - offset)
            content[base + offset:base + offset + length] = rng.randbytes(length)
    source_path = tmp_path / "src.raw"
    source_path.write_bytes(content)
    target_path = tmp_path / "dst.vhd"
    create_disk(target_path, size, "vhd")
    with open_disk(source_path) as source, open_disk(target_path, writable=True) as target:
        result = copy_disk(source, target, chunk_size=chunk_size)
    expected = 0
    for base in range(0, size, chunk_size):
        non_zero = [pos for pos in range(base, base + chunk_size, block) if any(content[pos:pos + block])]
        if non_zero:
            expected += non_zero[-1] + block - non_zero[0]
    assert result.bytes_written == expected
    assert result.bytes_written + result.zero_bytes_skipped == size
    assert_same_content(source_path, target_path, size)


def test_copy_over_stale_target_clears_it(tmp_path):
    """target_is_zero=False: zero chunks and holes of the source must overwrite what the target held."""
    size = 16 * MIB
    source_path = make_source(tmp_path / "src.raw", size, "raw")
    target_path = tmp_path / "dst.raw"
    create_disk(target_path, size)
    with open_disk(target_path, writable=True) as target:
        target.write(0, b"\xee" * size)
    with open_disk(source_path) as source, open_disk(target_path, writable=True) as target:
        copy_disk(source, target, target_is_zero=False)
        assert first_difference(source, target) is None
    assert_same_content(source_path, target_path, size)
    assert allocated_bytes(target_path) <= 8 * MIB + 64 * KIB  # the 8 data chunks; zeros were punched


def test_resume_after_crash_gives_an_identical_disk(tmp_path):
    size = 48 * MIB
    source_path = tmp_path / "src.raw"
    create_disk(source_path, size)
    with open_disk(source_path, writable=True) as disk:
        disk.write(0, random.Random(2).randbytes(size - 8 * MIB))  # then 8 MiB of hole
    target_path = tmp_path / "dst.vhd"
    create_disk(target_path, size, "vhd")
    checkpoints = []

    def crash_at_second_checkpoint(offset: int) -> None:
        checkpoints.append(offset)
        if len(checkpoints) == 2:
            raise CrashAfter(offset)

    with open_disk(source_path) as source, open_disk(target_path, writable=True) as target:
        tracked = InstrumentedDisk(target)
        gated = GatedSource(source, tracked, {8: 1, 16: 2})
        with pytest.raises(CrashAfter):
            copy_disk(gated, tracked, on_progress=crash_at_second_checkpoint, io_size=MIB, flush_interval=4 * MIB)
    checkpoint = checkpoints[-1]
    assert 0 < checkpoint < size and checkpoint % MIB == 0
    with open_disk(target_path, writable=True) as target:
        # Whatever the crashed copy left past its checkpoint counts for nothing.
        target.write(checkpoint, b"\x5a" * (size - checkpoint))
    with open_disk(source_path) as source, open_disk(target_path, writable=True) as target:
        resumed = copy_disk(source, target, start_offset=checkpoint, target_is_zero=False)
        assert first_difference(source, target) is None
    assert resumed.manifest is None
    assert resumed.bytes_read == size - 8 * MIB - checkpoint
    assert_same_content(source_path, target_path, size)
    assert qemu_identical(source_path, target_path)


def test_progress_offsets_are_monotonic_and_flushed(tmp_path):
    size = 40 * MIB
    source_path = tmp_path / "src.raw"
    create_disk(source_path, size)
    with open_disk(source_path, writable=True) as disk:
        disk.write(0, random.Random(3).randbytes(20 * MIB))
        disk.write(30 * MIB, random.Random(4).randbytes(10 * MIB))
    target_path = tmp_path / "dst.raw"
    create_disk(target_path, size)
    reported = []
    with open_disk(source_path) as source, open_disk(target_path, writable=True) as target:
        tracked = InstrumentedDisk(target)
        gated = GatedSource(source, tracked, {8: 1, 16: 2, 24: 3})

        def on_progress(offset: int) -> None:
            assert tracked.durable_below(offset), f"checkpoint {offset} claims unflushed writes"
            reported.append(offset)

        copy_disk(gated, tracked, on_progress=on_progress, io_size=MIB, flush_interval=4 * MIB)
    assert reported == sorted(set(reported)) and reported[-1] == size and len(reported) >= 3
    assert all(offset % MIB == 0 for offset in reported)
    assert tracked.flushes >= len(reported)
    assert_same_content(source_path, target_path, size)


def test_target_with_page_alignment(tmp_path):
    size = 16 * MIB
    source_path = make_source(tmp_path / "src.vhd", size, "vhd", seed=5)
    target_path = tmp_path / "dst.vhd"
    create_disk(target_path, size, "vhd")
    with open_disk(source_path) as source, open_disk(target_path, writable=True) as target:
        aligned = InstrumentedDisk(target, alignment=512)  # refuses any request not in whole pages
        copy_disk(source, aligned, chunk_size=64 * KIB, io_size=256 * KIB, target_is_zero=False)
        assert first_difference(source, target) is None
    assert aligned.writes and all(length <= 256 * KIB for _, length in aligned.writes)
    with open_disk(source_path) as source, open_disk(target_path, writable=True) as target:
        with pytest.raises(AlignmentError, match="alignment 4096"):
            copy_disk(source, InstrumentedDisk(target, alignment=4096), chunk_size=512)


@pytest.mark.parametrize("chunk_size, io_size", [(4 * MIB, MIB), (64 * KIB, 192 * KIB), (512, 4 * KIB)])
def test_chunk_and_io_sizes(tmp_path, chunk_size, io_size):
    size = 12 * MIB
    source_path = make_source(tmp_path / "src.raw", size, "raw", seed=6)
    target_path = tmp_path / "dst.raw"
    create_disk(target_path, size)
    with open_disk(source_path) as source, open_disk(target_path, writable=True) as target:
        result = copy_disk(source, target, chunk_size=chunk_size, io_size=io_size)
        assert result.manifest == compute_manifest(source, chunk_size)
    assert_same_content(source_path, target_path, size)


def test_size_mismatch_changes_nothing(tmp_path):
    source_path = make_source(tmp_path / "src.raw", 16 * MIB, "raw")
    target_path = tmp_path / "dst.vhd"
    create_disk(target_path, 17 * MIB, "vhd")
    before = file_digest(target_path)
    with open_disk(source_path) as source, open_disk(target_path, writable=True) as target:
        with pytest.raises(SizeMismatchError, match="dst.vhd"):
            copy_disk(source, target)
    assert file_digest(target_path) == before


@pytest.mark.parametrize("start_offset, error", [
    (MIB + 512, AlignmentError), (-MIB, ValueError), (17 * MIB, ValueError),
])
def test_bad_start_offset_changes_nothing(tmp_path, start_offset, error):
    source_path = make_source(tmp_path / "src.raw", 16 * MIB, "raw")
    target_path = tmp_path / "dst.raw"
    create_disk(target_path, 16 * MIB)
    before = file_digest(target_path)
    with open_disk(source_path) as source, open_disk(target_path, writable=True) as target:
        with pytest.raises(error, match="src.raw"):
            copy_disk(source, target, start_offset=start_offset)
    assert file_digest(target_path) == before


def test_write_failure_is_raised_and_threads_end(tmp_path):
    source_path = tmp_path / "src.raw"
    create_disk(source_path, 32 * MIB)
    with open_disk(source_path, writable=True) as disk:
        disk.write(0, b"\x07" * (32 * MIB))
    target_path = tmp_path / "dst.raw"
    create_disk(target_path, 32 * MIB)
    threads_before = threading.active_count()
    with open_disk(source_path) as source, open_disk(target_path, writable=True) as target:
        failing = FailingDisk(target, fail_write_at=3, error=LowDiskSpaceError("no space left (injected)"))
        with pytest.raises(LowDiskSpaceError, match="injected"):
            copy_disk(source, failing, io_size=MIB)
        assert len(failing.writes) == 2  # nothing written after the failure
    assert threading.active_count() == threads_before


def test_read_failure_is_raised_and_threads_end(tmp_path):
    source_path = make_source(tmp_path / "src.raw", 16 * MIB, "raw")
    target_path = tmp_path / "dst.raw"
    create_disk(target_path, 16 * MIB)
    threads_before = threading.active_count()
    with open_disk(source_path) as source, open_disk(target_path, writable=True) as target:
        with pytest.raises(OSError, match="injected"):
            copy_disk(FailingDisk(source, fail_read_at=2), target, io_size=MIB)
    assert threading.active_count() == threads_before


@pytest.mark.azure
def test_copy_to_a_page_blob_replica(tmp_path, azure_storage):
    """Asynchronous Put Page / Clear Pages writes, flushed on the flusher thread while more are issued."""
    size = 16 * MIB
    source_path = make_source(tmp_path / "src.vhd", size, "vhd", seed=8)
    azure_storage.create_disk("vm1/disk0.vhd", size)
    checkpoints = []
    with open_disk(source_path) as source, azure_storage.open_disk("vm1/disk0.vhd") as target:
        result = copy_disk(source, target, io_size=MIB, flush_interval=2 * MIB, on_progress=checkpoints.append)
        assert first_difference(source, target) is None
        assert compute_manifest(target) == result.manifest
        read_back = bytearray(size)
        target.read_into(0, memoryview(read_back))
    assert bytes(read_back) == file_bytes(source_path, 0, size)
    assert checkpoints == sorted(set(checkpoints)) and checkpoints[-1] == size
