"""What encrypting the recovery storage costs the data path: the initial copy of the run's disk into the
local backend and its restore (the whole replica read back into a raw disk), each through the storage the
engine opens (`open_encrypted`) with encryption on and with ASR_STORAGE_ENCRYPTION=off, alternating in one
run; and the AES-XTS itself in memory, ours (sites/storage/xts.py: OpenSSL's XTS, many sectors per call)
against a `cryptography` cipher per sector (what replica encryption did first).

Child steps run as `python -m benchmarks.encryption STEP JSON`, like the data path's (benchmarks.datapath).
"""
from __future__ import annotations

import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from benchmarks.datapath import (
    CHUNK_SIZE,
    REPLICA_NAME,
    Bench,
    BenchmarkError,
    MiB,
    RandomData,
    alternate,
    check_fixed_vhd,
    check_same_content,
    child_main,
    drop_from_cache,
    row,
    run_ours,
    summary,
)
from datapath.copy import copy_disk
from datapath.disk import open_disk
from sites.storage.encrypted import open_encrypted
from sites.storage.keys import write_kek_file
from sites.storage.local import LocalDirectoryStorage
from sites.storage.xts import XtsSectors

MODULE = "benchmarks.encryption"
MAX_COST = 1.15
"""The issue's goal: encryption costs at most 15% of the initial copy's and the restore's time."""
XTS_MEMORY_BYTES = 64 * MiB
"""Bytes the in-memory AES-XTS comparison encrypts each way (the per-sector side takes a quarter of it)."""
_SECTOR = 4096
_SPOT_CHECKS = 64


def bench_encryption_cost(bench: Bench) -> dict[str, Any]:
    disks = bench.disks
    size = disks.size
    site = bench.scratch / "encryption-site"
    restored = bench.scratch / "encryption-restored.raw"
    kek_file = bench.scratch / "encryption.kek"
    replica = site / REPLICA_NAME

    def side(encrypted: bool):
        label = "encrypted" if encrypted else "clear"

        def run() -> dict[str, Any]:
            shutil.rmtree(site, ignore_errors=True)
            restored.unlink(missing_ok=True)
            drop_from_cache(disks.source)
            arguments = {"site": str(site), "replica": REPLICA_NAME, "encrypted": encrypted, "kek_file": str(kek_file)}
            copied = run_ours("storage_copy", size, module=MODULE, source=str(disks.source), **arguments)
            check_fixed_vhd(replica, size, f"encryption cost, copy ({label})")
            if encrypted:
                check_no_plaintext(disks.source, replica, size, random.Random(f"{bench.seed}/spots"))
            else:
                check_same_content(disks.source, replica, size, "encryption cost, copy (clear)")
            drop_from_cache(replica)
            back = run_ours("storage_restore", size, module=MODULE, target=str(restored), **arguments)
            check_same_content(disks.source, restored, size, f"encryption cost, restore ({label})")
            if back["root"] != copied["root"]:
                raise BenchmarkError(f"encryption cost ({label}): the restored disk's manifest root {back['root']} "
                                     f"is not the copied one's {copied['root']}")
            return {"seconds": copied["seconds"], "copy": copied, "restore": back}

        return run

    try:
        write_kek_file(kek_file)
        our_runs, peer_runs = alternate(bench.rounds, side(True), side(False) if bench.with_peers else None)
        in_memory = run_ours("xts_speed", XTS_MEMORY_BYTES, module=MODULE, length=XTS_MEMORY_BYTES,
                             seed=bench.seed) if bench.with_peers else None
    finally:
        shutil.rmtree(site, ignore_errors=True)
        restored.unlink(missing_ok=True)
        kek_file.unlink(missing_ok=True)
    result: dict[str, Any] = {
        "title": "Encryption of the recovery storage (local backend)",
        "ours_does": "the initial copy (copy_disk from the raw disk into a new replica of the storage, as in the "
                     "initial copy benchmark) and then the restore (copy_disk of the whole replica, dropped from the "
                     "page cache, into a new raw disk, as restore_point copies a point without undo logs), through "
                     "open_encrypted(LocalDirectoryStorage): AES-256-XTS per 4 KiB sector, OpenSSL's, many "
                     "sectors per call",
        "peer_does": "the same two steps with ASR_STORAGE_ENCRYPTION=off (the replica in clear)",
        "ours": summary([run["copy"] for run in our_runs]),
        "ours_restore": summary([run["restore"] for run in our_runs]),
        "runs": our_runs, "peer_runs": peer_runs, "rows": [], "details": {},
    }
    if not bench.with_peers:
        return result
    result["peer"] = summary([run["copy"] for run in peer_runs])
    result["peer_restore"] = summary([run["restore"] for run in peer_runs])
    goal = f"clear time / encrypted time ≥ {1 / MAX_COST:.2f} (encryption costs ≤ {MAX_COST - 1:.0%})"
    result["rows"] += [
        _cost_row("initial copy, time (peer: encryption off)", result["ours"], result["peer"], goal),
        _cost_row("restore, time (peer: encryption off)", result["ours_restore"], result["peer_restore"], goal),
        row("AES-XTS in memory, one thread (ours: OpenSSL's XTS, many sectors per call; peer: a cipher per "
            "sector)", in_memory["ours_mb_per_s"], in_memory["per_sector_mb_per_s"], "MB/s",
            in_memory["ours_mb_per_s"] / in_memory["per_sector_mb_per_s"], "none set (reported)", None),
    ]
    result["details"] = {
        "copy_cost": result["ours"]["best_seconds"] / result["peer"]["best_seconds"],
        "restore_cost": result["ours_restore"]["best_seconds"] / result["peer_restore"]["best_seconds"],
        "copy_gb_per_s": {"encrypted": size / result["ours"]["best_seconds"] / 1e9,
                          "clear": size / result["peer"]["best_seconds"] / 1e9},
        "restore_gb_per_s": {"encrypted": size / result["ours_restore"]["best_seconds"] / 1e9,
                             "clear": size / result["peer_restore"]["best_seconds"] / 1e9},
        "xts_in_memory": in_memory,
    }
    return result


