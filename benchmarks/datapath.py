"""The data-path benchmarks: each of ours against its peer, on the same generated disks, in one run.

Ours are the child steps below (STEPS, run as `python -m benchmarks.datapath STEP JSON`); how a step is run,
timed against its peer over alternating rounds and summarized is benchmarks/harness.py's, the generated disks
and the checks of every result benchmarks/disks.py's. Every timed run but the warm checksum scan starts with
the files it touches dropped from the page cache.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.disks import (
    DAMAGE_WRITE_SIZE,
    DAMAGED_CHUNK_FRACTION,
    SPARSE_VIRTUAL_FACTOR,
    Disks,
    MiB,
    RandomData,
    allocated_bytes,
    check_fixed_vhd,
    check_same_content,
    drop_from_cache,
    generate_disks,
    plan_churn,
    plan_damage,
    toggled_changes,
)
from benchmarks.harness import BenchmarkError, alternate, child_main, row, run_ours, run_peer, summary, time_row
from datapath.buffers import aligned_buffer
from datapath.copy import copy_disk
from datapath.disk import format_size, open_disk
from datapath.logapply import apply_log
from datapath.manifest import Manifest, chunk_hash, compute_manifest
from datapath.replication import ReplicaDisk, initial_copy
from datapath.resync import sync_disks
from datapath.resynchronize import resynchronize
from datapath.tracker import ReplicationTracker
from sites.storage.local import LocalDirectoryStorage

CHUNK_SIZE = MiB
BLOCK_SIZE = 4096
SPARSE_ALLOCATION_SLACK = 0.01
"""A copy of the sparse disk stays sparse when it allocates at most 1% more than the source (the
replica's footer, and zeros between two extents inside one chunk)."""
MAX_LOG_VOLUME = 256 * MiB
"""Bytes of random writes sent through the tracker for the log benchmark (less on small disks)."""
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
    """The product's own resync (datapath.resynchronize) of a replica made by its own initial
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
        "resynchronize (datapath.resynchronize) of a replica made by initial_copy on LocalDirectoryStorage, "
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
