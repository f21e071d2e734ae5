"""The recovery-site storage backends: a local directory and Azure page blobs (served by Azurite).

Tests taking `storage` run on both backends. Disk data is checked byte for byte against what was
written, and the stored replica disks are checked as fixed VHDs with qemu-img, an outside reader.
"""
from __future__ import annotations

import io
import itertools
import json
import logging
import mmap
import os
import random
import re
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from azure.storage.blob import BlobServiceClient

from datapath.endpoint import DiskEndpoint
from datapath.errors import (
    AlignmentError,
    DiskFormatError,
    DiskNotFoundError,
    NonRecoverableError,
    PathOutsideRootError,
    SizeMismatchError,
    StorageAuthError,
    StorageUnavailableError,
)
from datapath.vhd import DISK_TYPE_FIXED, FOOTER_SIZE, MIB, parse_footer
from sites.localservices import AZURITE_ACCOUNT_KEY, AzuriteProcess, ServiceStartError
from sites.storage import ObjectNotFoundError, open_storage
from sites.storage.azure import MAX_PUT_PAGE, AzureBlobStorage, StorageRequestError
from sites.storage.base import RecoveryStorage
from sites.storage.local import LocalDirectoryStorage

KIB = 1024
TIB = 1024**4
DISK_SIZE = 32 * MIB
COMMAND_TIMEOUT = 60
# An unreachable or refusing account must be reported in seconds: the SDK's retries are kept short.
FAST_FAILURE_S = 10.0


# ---- helpers ------------------------------------------------------------------------------------
def read_disk(disk: DiskEndpoint, offset: int = 0, length: int | None = None) -> bytes:
    length = disk.size - offset if length is None else length
    buffer = mmap.mmap(-1, max(length, 1))
    try:
        with memoryview(buffer)[:length] as view:
            assert disk.read_into(offset, view) == length
            return bytes(view)
    finally:
        buffer.close()


def stored_image(storage: RecoveryStorage, name: str, destination: Path) -> Path:
    """The replica disk as the backend stores it (data then footer), copied to a local file."""
    with open(destination, "wb") as out:
        storage.get_object(name, out)
    return destination


def qemu_img_info(path: Path) -> dict:
    result = subprocess.run(
        ["qemu-img", "info", "-f", "vpc", "--output", "json", str(path)],
        check=True, capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
    )
    return json.loads(result.stdout)


def qemu_img_raw_bytes(path: Path, scratch: Path) -> bytes:
    """The disk's data as qemu's VHD driver reads it."""
    subprocess.run(
        ["qemu-img", "convert", "-f", "vpc", "-O", "raw", str(path), str(scratch)],
        check=True, capture_output=True, timeout=COMMAND_TIMEOUT,
    )
    return scratch.read_bytes()


