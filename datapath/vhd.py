"""The fixed VHD footer: the 512 bytes after a disk's data that make it a VHD Azure accepts.

Layout from the "Virtual Hard Disk Image Format Specification" (Microsoft, 2006), all fields big-endian:

    offset size field
         0    8 cookie "conectix"
         8    4 features (2: the reserved bit, always set)
        12    4 file format version 0x00010000
        16    8 data offset (all ones for a fixed disk: there is no dynamic header)
        24    4 timestamp, seconds since 2000-01-01 00:00:00 UTC
        28    4 creator application
        32    4 creator version
        36    4 creator host OS
        40    8 original size
        48    8 current size
        56    4 disk geometry: cylinders (2), heads (1), sectors per track (1)
        60    4 disk type (2 fixed, 3 dynamic, 4 differencing)
        64    4 checksum: ones' complement of the byte sum of the footer with this field zeroed
        68   16 unique id
        84    1 saved state
        85  427 reserved, zero

Only fixed VHDs are handled: they are what Azure page blobs take, and their data is the raw disk.
"""
from __future__ import annotations

import struct
import time
import uuid
from dataclasses import dataclass

from datapath.errors import DiskFormatError

FOOTER_SIZE = 512
COOKIE = b"conectix"
FEATURES = 0x00000002
FORMAT_VERSION = 0x00010000
FIXED_DATA_OFFSET = 0xFFFFFFFFFFFFFFFF

DISK_TYPE_FIXED = 2
DISK_TYPE_DYNAMIC = 3
DISK_TYPE_DIFFERENCING = 4

# qemu's vpc driver derives the virtual size from the CHS geometry for images written by Virtual PC or
# old qemu, and trusts `current_size` for the creators Hyper-V ("win "), Disk2vhd and XenServer use.
# Geometry rounds most sizes down, so we write what Hyper-V writes.
CREATOR_APPLICATION = b"win "
CREATOR_VERSION = 0x000A0000  # Hyper-V's own version field; readers do not interpret it
CREATOR_HOST_OS = b"Wi2k"

MIB = 1024 * 1024
# An Azure page blob holds at most 8 TiB, footer included.
MAX_VIRTUAL_SIZE = 8 * 1024**4 - FOOTER_SIZE
MAX_CHS_SECTORS = 65535 * 16 * 255

_VHD_EPOCH = 946684800  # 2000-01-01T00:00:00Z as a Unix time

# cookie, features, version, data offset, timestamp, creator app, creator version, creator host OS,
# original size, current size, cylinders, heads, sectors, disk type, checksum, uuid, saved state
_LAYOUT = struct.Struct(">8sIIQI4sI4sQQHBBII16sB427x")
assert _LAYOUT.size == FOOTER_SIZE
_CHECKSUM_OFFSET = 64
_CHECKSUM_END = 68


@dataclass(frozen=True)
class VhdFooter:
    current_size: int
    original_size: int
    cylinders: int
    heads: int
    sectors: int
    disk_type: int
    disk_uuid: bytes
    timestamp: int
    creator_app: bytes

    @property
    def chs_size(self) -> int:
        """The size the CHS geometry describes (what geometry-trusting readers would see)."""
        return self.cylinders * self.heads * self.sectors * 512


