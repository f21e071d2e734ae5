"""The data-path benchmarks: each of ours against its peer, on the same generated disks, in one run.

How a measurement is made, and why:
- Ours runs in a child process (`python -m benchmarks.datapath STEP JSON`), timed with perf_counter
  around the call inside the child, so the interpreter's start is not counted and the child's peak
  resident memory (VmHWM) is the step's own. Peers are timed with perf_counter around their commands.
- Every timed run but the warm scan starts with the files it touches dropped from the page cache
  (fsync, then POSIX_FADV_DONTNEED), so both sides read the same cold disk.
- Ours and the peer alternate (round 1 ours first, round 2 the peer first, ...) and the best time of
  the rounds is reported, so neither side profits from its place; every run is kept in the results.
- Every result that moves disk data is checked byte for byte with `cmp` over the union of both files'
  data extents (outside them both files are holes, and cmp reading holes crawls at 0.3 GB/s), and a
  replica's VHD footer with `qemu-img info`. A run whose result is wrong raises BenchmarkError: it is
  not a result.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from datapath.buffers import aligned_buffer
from datapath.copy import copy_disk
from datapath.disk import format_size, open_disk
from datapath.logapply import apply_log
from datapath.manifest import Manifest, chunk_hash, compute_manifest
from datapath.replication import ReplicaDisk, initial_copy, resynchronize
from datapath.resync import sync_disks
from datapath.tracker import ReplicationTracker
from sites.storage.local import LocalDirectoryStorage

MiB = 1 << 20
CHUNK_SIZE = MiB
BLOCK_SIZE = 4096
SPARSE_VIRTUAL_FACTOR = 10
"""The sparse disk is this many times the data it holds (10 GiB virtual for 1 GiB of data)."""
SPARSE_ALLOCATION_SLACK = 0.01
"""A copy of the sparse disk stays sparse when it allocates at most 1% more than the source (the
replica's footer, and zeros between two extents inside one chunk)."""
DAMAGED_CHUNK_FRACTION = 0.01
DAMAGE_WRITE_SIZE = 4096
MAX_LOG_VOLUME = 256 * MiB
"""Bytes of random writes sent through the tracker for the log benchmark (less on small disks)."""
CHURN_WRITE_SIZES = tuple(4096 << k for k in range(9))
"""4 KiB to 1 MiB, each equally likely: mostly small writes by count, mostly large ones by volume."""
FLAT_MEMORY_SLACK = 4 * MiB
"""How much higher a step may peak on the full-size disk than on the quarter-size one and still count
as not growing with the disk."""
REPLICA_NAME = "bench/disk0.vhd"
RSYNC = ["rsync", "--inplace", "--no-whole-file", "--ignore-times", "--stats"]
"""rsync as the resync's peer: delta transfer onto the existing file. --ignore-times, or a target whose size
and mtime second match the source's would be skipped without a look."""

# The reference product's figures (shared/MISSION.md), used as goals where the issue sets none.
REFERENCE_CHECKSUM_GBPS = 3 / 60
"""Azure Site Recovery's failback checksum speed, "a few GB per minute": 3 GB/min."""
REFERENCE_MAX_CHURN_MBPS = 20.0
"""The highest churn a protected VM may have (premium storage), MB/s: applying logs must keep up."""

_RANDOM_PIECE = 64 * MiB
_CHILD_BASE_TIMEOUT_S = 120.0
_CHILD_BYTES_PER_S = 20 * 10**6
_REPO_ROOT = Path(__file__).resolve().parent.parent


class BenchmarkError(RuntimeError):
    """A benchmark could not be measured, or measured a wrong result."""


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
            capture_output=True, text=True, timeout=_timeout(count),
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


# ---- running ours and the peers ---------------------------------------------------------------------
def _timeout(byte_count: int) -> float:
    """120 s plus the time to move `byte_count` bytes at 20 MB/s: generous, but a bound."""
    return _CHILD_BASE_TIMEOUT_S + byte_count / _CHILD_BYTES_PER_S


def run_ours(step: str, byte_count: int, *, module: str = "benchmarks.datapath", **arguments: Any) -> dict[str, Any]:
    """Run one of our steps (of `module`'s STEPS) in a child process; its figures, with `seconds` and
    `peak_rss_bytes`."""
    command = [sys.executable, "-m", module, step, json.dumps(arguments)]
    search_path = [str(_REPO_ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    try:
        child = subprocess.run(command, capture_output=True, text=True, cwd=_REPO_ROOT,
                               env=dict(os.environ, PYTHONPATH=os.pathsep.join(search_path)),
                               timeout=_timeout(byte_count))
    except subprocess.TimeoutExpired as exc:
        raise BenchmarkError(f"step {step} {arguments} did not finish within {exc.timeout:.0f} s") from None
    if child.returncode != 0:
        raise BenchmarkError(
            f"step {step} {arguments} failed (exit {child.returncode}): {child.stderr.strip()[-3000:]}"
        )
    return json.loads(child.stdout)


def run_peer(commands: list[list[str]], byte_count: int) -> dict[str, Any]:
    """Run commands one after the other, timed together; their stdout is kept for parsing."""
    outputs = []
    started = time.perf_counter()
    for command in commands:
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=_timeout(byte_count))
        except subprocess.TimeoutExpired as exc:
            raise BenchmarkError(f"{' '.join(command)} did not finish within {exc.timeout:.0f} s") from None
        if done.returncode != 0:
            raise BenchmarkError(f"{' '.join(command)} failed (exit {done.returncode}): {done.stderr.strip()}")
        outputs.append(done.stdout)
    return {"seconds": time.perf_counter() - started, "stdout": "".join(outputs)}


def in_rounds(rounds: int, runs: list[Callable[[int], dict] | None],
              before_round: Callable[[int], None] | None = None) -> list[list[dict]]:
    """Each of `runs` once a round, given the round's number (1 to `rounds`): in the order listed in odd
    rounds, reversed in even ones, so no side always goes first; `before_round(number)` before each round.
    Their results, one list per run (empty for None), each marked with its round."""
    results: list[list[dict]] = [[] for _ in runs]
    order = list(enumerate(runs))
    for number in range(1, rounds + 1):
        if before_round is not None:
            before_round(number)
        for index, run in order if number % 2 else reversed(order):
            if run is not None:
                results[index].append(run(number) | {"round": number})
    return results


def alternate(
    rounds: int, ours: Callable[[], dict], peer: Callable[[], dict] | None
) -> tuple[list[dict], list[dict]]:
    """Run ours and the peer `rounds` times each: ours first in odd rounds, the peer first in even ones."""
    our_runs, peer_runs = in_rounds(rounds, [lambda _: ours(), None if peer is None else lambda _: peer()])
    return our_runs, peer_runs


_RSYNC_FIGURES = {
    "literal_data": r"Literal data: ([\d,]+) bytes",
    "matched_data": r"Matched data: ([\d,]+) bytes",
    "total_bytes_sent": r"Total bytes sent: ([\d,]+)",
    "total_bytes_received": r"Total bytes received: ([\d,]+)",
}


def parse_rsync_stats(text: str) -> dict[str, int]:
    """The byte counts in `rsync --stats` output; BenchmarkError naming a line that is missing."""
    figures = {}
    for key, pattern in _RSYNC_FIGURES.items():
        match = re.search(pattern, text)
        if match is None:
            raise BenchmarkError(f"rsync --stats output has no {pattern.split(':')[0]!r} line:\n{text}")
        figures[key] = int(match.group(1).replace(",", ""))
    return figures


def summary(runs: list[dict]) -> dict[str, Any]:
    """The runs with their best and median time and the highest peak memory any of them reached."""
    seconds = [run["seconds"] for run in runs]
    result: dict[str, Any] = {"runs": runs, "best_seconds": min(seconds),
                              "median_seconds": statistics.median(seconds)}
    peaks = [run["peak_rss_bytes"] for run in runs if "peak_rss_bytes" in run]
    if peaks:
        result["peak_rss_bytes"] = max(peaks)
    return result


def row(metric: str, ours: float, peer: float | None, unit: str, ratio: float | None, goal: str,
        passed: bool | None) -> dict[str, Any]:
    """One line of the results table. `ratio` is always "higher is better": the peer's time over ours,
    our speed over the peer's, or the peer's bytes over ours. `passed` is None where no goal is set."""
    return {"metric": metric, "ours": ours, "peer": peer, "unit": unit, "ratio": ratio, "goal": goal,
            "passed": passed}


def time_row(result: dict[str, Any], goal: str, min_ratio: float | None) -> dict[str, Any]:
    """The time line of a benchmark: best times judged against the goal (reported only, with
    `min_ratio` None), with the medians beside them (on a busy machine the spread between rounds is
    wide, and the best alone would hide it)."""
    ours, peer = result["ours"], result["peer"]
    ratio = peer["best_seconds"] / ours["best_seconds"]
    passed = None if min_ratio is None else ratio >= min_ratio
    return row("time", ours["best_seconds"], peer["best_seconds"], "s", ratio, goal, passed) | {
        "ours_median": ours["median_seconds"], "peer_median": peer["median_seconds"],
        "median_ratio": peer["median_seconds"] / ours["median_seconds"],
    }


# ---- the benchmarks ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Bench:
    """What every benchmark needs: the disks, a scratch directory, how many rounds, whether to run the
    peers (the quarter-size run measures only our memory), and the log volume (the same at both sizes,
    so only the disk size differs)."""

    disks: Disks
    scratch: Path
    rounds: int
    seed: int
    log_volume: int
    with_peers: bool = True
    encryption_rounds: int | None = None
    """Rounds of the encryption benchmark when --rounds was given (None: at least its MIN_ROUNDS)."""


def _result(
    title: str, ours: str, peer: str | None, our_runs: list[dict], peer_runs: list[dict]
) -> dict[str, Any]:
    result: dict[str, Any] = {"title": title, "ours_does": ours, "peer_does": peer, "ours": summary(our_runs),
                              "rows": [], "details": {}}
    if peer_runs:
        result["peer"] = summary(peer_runs)
    return result


def bench_initial_copy(bench: Bench) -> dict[str, Any]:
    disks = bench.disks
    result = _bench_copy(
        bench, "initial_copy", disks.source, ["cp"],
        "Initial copy to the local backend",
        "copy_disk from the raw disk into a new fixed-VHD replica of LocalDirectoryStorage (create, copy, "
        "final fsync)",
        "cp SRC DST, then sync DST (an fsync of the file)",
    )
    if bench.with_peers:
        ours_best, peer_best = result["ours"]["best_seconds"], result["peer"]["best_seconds"]
        result["rows"].append(time_row(result, "cp time / our time ≥ 0.9", 0.9))
        result["details"] |= {"ours_gb_per_s": disks.size / ours_best / 1e9,
                              "peer_gb_per_s": disks.size / peer_best / 1e9}
    return result


def bench_sparse_copy(bench: Bench) -> dict[str, Any]:
    disks = bench.disks
    source = disks.sparse_source
    result = _bench_copy(
        bench, "sparse_copy", source, ["cp", "--sparse=always"],
        f"Sparse disk: {format_size(SPARSE_VIRTUAL_FACTOR * disks.size)} virtual, {format_size(disks.size)} "
        f"of data in {disks.sparse_extents} extents",
        "copy_disk into a new fixed-VHD replica of LocalDirectoryStorage (holes never read or written)",
        "cp --sparse=always SRC DST, then sync DST",
    )
    source_allocated = allocated_bytes(source)
    result["details"] |= {"data_bytes": disks.size, "data_extents": disks.sparse_extents,
                          "source_allocated_bytes": source_allocated}
    if bench.with_peers:
        ours_allocated = max(run["allocated_bytes"] for run in result["ours"]["runs"])
        peer_allocated = max(run["allocated_bytes"] for run in result["peer"]["runs"])
        result["rows"] += [
            time_row(result, "cp time / our time ≥ 0.9 (as for the full copy)", 0.9),
            row("space the target allocates (st_blocks)", ours_allocated, peer_allocated, "bytes",
                peer_allocated / ours_allocated, "as sparse as the source, within 1% of its allocation",
                ours_allocated <= source_allocated * (1 + SPARSE_ALLOCATION_SLACK)),
        ]
    return result


def _bench_copy(bench: Bench, name: str, source: Path, cp: list[str], title: str, ours_does: str,
                peer_does: str) -> dict[str, Any]:
    size = os.stat(source).st_size
    site = bench.scratch / f"{name}-site"
    peer_target = bench.scratch / f"{name}-cp.raw"

    def ours() -> dict:
        shutil.rmtree(site, ignore_errors=True)
        drop_from_cache(source)
        figures = run_ours("copy", size, source=str(source), site=str(site), replica=REPLICA_NAME)
        replica = site / REPLICA_NAME
        check_fixed_vhd(replica, size, f"{name} (ours)")
        check_same_content(source, replica, size, f"{name} (ours)")
        return figures | {"allocated_bytes": allocated_bytes(replica)}

    def peer() -> dict:
        peer_target.unlink(missing_ok=True)
        drop_from_cache(source)
        figures = run_peer([cp + [str(source), str(peer_target)], ["sync", str(peer_target)]], size)
        del figures["stdout"]
        check_same_content(source, peer_target, size, f"{name} (cp)")
        return figures | {"allocated_bytes": allocated_bytes(peer_target)}

    try:
        our_runs, peer_runs = alternate(bench.rounds, ours, peer if bench.with_peers else None)
    finally:
        shutil.rmtree(site, ignore_errors=True)
        peer_target.unlink(missing_ok=True)
    result = _result(title, ours_does, peer_does, our_runs, peer_runs)
    result["details"]["virtual_size"] = size
    return result


def bench_resync(bench: Bench) -> dict[str, Any]:
    disks = bench.disks
    damage = plan_damage(disks.size, CHUNK_SIZE, random.Random(f"{bench.seed}/damage"),
                         RandomData(bench.seed, "damage"))
    our_target = bench.scratch / "resync-ours.raw"
    peer_target = bench.scratch / "resync-rsync.raw"

    def damaged(target: Path) -> None:
        # The previous round repaired the copy; replaying the same writes damages it the same way.
        damage.apply(target)
        drop_from_cache(disks.source, target)

    def ours() -> dict:
        damaged(our_target)
        figures = run_ours("resync", 2 * disks.size, source=str(disks.source), target=str(our_target))
        check_same_content(disks.source, our_target, disks.size, "resync (ours)")
        return figures

    def peer() -> dict:
        damaged(peer_target)
        figures = run_peer([RSYNC + [str(disks.source), str(peer_target)]], 2 * disks.size)
        figures |= parse_rsync_stats(figures.pop("stdout"))
        check_same_content(disks.source, peer_target, disks.size, "resync (rsync)")
        return figures

    try:
        for target in [our_target] + ([peer_target] if bench.with_peers else []):
            shutil.copyfile(disks.source, target)
        our_runs, peer_runs = alternate(bench.rounds, ours, peer if bench.with_peers else None)
    finally:
        our_target.unlink(missing_ok=True)
        peer_target.unlink(missing_ok=True)
    result = _result(
        f"Resync, {DAMAGED_CHUNK_FRACTION:.0%} of the chunks damaged (both sides read: asr disk sync)",
        f"sync_disks ({CHUNK_SIZE // MiB} MiB chunks, {BLOCK_SIZE // 1024} KiB blocks) onto the damaged copy, "
        f"both disks checksummed whole",
        f"{' '.join(RSYNC)} SRC DST onto an identically damaged copy",
        our_runs, peer_runs,
    )
    result["details"] |= {
        "chunk_size": CHUNK_SIZE, "block_size": BLOCK_SIZE, "damaged_chunks": damage.chunks,
        "damage_writes": len(damage.writes), "damage_write_size": DAMAGE_WRITE_SIZE,
        "damage_bytes": damage.bytes, "damaged_blocks": damage.blocks_touched(BLOCK_SIZE),
    }
    if bench.with_peers:
        sent = max(run["bytes_sent"] for run in our_runs)
        literal = min(run["literal_data"] for run in peer_runs)
        result["rows"] += [
            # The ≥ 2× goal is the product's resync's (bench_resync_product), which reads the replica only
            # where it differs; this one, `asr disk sync`, reads both sides whole and is reported beside it.
            time_row(result, "none set (reported)", None),
            row("disk data sent (ours: bytes_sent; rsync: Literal data)", sent, literal, "bytes",
                literal / sent, "ours ≤ rsync's literal data", sent <= literal),
        ]
    return result


def bench_resync_product(bench: Bench) -> dict[str, Any]:
    """The product's own resync (datapath.replication.resynchronize) of a replica made by its own initial
    copy on LocalDirectoryStorage, after the tracked source changed in the same 1% of its chunks as the
    damage plan: the source snapshot is read whole, the replica only where the source differs from its
    stored manifest. rsync syncs the same source onto a raw copy of what the replica held."""
    disks = bench.disks
    damage = plan_damage(disks.size, CHUNK_SIZE, random.Random(f"{bench.seed}/damage"),
                         RandomData(bench.seed, "damage"))
    source = bench.scratch / "product-source.raw"
    site = bench.scratch / "product-site"
    replica = site / REPLICA_NAME
    peer_target = bench.scratch / "product-rsync.raw"
    changes = toggled_changes(disks.source, damage)
    our_runs: list[dict] = []
    peer_runs: list[dict] = []

    def ours() -> dict:
        drop_from_cache(source, replica)
        figures = run_ours("product_resync", 2 * disks.size, disk=str(source), site=str(site), replica=REPLICA_NAME)
        check_same_content(source, replica, disks.size, "product resync (ours)")
        check_fixed_vhd(replica, disks.size, "product resync (ours)")
        return figures

    def peer() -> dict:
        drop_from_cache(source, peer_target)
        figures = run_peer([RSYNC + [str(source), str(peer_target)]], 2 * disks.size)
        figures |= parse_rsync_stats(figures.pop("stdout"))
        check_same_content(source, peer_target, disks.size, "product resync (rsync)")
        return figures

    try:
        shutil.copyfile(disks.source, source)
        if bench.with_peers:
            shutil.copyfile(disks.source, peer_target)
        copied = run_ours("product_initial_copy", 2 * disks.size, disk=str(source), site=str(site),
                          replica=REPLICA_NAME)
        for number in range(1, bench.rounds + 1):
            # The source changes in the planned chunks: odd rounds write the damage, even ones put the
            # original bytes back, so every round has the same chunks and blocks to send.
            run_ours("track_changes", disks.size, disk=str(source), writes=changes[(number - 1) % 2])
            sides = [(ours, our_runs), (peer if bench.with_peers else None, peer_runs)]
            for run, runs in sides if number % 2 else reversed(sides):
                if run is not None:
                    runs.append(run() | {"round": number})
    finally:
        shutil.rmtree(site, ignore_errors=True)
        for path in (source, peer_target):
            path.unlink(missing_ok=True)
        for path in bench.scratch.glob("product-source.raw.*"):  # the tracker's files beside the disk
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    result = _result(
        f"Product-path resync, the source changed in {DAMAGED_CHUNK_FRACTION:.0%} of the chunks",
        "resynchronize (datapath.replication) of a replica made by initial_copy on LocalDirectoryStorage, "
        "the tracked source changed through its tracker as the damage plan says: the snapshot read whole, "
        "the replica only in the chunks that differ from its current version's stored manifest; undo log, "
        "manifest and state stored as the product does",
        f"{' '.join(RSYNC)} SRC DST onto a raw copy of what the replica held",
        our_runs, peer_runs,
    )
    result["details"] |= {"chunk_size": CHUNK_SIZE, "block_size": BLOCK_SIZE, "changed_chunks": damage.chunks,
                          "change_writes": len(damage.writes), "changed_blocks": damage.blocks_touched(BLOCK_SIZE),
                          "initial_copy_seconds": copied["seconds"]}
    if any(run["replica_read_whole"] for run in our_runs):
        raise BenchmarkError("product resync: the replica was read whole, its stored manifest was not used: "
                             + "; ".join({run["why_read_whole"] for run in our_runs if run["why_read_whole"]}))
    if bench.with_peers:
        sent = max(run["bytes_sent"] for run in our_runs)
        literal = min(run["literal_data"] for run in peer_runs)
        result["rows"] += [
            time_row(result, "our time ≤ ½ rsync's (ratio ≥ 2)", 2.0),
            row("disk data sent (ours: bytes_sent; rsync: Literal data)", sent, literal, "bytes",
                literal / sent, "ours ≤ rsync's literal data", sent <= literal),
            row("replica bytes read (ours: the differing chunks, twice; rsync: the whole target)",
                max(run["replica_bytes_read"] for run in our_runs), disks.size, "bytes",
                disks.size / max(run["replica_bytes_read"] for run in our_runs), "none set (reported)", None),
        ]
    return result


def toggled_changes(original: Path, damage: Damage) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """The damage plan's writes as (offset, hex data), and the writes putting the original bytes back."""
    with open(original, "rb") as disk:
        restore = [(offset, os.pread(disk.fileno(), len(data), offset).hex()) for offset, data in damage.writes]
    return [(offset, data.hex()) for offset, data in damage.writes], restore


def bench_checksum_scan(bench: Bench) -> dict[str, Any]:
    disks = bench.disks
    warm_runs: list[dict] = []

    def ours() -> dict:
        drop_from_cache(disks.source)
        cold = run_ours("manifest", disks.size, disk=str(disks.source))
        # The cold pass left the disk in the page cache.
        warm_runs.append(run_ours("manifest", disks.size, disk=str(disks.source)))
        return cold

    def ceiling() -> dict:
        return run_ours("hash_in_memory", disks.size, disk=str(disks.source))

    cold_runs, ceiling_runs = alternate(bench.rounds, ours, ceiling if bench.with_peers else None)
    result = _result(
        "Checksum scan (chunk manifest)",
        f"compute_manifest over the disk, {CHUNK_SIZE // MiB} MiB chunks; cold: dropped from the page "
        f"cache first; warm: right after, from the page cache",
        "the ceiling: mmh3_x64_128_digest over the same bytes already in memory, 1 MiB slices of a "
        "page-aligned buffer",
        cold_runs, ceiling_runs,
    )
    result["ours_warm"] = summary(warm_runs)
    roots = {run["root"] for run in cold_runs + warm_runs + ceiling_runs}
    if len(roots) != 1:
        raise BenchmarkError(
            f"checksum scan: the manifest roots of the same disk differ between runs: {sorted(roots)}"
        )
    result["details"]["root"] = roots.pop()
    if bench.with_peers:
        ceiling_speed = disks.size / result["peer"]["best_seconds"] / 1e9
        for cache, runs in (("cold", result["ours"]), ("warm", result["ours_warm"])):
            speed = disks.size / runs["best_seconds"] / 1e9
            result["rows"].append(row(
                f"speed, {cache} cache", speed, ceiling_speed, "GB/s", speed / ceiling_speed,
                f"≥ {REFERENCE_CHECKSUM_GBPS:.2f} GB/s (ASR failback checksums: a few GB/min)",
                speed >= REFERENCE_CHECKSUM_GBPS,
            ))
    return result


def bench_log_apply(bench: Bench) -> dict[str, Any]:
    disks = bench.disks
    protected = bench.scratch / "log-protected.raw"
    replica = bench.scratch / "log-replica.raw"

    def apply() -> dict:
        # Applying a log is idempotent, so every round does the same work on the replica.
        drop_from_cache(log, replica)
        figures = run_ours("apply_log", disks.size, log=str(log), replica=str(replica), generation=generation)
        check_same_content(protected, replica, disks.size, "log apply (ours)")
        return figures

    try:
        for copy in (protected, replica):
            shutil.copyfile(disks.source, copy)
        tracked = run_ours("track_writes", bench.log_volume, disk=str(protected), volume=bench.log_volume,
                           seed=bench.seed)
        log, generation = Path(tracked["log"]), tracked["generation"]
        apply_runs, _ = alternate(bench.rounds, apply, None)
    finally:
        for path in bench.scratch.glob("log-*"):
            path.unlink()
    result = _result(
        "Log apply",
        f"apply_log of one sealed log ({bench.log_volume // MiB} MiB of random writes of 4 KiB–1 MiB made "
        f"through ReplicationTracker) to a replica; log and replica dropped from the page cache first",
        None, apply_runs, [],
    )
    result["tracker"] = summary([tracked])
    data_bytes = tracked["data_bytes"]
    result["details"] |= {"writes": tracked["writes"], "records": tracked["records"], "data_bytes": data_bytes,
                          "log_file_bytes": tracked["log_bytes"]}
    if bench.with_peers:
        apply_speed = data_bytes / result["ours"]["best_seconds"] / 1e6
        tracker_speed = data_bytes / tracked["write_seconds"] / 1e6
        result["rows"] += [
            row("log data applied", apply_speed, None, "MB/s", None,
                f"≥ {REFERENCE_MAX_CHURN_MBPS:.0f} MB/s (the highest churn ASR protects)",
                apply_speed >= REFERENCE_MAX_CHURN_MBPS),
            row("writes through the tracker (log + disk)", tracker_speed, None, "MB/s", None,
                "none set (reported)", None),
        ]
    return result


def bench_encryption_cost(bench: Bench) -> dict[str, Any]:
    from benchmarks.encryption import bench_encryption_cost as measure  # it imports this module

    return measure(bench)


BENCHMARKS: dict[str, Callable[[Bench], dict[str, Any]]] = {
    "initial_copy": bench_initial_copy,
    "sparse_copy": bench_sparse_copy,
    "resync": bench_resync,
    "resync_product": bench_resync_product,
    "checksum_scan": bench_checksum_scan,
    "log_apply": bench_log_apply,
    "encryption_cost": bench_encryption_cost,
}

MEMORY_STEPS = {
    "copy_disk (full disk)": lambda results: results["initial_copy"]["ours"],
    "copy_disk (sparse disk)": lambda results: results["sparse_copy"]["ours"],
    "sync_disks": lambda results: results["resync"]["ours"],
    "compute_manifest (cold)": lambda results: results["checksum_scan"]["ours"],
    "compute_manifest (warm)": lambda results: results["checksum_scan"]["ours_warm"],
    "ReplicationTracker writes + seal": lambda results: results["log_apply"]["tracker"],
    "apply_log": lambda results: results["log_apply"]["ours"],
}
"""Where each of our steps' peak memory is found in a run's results."""


def run_benchmarks(bench: Bench, progress: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    results = {}
    for name, benchmark in BENCHMARKS.items():
        progress(f"{name} on {bench.disks.size // MiB} MiB")
        results[name] = benchmark(bench)
    return results


def memory_rows(full: dict[str, dict], quarter: dict[str, dict], full_size: int, quarter_size: int,
                baseline: int) -> list[dict[str, Any]]:
    """Each step's peak memory at both disk sizes, and whether it stayed flat."""
    rows = []
    for step, figures_of in MEMORY_STEPS.items():
        at_full, at_quarter = figures_of(full)["peak_rss_bytes"], figures_of(quarter)["peak_rss_bytes"]
        rows.append({"step": step, "full_size": full_size, "quarter_size": quarter_size,
                     "peak_rss_bytes_full": at_full, "peak_rss_bytes_quarter": at_quarter,
                     "growth_bytes": at_full - at_quarter, "above_baseline_bytes": at_full - baseline,
                     "passed": at_full - at_quarter <= FLAT_MEMORY_SLACK})
    return rows


# ---- our steps, each run in a child process ---------------------------------------------------------
def step_idle() -> dict[str, Any]:
    """Nothing: the peak memory of the interpreter with every data-path module imported."""
    return {"seconds": 0.0}


def step_copy(source: str, site: str, replica: str) -> dict[str, Any]:
    started = time.perf_counter()
    with open_disk(source) as disk:
        storage = LocalDirectoryStorage(site)
        storage.create_disk(replica, disk.size)
        with storage.open_disk(replica) as target:
            copied = copy_disk(disk, target, chunk_size=CHUNK_SIZE)
    return {"seconds": time.perf_counter() - started, "bytes_read": copied.bytes_read,
            "bytes_written": copied.bytes_written, "zero_bytes_skipped": copied.zero_bytes_skipped,
            "root": copied.manifest.root_hex}


def step_manifest(disk: str) -> dict[str, Any]:
    with open_disk(disk) as endpoint:
        started = time.perf_counter()
        manifest = compute_manifest(endpoint, CHUNK_SIZE)
        return {"seconds": time.perf_counter() - started, "bytes": endpoint.size, "root": manifest.root_hex}


def step_hash_in_memory(disk: str) -> dict[str, Any]:
    """The ceiling of a checksum scan: hashing bytes that are already in a page-aligned buffer."""
    with open_disk(disk) as endpoint:
        size = endpoint.size
        buffer = aligned_buffer(size)
        with memoryview(buffer) as view:
            endpoint.read_into(0, view)
            hashes = bytearray()
            started = time.perf_counter()
            for offset in range(0, size, CHUNK_SIZE):
                hashes += chunk_hash(view[offset:offset + CHUNK_SIZE])
            seconds = time.perf_counter() - started
        buffer.close()
    return {"seconds": seconds, "bytes": size, "root": Manifest(size, CHUNK_SIZE, bytes(hashes)).root_hex}


def step_resync(source: str, target: str) -> dict[str, Any]:
    with open_disk(source) as source_disk, open_disk(target, writable=True) as target_disk:
        started = time.perf_counter()
        synced = sync_disks(source_disk, target_disk, chunk_size=CHUNK_SIZE, block_size=BLOCK_SIZE)
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "bytes_sent": synced.bytes_sent, "bytes_zeroed": synced.bytes_zeroed,
            "hash_bytes": synced.hash_bytes, "chunks_compared": synced.chunks_compared,
            "chunks_sent": synced.chunks_sent, "blocks_sent": synced.blocks_sent}


def step_product_initial_copy(disk: str, site: str, replica: str) -> dict[str, Any]:
    """Protect a raw disk as the product does: enable its tracker, copy a snapshot to a replica of a
    LocalDirectoryStorage (version 1, its manifest stored)."""
    started = time.perf_counter()
    with ReplicationTracker.enable(disk) as tracker:
        state = initial_copy(tracker, ReplicaDisk(LocalDirectoryStorage(site), replica), chunk_size=CHUNK_SIZE)
    return {"seconds": time.perf_counter() - started, "version": state.version, "root": state.manifest_root}


def step_track_changes(disk: str, writes: list[tuple[int, str]]) -> dict[str, Any]:
    """Writes (offset, hex data) through the disk's tracker, as a guest's."""
    with ReplicationTracker.enable(disk) as tracker:
        for offset, data in writes:
            tracker.write(offset, bytes.fromhex(data))
    return {"seconds": 0.0, "writes": len(writes)}


class _CountingStorage(LocalDirectoryStorage):
    """LocalDirectoryStorage counting the bytes read from its disks (the replica's side of a resync)."""

    bytes_read = 0

    def open_disk(self, name: str):
        disk = super().open_disk(name)
        read_into = disk.read_into

        def counted(offset: int, buf: memoryview) -> int:
            done = read_into(offset, buf)
            _CountingStorage.bytes_read += done
            return done

        disk.read_into = counted
        return disk


def step_product_resync(disk: str, site: str, replica: str) -> dict[str, Any]:
    storage = _CountingStorage(site)
    with ReplicationTracker.enable(disk) as tracker:
        started = time.perf_counter()
        report = resynchronize(tracker, ReplicaDisk(storage, replica))
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "bytes_sent": report.bytes_sent, "bytes_zeroed": report.bytes_zeroed,
            "hash_bytes": report.hash_bytes, "chunks_compared": report.chunks_compared,
            "chunks_sent": report.chunks_sent, "blocks_sent": report.blocks_sent, "version": report.version,
            "replica_read_whole": report.replica_read_whole, "why_read_whole": report.why_read_whole,
            "replica_bytes_read": _CountingStorage.bytes_read}


def step_track_writes(disk: str, volume: int, seed: int) -> dict[str, Any]:
    """Random writes through the tracker, then a seal. Only the tracker's calls are timed, not the
    making of the random data."""
    data = RandomData(seed, "churn")
    tracker = ReplicationTracker.enable(disk)
    try:
        writes = plan_churn(tracker.disk_size, volume, random.Random(f"{seed}/churn"))
        write_seconds = 0.0
        for offset, length in writes:
            payload = data.take(length)
            started = time.perf_counter()
            tracker.write(offset, payload)
            write_seconds += time.perf_counter() - started
        started = time.perf_counter()
        sealed = tracker.seal()
        seal_seconds = time.perf_counter() - started
    finally:
        tracker.close()
    return {"seconds": write_seconds + seal_seconds, "write_seconds": write_seconds, "seal_seconds": seal_seconds,
            "writes": len(writes), "log": str(sealed.path), "generation": sealed.generation,
            "records": sealed.records, "data_bytes": sealed.data_bytes, "log_bytes": sealed.size}


def step_apply_log(log: str, replica: str, generation: int) -> dict[str, Any]:
    with open_disk(replica, writable=True) as target:
        started = time.perf_counter()
        applied = apply_log(log, target, expected_generation=generation)
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "records": applied.records, "data_bytes": applied.data_bytes,
            "bytes_written": applied.bytes_written}