def _cost_row(metric: str, encrypted: dict[str, Any], clear: dict[str, Any], goal: str) -> dict[str, Any]:
    ratio = clear["best_seconds"] / encrypted["best_seconds"]
    return row(metric, encrypted["best_seconds"], clear["best_seconds"], "s", ratio, goal, ratio >= 1 / MAX_COST) | {
        "ours_median": encrypted["median_seconds"], "peer_median": clear["median_seconds"],
        "median_ratio": clear["median_seconds"] / encrypted["median_seconds"],
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


def step_storage_copy(source: str, site: str, replica: str, encrypted: bool, kek_file: str) -> dict[str, Any]:
    storage = _storage(site, encrypted, kek_file)
    started = time.perf_counter()
    with open_disk(source) as disk:
        storage.create_disk(replica, disk.size)
        with storage.open_disk(replica) as target:
            copied = copy_disk(disk, target, chunk_size=CHUNK_SIZE)
    return {"seconds": time.perf_counter() - started, "bytes_written": copied.bytes_written,
            "root": copied.manifest.root_hex}


def step_storage_restore(site: str, replica: str, target: str, encrypted: bool, kek_file: str) -> dict[str, Any]:
    storage = _storage(site, encrypted, kek_file)
    started = time.perf_counter()
    with storage.open_disk(replica) as disk:
        with open(target, "xb") as new:
            new.truncate(disk.size)
        with open_disk(target, writable=True) as out:
            restored = copy_disk(disk, out, chunk_size=CHUNK_SIZE, target_is_zero=True)
    return {"seconds": time.perf_counter() - started, "bytes_written": restored.bytes_written,
            "root": restored.manifest.root_hex}


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


STEPS = {"storage_copy": step_storage_copy, "storage_restore": step_storage_restore, "xts_speed": step_xts_speed}


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:], STEPS, MODULE))