def chs_geometry(size: int) -> tuple[int, int, int]:
    """(cylinders, heads, sectors per track) for a disk of `size` bytes, by the VHD spec's algorithm.

    Disks larger than the CHS maximum (about 127 GiB) get the maximum geometry; readers then use the
    footer's current size."""
    total_sectors = min(size // 512, MAX_CHS_SECTORS)
    if total_sectors >= 65535 * 16 * 63:
        sectors_per_track = 255
        heads = 16
        cylinder_times_heads = total_sectors // sectors_per_track
    else:
        sectors_per_track = 17
        cylinder_times_heads = total_sectors // sectors_per_track
        heads = max((cylinder_times_heads + 1023) // 1024, 4)
        if cylinder_times_heads >= heads * 1024 or heads > 16:
            sectors_per_track = 31
            heads = 16
            cylinder_times_heads = total_sectors // sectors_per_track
        if cylinder_times_heads >= heads * 1024:
            sectors_per_track = 63
            heads = 16
            cylinder_times_heads = total_sectors // sectors_per_track
    return cylinder_times_heads // heads, heads, sectors_per_track


def footer_checksum(raw: bytes | bytearray | memoryview) -> int:
    """Ones' complement of the byte sum of a 512-byte footer, its checksum field counted as zero."""
    raw = bytes(raw)
    total = sum(raw) - sum(raw[_CHECKSUM_OFFSET:_CHECKSUM_END])
    return ~total & 0xFFFFFFFF


def vhd_timestamp(unix_time: float | None = None) -> int:
    """Seconds since 2000-01-01 UTC, the VHD epoch, for `unix_time` (now by default)."""
    if unix_time is None:
        unix_time = time.time()
    return max(int(unix_time) - _VHD_EPOCH, 0) & 0xFFFFFFFF


def check_fixed_vhd_size(size: int) -> None:
    """Raise DiskFormatError unless `size` can be the virtual size of a fixed VHD we write."""
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0 or size % MIB:
        raise DiskFormatError(
            f"a fixed VHD's virtual size must be a positive whole number of MiB, got {size!r} bytes"
        )
    if size > MAX_VIRTUAL_SIZE:
        raise DiskFormatError(
            f"a fixed VHD's virtual size is at most {MAX_VIRTUAL_SIZE // MIB} MiB "
            f"(an Azure page blob holds 8 TiB including the 512-byte footer), got {size} bytes"
        )


def build_footer(size: int, *, disk_uuid: bytes | None = None, timestamp: int | None = None) -> bytes:
    """The 512-byte footer of a fixed VHD whose virtual size is `size` bytes.

    `disk_uuid` (16 bytes) defaults to a fresh random UUID, `timestamp` (seconds since 2000-01-01 UTC)
    to now."""
    check_fixed_vhd_size(size)
    if disk_uuid is None:
        disk_uuid = uuid.uuid4().bytes
    if len(disk_uuid) != 16:
        raise ValueError(f"a VHD unique id is 16 bytes, got {len(disk_uuid)}")
    if timestamp is None:
        timestamp = vhd_timestamp()
    if not 0 <= timestamp <= 0xFFFFFFFF:
        raise ValueError(f"a VHD timestamp is an unsigned 32-bit count of seconds, got {timestamp}")
    cylinders, heads, sectors = chs_geometry(size)
    unsummed = _LAYOUT.pack(
        COOKIE, FEATURES, FORMAT_VERSION, FIXED_DATA_OFFSET, timestamp, CREATOR_APPLICATION,
        CREATOR_VERSION, CREATOR_HOST_OS, size, size, cylinders, heads, sectors, DISK_TYPE_FIXED,
        0, bytes(disk_uuid), 0,
    )
    checksum = footer_checksum(unsummed)
    return unsummed[:_CHECKSUM_OFFSET] + checksum.to_bytes(4, "big") + unsummed[_CHECKSUM_END:]


def parse_footer(raw: bytes | bytearray | memoryview, *, source: str) -> VhdFooter:
    """Validate and decode the footer of a fixed VHD; `source` names the file in error messages.

    Raises DiskFormatError for a wrong length, a bad cookie, a checksum mismatch, a disk type other
    than fixed, or a current size that is not a positive multiple of 512."""
    raw = bytes(raw)
    if len(raw) != FOOTER_SIZE:
        raise DiskFormatError(f"{source}: a VHD footer is {FOOTER_SIZE} bytes, got {len(raw)}")
    (cookie, _features, _version, _data_offset, timestamp, creator_app, _creator_version, _host_os,
     original_size, current_size, cylinders, heads, sectors, disk_type, stored_checksum, disk_uuid,
     _saved_state) = _LAYOUT.unpack(raw)
    if cookie != COOKIE:
        raise DiskFormatError(f"{source}: not a VHD footer (cookie {cookie!r}, expected {COOKIE!r})")
    computed_checksum = footer_checksum(raw)
    if stored_checksum != computed_checksum:
        raise DiskFormatError(
            f"{source}: VHD footer checksum mismatch (stored 0x{stored_checksum:08x}, "
            f"computed 0x{computed_checksum:08x}): the footer is corrupt"
        )
    if disk_type != DISK_TYPE_FIXED:
        kind = {DISK_TYPE_DYNAMIC: "dynamic", DISK_TYPE_DIFFERENCING: "differencing"}.get(
            disk_type, f"unknown type {disk_type}"
        )
        raise DiskFormatError(
            f"{source}: {kind} VHD is not supported, only fixed VHD (disk type {DISK_TYPE_FIXED}); "
            f"convert it first, e.g. qemu-img convert -O vpc -o subformat=fixed,force_size=on"
        )
    if current_size <= 0 or current_size % 512:
        raise DiskFormatError(
            f"{source}: VHD current size {current_size} is not a positive multiple of 512 bytes"
        )
    return VhdFooter(
        current_size=current_size,
        original_size=original_size,
        cylinders=cylinders,
        heads=heads,
        sectors=sectors,
        disk_type=disk_type,
        disk_uuid=disk_uuid,
        timestamp=timestamp,
        creator_app=creator_app,
    )