STEPS: dict[str, Callable[..., dict[str, Any]]] = {
    "idle": step_idle,
    "copy": step_copy,
    "manifest": step_manifest,
    "hash_in_memory": step_hash_in_memory,
    "resync": step_resync,
    "product_initial_copy": step_product_initial_copy,
    "track_changes": step_track_changes,
    "product_resync": step_product_resync,
    "track_writes": step_track_writes,
    "apply_log": step_apply_log,
}


def peak_rss_bytes() -> int:
    """This process's peak resident memory (VmHWM)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise BenchmarkError("/proc/self/status has no VmHWM line")


def child_main(argv: list[str], steps: dict[str, Callable[..., dict[str, Any]]], module: str) -> int:
    if len(argv) != 2 or argv[0] not in steps:
        print(f"usage: python -m {module} {{{','.join(steps)}}} JSON-ARGUMENTS", file=sys.stderr)
        return 2
    figures = steps[argv[0]](**json.loads(argv[1]))
    print(json.dumps(figures | {"peak_rss_bytes": peak_rss_bytes()}))
    return 0


def measure_datapath(workdir: Path, size: int, rounds: int, seed: int, progress: Callable[[str], None],
                     encryption_rounds: int | None = None) -> dict[str, Any]:
    """Every benchmark on a disk of `size` with the peers, then ours alone on a quarter-size disk for
    the memory comparison; the full-size disks are deleted before the quarter-size ones are made."""
    log_volume = min(MAX_LOG_VOLUME, size // 4)
    measured = {}
    for label, disk_size, with_peers, run_rounds in (("full", size, True, rounds),
                                                     ("quarter", size // 4, False, 1)):
        directory = workdir / label
        progress(f"generating a {format_size(disk_size)} disk and a sparse one in {directory}")
        disks = generate_disks(directory, disk_size, seed)
        bench = Bench(disks, directory, run_rounds, seed, log_volume, with_peers,
                      encryption_rounds if with_peers else None)
        measured[label] = run_benchmarks(bench, progress)
        shutil.rmtree(directory)
    baseline = run_ours("idle", 0)["peak_rss_bytes"]
    return {
        "log_volume": log_volume,
        "benchmarks": measured["full"],
        "memory": {
            "baseline_peak_rss_bytes": baseline,
            "flat_slack_bytes": FLAT_MEMORY_SLACK,
            "steps": memory_rows(measured["full"], measured["quarter"], size, size // 4, baseline),
            "quarter_size_runs": measured["quarter"],
        },
    }


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:], STEPS, "benchmarks.datapath"))
