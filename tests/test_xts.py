"""The AES-XTS of sites/storage/xts.py (OpenSSL's, many sectors per call) is byte for byte `cryptography`'s
own XTS applied sector by sector with the sector number as tweak, for any key (AES-128 and AES-256),
data, sector numbers (0 to 2^64 - 1) and number of sectors per call, from any number of threads at once;
it decrypts back, in place too; and an encrypted replica disk written sector by sector the old way reads
back through EncryptedDisk unchanged, and what EncryptedDisk writes is what the old way wrote (zero
sectors stay zeros)."""
from __future__ import annotations

import os
import random
from array import array
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from sites.storage.encrypted_disk import SECTOR_SIZE, EncryptedDisk
from sites.storage.local import LocalDirectoryStorage
from sites.storage.xts import XtsSectors

MIB = 1024 * 1024


def xts_per_sector(key: bytes, sectors: list[int], data: bytes, sector_size: int, *, decrypt: bool = False) -> bytes:
    """The reference: one `cryptography` XTS cipher per sector, tweak = its number (16 bytes little-endian),
    as EncryptedDisk did before XTS over many sectors per call."""
    out = bytearray()
    for index, sector in enumerate(sectors):
        cipher = Cipher(algorithms.AES(key), modes.XTS(sector.to_bytes(16, "little")))
        context = cipher.decryptor() if decrypt else cipher.encryptor()
        out += context.update(data[index * sector_size:(index + 1) * sector_size]) + context.finalize()
    return bytes(out)


FIRST_SECTORS = [0, 1, 255, 256, 12345, 2**32 - 3, 2**40, 2**63 - 2, 2**64 - 1]


@pytest.mark.parametrize("sector_size", [4096, 512, 16, 4112])
@pytest.mark.parametrize("key_bytes", [64, 32])
def test_xts_equals_per_sector_xts_for_any_run_of_sectors(sector_size: int, key_bytes: int):
    rng = random.Random(f"{sector_size}/{key_bytes}")
    for first in FIRST_SECTORS:
        key = rng.randbytes(key_bytes)
        count = rng.randint(41, 80)
        first = min(first, 2**64 - count)  # the last run ends at sector 2^64 - 1
        data = rng.randbytes(count * sector_size)
        expected = xts_per_sector(key, list(range(first, first + count)), data, sector_size)
        xts = XtsSectors(key, sector_size)
        # The run in calls of odd numbers of sectors (the same context goes on from call to call).
        cuts = sorted({0, count, 1, 2, 5, 12, count - 7, count - 1} | {rng.randrange(count) for _ in range(3)})
        out, back = bytearray(len(data)), bytearray(len(data))
        with memoryview(data) as plain, memoryview(out) as cipher, memoryview(back) as deciphered:
            for start, stop in zip(cuts, cuts[1:], strict=False):
                piece = slice(start * sector_size, stop * sector_size)
                xts.encrypt(first + start, plain[piece], cipher[piece])
                assert cipher[piece] == expected[piece], (first, start, stop)
                xts.decrypt(first + start, cipher[piece], deciphered[piece])
                assert deciphered[piece] == data[piece], (first, start, stop)
        assert bytes(out) == expected
        assert bytes(back) == data


