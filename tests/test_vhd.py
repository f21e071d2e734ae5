"""The fixed VHD footer, checked against the spec's layout and against qemu-img as an outside reader."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from datapath.disk import create_disk, detect_format, open_disk
from datapath.errors import DiskFormatError
from datapath.vhd import (
    FOOTER_SIZE,
    MAX_CHS_SECTORS,
    MAX_VIRTUAL_SIZE,
    VhdFooter,
    build_footer,
    chs_geometry,
    parse_footer,
)

MIB = 1024 * 1024
GIB = 1024 * MIB
QEMU_TIMEOUT = 30


def qemu_img(*args: str) -> str:
    return subprocess.run(
        ["qemu-img", *args], check=True, capture_output=True, text=True, timeout=QEMU_TIMEOUT
    ).stdout


def qemu_info(path: Path, fmt: str | None = None) -> dict:
    forced = ["-f", fmt] if fmt else []
    return json.loads(qemu_img("info", *forced, "--output=json", str(path)))


def tail(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(-FOOTER_SIZE, os.SEEK_END)
        return f.read()


def rewrite_tail(path: Path, footer: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(-FOOTER_SIZE, os.SEEK_END)
        f.write(footer)


def with_valid_checksum(footer: bytes) -> bytes:
    unsummed = footer[:64] + bytes(4) + footer[68:]
    return unsummed[:64] + (~sum(unsummed) & 0xFFFFFFFF).to_bytes(4, "big") + unsummed[68:]


def test_footer_fields_sit_where_the_spec_puts_them():
    disk_uuid = uuid.uuid4().bytes
    footer = build_footer(64 * MIB, disk_uuid=disk_uuid, timestamp=123456789)
    assert len(footer) == FOOTER_SIZE
    assert footer[0:8] == b"conectix"
    assert struct.unpack(">I", footer[8:12])[0] == 2
    assert struct.unpack(">I", footer[12:16])[0] == 0x00010000
    assert footer[16:24] == b"\xff" * 8
    assert struct.unpack(">I", footer[24:28])[0] == 123456789
    assert footer[28:32] == b"win "
    assert footer[36:40] == b"Wi2k"
    assert struct.unpack(">QQ", footer[40:56]) == (64 * MIB, 64 * MIB)
    assert struct.unpack(">HBB", footer[56:60]) == chs_geometry(64 * MIB)
    assert struct.unpack(">I", footer[60:64])[0] == 2
    assert footer[68:84] == disk_uuid
    assert footer[84] == 0
    assert footer[85:] == bytes(427)


def test_checksum_is_ones_complement_of_the_byte_sum():
    footer = build_footer(10 * GIB)
    byte_sum = sum(footer[:64]) + sum(footer[68:])
    assert int.from_bytes(footer[64:68], "big") == ~byte_sum & 0xFFFFFFFF


def test_footer_round_trip():
    disk_uuid = uuid.uuid4().bytes
    footer = parse_footer(build_footer(37 * MIB, disk_uuid=disk_uuid, timestamp=42), source="t.vhd")
    cylinders, heads, sectors = chs_geometry(37 * MIB)
    assert footer == VhdFooter(
        current_size=37 * MIB, original_size=37 * MIB, cylinders=cylinders, heads=heads,
        sectors=sectors, disk_type=2, disk_uuid=disk_uuid, timestamp=42, creator_app=b"win ",
    )


def test_default_uuid_is_fresh_and_timestamp_is_now():
    seconds_since_2000 = int(time.time()) - 946684800
    first, second = (parse_footer(build_footer(MIB), source="t") for _ in range(2))
    assert first.disk_uuid != second.disk_uuid
    assert abs(first.timestamp - seconds_since_2000) <= 5


@pytest.mark.parametrize(
    "size, geometry",
    [
        (MIB, (30, 4, 17)),  # 2048 sectors: 17 per track, at least 4 heads
        (64 * MIB, (963, 8, 17)),
        (10 * GIB, (20805, 16, 63)),
        (MAX_VIRTUAL_SIZE - MIB + 512, (65535, 16, 255)),  # beyond CHS: capped at the spec maximum
    ],
)
def test_chs_geometry_follows_the_spec(size, geometry):
    assert chs_geometry(size) == geometry
    cylinders, heads, sectors = geometry
    assert cylinders * heads * sectors <= min(size // 512, MAX_CHS_SECTORS)


@pytest.mark.parametrize("requested", ["1M", "3M", "64M", "100M", "10G"])
def test_chs_geometry_agrees_with_qemu(tmp_path, requested):
    # Without force_size qemu rounds the size up to a geometry from the same algorithm, so the size it
    # writes maps back to exactly the geometry it stored.
    image = tmp_path / "qemu.vhd"
    qemu_img("create", "-q", "-f", "vpc", "-o", "subformat=fixed", str(image), requested)
    footer = parse_footer(tail(image), source=str(image))
    assert chs_geometry(footer.current_size) == (footer.cylinders, footer.heads, footer.sectors)


@pytest.mark.parametrize("size", [0, -MIB, MIB + 512, 512, 8 * 1024**4, MAX_VIRTUAL_SIZE + 1])
def test_build_footer_rejects_sizes_a_fixed_vhd_cannot_have(size):
    with pytest.raises(DiskFormatError, match="MiB"):
        build_footer(size)


def test_build_footer_rejects_a_short_uuid():
    with pytest.raises(ValueError, match="16 bytes"):
        build_footer(MIB, disk_uuid=b"short")


@pytest.mark.parametrize("size", [MIB, 64 * MIB, 10 * GIB, 37 * MIB])
def test_qemu_reads_our_vhd_with_its_exact_size(tmp_path, size):
    image = tmp_path / "ours.vhd"
    create_disk(image, size, "vhd")
    info = qemu_info(image, "vpc")
    assert info["format"] == "vpc"
    assert info["virtual-size"] == size
    # qemu 7.2 probes VHD by the cookie at offset 0, which only dynamic VHDs have: unforced, it takes a
    # fixed VHD for raw and counts the footer as disk data. Always pass -f vpc.
    probed = qemu_info(image)
    assert probed["format"] == "raw"
    assert probed["virtual-size"] == size + FOOTER_SIZE


@pytest.mark.parametrize("requested", [MIB, 3 * MIB, 64 * MIB, 100 * MIB])
def test_qemu_fixed_vhd_rounded_to_geometry_is_read_at_its_footer_size(tmp_path, requested):
    image = tmp_path / "qemu.vhd"
    qemu_img("create", "-q", "-f", "vpc", "-o", "subformat=fixed", str(image), str(requested))
    footer = parse_footer(tail(image), source=str(image))
    assert footer.creator_app == b"qemu"
    assert footer.current_size >= requested
    assert footer.current_size == footer.chs_size == image.stat().st_size - FOOTER_SIZE
    assert detect_format(image) == "vhd"
    with open_disk(image) as disk:
        assert disk.size == footer.current_size == qemu_info(image, "vpc")["virtual-size"]


@pytest.mark.parametrize("requested", [MIB, 3 * MIB, 64 * MIB, 10 * GIB])
def test_qemu_fixed_vhd_with_forced_size_keeps_the_size(tmp_path, requested):
    image = tmp_path / "qemu.vhd"
    qemu_img("create", "-q", "-f", "vpc", "-o", "subformat=fixed,force_size=on", str(image), str(requested))
    footer = parse_footer(tail(image), source=str(image))
    assert footer.creator_app == b"qem2"
    assert footer.current_size == footer.original_size == requested
    # qemu marks a forced size with the maximum geometry rather than the spec's.
    assert (footer.cylinders, footer.heads, footer.sectors) == (65535, 16, 255)
    with open_disk(image) as disk:
        assert (disk.format, disk.size) == ("vhd", requested)


@pytest.mark.parametrize("position", [8, 20, 30, 45, 57, 61, 70, 84, 300, 511])
def test_a_flipped_footer_byte_is_caught_by_the_checksum(tmp_path, position):
    image = tmp_path / "flipped.vhd"
    create_disk(image, 4 * MIB, "vhd")
    footer = bytearray(tail(image))
    footer[position] ^= 0x01
    rewrite_tail(image, bytes(footer))
    with pytest.raises(DiskFormatError, match="checksum mismatch") as caught:
        open_disk(image)
    assert str(image) in str(caught.value)
    assert "stored 0x" in str(caught.value) and "computed 0x" in str(caught.value)
    with pytest.raises(DiskFormatError, match=str(image)):
        detect_format(image)


def test_a_damaged_checksum_field_is_reported_with_both_values(tmp_path):
    footer = bytearray(build_footer(MIB))
    stored = int.from_bytes(footer[64:68], "big")
    footer[64:68] = (stored ^ 0xFF).to_bytes(4, "big")
    with pytest.raises(DiskFormatError, match=f"stored 0x{stored ^ 0xFF:08x}, computed 0x{stored:08x}"):
        parse_footer(bytes(footer), source="disk.vhd")


def test_bad_cookie_and_bad_length_name_the_source():
    with pytest.raises(DiskFormatError, match="disk.vhd: not a VHD footer"):
        parse_footer(b"notavhd!" + bytes(504), source="disk.vhd")
    with pytest.raises(DiskFormatError, match="disk.vhd: a VHD footer is 512 bytes, got 511"):
        parse_footer(build_footer(MIB)[:511], source="disk.vhd")


def test_dynamic_vhd_from_qemu_is_refused_as_not_supported(tmp_path):
    image = tmp_path / "dynamic.vhd"
    qemu_img("create", "-q", "-f", "vpc", "-o", "subformat=dynamic", str(image), "64M")
    with pytest.raises(DiskFormatError, match="dynamic VHD is not supported") as caught:
        open_disk(image)
    assert str(image) in str(caught.value)
    with pytest.raises(DiskFormatError, match="dynamic VHD is not supported"):
        detect_format(image)


def test_differencing_vhd_is_refused_as_not_supported():
    footer = bytearray(build_footer(MIB))
    footer[60:64] = (4).to_bytes(4, "big")
    with pytest.raises(DiskFormatError, match="child.vhd: differencing VHD is not supported"):
        parse_footer(with_valid_checksum(bytes(footer)), source="child.vhd")


@pytest.mark.parametrize("current_size", [0, MIB + 100])
def test_current_size_must_be_a_positive_multiple_of_512(current_size):
    footer = bytearray(build_footer(MIB))
    footer[48:56] = current_size.to_bytes(8, "big")
    with pytest.raises(DiskFormatError, match=f"d.vhd: VHD current size {current_size} is not"):
        parse_footer(with_valid_checksum(bytes(footer)), source="d.vhd")


def test_footer_describing_another_size_is_reported_not_read_as_raw(tmp_path):
    image = tmp_path / "truncated.vhd"
    create_disk(image, 2 * MIB, "vhd")
    rewrite_tail(image, build_footer(3 * MIB))
    with pytest.raises(DiskFormatError, match="footer says the disk is 3145728 bytes") as caught:
        open_disk(image)
    assert str(image) in str(caught.value)
