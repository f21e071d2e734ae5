"""Replication logs: writing, verifying and applying them, on real raw and VHD files and on the
recovery-site storage backends. Every apply is checked byte for byte against a plain replay of the same
writes, and every rejected log against an untouched copy of the target."""
from __future__ import annotations

import os
import random
import shutil
import struct
import subprocess
import threading
import uuid
from dataclasses import replace
from pathlib import Path

import mmh3
import pytest

from datapath.disk import create_disk, open_disk
from datapath.errors import AlignmentError, LogCorruptError, LogOutOfSequenceError
from datapath.logapply import MAX_TARGET_WRITE, apply_log
from datapath.logformat import HEADER_SIZE, MAX_RECORD_DATA, LogWriter
from datapath.logreader import LogDiskMismatchError, LogReader, read_log_header, read_seal, verify_log
from sites.storage.base import RecoveryStorage

KIB = 1024
MIB = 1024 * KIB
DISK_SIZE = 16 * MIB
DISK_ID = uuid.UUID("6a1f0c1e-2b3d-4e5f-8a9b-0c1d2e3f4a5b").bytes
QEMU_TIMEOUT = 30

Write = tuple[int, bytes]


# ---- helpers -------------------------------------------------------------------------------------
def make_disk(path: Path, fmt: str = "raw", size: int = DISK_SIZE, seed: int | None = 7) -> Path:
    """A disk of random content (a seed of None leaves it all zeros)."""
    create_disk(path, size, fmt)
    if seed is not None:
        data = random.Random(seed).randbytes(size)
        with open_disk(path, writable=True) as disk:
            disk.write(0, data)
    return path


def random_writes(rng: random.Random, count: int, *, size: int = DISK_SIZE, max_sectors: int = 64,
                  region: tuple[int, int] | None = None) -> list[Write]:
    low, high = region or (0, size)
    writes = []
    for _ in range(count):
        length = rng.randint(1, max_sectors) * 512
        offset = rng.randrange(low, high - length + 1) // 512 * 512
        writes.append((offset, rng.randbytes(length)))
    return writes


def write_log(path: Path, writes: list[Write], *, generation: int = 3, first_seq: int = 1001,
              disk_size: int = DISK_SIZE, disk_id: bytes = DISK_ID) -> Path:
    with LogWriter.create(path, disk_id=disk_id, generation=generation, first_seq=first_seq,
                          disk_size=disk_size) as log:
        for offset, data in writes:
            log.append(offset, data)
        log.seal()
    return path


def replay(path: Path, writes: list[Write]) -> None:
    """The plain reference: every write, in order, one by one."""
    with open(path, "r+b") as f:
        for offset, data in writes:
            f.seek(offset)
            f.write(data)


def record_positions(writes: list[Write]) -> list[int]:
    """File position of each record, from the layout in docs/formats.md; the last one is the SEAL's."""
    positions = [HEADER_SIZE]
    for _, data in writes:
        positions.append(positions[-1] + 24 + len(data) + 16)
    return positions


def flip_byte(path: Path, position: int) -> None:
    with open(path, "r+b") as f:
        f.seek(position)
        byte = f.read(1)[0]
        f.seek(position)
        f.write(bytes([byte ^ 0x5A]))


def qemu_compare(vhd: Path, raw: Path) -> None:
    """qemu-img's own reading of the VHD must equal the raw reference."""
    subprocess.run(["qemu-img", "compare", "-q", "-f", "vpc", "-F", "raw", str(vhd), str(raw)],
                   check=True, timeout=QEMU_TIMEOUT)