def random_page_write(rng: random.Random, size: int, max_length: int) -> tuple[int, int]:
    pages = size // 512
    length_pages = rng.randint(1, max_length // 512)
    offset_pages = rng.randrange(0, pages - length_pages + 1)
    return offset_pages * 512, length_pages * 512


def covered(extents: list[tuple[int, int]], start: int, end: int) -> bool:
    position = start
    for offset, length in extents:
        if offset <= position < offset + length:
            position = offset + length
    return position >= end


def check_extents_shape(extents: list[tuple[int, int]], start: int, end: int) -> None:
    previous_end = start
    for offset, length in extents:
        assert length > 0 and offset >= previous_end and offset + length <= end, extents
        previous_end = offset + length


# ---- replica disks on both backends -------------------------------------------------------------
def test_random_page_writes_round_trip_byte_for_byte(storage: RecoveryStorage):
    rng = random.Random(4)
    storage.create_disk("vm1/os.vhd", DISK_SIZE)
    expected = bytearray(DISK_SIZE)
    # One reused source buffer, overwritten after every write: the disk must have taken its own copy.
    source = mmap.mmap(-1, 6 * MIB)
    with storage.open_disk("vm1/os.vhd") as disk, memoryview(source) as source_view:
        assert isinstance(disk, DiskEndpoint) and disk.size == DISK_SIZE
        for _ in range(40):  # several writes in flight at once, some overlapping
            offset, length = random_page_write(rng, DISK_SIZE, 6 * MIB)
            data = rng.randbytes(length)
            source_view[:length] = data
            disk.write(offset, source_view[:length])
            source_view[:length] = bytes(length)
            expected[offset:offset + length] = data
        # Read-your-writes before any flush: a read waits for the writes it overlaps.
        assert read_disk(disk, 0, 4 * MIB) == bytes(expected[:4 * MIB])
        disk.flush()
        for _ in range(20):
            offset = rng.randrange(0, DISK_SIZE)
            length = rng.randint(1, min(9 * MIB, DISK_SIZE - offset))
            assert read_disk(disk, offset, length) == bytes(expected[offset:offset + length])
    source.close()
    with storage.open_disk("vm1/os.vhd") as reopened:
        assert read_disk(reopened) == bytes(expected)


def test_overlapping_writes_land_in_the_order_issued(storage: RecoveryStorage):
    storage.create_disk("vm1/data.vhd", 16 * MIB)
    expected = bytearray(16 * MIB)
    with storage.open_disk("vm1/data.vhd") as disk:
        for round_number in range(8):
            for index, (offset, length) in enumerate(((0, 8 * MIB), (MIB, MIB), (0, 512),
                                                       (4 * MIB, 4 * MIB + 512))):
                data = bytes([round_number * 4 + index + 1]) * length
                disk.write(offset, data)
                expected[offset:offset + length] = data
            disk.write_zeros(2 * MIB, 512 * KIB)
            expected[2 * MIB:2 * MIB + 512 * KIB] = bytes(512 * KIB)
        disk.flush()
        assert read_disk(disk) == bytes(expected)


def test_data_extents_cover_the_written_regions_and_nothing_far_from_them(storage: RecoveryStorage):
    storage.create_disk("vm1/data.vhd", DISK_SIZE)
    written = [(0, 4 * KIB), (3 * MIB, 64 * KIB), (10 * MIB, 5 * MIB), (DISK_SIZE - 4 * KIB, 4 * KIB)]
    untouched = [(MIB, MIB), (4 * MIB, 5 * MIB), (16 * MIB, 15 * MIB)]
    with storage.open_disk("vm1/data.vhd") as disk:
        assert list(disk.data_extents()) == []
        for offset, length in written:
            disk.write(offset, os.urandom(length))
        disk.flush()
        extents = list(disk.data_extents())
        check_extents_shape(extents, 0, DISK_SIZE)
        for offset, length in written:
            assert covered(extents, offset, offset + length), (offset, length, extents)
        for offset, length in untouched:
            assert not any(o < offset + length and offset < o + n for o, n in extents), extents
        # The last extent stops at the virtual size: the footer is not data.
        assert extents[-1][0] + extents[-1][1] == DISK_SIZE
        # A window clips the extents to itself.
        window = list(disk.data_extents(10 * MIB + 4 * KIB, MIB))
        assert window == [(10 * MIB + 4 * KIB, MIB)]
        assert list(disk.data_extents(MIB, MIB)) == []


def test_write_zeros_reads_back_zeros_and_frees_the_range(storage: RecoveryStorage):
    storage.create_disk("vm1/data.vhd", 16 * MIB)
    data = os.urandom(16 * MIB)
    with storage.open_disk("vm1/data.vhd") as disk:
        disk.write(0, data)
        disk.write_zeros(2 * MIB, 9 * MIB)  # more than one Put Page may carry: Clear Pages may
        disk.write_zeros(12 * MIB + 512, 512)
        disk.flush()
        expected = data[:2 * MIB] + bytes(9 * MIB) + data[11 * MIB:12 * MIB + 512] + bytes(512) \
            + data[12 * MIB + 1024:]
        assert read_disk(disk) == expected
        extents = list(disk.data_extents())
        assert covered(extents, 0, 2 * MIB) and covered(extents, 11 * MIB, 12 * MIB)
        assert not any(o < 11 * MIB and 2 * MIB < o + n for o, n in extents), extents
    with storage.open_disk("vm1/data.vhd") as reopened:
        assert read_disk(reopened) == expected


def test_the_stored_replica_disk_is_a_valid_fixed_vhd(storage: RecoveryStorage, tmp_path: Path):
    storage.create_disk("vm1/os.vhd", 16 * MIB)
    data = os.urandom(MIB)
    with storage.open_disk("vm1/os.vhd") as disk:
        disk.write(7 * MIB, data)
        disk.flush()
    image = stored_image(storage, "vm1/os.vhd", tmp_path / "os.vhd")
    raw_image = image.read_bytes()
    assert len(raw_image) == 16 * MIB + FOOTER_SIZE
    footer = parse_footer(raw_image[-FOOTER_SIZE:], source=str(image))
    assert footer.current_size == footer.original_size == 16 * MIB
    assert footer.disk_type == DISK_TYPE_FIXED
    info = qemu_img_info(image)
    assert info["format"] == "vpc" and info["virtual-size"] == 16 * MIB
    expected = bytes(7 * MIB) + data + bytes(8 * MIB)
    assert qemu_img_raw_bytes(image, tmp_path / "os.raw") == expected


def test_create_disk_is_idempotent_keeps_the_data_and_refuses_another_size(storage: RecoveryStorage):
    storage.create_disk("vm1/os.vhd", 8 * MIB)
    data = os.urandom(MIB)
    with storage.open_disk("vm1/os.vhd") as disk:
        disk.write(MIB, data)
        disk.flush()
    storage.create_disk("vm1/os.vhd", 8 * MIB)  # a retried step must not reset the replica
    with storage.open_disk("vm1/os.vhd") as disk:
        assert read_disk(disk, MIB, MIB) == data
    with pytest.raises(SizeMismatchError, match=r"vm1/os\.vhd.*8388608"):
        storage.create_disk("vm1/os.vhd", 16 * MIB)
    with storage.open_disk("vm1/os.vhd") as disk:
        assert disk.size == 8 * MIB and read_disk(disk, MIB, MIB) == data


def test_missing_disks_and_deletion(storage: RecoveryStorage):
    assert not storage.disk_exists("vm1/os.vhd")
    with pytest.raises(DiskNotFoundError, match=r"vm1/os\.vhd"):
        storage.open_disk("vm1/os.vhd")
    storage.delete_disk("vm1/os.vhd")  # no error when missing
    storage.create_disk("vm1/os.vhd", 4 * MIB)
    assert storage.disk_exists("vm1/os.vhd")
    storage.delete_disk("vm1/os.vhd")
    assert not storage.disk_exists("vm1/os.vhd")
    assert storage.list_objects() == []


def test_writes_outside_the_disk_are_refused_and_leave_the_footer_intact(storage: RecoveryStorage,
                                                                         tmp_path: Path):
    storage.create_disk("vm1/os.vhd", 4 * MIB)
    with storage.open_disk("vm1/os.vhd") as disk:
        with pytest.raises(ValueError, match=r"vm1/os\.vhd.*outside the disk"):
            disk.write(4 * MIB, bytes(512))
        with pytest.raises(ValueError, match="outside the disk"):
            disk.write(4 * MIB - 512, bytes(1024))
        with pytest.raises(ValueError, match="outside the disk"):
            disk.write_zeros(0, 4 * MIB + 512)
        with pytest.raises(ValueError, match="outside the disk"):
            disk.read_into(4 * MIB - 512, memoryview(bytearray(1024)))
        disk.flush()
    image = stored_image(storage, "vm1/os.vhd", tmp_path / "os.vhd").read_bytes()
    assert parse_footer(image[-FOOTER_SIZE:], source="os.vhd").current_size == 4 * MIB
    assert image[:-FOOTER_SIZE] == bytes(4 * MIB)


@pytest.mark.parametrize("size, problem", [
    (8 * TIB, "at most"),
    (8 * TIB + MIB, "at most"),
    (MIB + 512, "whole number of MiB"),
    (0, "whole number of MiB"),
])
def test_disks_azure_cannot_hold_are_refused_and_nothing_is_created(storage: RecoveryStorage, size, problem):
    with pytest.raises(DiskFormatError, match=problem):
        storage.create_disk("vm1/big.vhd", size)
    assert storage.list_objects() == []


def test_the_largest_page_blob_disk_is_accepted(storage: RecoveryStorage):
    largest = 8 * TIB - MIB  # whole MiB, plus the footer page, within 8 TiB
    storage.create_disk("vm1/big.vhd", largest)
    with storage.open_disk("vm1/big.vhd") as disk:
        assert disk.size == largest
        disk.write(largest - 4 * KIB, b"\xee" * 4 * KIB)
        disk.flush()
        assert read_disk(disk, largest - 8 * KIB, 8 * KIB) == bytes(4 * KIB) + b"\xee" * 4 * KIB
        assert list(disk.data_extents(largest - MIB)) == [(largest - 4 * KIB, 4 * KIB)]
    storage.delete_disk("vm1/big.vhd")


# ---- objects ------------------------------------------------------------------------------------
def test_objects_put_get_list_delete(storage: RecoveryStorage, tmp_path: Path):
    log = os.urandom(3 * MIB + 17)
    assert storage.put_object("vm1/os.vhd.1.hrl", log) == len(log)
    # A file object is stored from its current position.
    source = tmp_path / "state.json"
    source.write_bytes(b"HEADER" + b'{"generation": 1}')
    with open(source, "rb") as src:
        src.seek(len(b"HEADER"))
        assert storage.put_object("vm1/os.vhd.state.json", src) == len(b'{"generation": 1}')
    assert storage.put_object("vm1/empty", b"") == 0
    storage.create_disk("vm1/os.vhd", 4 * MIB)
    storage.put_object("vm2/manifest.json", io.BytesIO(b"{}"))

    out = io.BytesIO()
    assert storage.get_object("vm1/os.vhd.1.hrl", out) == len(log)
    assert out.getvalue() == log
    assert storage.read_object("vm1/os.vhd.state.json") == b'{"generation": 1}'
    assert storage.read_object("vm1/empty") == b""
    assert storage.object_exists("vm1/os.vhd.1.hrl") and not storage.object_exists("vm1/nothing")

    # Overwriting replaces the whole object.
    storage.put_object("vm1/os.vhd.state.json", b'{"generation": 2}')
    assert storage.read_object("vm1/os.vhd.state.json") == b'{"generation": 2}'

    assert storage.list_objects() == [
        "vm1/empty", "vm1/os.vhd", "vm1/os.vhd.1.hrl", "vm1/os.vhd.state.json", "vm2/manifest.json",
    ]
    assert storage.list_objects("vm1/os.vhd.") == ["vm1/os.vhd.1.hrl", "vm1/os.vhd.state.json"]
    assert storage.list_objects("vm2") == ["vm2/manifest.json"]
    assert storage.list_objects("vm3/") == []

    storage.delete_object("vm1/os.vhd.1.hrl")
    storage.delete_object("vm1/os.vhd.1.hrl")  # no error when missing
    assert not storage.object_exists("vm1/os.vhd.1.hrl")
    with pytest.raises(ObjectNotFoundError, match=r"vm1/os\.vhd\.1\.hrl"):
        storage.get_object("vm1/os.vhd.1.hrl", io.BytesIO())
    with pytest.raises(ObjectNotFoundError, match=r"vm1/os\.vhd\.1\.hrl"):
        storage.read_object("vm1/os.vhd.1.hrl")


BAD_NAMES = [
    "../escape", "vm1/../../escape", "vm1/..", "/etc/passwd", "vm1\\..\\escape", "", "vm1//os.vhd",
    ".hidden", "vm1/./os.vhd", "vm1/os.vhd/", "a" * 129, "vm1/\x00",
]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_refused_and_nothing_is_created(storage: RecoveryStorage, name: str):
    operations = [
        lambda: storage.create_disk(name, MIB),
        lambda: storage.open_disk(name),
        lambda: storage.disk_exists(name),
        lambda: storage.delete_disk(name),
        lambda: storage.put_object(name, b"data"),
        lambda: storage.get_object(name, io.BytesIO()),
        lambda: storage.read_object(name),
        lambda: storage.object_exists(name),
        lambda: storage.delete_object(name),
    ]
    for operation in operations:
        with pytest.raises(PathOutsideRootError):
            operation()
    assert storage.list_objects() == []


def test_parallelism_outside_1_to_32_is_refused(storage: RecoveryStorage, tmp_path: Path,
                                               request: pytest.FixtureRequest):
    def open_with(parallelism):
        if isinstance(storage, LocalDirectoryStorage):
            return LocalDirectoryStorage(tmp_path / "other", parallelism=parallelism)
        azurite = request.getfixturevalue("azurite")
        return AzureBlobStorage(storage.container, connection_string=azurite.connection_string(),
                                parallelism=parallelism)

    for bad in (0, 33, -4, 2.5, True, "8"):
        with pytest.raises(ValueError, match="parallelism must be .* from 1 to 32"):
            open_with(bad)
    for good in (1, 32):
        opened = open_with(good)
        assert opened.parallelism == good
        opened.close()


# ---- local directory ----------------------------------------------------------------------------
def test_local_disk_file_is_a_fixed_vhd_qemu_reads(local_storage: LocalDirectoryStorage, tmp_path: Path):
    local_storage.create_disk("vm1/os.vhd", 16 * MIB)
    data = os.urandom(64 * KIB)
    with local_storage.open_disk("vm1/os.vhd") as disk:
        disk.write(MIB + 512, data)
        disk.flush()
    path = local_storage.path("vm1/os.vhd")
    assert path == local_storage.root / "vm1" / "os.vhd"
    info = qemu_img_info(path)
    assert info["format"] == "vpc" and info["virtual-size"] == 16 * MIB
    assert qemu_img_raw_bytes(path, tmp_path / "os.raw")[MIB + 512:MIB + 512 + len(data)] == data
    # Created sparse: only the footer and what was written take space.
    assert os.stat(path).st_blocks * 512 <= len(data) + 64 * KIB


def test_local_symlinks_out_of_the_root_are_refused(tmp_path: Path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    storage = LocalDirectoryStorage(tmp_path / "site")
    (storage.root / "vm1").symlink_to(outside)
    (storage.root / "leak").symlink_to(outside / "secret")
    for operation in (
        lambda: storage.create_disk("vm1/os.vhd", MIB),
        lambda: storage.put_object("vm1/state.json", b"x"),
        lambda: storage.put_object("leak", b"overwritten"),
        lambda: storage.read_object("leak"),
        lambda: storage.delete_object("leak"),
        lambda: storage.list_objects("vm1/"),
    ):
        with pytest.raises(PathOutsideRootError, match="outside the storage root"):
            operation()
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]
    assert (outside / "secret").read_bytes() == b"secret"
    assert storage.list_objects() == []  # symlinks are never listed


def test_local_file_without_a_vhd_footer_is_not_a_replica_disk(local_storage: LocalDirectoryStorage):
    local_storage.put_object("vm1/os.vhd", bytes(MIB))
    with pytest.raises(DiskFormatError, match=r"vm1/os\.vhd.*not a fixed VHD"):
        local_storage.open_disk("vm1/os.vhd")
    with pytest.raises(DiskFormatError, match="not a fixed VHD"):
        local_storage.create_disk("vm1/os.vhd", MIB)


def test_local_put_object_leaves_no_temporary_files(local_storage: LocalDirectoryStorage):
    local_storage.put_object("vm1/a", b"1")
    local_storage.put_object("vm1/a", b"2")
    local_storage.create_disk("vm1/d.vhd", MIB)

    class BrokenSource(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def readinto(self, b) -> int:
            raise OSError("source broke off")

    with pytest.raises(OSError, match="source broke off"):
        local_storage.put_object("vm1/a", BrokenSource())
    assert sorted(p.name for p in (local_storage.root / "vm1").iterdir()) == ["a", "d.vhd"]
    assert local_storage.read_object("vm1/a") == b"2"


def test_local_no_space_is_a_low_disk_space_error(tmp_path: Path):
    """On a real 1 MiB tmpfs, mounted in a private user and mount namespace (no root needed)."""
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    script = textwrap.dedent(f"""
        import os, subprocess, sys
        sys.path[:0] = {[str(Path(__file__).resolve().parent.parent)]!r}
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", {str(mountpoint)!r}], check=True)
        from datapath.errors import LowDiskSpaceError
        from sites.storage.local import LocalDirectoryStorage
        storage = LocalDirectoryStorage({str(mountpoint / "site")!r})
        storage.put_object("vm1/small", b"x" * 1024)
        try:
            storage.put_object("vm1/big.hrl", b"x" * (2 * 1024 * 1024))
        except LowDiskSpaceError as error:
            assert "vm1/big.hrl" in str(error), error
        else:
            raise SystemExit("no LowDiskSpaceError")
        assert storage.list_objects() == ["vm1/small"], storage.list_objects()
        assert sorted(os.listdir({str(mountpoint / "site" / "vm1")!r})) == ["small"]
        print("ok")
    """)
    result = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", sys.executable, "-c", script],
        capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", (
        f"the check runs in a private user and mount namespace (unshare --user --mount, which the "
        f"kernel must allow unprivileged users); it said: {result.stderr}"
    )


@pytest.mark.azure
def test_open_storage_picks_the_backend_from_the_url(tmp_path: Path, azurite):
    local = open_storage(f"file://{tmp_path / 'site'}")
    assert isinstance(local, LocalDirectoryStorage) and local.root == (tmp_path / "site").resolve()
    remote = open_storage("azure://opened-by-url", connection_string=azurite.connection_string())
    assert isinstance(remote, AzureBlobStorage) and remote.container == "opened-by-url"
    remote.close()


# ---- Azure page blobs ---------------------------------------------------------------------------
@pytest.mark.azure
def test_azure_refuses_unaligned_page_requests_and_writes_nothing(azure_storage: AzureBlobStorage):
    azure_storage.create_disk("vm1/os.vhd", 4 * MIB)
    with azure_storage.open_disk("vm1/os.vhd") as disk:
        assert disk.alignment == 512
        for operation in (
            lambda: disk.write(100, bytes(512)),
            lambda: disk.write(0, bytes(1000)),
            lambda: disk.write_zeros(512, 100),
            lambda: disk.write_zeros(1, 512),
        ):
            with pytest.raises(AlignmentError, match=r"vm1/os\.vhd.*multiples of 512"):
                operation()
        disk.flush()
        assert list(disk.data_extents()) == []
        # Reads need no alignment.
        disk.write(0, b"\x01" * 1024)
        assert read_disk(disk, 3, 5) == b"\x01" * 5


@dataclass
class PageRequest:
    """A Put Page request as Azurite's debug log records it, with the log positions at which it started
    and ended."""

    kind: str  # "update" or "clear"
    start: int
    end: int
    began: int
    ended: int | None = None


_LOG_LINE = re.compile(r"^\S+ (?P<request>[0-9a-f-]{36}) \w+: (?P<message>.*)$")
_PAGE_RANGE = re.compile(r"x-ms-page-write:(update|clear)\\nx-ms-range:bytes=(\d+)-(\d+)")


def azurite_page_requests(debug_log: Path) -> list[PageRequest]:
    begun: dict[str, int] = {}
    requests: dict[str, PageRequest] = {}
    for position, line in enumerate(debug_log.read_text().splitlines()):
        match = _LOG_LINE.match(line)
        if match is None:
            continue
        request_id, message = match["request"], match["message"]
        if message.startswith("BlobStorageContextMiddleware: RequestMethod="):
            begun[request_id] = position
        elif (page_range := _PAGE_RANGE.search(message)) is not None:
            kind, first, last = page_range.groups()
            requests[request_id] = PageRequest(kind, int(first), int(last) + 1, begun[request_id])
        elif message.startswith("EndMiddleware: End response") and request_id in requests:
            requests[request_id].ended = position
    return sorted(requests.values(), key=lambda request: request.began)


@pytest.mark.azure
def test_azure_page_requests_are_split_to_4_mib_and_never_overlap_in_flight(tmp_path: Path):
    """Azurite takes Put Page requests larger than 4 MiB, and it happens to apply requests in the order
    they arrive; Azure does neither. Azurite's debug log shows what was sent and when."""
    debug_log = tmp_path / "azurite-debug.log"
    expected = bytearray(16 * MIB)
    with AzuriteProcess(tmp_path / "azurite", debug_log=debug_log) as azurite:
        storage = AzureBlobStorage("split", connection_string=azurite.connection_string())
        storage.create_disk("vm1/os.vhd", 16 * MIB)
        with storage.open_disk("vm1/os.vhd") as disk:
            for offset, length in ((MIB, 9 * MIB + 512), (MIB, 512), (8 * MIB, 4 * MIB), (2 * MIB, MIB)):
                data = os.urandom(length)
                disk.write(offset, data)
                expected[offset:offset + length] = data
            disk.write_zeros(MIB + 512, 3 * MIB)
            expected[MIB + 512:4 * MIB + 512] = bytes(3 * MIB)
            disk.flush()
            assert read_disk(disk) == bytes(expected)
        storage.close()
    requests = azurite_page_requests(debug_log)
    footer_page = (16 * MIB, 16 * MIB + FOOTER_SIZE)
    assert sorted((r.kind, r.start, r.end) for r in requests) == sorted([
        ("update", *footer_page),
        ("update", MIB, MIB + MAX_PUT_PAGE),
        ("update", MIB + MAX_PUT_PAGE, MIB + 2 * MAX_PUT_PAGE),
        ("update", MIB + 2 * MAX_PUT_PAGE, 10 * MIB + 512),
        ("update", MIB, MIB + 512),
        ("update", 8 * MIB, 12 * MIB),
        ("update", 2 * MIB, 3 * MIB),
        ("clear", MIB + 512, 4 * MIB + 512),
    ])
    for request in requests:
        assert request.ended is not None
        assert request.start % 512 == 0 and request.end % 512 == 0
        assert request.kind == "clear" or request.end - request.start <= MAX_PUT_PAGE
    for earlier, later in itertools.combinations(requests, 2):
        if earlier.start < later.end and later.start < earlier.end:
            assert earlier.ended < later.began, (earlier, later)
    # Requests on distinct ranges did run side by side.
    assert any(earlier.ended > later.began for earlier, later in itertools.combinations(requests, 2))


@pytest.mark.azure
def test_azure_wrong_account_key_is_a_quick_auth_error(azurite):
    # Still valid base64, so the request is signed and sent, with a signature the account rejects.
    wrong_key = ("B" if AZURITE_ACCOUNT_KEY[0] == "A" else "A") + AZURITE_ACCOUNT_KEY[1:]
    started = time.monotonic()
    with pytest.raises(StorageAuthError, match=r"devstoreaccount1.*(403|401).*account key"):
        AzureBlobStorage("wrong-key", connection_string=azurite.connection_string(wrong_key))
    with pytest.raises(StorageAuthError):
        AzureBlobStorage("wrong-key", connection_string=azurite.connection_string(wrong_key),
                         create_container=False)
    assert time.monotonic() - started < FAST_FAILURE_S


@pytest.mark.azure
def test_azure_stopped_service_is_reported_unavailable_in_seconds(tmp_path: Path):
    azurite = AzuriteProcess(tmp_path / "azurite").start()
    try:
        storage = AzureBlobStorage("stopping", connection_string=azurite.connection_string())
        storage.create_disk("vm1/os.vhd", 8 * MIB)
        disk = storage.open_disk("vm1/os.vhd")
        disk.write(0, b"\x07" * MIB)
        disk.flush()
        reader = storage.open_disk("vm1/os.vhd")
    finally:
        azurite.stop()
    assert not azurite.running

    def fails_unavailable_quickly(operation) -> StorageUnavailableError:
        started = time.monotonic()
        with pytest.raises(StorageUnavailableError) as caught:
            operation()
        assert time.monotonic() - started < FAST_FAILURE_S
        assert "devstoreaccount1" in str(caught.value) and "stopping" in str(caught.value)
        return caught.value

    disk.write(MIB, b"\x08" * MIB)  # accepted: the request fails in the background
    fails_unavailable_quickly(disk.flush)
    fails_unavailable_quickly(disk.flush)  # a lost write stays reported
    fails_unavailable_quickly(lambda: disk.write(0, bytes(512)))
    disk.close()
    error = fails_unavailable_quickly(lambda: read_disk(reader, 0, 8 * MIB))  # two ranges in parallel
    assert "reading 4194304 bytes at offset" in str(error)
    fails_unavailable_quickly(lambda: list(reader.data_extents()))
    reader.close()
    fails_unavailable_quickly(lambda: storage.open_disk("vm1/os.vhd"))
    fails_unavailable_quickly(lambda: storage.put_object("vm1/state.json", b"{}"))
    fails_unavailable_quickly(lambda: storage.list_objects())
    fails_unavailable_quickly(
        lambda: AzureBlobStorage("stopping", connection_string=azurite.connection_string())
    )
    storage.close()


@pytest.mark.azure
def test_azure_blobs_that_are_not_replica_disks(azure_storage: AzureBlobStorage, azurite):
    service = BlobServiceClient.from_connection_string(azurite.connection_string())
    container = service.get_container_client(azure_storage.container)
    azure_storage.put_object("vm1/block.vhd", bytes(MIB + FOOTER_SIZE))
    with pytest.raises(DiskFormatError, match=r"vm1/block\.vhd.*BlockBlob, not a replica disk"):
        azure_storage.open_disk("vm1/block.vhd")
    with pytest.raises(DiskFormatError, match="not a replica disk"):
        azure_storage.create_disk("vm1/block.vhd", MIB)
    assert not azure_storage.disk_exists("vm1/block.vhd")

    garbage = container.get_blob_client("vm1/garbage.vhd")
    garbage.create_page_blob(MIB + FOOTER_SIZE)
    garbage.upload_page(b"conectix" + bytes(504), offset=MIB, length=FOOTER_SIZE)
    with pytest.raises(DiskFormatError, match=r"vm1/garbage\.vhd.*checksum"):
        azure_storage.open_disk("vm1/garbage.vhd")
    service.close()


@pytest.mark.azure
def test_azure_create_disk_finishes_a_disk_whose_footer_was_never_written(
        azure_storage: AzureBlobStorage, azurite, tmp_path: Path):
    service = BlobServiceClient.from_connection_string(azurite.connection_string())
    # What a crash between Create Blob and the footer's Put Page leaves behind.
    service.get_blob_client(azure_storage.container, "vm1/os.vhd").create_page_blob(4 * MIB + FOOTER_SIZE)
    service.close()
    with pytest.raises(DiskFormatError, match="not a VHD footer"):
        azure_storage.open_disk("vm1/os.vhd")
    azure_storage.create_disk("vm1/os.vhd", 4 * MIB)
    with azure_storage.open_disk("vm1/os.vhd") as disk:
        assert disk.size == 4 * MIB
    image = stored_image(azure_storage, "vm1/os.vhd", tmp_path / "os.vhd")
    assert qemu_img_info(image)["virtual-size"] == 4 * MIB


@pytest.mark.azure
def test_azure_container_names_and_missing_containers(azurite):
    for bad in ("ab", "Upper", "double--hyphen", "-edge", "a" * 64, "under_score"):
        with pytest.raises(ValueError, match="invalid Azure container name"):
            AzureBlobStorage(bad, connection_string=azurite.connection_string())
    with pytest.raises(StorageRequestError, match="container never-created does not exist"):
        AzureBlobStorage("never-created", connection_string=azurite.connection_string(),
                         create_container=False)
    with pytest.raises(ValueError, match="exactly one of connection_string or account_url"):
        AzureBlobStorage("some-container")


@pytest.mark.azure
def test_azure_disk_endpoint_reports_its_container_and_blob(azure_storage: AzureBlobStorage):
    azure_storage.create_disk("vm1/os.vhd", MIB)
    with azure_storage.open_disk("vm1/os.vhd") as disk:
        assert disk.name == f"{azure_storage.container}/vm1/os.vhd"
        assert disk.parallelism == azure_storage.parallelism == 4


# ---- test services ------------------------------------------------------------------------------
def test_missing_azurite_install_says_to_run_make_test(tmp_path: Path):
    with pytest.raises(ServiceStartError, match="make test"):
        AzuriteProcess(tmp_path, executable=tmp_path / "no-such-azurite").start()


@pytest.mark.parametrize("name", ["vm1/disk0.vhd\n", "vm1\n/disk0.vhd", "\nvm1"])
def test_names_with_a_trailing_or_embedded_newline_are_refused(local_storage, name):
    with pytest.raises(PathOutsideRootError):
        local_storage.put_object(name, b"x")
    assert local_storage.list_objects() == []


# ---- the administrator's allow-list, where a worker opens the storage ---------------------------------------
def test_a_worker_opens_no_storage_the_allow_list_refuses_whatever_the_database_holds(tmp_path, monkeypatch):
    """tasks.recovery_storage.open_recovery_storage (what every worker step opens storage with) re-checks the stored
    URL and options: rows written behind the API's back (another process with database access) open nothing."""
    from tasks.recovery_storage import open_recovery_storage

    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (tmp_path / "outside").mkdir()
    (allowed / "escape").symlink_to(tmp_path / "outside")
    monkeypatch.setenv("ASR_STORAGE_ROOTS", str(allowed))
    monkeypatch.setenv("ASR_STORAGE_ENCRYPTION", "off")  # the allow-list is checked before any key is needed
    refused = [
        (f"file://{tmp_path / 'outside'}", {}, "is not inside a recovery storage root"),
        (f"file://{allowed / 'escape'}", {}, "is not inside a recovery storage root"),  # a link out of the root
        ("azure:replicas", {"account_url": "https://127.0.0.1:1/"}, "is not a storage account allowed here"),
        ("azure:replicas", {"connection_string_env": "ASR_DATABASE_URL"}, "must name a storage variable"),
        ("azure:replicas", {"connection_string": "UseDevelopmentStorage=true"}, "unknown storage option"),
    ]
    for url, options, message in refused:
        with pytest.raises(NonRecoverableError, match=message):
            open_recovery_storage(url, options)
    assert list((tmp_path / "outside").iterdir()) == []
    storage = open_recovery_storage(f"file://{allowed / 'site'}", {})
    assert storage is not None
    monkeypatch.delenv("ASR_STORAGE_ROOTS")
    with pytest.raises(NonRecoverableError, match="no local recovery storage is allowed here"):
        open_recovery_storage(f"file://{allowed / 'site'}", {})


def test_connection_string_env_names_only_variables_meant_for_a_connection_string():
    """`connection_string_env` makes a worker send its variable's value to the storage service as credentials:
    only variables meant to hold a connection string may be named, never the key-encryption key, its file or
    the administrator's allow-lists (all of them ASR_STORAGE_*)."""
    from sites.storage.policy import StoragePolicyError, check_storage

    for variable in ("ASR_AZURE_CONNECTION_STRING", "ASR_STORAGE_CONNECTION_STRING",
                     "ASR_STORAGE_DR2_CONNECTION_STRING", "ASR_AZURE_WEST_EUROPE_CONNECTION_STRING"):
        check_storage("azure:replicas", {"connection_string_env": variable}, roots=[], account_urls=[])
    for variable in ("ASR_STORAGE_KEK", "ASR_STORAGE_KEK_FILE", "ASR_STORAGE_ROOTS", "ASR_STORAGE_ACCOUNT_URLS",
                     "ASR_STORAGE_ENCRYPTION", "ASR_DATABASE_URL", "ASR_AZURE_CONNECTION_STRING_FILE",
                     "ASR_STORAGE_CONNECTION_STRING\n", "asr_azure_connection_string", "HOME"):
        with pytest.raises(StoragePolicyError, match="must name a storage variable"):
            check_storage("azure:replicas", {"connection_string_env": variable}, roots=[], account_urls=[])


@pytest.mark.azure
def test_azure_requests_are_not_logged_at_info(azure_storage: AzureBlobStorage, caplog: pytest.LogCaptureFixture):
    """The SDK would log each request's headers at INFO (some 20 lines a request, most of a worker's log);
    its HTTP logger is at WARNING, and its failures would still be logged."""
    with caplog.at_level(logging.INFO):
        azure_storage.create_disk("vm1/os.vhd", 4 * MIB)
        with azure_storage.open_disk("vm1/os.vhd") as disk:
            disk.write(0, b"x" * 4096)
        assert azure_storage.disk_exists("vm1/os.vhd")
    assert [r for r in caplog.records if r.name.startswith("azure")] == [], caplog.text[:2000]
    assert logging.getLogger("azure.core.pipeline.policies.http_logging_policy").getEffectiveLevel() == logging.WARNING
