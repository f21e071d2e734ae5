"""What encrypting the recovery storage costs the data path: the initial copy of the run's disk into the
local backend, the apply of a replication log to its replica, the product's resync of it after the source
changed, and its restore (the whole replica read back into a raw disk), each through the storage the engine
opens (`open_encrypted` over LocalDirectoryStorage) with encryption on and with ASR_STORAGE_ENCRYPTION=off,
alternating in one run; and the AES-XTS itself in memory, ours (sites/storage/xts.py: OpenSSL's XTS, many
sectors per call) against a `cryptography` cipher per sector (what replica encryption did first).

How the two sides are kept in the same state (the copy and the restore move a whole disk through the page
cache and the device, so what ran just before them shows in their time):
- every timed step starts with the files it touches fsynced and dropped from the page cache and every other
  dirty page on the machine written back (`drop_from_cache`), and each side deletes what it wrote before the
  other side's next step, so neither side's step runs while the other's writeback drains;
- a side's checks (byte-for-byte comparisons, which read whole disks) run after its timed steps, never
  between them, so the time between a side's copy and its restore is the same for both sides;
- one untimed warm-up round of both sides first (the first step after the disks were generated ran seconds
  slower than any later one), then at least MIN_ROUNDS rounds, the side going first alternating;
- the best and the median of the rounds are reported, with each round's ratio (the sides of one round ran
  a few seconds apart, under the same load) and the CPU time (user + system) of each step, which waits on
  no device and shows the encryption's own cost.

Child steps run as `python -m benchmarks.encryption STEP JSON`, like the data path's (benchmarks.datapath).
"""
from __future__ import annotations

import functools
import os
import random
import resource
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from benchmarks.datapath import BLOCK_SIZE, CHUNK_SIZE, REPLICA_NAME, Bench
from benchmarks.disks import (
    DAMAGED_CHUNK_FRACTION,
    MiB,
    RandomData,
    check_fixed_vhd,
    check_same_content,
    drop_from_cache,
    plan_damage,
    toggled_changes,
)
from benchmarks.harness import BenchmarkError, child_main, in_rounds, row, run_ours, summary
from datapath.copy import copy_disk
from datapath.disk import open_disk
from datapath.points import prune_versions
from datapath.replication import ReplicaDisk, apply_shipped_logs, initial_copy, ship_pending_logs
from datapath.resynchronize import resynchronize
from datapath.tracker import ReplicationTracker
from sites.storage.encrypted import open_encrypted
from sites.storage.keys import write_kek_file
from sites.storage.local import LocalDirectoryStorage
from sites.storage.xts import XtsSectors

MODULE = "benchmarks.encryption"
MAX_COST = 1.15
"""The issue's goal: encryption costs at most 15% of the initial copy's, the log apply's, the resync's and the
restore's time."""
MIN_ROUNDS = 5
"""Rounds of both sides at least unless --rounds is given: the steps are I/O-bound and the machine may be
shared, so with two or three rounds a round slowed by something else was the median."""
XTS_MEMORY_BYTES = 64 * MiB
"""Bytes the in-memory AES-XTS comparison encrypts each way (the per-sector side takes a quarter of it)."""
STEPS_MEASURED = ("copy", "log_apply", "resync", "restore")
"""The four steps of the issue, in the order of the results table."""
STEP_TITLES = {"copy": "initial copy", "log_apply": "log apply", "resync": "resync", "restore": "restore"}
_SECTOR = 4096
_SPOT_CHECKS = 64
_COMPARE_PIECE = 4 * MiB


def encryption_rounds(bench: Bench) -> int:
    """The rounds of both sides: as --rounds says when it was given, else at least MIN_ROUNDS (one round of
    ours alone in the quarter-size run, which measures memory only)."""
    if not bench.with_peers:
        return bench.rounds
    return bench.encryption_rounds if bench.encryption_rounds is not None else max(bench.rounds, MIN_ROUNDS)


def _label(encrypted: bool) -> str:
    return "encrypted" if encrypted else "clear"