class SpecLog:
    """A log assembled by hand from docs/formats.md, independent of LogWriter, to build the logs a
    correct writer never would."""

    def __init__(self, *, generation: int = 3, first_seq: int = 1001, disk_size: int = DISK_SIZE,
                 created: int = 0):
        fields = struct.pack("<8sHHI16sQQQQ", b"ASRHRL1\0", 1, 80, 512, DISK_ID, generation, first_seq,
                             disk_size, created)
        self.header_checksum = mmh3.mmh3_x64_128_digest(fields)
        self.parts = [fields + self.header_checksum]
        self.digest = self.header_checksum
        self.records = 0
        self.data_bytes = 0
        self.next_seq = first_seq

    def record(self, rtype: int, seq: int, offset: int, payload: bytes) -> bytes:
        body = struct.pack("<IIQQ", rtype, len(payload), seq, offset) + payload
        checksum = mmh3.mmh3_x64_128_digest(body)
        self.parts.append(body + checksum)
        return checksum

    def raw(self, rtype: int, seq: int, offset: int, payload: bytes) -> SpecLog:
        """A record of any type, outside the count and digest."""
        self.record(rtype, seq, offset, payload)
        return self

    def write(self, offset: int, data: bytes, *, seq: int | None = None) -> SpecLog:
        checksum = self.record(1, self.next_seq if seq is None else seq, offset, data)
        self.digest = mmh3.mmh3_x64_128_digest(self.digest + checksum)
        self.records += 1
        self.data_bytes += len(data)
        self.next_seq += 1
        return self

    def seal(self, *, records: int | None = None, digest: bytes | None = None) -> SpecLog:
        payload = struct.pack("<QQQ16s", self.records if records is None else records, self.next_seq - 1,
                              self.data_bytes, self.digest if digest is None else digest)
        self.record(2, self.next_seq, 0, payload)
        return self

    def save(self, path: Path, trailer: bytes = b"") -> Path:
        path.write_bytes(b"".join(self.parts) + trailer)
        return path


@pytest.fixture
def rng() -> random.Random:
    return random.Random(2024)


