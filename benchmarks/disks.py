"""The disks the data-path benchmarks measure on, generated from a seed, and the checks of what a run wrote.

- A full disk of random data (the AES-256-CTR keystream of the seed: incompressible), and a sparse one
  holding as many bytes in scattered extents over SPARSE_VIRTUAL_FACTOR times the size; the damage and the
  churn written to them are drawn from the seed too.
- A timed run starts with the files it touches dropped from the page cache (fsync, then
  POSIX_FADV_DONTNEED), so both sides read the same cold disk.
- Every result that moves disk data is checked byte for byte with `cmp` over the union of both files'
  data extents (outside them both files are holes, and cmp reading holes crawls at 0.3 GB/s), and a
  replica's VHD footer with `qemu-img info`. A wrong result raises BenchmarkError (benchmarks/harness.py).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from benchmarks.harness import BenchmarkError, command_timeout

MiB = 1 << 20
SPARSE_VIRTUAL_FACTOR = 10
"""The sparse disk is this many times the data it holds (10 GiB virtual for 1 GiB of data)."""
DAMAGED_CHUNK_FRACTION = 0.01
DAMAGE_WRITE_SIZE = 4096
CHURN_WRITE_SIZES = tuple(4096 << k for k in range(9))
"""4 KiB to 1 MiB, each equally likely: mostly small writes by count, mostly large ones by volume."""

_RANDOM_PIECE = 64 * MiB


# ---- generated data --------------------------------------------------------------------------------
class RandomData:
    """Incompressible bytes reproducible from a seed: the AES-256-CTR keystream (about 4.5 GB/s here,
    where os.urandom and random.randbytes give 0.2 GB/s)."""

    def __init__(self, seed: int, stream: str):
        key = hashlib.sha256(f"{seed}/{stream}".encode()).digest()
        self._encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
        self._zeros = memoryview(bytes(_RANDOM_PIECE))

    def take(self, length: int) -> bytes:
        """The next `length` bytes of the stream (at most 64 MiB)."""
        if not 0 < length <= _RANDOM_PIECE:
            raise ValueError(f"random data is taken 1 byte to {_RANDOM_PIECE} bytes at a time, not {length}")
        return self._encryptor.update(self._zeros[:length])


def write_random_disk(path: Path, size: int, data: RandomData) -> None:
    """A raw disk image of `size` bytes of random data, durable and dropped from the page cache."""
    with open(path, "xb") as out:
        for offset in range(0, size, _RANDOM_PIECE):
            out.write(data.take(min(_RANDOM_PIECE, size - offset)))
    drop_from_cache(path)


def scatter_extents(virtual_size: int, data_size: int, rng: random.Random) -> list[tuple[int, int]]:
    """(offset, length) of extents 64 KiB to 8 MiB long totalling `data_size` bytes, in order, with
    random gaps between them over `virtual_size` bytes (both sizes whole multiples of 64 KiB)."""
    unit = 64 * 1024
    if virtual_size % unit or data_size % unit or not 0 < data_size <= virtual_size:
        raise ValueError(f"cannot scatter {data_size} bytes over {virtual_size} bytes in 64 KiB units")
    lengths = []
    remaining = data_size // unit
    while remaining:
        lengths.append(min(remaining, rng.randint(1, 128)))
        remaining -= lengths[-1]
    hole_units = (virtual_size - data_size) // unit
    cuts = sorted(rng.randrange(hole_units + 1) for _ in lengths)
    extents = []
    position = previous_cut = 0
    for units, cut in zip(lengths, cuts, strict=True):
        position += (cut - previous_cut) * unit
        previous_cut = cut
        extents.append((position, units * unit))
        position += units * unit
    return extents


def write_sparse_disk(path: Path, virtual_size: int, extents: list[tuple[int, int]], data: RandomData) -> None:
    """A sparse raw disk image: random data in `extents`, holes elsewhere; dropped from the cache."""
    with open(path, "xb") as out:
        out.truncate(virtual_size)
        for offset, length in extents:
            os.pwrite(out.fileno(), data.take(length), offset)
    drop_from_cache(path)


def drop_from_cache(*paths: Path) -> None:
    """Make the files durable and drop their pages from the page cache, so the next read is cold
    (dirty pages cannot be dropped, hence the fsync first). Then flush every other dirty page on the
    machine too, so that the writeback of earlier steps (a deleted target, a previous round) does not
    land inside the next timed run."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    os.sync()


def allocated_bytes(path: Path) -> int:
    return os.stat(path).st_blocks * 512


