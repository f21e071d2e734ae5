"""Local raw and fixed-VHD disk images as DiskEndpoints: real sparse files on the local filesystem,
with qemu-img and qemu-io as outside readers and writers."""
from __future__ import annotations

import io
import os
import subprocess
import threading
from pathlib import Path

import pytest

from datapath.buffers import aligned_buffer
from datapath.disk import (
    LocalDisk,
    _pwrite_all,
    create_disk,
    detect_format,
    format_size,
    open_disk,
    parse_size,
)
from datapath.endpoint import DiskEndpoint
from datapath.errors import DiskFormatError, DiskNotFoundError, LowDiskSpaceError
from datapath.vhd import FOOTER_SIZE, parse_footer

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
QEMU_TIMEOUT = 30
THREAD_TIMEOUT = 30


def pattern(length: int, seed: int) -> bytes:
    return (seed.to_bytes(4, "big") * (length // 4 + 1))[:length] if seed else os.urandom(length)


def file_bytes(path: Path, offset: int = 0, length: int = -1) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def read_disk(disk: LocalDisk, offset: int, length: int) -> bytes:
    buffer = aligned_buffer(length)
    try:
        with memoryview(buffer) as view:
            assert disk.read_into(offset, view) == length
            return bytes(view)
    finally:
        buffer.close()


def allocated_bytes(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def run(*command: str) -> str:
    return subprocess.run(command, check=True, capture_output=True, text=True, timeout=QEMU_TIMEOUT).stdout


# ---- sizes ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "text, size",
    [
        ("64M", 64 * MIB), ("10G", 10 * GIB), ("512K", 512 * KIB), ("1T", 1024 * GIB), ("4096", 4096),
        ("64MiB", 64 * MIB), ("10GB", 10 * GIB), ("10gb", 10 * GIB), ("64m", 64 * MIB),
        ("512kib", 512 * KIB), (" 2 G ", 2 * GIB), ("1.5G", 3 * GIB // 2), ("4096B", 4096), ("1P", 1024**5),
    ],
)
def test_parse_size_accepts_binary_units(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize(
    "text, problem",
    [
        ("", "expected a number"), ("abc", "expected a number"), ("10X", "expected a number"),
        ("G", "expected a number"), ("1.5", "whole number of bytes"), ("0", "greater than zero"),
        ("0M", "greater than zero"), ("-1G", "greater than zero"), ("1 0M", "expected a number"),
        ("10MM", "expected a number"),
    ],
)
def test_parse_size_rejects_junk_zero_and_negative(text, problem):
    with pytest.raises(ValueError, match=problem) as caught:
        parse_size(text)
    assert repr(text) in str(caught.value)


@pytest.mark.parametrize(
    "size, text",
    [(0, "0 B"), (512, "512 B"), (1536, "1.5 KiB"), (MIB - 1, "1.0 MiB"), (64 * MIB, "64.0 MiB"), (GIB, "1.0 GiB"),
     (8 * 1024 * GIB, "8.0 TiB")],
)
def test_format_size(size, text):
    assert format_size(size) == text


# ---- creating ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt, file_size", [("raw", 64 * MIB), ("vhd", 64 * MIB + FOOTER_SIZE)])
def test_created_disks_are_sparse_and_have_the_right_size(tmp_path, fmt, file_size):
    path = tmp_path / f"disk.{fmt}"
    create_disk(path, 64 * MIB, fmt)
    assert path.stat().st_size == file_size
    assert allocated_bytes(path) <= 4 * KIB * (fmt == "vhd")  # nothing but the footer's block
    with open_disk(path) as disk:
        assert (disk.format, disk.size) == (fmt, 64 * MIB)
        assert list(disk.data_extents()) == []
        assert read_disk(disk, 0, 64 * MIB) == bytes(64 * MIB)


def test_a_10_gib_vhd_is_created_sparse(tmp_path):
    path = tmp_path / "big.vhd"
    create_disk(path, 10 * GIB, "vhd")
    assert allocated_bytes(path) <= 4 * KIB
    assert parse_footer(file_bytes(path, 10 * GIB), source=str(path)).current_size == 10 * GIB


def test_create_refuses_to_overwrite(tmp_path):
    path = tmp_path / "existing.raw"
    path.write_bytes(b"precious" * 64)
    for fmt in ("raw", "vhd"):
        with pytest.raises(FileExistsError) as caught:
            create_disk(path, MIB, fmt)
        assert str(path) in str(caught.value)
    assert path.read_bytes() == b"precious" * 64


@pytest.mark.parametrize(
    "size, fmt, problem",
    [
        (1000, "raw", "positive multiple of 512"), (0, "raw", "positive multiple of 512"),
        (-512, "raw", "positive multiple of 512"), (MIB + 512, "vhd", "whole number of MiB"),
        (0, "vhd", "whole number of MiB"), (8 * 1024 * GIB, "vhd", "8 TiB"),
    ],
)
def test_create_rejects_bad_sizes_and_creates_nothing(tmp_path, size, fmt, problem):
    path = tmp_path / "bad.img"
    with pytest.raises(DiskFormatError, match=problem) as caught:
        create_disk(path, size, fmt)
    assert str(path) in str(caught.value)
    assert not path.exists()


def test_create_rejects_unknown_format(tmp_path):
    with pytest.raises(ValueError, match="unknown disk format 'qcow2'"):
        create_disk(tmp_path / "d.qcow2", MIB, "qcow2")
    assert list(tmp_path.iterdir()) == []


# ---- opening ----------------------------------------------------------------------------------------

def test_open_missing_disk_names_the_path(tmp_path):
    missing = tmp_path / "missing.vhd"
    with pytest.raises(DiskNotFoundError, match=str(missing)):
        open_disk(missing)
    with pytest.raises(DiskNotFoundError, match=str(missing)):
        detect_format(missing)


def test_open_rejects_what_is_not_a_disk_image(tmp_path):
    for writable in (False, True):
        with pytest.raises(DiskFormatError, match=f"{tmp_path} is not a regular file"):
            open_disk(tmp_path, writable)
    odd = tmp_path / "odd.raw"
    odd.write_bytes(bytes(1000))
    with pytest.raises(DiskFormatError, match=f"{odd}: .*1000 bytes"):
        open_disk(odd)
    empty = tmp_path / "empty.raw"
    empty.touch()
    with pytest.raises(DiskFormatError, match=f"{empty}: .*0 bytes"):
        open_disk(empty)


def test_local_disk_is_a_disk_endpoint(tmp_path):
    path = tmp_path / "d.vhd"
    create_disk(path, MIB, "vhd")
    with open_disk(path, writable=True) as disk:
        assert isinstance(disk, DiskEndpoint)
        assert (disk.name, disk.path, disk.alignment) == (str(path), path, 1)
        assert disk.fileno() >= 0
        disk.flush()
    assert disk.closed
    disk.close()  # closing twice is harmless
    with pytest.raises(ValueError, match="closed"):
        read_disk(disk, 0, 512)


def test_detect_format(tmp_path):
    create_disk(tmp_path / "a.vhd", MIB, "vhd")
    create_disk(tmp_path / "a.raw", MIB, "raw")
    assert detect_format(tmp_path / "a.vhd") == "vhd"
    assert detect_format(tmp_path / "a.raw") == "raw"


def test_raw_disk_ending_in_a_vhd_cookie_is_not_silently_raw(tmp_path):
    path = tmp_path / "suspicious.raw"
    create_disk(path, MIB, "raw")
    with open_disk(path, writable=True) as disk:
        disk.write(MIB - 512, b"conectix" + pattern(504, 7))
    with pytest.raises(DiskFormatError, match=f"{path}: VHD footer checksum mismatch"):
        detect_format(path)


# ---- reading and writing ----------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["raw", "vhd"])
def test_writes_read_back_byte_for_byte(tmp_path, fmt):
    path = tmp_path / f"d.{fmt}"
    create_disk(path, 16 * MIB, fmt)
    writes = [(0, pattern(4096, 0)), (12345, pattern(70000, 0)), (5 * MIB - 3, pattern(MIB + 7, 0)),
              (16 * MIB - 1000, pattern(1000, 0))]
    expected = bytearray(16 * MIB)
    with open_disk(path, writable=True) as disk:
        for offset, data in writes:
            disk.write(offset, data)
            expected[offset:offset + len(data)] = data
        disk.write(MIB, memoryview(pattern(8192, 3))[100:200])  # memoryview slices are written as is
        expected[MIB:MIB + 100] = pattern(8192, 3)[100:200]
        disk.flush()
        assert read_disk(disk, 0, 16 * MIB) == expected
        assert read_disk(disk, 12340, 20) == expected[12340:12360]
    assert file_bytes(path, 0, 16 * MIB) == expected
    if fmt == "vhd":
        assert parse_footer(file_bytes(path, 16 * MIB), source=str(path)).current_size == 16 * MIB


def test_writes_and_reads_outside_the_disk_are_refused_and_leave_the_footer_intact(tmp_path):
    path = tmp_path / "d.vhd"
    create_disk(path, MIB, "vhd")
    footer = file_bytes(path, MIB)
    with open_disk(path, writable=True) as disk:
        for offset, length in [(MIB - 1, 2), (MIB, 1), (-1, 1), (0, MIB + 1), (MIB + 512, 512)]:
            with pytest.raises(ValueError, match=f"{path}: cannot write"):
                disk.write(offset, bytes(length))
            with pytest.raises(ValueError, match=f"{path}: cannot write zeros"):
                disk.write_zeros(offset, length)
            with pytest.raises(ValueError, match=f"{path}: cannot read"):
                read_disk(disk, offset, length)
        disk.write(MIB, b"")  # an empty write at the end is inside the disk
        disk.write(MIB - 1, b"\xff")
    assert file_bytes(path, MIB) == footer
    assert file_bytes(path, MIB - 1, 1) == b"\xff"
    assert path.stat().st_size == MIB + FOOTER_SIZE


def test_read_only_disk_refuses_writes(tmp_path):
    path = tmp_path / "d.raw"
    create_disk(path, MIB, "raw")
    with open_disk(path) as disk:
        with pytest.raises(io.UnsupportedOperation, match=f"{path}: the disk is open read-only"):
            disk.write(0, b"x")
        with pytest.raises(ValueError, match="read-only"):
            disk.write_zeros(0, 512)
    assert allocated_bytes(path) == 0


def test_reading_where_the_file_was_cut_short_gives_zeros(tmp_path):
    path = tmp_path / "d.raw"
    create_disk(path, MIB, "raw")
    with open_disk(path, writable=True) as disk:
        disk.write(0, b"\x11" * MIB)
        os.truncate(path, MIB // 2)  # someone else shrinks the file under an open disk
        assert read_disk(disk, MIB // 2 - 4, 8) == b"\x11" * 4 + bytes(4)
        assert read_disk(disk, MIB - 512, 512) == bytes(512)


def test_concurrent_writes_and_reads_at_different_offsets(tmp_path):
    path = tmp_path / "d.vhd"
    create_disk(path, 32 * MIB, "vhd")
    chunk = MIB
    chunks = {i: pattern(chunk, i + 1) for i in range(32)}
    errors: list[BaseException] = []

    def worker(disk: LocalDisk, indexes: range, action: str) -> None:
        try:
            for i in indexes:
                if action == "write":
                    disk.write(i * chunk, chunks[i])
                else:
                    assert read_disk(disk, i * chunk, chunk) == chunks[i]
        except BaseException as exc:  # handed back to the test thread
            errors.append(exc)

    with open_disk(path, writable=True) as disk:
        for action in ("write", "read"):
            threads = [threading.Thread(target=worker, args=(disk, range(k, 32, 4), action)) for k in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(THREAD_TIMEOUT)
                assert not thread.is_alive()
            assert errors == []
    assert file_bytes(path, 0, 32 * MIB) == b"".join(chunks[i] for i in range(32))


def test_no_space_is_a_recoverable_low_disk_space_error():
    # /dev/full answers every write with ENOSPC, as a full filesystem would.
    fd = os.open("/dev/full", os.O_WRONLY)
    try:
        with pytest.raises(LowDiskSpaceError, match="no space left writing replica.vhd at offset 4096"):
            _pwrite_all(fd, memoryview(b"data"), 4096, "replica.vhd")
    finally:
        os.close(fd)


# ---- holes and extents ------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["raw", "vhd"])
def test_data_extents_find_exactly_the_written_regions(tmp_path, fmt):
    path = tmp_path / f"d.{fmt}"
    create_disk(path, 64 * MIB, fmt)
    regions = [(0, 4 * KIB), (MIB, 64 * KIB), (10 * MIB + 8 * KIB, 12 * KIB), (64 * MIB - 4 * KIB, 4 * KIB)]
    with open_disk(path, writable=True) as disk:
        for offset, length in regions:
            disk.write(offset, pattern(length, 9))
        assert list(disk.data_extents()) == regions
        assert list(disk.data_extents(MIB + 4 * KIB, 10 * MIB)) == [
            (MIB + 4 * KIB, 60 * KIB), (10 * MIB + 8 * KIB, 12 * KIB)
        ]
        assert list(disk.data_extents(2 * MIB, 8 * MIB)) == []
        # A length past the end is clipped to the disk; the footer is never an extent.
        assert list(disk.data_extents(60 * MIB, 100 * MIB)) == [(64 * MIB - 4 * KIB, 4 * KIB)]
        assert list(disk.data_extents(64 * MIB)) == []
        with pytest.raises(ValueError, match="outside"):
            list(disk.data_extents(64 * MIB + 1))
        with pytest.raises(ValueError, match="non-negative"):
            list(disk.data_extents(0, -1))


def test_fully_written_vhd_has_one_extent_ending_at_the_virtual_size(tmp_path):
    path = tmp_path / "full.vhd"
    create_disk(path, 8 * MIB, "vhd")
    with open_disk(path, writable=True) as disk:
        disk.write(0, pattern(8 * MIB, 5))
        assert list(disk.data_extents()) == [(0, 8 * MIB)]


@pytest.mark.parametrize("fmt", ["raw", "vhd"])
def test_write_zeros_punches_a_hole(tmp_path, fmt):
    path = tmp_path / f"d.{fmt}"
    create_disk(path, 8 * MIB, fmt)
    data = pattern(4 * MIB, 0)
    with open_disk(path, writable=True) as disk:
        disk.write(2 * MIB, data)
        disk.flush()
        before = allocated_bytes(path)
        disk.write_zeros(3 * MIB, 2 * MIB)
        assert before - allocated_bytes(path) == 2 * MIB
        assert read_disk(disk, 3 * MIB, 2 * MIB) == bytes(2 * MIB)
        assert read_disk(disk, 2 * MIB, MIB) == data[:MIB]
        assert read_disk(disk, 5 * MIB, MIB) == data[3 * MIB:]
        assert list(disk.data_extents()) == [(2 * MIB, MIB), (5 * MIB, MIB)]
        # Unaligned ranges are zeroed exactly, partial blocks included.
        disk.write_zeros(2 * MIB + 1000, 5000)
        assert read_disk(disk, 2 * MIB, 8192) == data[:1000] + bytes(5000) + data[6000:8192]
        disk.write_zeros(0, 0)
    if fmt == "vhd":
        assert parse_footer(file_bytes(path, 8 * MIB), source=str(path)).current_size == 8 * MIB


def test_zeros_are_written_where_a_hole_cannot_be_punched(tmp_path):
    path = tmp_path / "d.raw"
    create_disk(path, 4 * MIB, "raw")
    with open_disk(path, writable=True) as disk:
        disk.write(0, b"\xee" * 4 * MIB)
        disk._write_zero_bytes(100, 3 * MIB)  # the fallback write_zeros takes without hole punching
        assert read_disk(disk, 0, 4 * MIB) == b"\xee" * 100 + bytes(3 * MIB) + b"\xee" * (MIB - 100)


# ---- qemu as the outside reader and writer ----------------------------------------------------------

def test_qemu_reads_what_we_wrote_into_a_vhd(tmp_path):
    path = tmp_path / "ours.vhd"
    create_disk(path, 8 * MIB, "vhd")
    with open_disk(path, writable=True) as disk:
        disk.write(777, pattern(3 * MIB, 0))
        disk.write(8 * MIB - 512, b"\x5a" * 512)
        disk.flush()
        expected = read_disk(disk, 0, 8 * MIB)
    converted = tmp_path / "converted.raw"
    run("qemu-img", "convert", "-f", "vpc", "-O", "raw", str(path), str(converted))
    assert converted.read_bytes() == expected


def test_we_read_what_qemu_wrote_into_a_vhd(tmp_path):
    path = tmp_path / "qemu.vhd"
    run("qemu-img", "create", "-q", "-f", "vpc", "-o", "subformat=fixed,force_size=on", str(path), "8M")
    run("qemu-io", "-f", "vpc", "-c", "write -P 0xab 1M 64k", "-c", "write -P 0x01 8388096 512", str(path))
    with open_disk(path) as disk:
        assert disk.size == 8 * MIB
        assert read_disk(disk, MIB - 1, 64 * KIB + 2) == b"\x00" + b"\xab" * 64 * KIB + b"\x00"
        assert read_disk(disk, 8 * MIB - 512, 512) == b"\x01" * 512
        # qemu-img create writes zeros over the first block (so later probes see a block), which makes
        # it an extent of zeros: extents may hold zeros, only what is outside them must be zero.
        assert list(disk.data_extents()) == [(0, 4 * KIB), (MIB, 64 * KIB), (8 * MIB - 4 * KIB, 4 * KIB)]
        assert read_disk(disk, 0, 4 * KIB) == bytes(4 * KIB)
