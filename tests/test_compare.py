"""first_difference on real raw and VHD files: the exact first differing offset wherever it lies (in data,
in a hole of one side, at either end), holes common to both never read."""
from __future__ import annotations

import random

import pytest
from instrumented_disks import GIB, KIB, MIB, FailingDisk, InstrumentedDisk

from datapath.compare import first_difference, same_bytes
from datapath.disk import create_disk, open_disk
from datapath.errors import SizeMismatchError

SIZE = 24 * MIB


@pytest.fixture
def twins(tmp_path):
    """A raw and a VHD disk with the same content: random data, written zeros and holes."""
    rng = random.Random(9)
    writes = [(0, rng.randbytes(2 * MIB + 3)), (6 * MIB, bytes(3 * MIB)), (13 * MIB + 100, rng.randbytes(MIB)),
              (SIZE - 4096, rng.randbytes(4096))]
    paths = tmp_path / "a.raw", tmp_path / "b.vhd"
    for path, fmt in zip(paths, ("raw", "vhd"), strict=True):
        create_disk(path, SIZE, fmt)
        with open_disk(path, writable=True) as disk:
            for offset, data in writes:
                disk.write(offset, data)
    return paths


def test_equal_disks(twins):
    with open_disk(twins[0]) as a, open_disk(twins[1]) as b:
        assert first_difference(a, b) is None
        assert first_difference(b, a) is None


@pytest.mark.parametrize("offset", [
    0, 1, 2 * MIB + 2, 2 * MIB + 3, 4 * MIB, 7 * MIB + 4095, 13 * MIB + 100 + 4096 * 3 + 1, 16 * MIB - 1,
    SIZE - 4096, SIZE - 1,
])
def test_first_difference_is_exact(twins, offset):
    """Changes in data, in written zeros, and in a hole of the other side; the first one is found."""
    with open_disk(twins[1], writable=True) as b:
        b.write(offset, b"\x80")
        if offset + 5000 < SIZE:
            b.write(offset + 5000, b"\x81")  # a later difference must not hide the first
    with open_disk(twins[0]) as a, open_disk(twins[1]) as b:
        assert first_difference(a, b) == offset
        assert first_difference(b, a) == offset


def test_common_holes_are_not_read(tmp_path):
    size = GIB
    paths = tmp_path / "a.raw", tmp_path / "b.raw"
    for path in paths:
        create_disk(path, size)
        with open_disk(path, writable=True) as disk:
            disk.write(300 * MIB, b"same" * 1024)
    with open_disk(paths[0]) as a, open_disk(paths[1]) as b:
        counted_a, counted_b = InstrumentedDisk(a), InstrumentedDisk(b)
        assert first_difference(counted_a, counted_b) is None
    assert counted_a.bytes_read == counted_b.bytes_read <= 64 * KIB


def test_data_on_one_side_only(tmp_path):
    paths = tmp_path / "a.raw", tmp_path / "b.raw"
    for path in paths:
        create_disk(path, 8 * MIB)
    with open_disk(paths[1], writable=True) as disk:
        disk.write(5 * MIB + 77, b"\x01")
        disk.write(5 * MIB, bytes(77))  # allocated zeros before it change nothing
    with open_disk(paths[0]) as a, open_disk(paths[1]) as b:
        assert first_difference(a, b) == 5 * MIB + 77


def test_different_sizes(tmp_path):
    create_disk(tmp_path / "a.raw", 8 * MIB)
    create_disk(tmp_path / "b.vhd", 9 * MIB, "vhd")
    with open_disk(tmp_path / "a.raw") as a, open_disk(tmp_path / "b.vhd") as b:
        with pytest.raises(SizeMismatchError, match="b.vhd"):
            first_difference(a, b)


def test_read_error_is_raised(twins):
    with open_disk(twins[0]) as a, open_disk(twins[1]) as b:
        with pytest.raises(OSError, match="injected"):
            first_difference(a, FailingDisk(b, fail_read_at=2), read_size=MIB)


def test_same_bytes():
    data = random.Random(1).randbytes(3 * MIB + 1)
    other = bytearray(data)
    assert same_bytes(memoryview(data), memoryview(other))
    other[-1] ^= 1
    assert not same_bytes(memoryview(data), memoryview(other))
    assert not same_bytes(memoryview(data), memoryview(other)[:-1])