# ---- round trip ----------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["raw", "vhd"])
def test_round_trip_applies_exactly_the_logged_writes(tmp_path: Path, rng: random.Random, fmt: str) -> None:
    writes = random_writes(rng, 1500, max_sectors=64)
    # Full-size records and a log several times the reader's buffer exercise its refilling.
    writes += [(rng.randrange(0, DISK_SIZE - MAX_RECORD_DATA) // 512 * 512, rng.randbytes(MAX_RECORD_DATA))
               for _ in range(3)]
    writes += random_writes(rng, 500, max_sectors=8)
    log = write_log(tmp_path / "disk0.vhd.00000003.hrl", writes)

    with open(log, "rb") as f:
        reader = LogReader(f)
        seen = [(r.seq, r.offset, r.data.tobytes()) for r in reader.records()]
    assert seen == [(1001 + i, offset, data) for i, (offset, data) in enumerate(writes)]
    assert reader.seal is not None and reader.seal.records == len(writes)
    assert reader.seal.last_seq == 1000 + len(writes)
    assert reader.seal.data_bytes == sum(len(d) for _, d in writes)
    assert reader.seal.size == log.stat().st_size

    header, seal = verify_log(log, disk_id=DISK_ID, disk_size=DISK_SIZE)
    assert (header.generation, header.first_seq, header.disk_size, header.block_size) == (3, 1001, DISK_SIZE, 512)
    assert read_log_header(log) == header
    assert read_seal(log, header) == seal

    target = make_disk(tmp_path / f"replica.{fmt}", fmt)
    reference = tmp_path / "reference.raw"
    with open(reference, "wb") as f, open(target, "rb") as src:
        f.write(src.read(DISK_SIZE))
    footer_before = target.read_bytes()[DISK_SIZE:]
    replay(reference, writes)

    with open_disk(target, writable=True) as disk:
        applied = apply_log(log, disk, expected_generation=3, disk_id=DISK_ID, disk_name="disk0.vhd")
    assert (applied.generation, applied.first_seq, applied.last_seq, applied.records) == (
        3, 1001, 1000 + len(writes), len(writes))
    assert applied.data_bytes == seal.data_bytes
    assert 0 < applied.bytes_written <= DISK_SIZE
    assert target.read_bytes()[:DISK_SIZE] == reference.read_bytes()
    assert target.read_bytes()[DISK_SIZE:] == footer_before
    if fmt == "vhd":
        qemu_compare(target, reference)


def test_log_built_from_the_format_document_is_accepted(tmp_path: Path) -> None:
    writes = [(0, b"\x11" * 512), (8 * KIB, b"\x22" * 4096), (DISK_SIZE - 512, b"\x33" * 512)]
    spec = SpecLog()
    for offset, data in writes:
        spec.write(offset, data)
    log = spec.seal().save(tmp_path / "spec.hrl")
    header, seal = verify_log(log)
    assert header.checksum == spec.header_checksum
    assert (seal.records, seal.last_seq, seal.data_bytes, seal.digest) == (3, 1003, 5120, spec.digest)

    # LogWriter writes exactly the bytes the document describes, creation time included.
    written = write_log(tmp_path / "written.hrl", writes).read_bytes()
    spec = SpecLog(created=struct.unpack_from("<Q", written, 56)[0])
    for offset, data in writes:
        spec.write(offset, data)
    assert b"".join(spec.seal().parts) == written


def test_empty_sealed_log_applies_as_a_no_op(tmp_path: Path) -> None:
    log = write_log(tmp_path / "empty.hrl", [], generation=5, first_seq=77)
    assert log.stat().st_size == 160
    target = make_disk(tmp_path / "replica.vhd", "vhd")
    before = target.read_bytes()
    with open_disk(target, writable=True) as disk:
        applied = apply_log(log, disk, expected_generation=5)
    assert (applied.records, applied.data_bytes, applied.bytes_written) == (0, 0, 0)
    assert (applied.first_seq, applied.last_seq) == (77, 76)
    assert target.read_bytes() == before


# ---- rejected logs change nothing ----------------------------------------------------------------
def corrupt_cases() -> list:
    def flipped_data(log: Path, writes: list[Write]) -> None:
        flip_byte(log, record_positions(writes)[16] + 24 + 100)

    def flipped_record_header(log: Path, writes: list[Write]) -> None:
        flip_byte(log, record_positions(writes)[4] + 17)  # inside the disk offset field

    def flipped_file_header(log: Path, writes: list[Write]) -> None:
        flip_byte(log, 33)  # inside the generation

    def truncated_mid_record(log: Path, writes: list[Write]) -> None:
        os.truncate(log, record_positions(writes)[29] + 24 + 10)

    def truncated_mid_record_header(log: Path, writes: list[Write]) -> None:
        os.truncate(log, record_positions(writes)[29] + 7)

    def missing_seal(log: Path, writes: list[Write]) -> None:
        os.truncate(log, record_positions(writes)[-1])

    def data_after_seal(log: Path, writes: list[Write]) -> None:
        with open(log, "ab") as f:
            f.write(b"\0" * 512)

    return [
        pytest.param(flipped_data, 17, "checksum mismatch", id="flipped-data-byte"),
        pytest.param(flipped_record_header, 5, "checksum mismatch", id="flipped-record-header-byte"),
        pytest.param(flipped_file_header, None, "header checksum mismatch", id="flipped-file-header-byte"),
        pytest.param(truncated_mid_record, 30, "truncated", id="truncated-mid-record"),
        pytest.param(truncated_mid_record_header, 30, "truncated", id="truncated-mid-record-header"),
        pytest.param(missing_seal, 41, "without a SEAL record", id="missing-seal"),
        pytest.param(data_after_seal, 41, "data after the SEAL record", id="data-after-seal"),
    ]


def assert_rejected_without_writing(tmp_path: Path, log: Path, record: int | None, detail: str,
                                    error: type[Exception] = LogCorruptError) -> LogCorruptError:
    target = tmp_path / "replica.vhd"
    target.unlink(missing_ok=True)
    make_disk(target, "vhd")
    before = target.read_bytes()
    with open_disk(target, writable=True) as disk, pytest.raises(error) as caught:
        apply_log(log, disk, expected_generation=3, disk_name="disk0.vhd")
    message = str(caught.value)
    assert message.startswith(f"replication log {log.name} of disk disk0.vhd")
    assert detail in message
    if isinstance(caught.value, LogCorruptError):
        assert caught.value.disk == "disk0.vhd"
        assert caught.value.record == record
        if record is not None:
            assert f": record {record}" in message
    assert target.read_bytes() == before
    return caught.value


@pytest.mark.parametrize("damage, record, detail", corrupt_cases())
def test_damaged_log_is_rejected_before_anything_is_written(tmp_path: Path, rng: random.Random, damage,
                                                            record: int | None, detail: str) -> None:
    writes = random_writes(rng, 40)
    log = write_log(tmp_path / "disk0.vhd.00000003.hrl", writes)
    damage(log, writes)
    error = assert_rejected_without_writing(tmp_path, log, record, detail)
    if detail == "checksum mismatch":
        assert f"(seq {1000 + record})" in str(error)
    with pytest.raises(LogCorruptError):
        verify_log(log)


def test_sequence_gap_is_rejected(tmp_path: Path, rng: random.Random) -> None:
    writes = random_writes(rng, 20)
    with LogWriter.create(tmp_path / "gap.hrl", disk_id=DISK_ID, generation=3, first_seq=1001,
                          disk_size=DISK_SIZE) as log:
        for i, (offset, data) in enumerate(writes):
            if i == 10:  # a writer that lost a sequence number
                log.state = replace(log.state, next_seq=log.state.next_seq + 1)
            log.append(offset, data)
        log.seal()
    error = assert_rejected_without_writing(tmp_path, tmp_path / "gap.hrl", 11, "sequence gap")
    assert "(seq 1012)" in str(error) and "expected seq 1011" in str(error)


@pytest.mark.parametrize("offset, detail", [
    pytest.param(DISK_SIZE, "outside the disk", id="offset-outside-disk"),
    pytest.param(DISK_SIZE - 512, "outside the disk", id="range-crossing-disk-end"),
    pytest.param(4096 + 100, "unaligned", id="unaligned-offset"),
])
def test_record_outside_the_disk_is_rejected(tmp_path: Path, offset: int, detail: str) -> None:
    spec = SpecLog().write(0, b"\1" * 4096).write(offset, b"\2" * 1024).write(8192, b"\3" * 512)
    log = spec.seal().save(tmp_path / "outside.hrl")
    assert_rejected_without_writing(tmp_path, log, 2, detail)


@pytest.mark.parametrize("build, record, detail", [
    pytest.param(lambda s: s.write(0, b"\1" * 512).seal(records=2), 2, "SEAL record says 2 records",
                 id="seal-count-wrong"),
    pytest.param(lambda s: s.write(0, b"\1" * 512).seal(digest=b"\0" * 16), 2, "log digest mismatch",
                 id="seal-digest-wrong"),
    pytest.param(lambda s: s.raw(9, 1001, 0, b""), 1, "unknown record type 9", id="unknown-type"),
    pytest.param(lambda s: s.write(0, b"\1" * 100).seal(), 1, "bad data length 100", id="unaligned-length"),
    pytest.param(lambda s: s.write(0, b"\1" * 512, seq=1000).seal(), 1, "sequence gap", id="seq-before-first"),
])
def test_inconsistent_log_is_rejected(tmp_path: Path, build, record: int, detail: str) -> None:
    log = build(SpecLog()).save(tmp_path / "bad.hrl")
    assert_rejected_without_writing(tmp_path, log, record, detail)


def test_not_a_log_is_rejected(tmp_path: Path) -> None:
    log = tmp_path / "garbage.hrl"
    log.write_bytes(os.urandom(4096))
    assert_rejected_without_writing(tmp_path, log, None, "not a replication log")
    log.write_bytes(b"ASRHRL1\0")
    assert_rejected_without_writing(tmp_path, log, None, "truncated header")


def test_log_of_another_generation_is_rejected(tmp_path: Path, rng: random.Random) -> None:
    log = write_log(tmp_path / "disk0.vhd.00000003.hrl", random_writes(rng, 10), generation=3)
    target = make_disk(tmp_path / "replica.raw")
    before = target.read_bytes()
    with open_disk(target, writable=True) as disk:
        for expected in (2, 4):
            with pytest.raises(LogOutOfSequenceError) as caught:
                apply_log(log, disk, expected_generation=expected, disk_name="disk0.vhd")
            assert "generation 3" in str(caught.value) and f"generation {expected}" in str(caught.value)
            assert "disk0.vhd.00000003.hrl" in str(caught.value)
    assert target.read_bytes() == before


def test_log_of_another_disk_is_rejected(tmp_path: Path, rng: random.Random) -> None:
    log = write_log(tmp_path / "disk0.vhd.00000003.hrl", random_writes(rng, 10))
    other_id = uuid.uuid4().bytes
    target = make_disk(tmp_path / "replica.raw")
    before = target.read_bytes()
    with open_disk(target, writable=True) as disk:
        with pytest.raises(LogDiskMismatchError) as caught:
            apply_log(log, disk, expected_generation=3, disk_id=other_id)
        assert str(uuid.UUID(bytes=DISK_ID)) in str(caught.value)
        assert str(uuid.UUID(bytes=other_id)) in str(caught.value)
    small = make_disk(tmp_path / "small.raw", size=8 * MIB)
    small_before = small.read_bytes()
    with open_disk(small, writable=True) as disk, pytest.raises(LogDiskMismatchError, match="8388608 bytes"):
        apply_log(log, disk, expected_generation=3, disk_id=DISK_ID)
    assert target.read_bytes() == before and small.read_bytes() == small_before


# ---- idempotence and crashes ---------------------------------------------------------------------
def test_applying_twice_gives_the_same_disk(tmp_path: Path, rng: random.Random) -> None:
    writes = random_writes(rng, 400, max_sectors=128)
    log = write_log(tmp_path / "l.hrl", writes)
    target, reference = make_disk(tmp_path / "replica.raw"), make_disk(tmp_path / "reference.raw")
    replay(reference, writes)
    with open_disk(target, writable=True) as disk:
        apply_log(log, disk, expected_generation=3)
        assert target.read_bytes() == reference.read_bytes()
        apply_log(log, disk, expected_generation=3)
    assert target.read_bytes() == reference.read_bytes()


@pytest.mark.parametrize("prefix", [1, 150, 299])
def test_apply_after_a_crash_half_way_gives_the_same_disk(tmp_path: Path, rng: random.Random, prefix: int) -> None:
    # Rewrites of one hot region make the outcome depend on order: a replay that let an early record
    # win would show.
    writes = random_writes(rng, 300, max_sectors=32, region=(0, MIB)) + random_writes(rng, 100)
    rng.shuffle(writes)
    log = write_log(tmp_path / "l.hrl", writes)
    target, reference = make_disk(tmp_path / "replica.vhd", "vhd"), make_disk(tmp_path / "reference.raw")
    replay(reference, writes)
    with open_disk(target, writable=True) as disk:
        for offset, data in writes[:prefix]:  # what an apply got through before it crashed
            disk.write(offset, data)
        apply_log(log, disk, expected_generation=3)
    assert target.read_bytes()[:DISK_SIZE] == reference.read_bytes()
    qemu_compare(target, reference)


# ---- coalescing ----------------------------------------------------------------------------------
class AlignedFileDisk:
    """A real file behind the DiskEndpoint interface with a page blob's rules: writes must be aligned
    to `alignment` (or end at the disk's end) and at most 4 MiB. Counts the writes it receives."""

    def __init__(self, path: Path, alignment: int):
        self._disk = open_disk(path, writable=True)
        self.name, self.size, self.alignment = f"aligned:{path.name}", self._disk.size, alignment
        self.writes: list[tuple[int, int]] = []

    def read_into(self, offset: int, buf: memoryview) -> int:
        return self._disk.read_into(offset, buf)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        length = memoryview(data).nbytes
        if offset % self.alignment or (length % self.alignment and offset + length != self.size):
            raise AlignmentError(f"{self.name}: unaligned write of {length} bytes at {offset}")
        if length > MAX_TARGET_WRITE:
            raise ValueError(f"{self.name}: write of {length} bytes exceeds {MAX_TARGET_WRITE}")
        self.writes.append((offset, length))
        self._disk.write(offset, data)

    def write_zeros(self, offset: int, length: int) -> None:
        raise AssertionError("apply_log never writes zeros")

    def data_extents(self, offset: int = 0, length: int | None = None):
        return self._disk.data_extents(offset, length)

    def flush(self) -> None:
        self._disk.flush()

    def close(self) -> None:
        self._disk.close()


@pytest.mark.parametrize("alignment", [1, 512, 4096, 65536])
def test_coalescing_matches_a_plain_replay(tmp_path: Path, rng: random.Random, alignment: int) -> None:
    # Overlapping rewrites of a hot region, scattered writes, and a sequential run, with the smallest
    # window so the map is written out several times mid-log.
    writes = random_writes(rng, 3000, max_sectors=16, region=(2 * MIB, 3 * MIB))
    writes += random_writes(rng, 500, max_sectors=64)
    writes += [(8 * MIB + i * 4096, rng.randbytes(4096)) for i in range(2048)]
    rng.shuffle(writes)
    writes += [(2 * MIB, rng.randbytes(MIB))]  # the last writer wins over a whole region
    log = write_log(tmp_path / "l.hrl", writes)
    target, reference = make_disk(tmp_path / "replica.raw"), make_disk(tmp_path / "reference.raw")
    replay(reference, writes)
    disk = AlignedFileDisk(target, alignment)
    try:
        applied = apply_log(log, disk, expected_generation=3, window=MAX_RECORD_DATA)
    finally:
        disk.close()
    assert target.read_bytes() == reference.read_bytes()
    assert len(disk.writes) < len(writes) / 2
    assert applied.bytes_written == sum(length for _, length in disk.writes)


def test_sequential_records_become_few_large_writes(tmp_path: Path, rng: random.Random) -> None:
    writes = [(i * 4096, rng.randbytes(4096)) for i in range(2048)]  # 8 MiB in 4 KiB records
    log = write_log(tmp_path / "l.hrl", writes)
    target = make_disk(tmp_path / "replica.raw", seed=None)
    disk = AlignedFileDisk(target, 512)
    try:
        applied = apply_log(log, disk, expected_generation=3)
    finally:
        disk.close()
    assert disk.writes == [(0, 4 * MIB), (4 * MIB, 4 * MIB)]
    assert applied.bytes_written == 8 * MIB
    assert target.read_bytes()[: 8 * MIB] == b"".join(data for _, data in writes)


def test_apply_to_recovery_storage(storage: RecoveryStorage, tmp_path: Path, rng: random.Random) -> None:
    size = 8 * MIB
    writes = random_writes(rng, 300, size=size, max_sectors=64)
    writes += random_writes(rng, 300, size=size, region=(0, 64 * KIB))
    log = write_log(tmp_path / "disk0.vhd.00000003.hrl", writes, disk_size=size)
    reference = make_disk(tmp_path / "reference.raw", size=size, seed=None)
    replay(reference, writes)
    storage.create_disk("vm1/disk0.vhd", size)
    with storage.open_disk("vm1/disk0.vhd") as replica:
        applied = apply_log(log, replica, expected_generation=3, disk_id=DISK_ID)
        content = bytearray(size)
        replica.read_into(0, memoryview(content))
    assert applied.records == len(writes)
    assert bytes(content) == reference.read_bytes()


def test_apply_from_a_stream_that_cannot_seek(tmp_path: Path, rng: random.Random) -> None:
    writes = random_writes(rng, 200)
    log = write_log(tmp_path / "l.hrl", writes)
    target, reference = make_disk(tmp_path / "replica.raw"), make_disk(tmp_path / "reference.raw")
    replay(reference, writes)
    read_end, write_end = os.pipe()

    def feed() -> None:
        with open(write_end, "wb") as pipe, open(log, "rb") as src:
            shutil.copyfileobj(src, pipe)

    feeder = threading.Thread(target=feed)
    feeder.start()
    try:
        with open(read_end, "rb") as pipe, open_disk(target, writable=True) as disk:
            apply_log(pipe, disk, expected_generation=3)
    finally:
        feeder.join(timeout=30)
    assert not feeder.is_alive()
    assert target.read_bytes() == reference.read_bytes()


# ---- the writer refuses bad input ----------------------------------------------------------------
@pytest.mark.parametrize("offset, length, error", [
    (100, 512, AlignmentError),
    (0, 700, AlignmentError),
    (DISK_SIZE, 512, ValueError),
    (0, MAX_RECORD_DATA + 512, ValueError),
])
def test_writer_refuses_bad_writes_and_leaves_the_log_as_it_was(tmp_path: Path, offset: int, length: int,
                                                                 error: type[Exception]) -> None:
    with LogWriter.create(tmp_path / "l.hrl", disk_id=DISK_ID, generation=1, first_seq=1,
                          disk_size=DISK_SIZE) as log:
        log.append(0, b"\1" * 512)
        before = (tmp_path / "l.hrl").read_bytes(), log.state
        with pytest.raises(error, match="l.hrl"):
            log.append(offset, b"\2" * length)
        assert ((tmp_path / "l.hrl").read_bytes(), log.state) == before
        log.seal()
    assert verify_log(tmp_path / "l.hrl")[1].records == 1