@dataclass(frozen=True)
class Damage:
    """Small random writes, replayable onto any copy of a disk to damage it the same way."""

    writes: tuple[tuple[int, bytes], ...]
    chunk_size: int

    @property
    def chunks(self) -> int:
        return len({offset // self.chunk_size for offset, _ in self.writes})

    @property
    def bytes(self) -> int:
        return sum(len(data) for _, data in self.writes)

    def blocks_touched(self, block_size: int) -> int:
        return len({block for offset, data in self.writes
                    for block in range(offset // block_size, (offset + len(data) - 1) // block_size + 1)})

    def apply(self, path: Path) -> None:
        fd = os.open(path, os.O_WRONLY)
        try:
            for offset, data in self.writes:
                os.pwrite(fd, data, offset)
            os.fsync(fd)
        finally:
            os.close(fd)


def plan_damage(size: int, chunk_size: int, rng: random.Random, data: RandomData) -> Damage:
    """One DAMAGE_WRITE_SIZE write of random data in each of 1% of the chunks (picked at random), at a
    random sector-aligned offset inside the chunk: a guest writes whole sectors, not always whole
    4 KiB blocks, so a write may straddle two blocks."""
    chunks = size // chunk_size
    damaged = sorted(rng.sample(range(chunks), max(1, round(chunks * DAMAGED_CHUNK_FRACTION))))
    sectors_in_chunk = (chunk_size - DAMAGE_WRITE_SIZE) // 512 + 1
    return Damage(tuple((index * chunk_size + rng.randrange(sectors_in_chunk) * 512, data.take(DAMAGE_WRITE_SIZE))
                        for index in damaged), chunk_size)


def toggled_changes(original: Path, damage: Damage) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """The damage plan's writes as (offset, hex data), and the writes putting the original bytes back."""
    with open(original, "rb") as disk:
        restore = [(offset, os.pread(disk.fileno(), len(data), offset).hex()) for offset, data in damage.writes]
    return [(offset, data.hex()) for offset, data in damage.writes], restore



def plan_churn(size: int, volume: int, rng: random.Random) -> list[tuple[int, int]]:
    """(offset, length) of random 4 KiB-aligned writes inside a disk of `size` bytes, lengths drawn
    from CHURN_WRITE_SIZES, totalling at least `volume` bytes."""
    writes = []
    total = 0
    while total < volume:
        length = min(rng.choice(CHURN_WRITE_SIZES), size)
        writes.append((rng.randrange((size - length) // 4096 + 1) * 4096, length))
        total += length
    return writes


@dataclass(frozen=True)
class Disks:
    """The generated disks one run measures on."""

    size: int
    source: Path
    """A raw disk of `size` bytes of random data."""
    sparse_source: Path
    """A raw disk of SPARSE_VIRTUAL_FACTOR × `size` bytes holding `size` bytes of random data."""
    sparse_extents: int


def generate_disks(directory: Path, size: int, seed: int) -> Disks:
    """The run's disks in `directory` (created), dropped from the page cache."""
    directory.mkdir(parents=True, exist_ok=True)
    source = directory / "source.raw"
    write_random_disk(source, size, RandomData(seed, f"source-{size}"))
    sparse_source = directory / "sparse-source.raw"
    virtual_size = SPARSE_VIRTUAL_FACTOR * size
    extents = scatter_extents(virtual_size, size, random.Random(f"{seed}/extents-{size}"))
    write_sparse_disk(sparse_source, virtual_size, extents, RandomData(seed, f"sparse-{size}"))
    return Disks(size, source, sparse_source, len(extents))


# ---- checks ---------------------------------------------------------------------------------------
def data_ranges(path: Path, end: int) -> list[tuple[int, int]]:
    """The (offset, length) ranges of `path` below `end` that SEEK_DATA reports as data."""
    ranges = []
    fd = os.open(path, os.O_RDONLY)
    try:
        position = 0
        while position < end:
            try:
                start = os.lseek(fd, position, os.SEEK_DATA)
            except OSError:  # ENXIO: nothing but holes from here on
                break
            if start >= end:
                break
            stop = min(os.lseek(fd, start, os.SEEK_HOLE), end)
            ranges.append((start, stop - start))
            position = stop
    finally:
        os.close(fd)
    return ranges


def merged_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[list[int]] = []
    for offset, length in sorted(ranges):
        if merged and offset <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], offset + length)
        else:
            merged.append([offset, offset + length])
    return [(start, stop - start) for start, stop in merged]


def check_same_content(expected: Path, actual: Path, length: int, what: str) -> None:
    """BenchmarkError unless the first `length` bytes of both files are equal, compared by `cmp` over
    every range either file holds data in (elsewhere both read as zeros)."""
    for path in (expected, actual):
        if os.stat(path).st_size < length:
            raise BenchmarkError(f"{what}: {path} is shorter than the {length} bytes to compare")
    for offset, count in merged_ranges(data_ranges(expected, length) + data_ranges(actual, length)):
        compared = subprocess.run(
            ["cmp", f"--ignore-initial={offset}:{offset}", f"--bytes={count}", str(expected), str(actual)],
            capture_output=True, text=True, timeout=command_timeout(count),
        )
        if compared.returncode != 0:
            raise BenchmarkError(
                f"{what}: {actual} differs from {expected} in [{offset}, {offset + count}) "
                f"(cmp counts from {offset}): {(compared.stdout + compared.stderr).strip()}"
            )


def check_fixed_vhd(path: Path, size: int, what: str) -> None:
    """BenchmarkError unless qemu-img reads `path` as a VHD ("vpc") of virtual size `size` and the
    file is exactly the data and a 512-byte footer. (qemu-img probes a VHD only by a cookie at the
    start, which a fixed VHD lacks, hence `-f vpc`.)"""
    info = subprocess.run(["qemu-img", "info", "-f", "vpc", "--output=json", str(path)],
                          capture_output=True, text=True, timeout=60)
    if info.returncode != 0:
        raise BenchmarkError(f"{what}: qemu-img cannot read {path}: {info.stderr.strip()}")
    details = json.loads(info.stdout)
    file_size = os.stat(path).st_size
    if details.get("format") != "vpc" or details.get("virtual-size") != size or file_size != size + 512:
        raise BenchmarkError(
            f"{what}: {path} is not a fixed VHD of {size} bytes: qemu-img reads format "
            f"{details.get('format')!r} of virtual size {details.get('virtual-size')!r}; the file is "
            f"{file_size} bytes"
        )