def test_threads_each_encrypt_and_decrypt_with_one_xts_at_once():
    """An OpenSSL context holds the tweak it is at: threads sharing one XtsSectors must not share one."""
    rng = random.Random(5)
    key = rng.randbytes(64)
    xts = XtsSectors(key)
    jobs = []
    for _ in range(8):
        first = rng.randrange(2**40)
        data = rng.randbytes(rng.randint(1, 64) * SECTOR_SIZE)
        jobs.append((first, data, xts_per_sector(key, list(range(first, first + len(data) // SECTOR_SIZE)), data,
                                                 SECTOR_SIZE)))

    def work(job) -> bool:
        first, data, expected = job
        for _ in range(30):
            out, back = bytearray(len(data)), bytearray(len(data))
            xts.encrypt(first, data, out)
            xts.decrypt(first, out, back)
            if out != expected or back != data:
                return False
        return True

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert all(pool.map(work, jobs * 3))


def test_decrypting_per_sector_ciphertext_and_sector_numbers_given_one_by_one():
    rng = random.Random(3)
    key = rng.randbytes(64)
    numbers = sorted(rng.sample(range(2**41), 25)) + [0, 2**64 - 1, 2**40]
    data = rng.randbytes(len(numbers) * SECTOR_SIZE)
    ciphertext = xts_per_sector(key, numbers, data, SECTOR_SIZE)
    xts = XtsSectors(key)
    for given in (numbers, array("Q", numbers)):
        out = bytearray(len(data))
        xts.encrypt(given, data, out)
        assert bytes(out) == ciphertext
        plain = bytearray(len(data))
        xts.decrypt(given, ciphertext, plain)
        assert bytes(plain) == data
    assert xts_per_sector(key, numbers, ciphertext, SECTOR_SIZE, decrypt=True) == data


@pytest.mark.parametrize("numbered", [False, True], ids=["first sector", "each sector's number"])
def test_a_call_of_megabytes_cut_into_parts_on_helper_threads_equals_per_sector_xts(numbered: bool):
    """A call of at least 2 MiB runs in parts side by side (sites/storage/xts.py PARALLEL_PART_BYTES); with
    `zeros_stay`, the sectors of zeros (here one in five, and one at each part's edge) stay zeros, into a
    target that held other bytes and in place, the others as the per-sector reference."""
    rng = random.Random(f"parts/{numbered}")
    key = rng.randbytes(64)
    count = 5 * 1024 * 1024 // SECTOR_SIZE + 3  # not a multiple of the parts
    first = 2**40 + 17
    numbers = [first + i for i in range(count)]
    if numbered:
        numbers = sorted(rng.sample(range(2**41), count))
    zero = {i for i in range(count) if i % 5 == 0} | {count // 2, count // 2 - 1, count - 1}
    data = bytearray(rng.randbytes(count * SECTOR_SIZE))
    for i in zero:
        data[i * SECTOR_SIZE:(i + 1) * SECTOR_SIZE] = bytes(SECTOR_SIZE)
    reference = bytearray(xts_per_sector(key, numbers, bytes(data), SECTOR_SIZE))
    for i in zero:
        reference[i * SECTOR_SIZE:(i + 1) * SECTOR_SIZE] = bytes(SECTOR_SIZE)
    xts = XtsSectors(key)
    given = numbers if numbered else first
    out = bytearray(b"\xa5" * len(data))
    xts.encrypt(given, data, out, zeros_stay=True)
    assert out == reference
    xts.decrypt(given, out, out, zeros_stay=True)
    assert out == data
    plain_xts = bytearray(len(data))  # without zeros_stay a sector of zeros is encrypted as any other
    xts.encrypt(given, data, plain_xts)
    assert plain_xts == xts_per_sector(key, numbers, bytes(data), SECTOR_SIZE)


def test_in_place_and_empty():
    rng = random.Random(4)
    key = rng.randbytes(64)
    data = rng.randbytes(300 * SECTOR_SIZE)
    buffer = bytearray(data)
    xts = XtsSectors(key)
    xts.encrypt(77, buffer, buffer)
    assert bytes(buffer) == xts_per_sector(key, list(range(77, 377)), data, SECTOR_SIZE)
    xts.decrypt(77, buffer, buffer)
    assert bytes(buffer) == data
    xts.encrypt(5, b"", bytearray())  # nothing to do


def test_bad_keys_sizes_and_sector_numbers_are_refused():
    key = os.urandom(64)
    with pytest.raises(ValueError, match="32 or 64 bytes"):
        XtsSectors(key[:48])
    with pytest.raises(ValueError, match="halves"):
        XtsSectors(key[:32] * 2)
    with pytest.raises(ValueError, match="multiple of 16"):
        XtsSectors(key, sector_size=1000)
    with pytest.raises(ValueError, match="multiple of 16"):
        XtsSectors(key, sector_size=(1 << 24) + 16)
    xts = XtsSectors(key)
    with pytest.raises(ValueError, match="whole 4096-byte sectors"):
        xts.encrypt(0, bytes(SECTOR_SIZE + 16), bytearray(SECTOR_SIZE + 16))
    with pytest.raises(ValueError, match="differ in length"):
        xts.encrypt(0, bytes(SECTOR_SIZE), bytearray(2 * SECTOR_SIZE))
    with pytest.raises(ValueError, match="writable"):
        xts.encrypt(0, bytes(SECTOR_SIZE), bytes(SECTOR_SIZE))
    with pytest.raises(ValueError, match="outside"):
        xts.encrypt(2**64 - 1, bytes(2 * SECTOR_SIZE), bytearray(2 * SECTOR_SIZE))
    with pytest.raises(ValueError, match="outside"):
        xts.encrypt(-1, bytes(SECTOR_SIZE), bytearray(SECTOR_SIZE))
    with pytest.raises(ValueError, match="sector numbers"):
        xts.encrypt([1, 2], bytes(SECTOR_SIZE), bytearray(SECTOR_SIZE))
    with pytest.raises(ValueError, match="sector numbers"):
        xts.encrypt([-3], bytes(SECTOR_SIZE), bytearray(SECTOR_SIZE))


# ---- EncryptedDisk: the stored format is unchanged ----------------------------------------------------
def old_encrypted_image(key: bytes, plain: bytes) -> bytes:
    """What EncryptedDisk stored before XTS over many sectors per call: per-sector XTS, all-zero sectors
    stored as zeros."""
    stored = bytearray(len(plain))
    for sector in range(len(plain) // SECTOR_SIZE):
        piece = plain[sector * SECTOR_SIZE:(sector + 1) * SECTOR_SIZE]
        if any(piece):
            stored[sector * SECTOR_SIZE:(sector + 1) * SECTOR_SIZE] = xts_per_sector(key, [sector], piece, SECTOR_SIZE)
    return bytes(stored)


def plain_disk_content(size: int, rng: random.Random) -> bytes:
    """Random data with zero sectors alone and in runs, and sectors that are zero but for one byte."""
    content = bytearray(rng.randbytes(size))
    for _ in range(size // SECTOR_SIZE // 6):
        sector = rng.randrange(size // SECTOR_SIZE)
        run = rng.choice([1, 1, 2, 5, 64])
        content[sector * SECTOR_SIZE:(sector + run) * SECTOR_SIZE] = bytes(len(content[sector * SECTOR_SIZE:
                                                                                      (sector + run) * SECTOR_SIZE]))
    for _ in range(5):
        sector = rng.randrange(size // SECTOR_SIZE)
        content[sector * SECTOR_SIZE:(sector + 1) * SECTOR_SIZE] = bytes(SECTOR_SIZE)
        content[sector * SECTOR_SIZE + rng.choice([0, 7, SECTOR_SIZE - 1])] = 1
    return bytes(content)


def test_a_replica_written_sector_by_sector_reads_the_same_and_new_writes_store_the_same(tmp_path: Path):
    rng = random.Random(11)
    key = rng.randbytes(64)
    size = 4 * MIB
    plain = plain_disk_content(size, rng)
    stored = old_encrypted_image(key, plain)
    storage = LocalDirectoryStorage(tmp_path / "storage")
    storage.create_disk("vm/old.vhd", size)
    with storage.open_disk("vm/old.vhd") as raw:
        raw.write(0, stored)  # the image the old code would have left
        raw.flush()
    with EncryptedDisk(storage.open_disk("vm/old.vhd"), key) as disk:
        whole = bytearray(size)
        disk.read_into(0, memoryview(whole))
        assert bytes(whole) == plain
        for _ in range(40):  # reads of any offset and length, sector-aligned or not
            offset = rng.randrange(size)
            length = rng.randrange(1, min(3 * SECTOR_SIZE * 40, size - offset) + 1)
            piece = bytearray(length)
            disk.read_into(offset, memoryview(piece))
            assert bytes(piece) == plain[offset:offset + length], (offset, length)

    storage.create_disk("vm/new.vhd", size)
    with EncryptedDisk(storage.open_disk("vm/new.vhd"), key) as disk:
        for offset in range(0, size, MIB):  # as the copy writes: large aligned runs
            disk.write(offset, plain[offset:offset + MIB])
        disk.flush()
    with storage.open_disk("vm/new.vhd") as raw:
        image = bytearray(size)
        raw.read_into(0, memoryview(image))
    assert bytes(image) == stored


def test_partial_sector_writes_and_zero_writes_keep_the_format(tmp_path: Path):
    """Read-modify-write of parts of sectors (512-byte log records), zeros written over data, and data
    written over zeros: the stored image is always the old per-sector encoding of the plaintext."""
    rng = random.Random(12)
    key = rng.randbytes(64)
    size = MIB
    plain = bytearray(plain_disk_content(size, rng))
    storage = LocalDirectoryStorage(tmp_path / "storage")
    storage.create_disk("vm/disk.vhd", size)
    with EncryptedDisk(storage.open_disk("vm/disk.vhd"), key) as disk:
        disk.write(0, bytes(plain))
        for _ in range(150):
            offset = rng.randrange(size // 512) * 512
            length = min(rng.randrange(1, 40) * 512, size - offset)
            if rng.random() < 0.3:
                disk.write_zeros(offset, length)
                plain[offset:offset + length] = bytes(length)
            else:
                data = rng.randbytes(length) if rng.random() < 0.8 else bytes(length)
                disk.write(offset, data)
                plain[offset:offset + length] = data
        whole = bytearray(size)
        disk.read_into(0, memoryview(whole))
        assert whole == plain
    with storage.open_disk("vm/disk.vhd") as raw:
        image = bytearray(size)
        raw.read_into(0, memoryview(image))
    assert bytes(image) == old_encrypted_image(key, bytes(plain))
    zero_sectors = [s for s in range(size // SECTOR_SIZE) if not any(plain[s * SECTOR_SIZE:(s + 1) * SECTOR_SIZE])]
    assert zero_sectors, "the test writes zero sectors"
    for sector in zero_sectors:
        assert not any(image[sector * SECTOR_SIZE:(sector + 1) * SECTOR_SIZE]), sector