def bench_encryption_cost(bench: Bench) -> dict[str, Any]:
    sides = (True, False) if bench.with_peers else (True,)
    rounds = encryption_rounds(bench)
    kek_file = bench.scratch / "encryption.kek"
    try:
        write_kek_file(kek_file)
        copies = _measure_copy_and_restore(bench, sides, rounds, kek_file)
        replicated = _measure_log_apply_and_resync(bench, sides, rounds, kek_file)
        in_memory = run_ours("xts_speed", XTS_MEMORY_BYTES, module=MODULE, length=XTS_MEMORY_BYTES,
                             seed=bench.seed) if bench.with_peers else None
    finally:
        for path in bench.scratch.glob("encryption*"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    runs = {encrypted: {step: [run[step] | {"round": run["round"]} for run in copies["runs"][encrypted]]
                         for step in ("copy", "restore")}
            | {step: replicated["runs"][encrypted][step] for step in ("log_apply", "resync")}
            for encrypted in sides}
    result: dict[str, Any] = {
        "title": "Encryption of the recovery storage (local backend)",
        "ours_does": "four steps through open_encrypted(LocalDirectoryStorage), AES-256-XTS per 4 KiB sector of "
                     "the replica (OpenSSL's, many sectors per call), AES-256-GCM for objects: the initial copy "
                     "(copy_disk from the raw disk into a new replica of the storage, as in the initial copy "
                     "benchmark); the log apply (apply_shipped_logs, the engine's Apply logs step: a sealed log "
                     f"of {bench.log_volume // MiB} MiB of random 4 KiB–1 MiB writes made through "
                     "ReplicationTracker and shipped by ship_pending_logs, read back from the storage, verified, "
                     "its undo log stored, applied, the manifest stored); the resync (resynchronize, the engine's "
                     f"Resync step, after the tracked source changed in {DAMAGED_CHUNK_FRACTION:.0%} of its "
                     "chunks: the snapshot read whole, the replica only where it differs from its stored "
                     "manifest, undo log and manifest stored); the restore (copy_disk of the whole replica into "
                     "a new raw disk, as restore_point copies a point without undo logs). Every step starts "
                     "with its files dropped from the page cache and every dirty page written back; checks "
                     f"run after both timed steps of a side; an untimed warm-up round, then {rounds} rounds",
        "peer_does": "the same four steps, in the same rounds, with ASR_STORAGE_ENCRYPTION=off (replica and "
                     "objects in clear)",
        "ours": summary(runs[True]["copy"]),
        "rounds": rounds,
        "warmup_runs": copies["warmup"],
        "rows": [], "details": {},
    }
    for step in STEPS_MEASURED[1:]:
        result[f"ours_{step}"] = summary(runs[True][step])
    if not bench.with_peers:
        return result
    for step in STEPS_MEASURED:
        result["peer" if step == "copy" else f"peer_{step}"] = summary(runs[False][step])
    goal = f"clear time / encrypted time ≥ {1 / MAX_COST:.2f} (encryption costs ≤ {MAX_COST - 1:.0%})"
    result["rows"] += [_cost_row(f"{STEP_TITLES[step]}, time (peer: encryption off)", runs[True][step],
                                 runs[False][step], goal) for step in STEPS_MEASURED]
    result["rows"].append(
        row("AES-XTS in memory, one thread (ours: OpenSSL's XTS, many sectors per call; peer: a cipher per "
            "sector)", in_memory["ours_mb_per_s"], in_memory["per_sector_mb_per_s"], "MB/s",
            in_memory["ours_mb_per_s"] / in_memory["per_sector_mb_per_s"], "none set (reported)", None))
    size = bench.disks.size
    result["details"] = {
        "rounds": rounds,
        "steps": {step: _step_details(runs[True][step], runs[False][step], size if step in ("copy", "restore")
                                      else None) for step in STEPS_MEASURED},
        "ship": {_label(encrypted): summary(replicated["ship"][encrypted]) for encrypted in sides},
        "log": replicated["log"],
        "resync": replicated["resync"],
        "xts_in_memory": in_memory,
    }
    # Kept under the names of the report's first encryption rows (copy and restore only).
    for step in ("copy", "restore"):
        steps = result["details"]["steps"][step]
        result["details"][f"{step}_cost"] = steps["cost"]
        result["details"][f"{step}_gb_per_s"] = steps["gb_per_s"]
    return result


def _cost_row(metric: str, encrypted: list[dict], clear: list[dict], goal: str) -> dict[str, Any]:
    ours, peer = summary(encrypted), summary(clear)
    ratio = peer["best_seconds"] / ours["best_seconds"]
    return row(metric, ours["best_seconds"], peer["best_seconds"], "s", ratio, goal, ratio >= 1 / MAX_COST) | {
        "ours_median": ours["median_seconds"], "peer_median": peer["median_seconds"],
        "median_ratio": peer["median_seconds"] / ours["median_seconds"],
    }


def _step_details(encrypted: list[dict], clear: list[dict], size: int | None) -> dict[str, Any]:
    """One step's figures beside its row: the cost (encrypted time over clear, best), each round's ratio
    (clear over encrypted, the two sides of one round), and the CPU seconds (best and median) of each side."""
    ours, peer = summary(encrypted), summary(clear)
    by_round = {run["round"]: run["seconds"] for run in clear}
    round_ratios = [by_round[run["round"]] / run["seconds"] for run in encrypted if run["round"] in by_round]
    details: dict[str, Any] = {
        "cost": ours["best_seconds"] / peer["best_seconds"],
        "median_cost": ours["median_seconds"] / peer["median_seconds"],
        "round_ratios": round_ratios, "median_round_ratio": statistics.median(round_ratios),
        "cpu_seconds": {_label(side): {"best": min(run["cpu_seconds"] for run in runs),
                                       "median": statistics.median(run["cpu_seconds"] for run in runs)}
                        for side, runs in ((True, encrypted), (False, clear))},
    }
    if size is not None:
        details["gb_per_s"] = {"encrypted": size / ours["best_seconds"] / 1e9,
                               "clear": size / peer["best_seconds"] / 1e9}
    return details


def _in_rounds(rounds: int, sides: tuple[bool, ...], run: Callable[[bool, int], dict],
               before_round: Callable[[int], None] | None = None) -> dict[bool, list[dict]]:
    """`run(encrypted, round)` for each side in each round, the encrypted side first in odd rounds and the
    clear side first in even ones (harness.in_rounds); `before_round(round)` first, for both sides."""
    return dict(zip(sides, in_rounds(rounds, [functools.partial(run, side) for side in sides], before_round),
                    strict=True))


def _site_files(site: Path) -> list[Path]:
    return [path for path in site.rglob("*") if path.is_file()]


# ---- the initial copy and the restore ---------------------------------------------------------------
def _measure_copy_and_restore(bench: Bench, sides: tuple[bool, ...], rounds: int, kek_file: Path
                              ) -> dict[str, Any]:
    disks = bench.disks
    size = disks.size

    def side(encrypted: bool, number: int) -> dict[str, Any]:
        label = _label(encrypted)
        site = bench.scratch / f"encryption-copy-{label}"
        restored = bench.scratch / f"encryption-restored-{label}.raw"
        replica = site / REPLICA_NAME
        arguments = {"site": str(site), "replica": REPLICA_NAME, "encrypted": encrypted, "kek_file": str(kek_file)}
        drop_from_cache(disks.source)
        copied = run_ours("storage_copy", size, module=MODULE, source=str(disks.source), **arguments)
        drop_from_cache(replica)
        back = run_ours("storage_restore", size, module=MODULE, target=str(restored), **arguments)
        # The checks read whole disks: after both timed steps, so both sides' restores follow their copies alike.
        what = f"encryption cost, round {number} ({label})"
        check_fixed_vhd(replica, size, f"{what}, copy")
        check_same_content(disks.source, restored, size, f"{what}, restore of the copy")
        if encrypted:
            check_no_plaintext(disks.source, replica, size, random.Random(f"{bench.seed}/spots/{number}"))
        else:
            check_same_content(disks.source, replica, size, f"{what}, copy")
        if back["root"] != copied["root"]:
            raise BenchmarkError(f"{what}: the restored disk's manifest root {back['root']} is not the copied "
                                 f"one's {copied['root']}")
        # Nothing of this side is left for the other side's steps to write back or free.
        shutil.rmtree(site)
        restored.unlink()
        os.sync()
        return {"seconds": copied["seconds"], "copy": copied, "restore": back}

    warmup = [side(encrypted, 0) | {"round": 0} for encrypted in sides] if bench.with_peers else []
    return {"warmup": warmup, "runs": _in_rounds(rounds, sides, side)}


# ---- the log apply and the resync -------------------------------------------------------------------
def _measure_log_apply_and_resync(bench: Bench, sides: tuple[bool, ...], rounds: int, kek_file: Path
                                  ) -> dict[str, Any]:
    """One tracked copy of the source and one replica per side, both made by initial_copy from the same
    snapshot (so both sides are at the same generation). Log rounds: writes through the tracker, the sealed
    log shipped to both sides, then applied on both; resync rounds: the tracked disk changed in the same
    chunks (the damage plan's writes, then the original bytes back), then each side resynchronized."""
    disks = bench.disks
    size = disks.size
    tracked = bench.scratch / "encryption-tracked.raw"
    sites = {encrypted: bench.scratch / f"encryption-replica-{_label(encrypted)}" for encrypted in sides}

    def arguments(encrypted: bool) -> dict[str, Any]:
        return {"site": str(sites[encrypted]), "replica": REPLICA_NAME, "encrypted": encrypted,
                "kek_file": str(kek_file)}

    def checked(encrypted: bool, what: str, number: int) -> None:
        replica = sites[encrypted] / REPLICA_NAME
        check_fixed_vhd(replica, size, what)
        compared = run_ours("storage_compare", size, module=MODULE, expected=str(tracked), **arguments(encrypted))
        if compared["first_difference"] is not None:
            raise BenchmarkError(f"{what}: the replica, read through the storage, differs from the tracked disk "
                                 f"at byte {compared['first_difference']}")
        if encrypted:
            check_no_plaintext(tracked, replica, size, random.Random(f"{bench.seed}/{what}/{number}"))

    shutil.copyfile(disks.source, tracked)
    made = run_ours("storage_replicas", 2 * size, module=MODULE, disk=str(tracked), replica=REPLICA_NAME,
                    sites=[[str(sites[encrypted]), encrypted] for encrypted in sides], kek_file=str(kek_file))
    for encrypted in sides:
        checked(encrypted, f"encryption cost, initial copy through the tracker ({_label(encrypted)})", 0)
    ship: dict[bool, list[dict]] = {side: [] for side in sides}
    sealed: dict[str, Any] = {}

    def new_log(number: int) -> None:
        tracked_writes = run_ours("track_writes", bench.log_volume, disk=str(tracked), volume=bench.log_volume,
                                  seed=bench.seed * 1000 + number)
        sealed.clear()
        sealed.update(tracked_writes)
        order = sides if number % 2 else tuple(reversed(sides))
        for position, encrypted in enumerate(order):
            drop_from_cache(Path(sealed["log"]), *_site_files(sites[encrypted]))
            shipped = run_ours("storage_ship", bench.log_volume, module=MODULE, disk=str(tracked),
                               acknowledge=position == len(order) - 1, **arguments(encrypted))
            if shipped["shipped"] != [sealed["generation"]]:
                raise BenchmarkError(f"encryption cost, round {number}: shipping to the {_label(encrypted)} replica "
                                     f"sent generations {shipped['shipped']}, not {[sealed['generation']]}")
            ship[encrypted].append(shipped | {"round": number})

    def apply(encrypted: bool, number: int) -> dict[str, Any]:
        drop_from_cache(tracked, *_site_files(sites[encrypted]))
        applied = run_ours("storage_apply", size, module=MODULE, **arguments(encrypted))
        what = f"encryption cost, log apply round {number} ({_label(encrypted)})"
        if (applied["applied"], applied["records"], applied["data_bytes"]) != (
                [sealed["generation"]], sealed["records"], sealed["data_bytes"]):
            raise BenchmarkError(f"{what}: applied generations {applied['applied']} ({applied['records']} records, "
                                 f"{applied['data_bytes']} B), not the sealed log {sealed['generation']} "
                                 f"({sealed['records']} records, {sealed['data_bytes']} B)")
        checked(encrypted, what, number)
        return applied

    damage = plan_damage(size, CHUNK_SIZE, random.Random(f"{bench.seed}/damage"), RandomData(bench.seed, "damage"))
    changes = toggled_changes(disks.source, damage)

    def change_source(number: int) -> None:
        run_ours("track_changes", size, disk=str(tracked), writes=changes[(number - 1) % 2])

    def resync(encrypted: bool, number: int) -> dict[str, Any]:
        drop_from_cache(tracked, *_site_files(sites[encrypted]))
        synced = run_ours("storage_resync", 2 * size, module=MODULE, disk=str(tracked), **arguments(encrypted))
        what = f"encryption cost, resync round {number} ({_label(encrypted)})"
        if synced["replica_read_whole"]:
            raise BenchmarkError(f"{what}: the replica was read whole, its stored manifest was not used: "
                                 f"{synced['why_read_whole']}")
        checked(encrypted, what, number)
        return synced

    try:
        applied = _in_rounds(rounds, sides, apply, new_log)
        synced = _in_rounds(rounds, sides, resync, change_source)
    finally:
        for path in [tracked, *sites.values(), *bench.scratch.glob("encryption-tracked.raw.*")]:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    return {
        "runs": {side: {"log_apply": applied[side], "resync": synced[side]} for side in sides},
        "ship": ship,
        "log": {"volume": bench.log_volume, "records": sealed.get("records"), "data_bytes": sealed.get("data_bytes"),
                "log_file_bytes": sealed.get("log_bytes"), "initial_copies": made["sides"]},
        "resync": {"changed_chunks": damage.chunks, "changed_blocks": damage.blocks_touched(BLOCK_SIZE)},
    }


def check_no_plaintext(source: Path, replica: Path, size: int, rng: random.Random) -> None:
    """BenchmarkError when a sampled 4 KiB sector of the encrypted replica equals the source's (random data:
    a sector stored in clear would)."""
    with open(source, "rb") as plain, open(replica, "rb") as stored:
        for _ in range(_SPOT_CHECKS):
            offset = rng.randrange(size // _SECTOR) * _SECTOR
            if os.pread(plain.fileno(), _SECTOR, offset) == os.pread(stored.fileno(), _SECTOR, offset):
                raise BenchmarkError(f"encryption cost: sector at {offset} of {replica} is stored in clear")


# ---- our steps, each run in a child process ---------------------------------------------------------
def _storage(site: str, encrypted: bool, kek_file: str):
    """The storage as the engine opens it (tasks.recovery_storage.open_recovery_storage): open_encrypted."""
    os.environ["ASR_STORAGE_ENCRYPTION"] = "on" if encrypted else "off"
    os.environ["ASR_STORAGE_KEK_FILE"] = kek_file
    os.environ.pop("ASR_STORAGE_KEK", None)
    return open_encrypted(LocalDirectoryStorage(site))


@contextmanager
def _timed(figures: dict[str, Any]) -> Iterator[None]:
    """Puts the block's wall time (`seconds`) and this process's CPU time, every thread's, user and system
    (`cpu_seconds`) into `figures`."""
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    yield
    figures["seconds"] = time.perf_counter() - started
    done = resource.getrusage(resource.RUSAGE_SELF)
    figures["cpu_seconds"] = done.ru_utime - cpu.ru_utime + done.ru_stime - cpu.ru_stime


def step_storage_copy(source: str, site: str, replica: str, encrypted: bool, kek_file: str) -> dict[str, Any]:
    storage = _storage(site, encrypted, kek_file)
    figures: dict[str, Any] = {}
    with _timed(figures), open_disk(source) as disk:
        storage.create_disk(replica, disk.size)
        with storage.open_disk(replica) as target:
            copied = copy_disk(disk, target, chunk_size=CHUNK_SIZE)
    return figures | {"bytes_written": copied.bytes_written, "root": copied.manifest.root_hex}


def step_storage_restore(site: str, replica: str, target: str, encrypted: bool, kek_file: str) -> dict[str, Any]:
    storage = _storage(site, encrypted, kek_file)
    figures: dict[str, Any] = {}
    with _timed(figures), storage.open_disk(replica) as disk:
        with open(target, "xb") as new:
            new.truncate(disk.size)
        with open_disk(target, writable=True) as out:
            restored = copy_disk(disk, out, chunk_size=CHUNK_SIZE, target_is_zero=True)
    return figures | {"bytes_written": restored.bytes_written, "root": restored.manifest.root_hex}


def step_storage_replicas(disk: str, replica: str, sites: list[tuple[str, bool]], kek_file: str) -> dict[str, Any]:
    """Protect the raw disk as the product does (its tracker enabled, initial_copy into a replica) once per
    site, every replica from the same snapshot: after the first copy a snapshot is taken for the next ones,
    and the log its taking sealed (empty) is shipped to and applied on the replicas copied before it, so
    every replica ends at the same generation and the same logs apply to all of them."""
    figures = []
    with ReplicationTracker.enable(disk) as tracker:
        copied_before: list[ReplicaDisk] = []
        for number, (site, encrypted) in enumerate(sites):
            if number:
                tracker.create_snapshot()
                for earlier in copied_before:
                    ship_pending_logs(tracker, earlier)
                    apply_shipped_logs(earlier)
            target = ReplicaDisk(_storage(site, encrypted, kek_file), replica)
            done: dict[str, Any] = {}
            with _timed(done):
                state = initial_copy(tracker, target, chunk_size=CHUNK_SIZE)
            figures.append(done | {"side": _label(encrypted), "version": state.version})
            copied_before.append(target)
    generations = {target.load_state().applied_generation for target in copied_before}
    if len(generations) != 1:
        raise BenchmarkError(f"the replicas were copied at different generations: {figures}")
    return {"seconds": sum(side["seconds"] for side in figures), "sides": figures}


def step_storage_ship(disk: str, site: str, replica: str, encrypted: bool, kek_file: str,
                      acknowledge: bool) -> dict[str, Any]:
    """ship_pending_logs (the Ship logs step's upload); with `acknowledge` (the last side shipped), the
    tracker then drops the logs shipped, untimed."""
    target = ReplicaDisk(_storage(site, encrypted, kek_file), replica)
    figures: dict[str, Any] = {}
    with ReplicationTracker.enable(disk) as tracker:
        with _timed(figures):
            shipped = ship_pending_logs(tracker, target)
        if acknowledge and shipped:
            tracker.acknowledge(max(shipped))
    return figures | {"shipped": shipped}


def step_storage_apply(site: str, replica: str, encrypted: bool, kek_file: str) -> dict[str, Any]:
    """apply_shipped_logs (the Apply logs step's work on the replica); then, untimed, the versions before the
    new one pruned, so undo logs do not pile up over the rounds."""
    target = ReplicaDisk(_storage(site, encrypted, kek_file), replica)
    figures: dict[str, Any] = {}
    with _timed(figures):
        report = apply_shipped_logs(target)
    prune_versions(target, report.version)
    return figures | {"applied": report.applied, "records": report.records, "data_bytes": report.data_bytes,
                      "version": report.version}


def step_storage_resync(disk: str, site: str, replica: str, encrypted: bool, kek_file: str) -> dict[str, Any]:
    """resynchronize (the Resync step's work) from the tracked disk; then, untimed, earlier versions pruned."""
    target = ReplicaDisk(_storage(site, encrypted, kek_file), replica)
    figures: dict[str, Any] = {}
    with ReplicationTracker.enable(disk) as tracker, _timed(figures):
        report = resynchronize(tracker, target)
    prune_versions(target, report.version)
    return figures | {"bytes_sent": report.bytes_sent, "chunks_compared": report.chunks_compared,
                      "chunks_sent": report.chunks_sent, "blocks_sent": report.blocks_sent,
                      "version": report.version, "replica_read_whole": report.replica_read_whole,
                      "why_read_whole": report.why_read_whole}


def step_storage_compare(expected: str, site: str, replica: str, encrypted: bool, kek_file: str) -> dict[str, Any]:
    """The replica read through the storage (decrypted) against a raw disk, byte for byte: the offset of the
    first 4 MiB piece that differs, or None."""
    storage = _storage(site, encrypted, kek_file)
    started = time.perf_counter()
    first_difference = None
    with open_disk(expected) as plain, storage.open_disk(replica) as stored:
        if plain.size != stored.size:
            first_difference = min(plain.size, stored.size)
        else:
            ours, theirs = bytearray(_COMPARE_PIECE), bytearray(_COMPARE_PIECE)
            with memoryview(ours) as ours_view, memoryview(theirs) as theirs_view:
                for offset in range(0, plain.size, _COMPARE_PIECE):
                    length = min(_COMPARE_PIECE, plain.size - offset)
                    plain.read_into(offset, ours_view[:length])
                    stored.read_into(offset, theirs_view[:length])
                    if ours_view[:length] != theirs_view[:length]:
                        first_difference = offset
                        break
    return {"seconds": time.perf_counter() - started, "first_difference": first_difference}


def step_xts_speed(length: int, seed: int) -> dict[str, Any]:
    """Encrypt and decrypt `length` bytes of random data in memory, one thread: ours (XtsSectors over the
    whole buffer, one call) and a `cryptography` XTS cipher per sector (a quarter of the bytes: it is
    slow). Best of three runs each; both sides' ciphertext must agree."""
    data = RandomData(seed, "xts").take(length)
    key = RandomData(seed, "xts-key").take(64)
    xts = XtsSectors(key)
    out, back = bytearray(length), bytearray(length)

    def ours_encrypt() -> None:
        xts.encrypt(0, data, out)

    def ours_decrypt() -> None:
        xts.decrypt(0, out, back)

    sample = length // 4
    per_sector_out = bytearray(sample)

    def per_sector() -> None:
        with memoryview(data) as source, memoryview(per_sector_out) as target:
            for sector in range(sample // _SECTOR):
                cipher = Cipher(algorithms.AES(key), modes.XTS(sector.to_bytes(16, "little"))).encryptor()
                cipher.update_into(source[sector * _SECTOR:(sector + 1) * _SECTOR],
                                   target[sector * _SECTOR:(sector + 1) * _SECTOR])

    encrypt_s, decrypt_s, per_sector_s = (_best(ours_encrypt), _best(ours_decrypt), _best(per_sector))
    if back != data or per_sector_out != out[:sample]:
        raise BenchmarkError("AES-XTS in memory: our and the per-sector ciphertexts differ, or do not decrypt")
    return {"seconds": encrypt_s, "bytes": length, "ours_mb_per_s": length / encrypt_s / 1e6,
            "ours_decrypt_mb_per_s": length / decrypt_s / 1e6, "per_sector_mb_per_s": sample / per_sector_s / 1e6}


def _best(run, rounds: int = 3) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


STEPS = {"storage_copy": step_storage_copy, "storage_restore": step_storage_restore,
         "storage_replicas": step_storage_replicas, "storage_ship": step_storage_ship,
         "storage_apply": step_storage_apply, "storage_resync": step_storage_resync,
         "storage_compare": step_storage_compare, "xts_speed": step_xts_speed}


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:], STEPS, MODULE))
