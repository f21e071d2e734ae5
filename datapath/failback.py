"""Failback's data path: bring the primary's disk to the content of the failed-over VM's disk.

The data never goes host to host: the recovery side writes what the primary lacks as a replication log
(the same sealed, checksummed format the tracker ships, `docs/formats.md`), the log travels through the
recovery storage as an object, and the primary side applies it to a staging copy of its disk. Only once
the staging copy is complete does the host swap it in (`sites.host.Host.replace_disk`), so an
interrupted failback leaves the primary disk as it was.

Two ways, as Azure Site Recovery offers them:

- minimize downtime ("synchronize only differences"): the staging copy starts as a copy of the primary
  disk; its chunk manifest goes to the recovery side, which logs only the chunks whose checksums differ.
- full download: the staging copy starts all zeros and the recovery side logs every chunk holding data.

Each function can simply be called again after a crash: the staging image and the log are rebuilt from
scratch, and applying a log twice gives the same disk.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from datapath.copy import copy_disk
from datapath.disk import FORMATS, create_disk, open_disk
from datapath.durable import fsync_directory
from datapath.endpoint import SECTOR, DiskEndpoint
from datapath.errors import SizeMismatchError
from datapath.logapply import AppliedLog, apply_log
from datapath.logformat import MAX_RECORD_DATA, LogWriter
from datapath.manifest import (
    DEFAULT_CHUNK_SIZE,
    HASH_SIZE,
    Manifest,
    Progress,
    ReadAhead,
    check_chunk_size,
    chunk_count,
    chunk_hash,
    data_windows,
    window_size,
    zero_chunk_hash,
)
from sites.storage.base import validate_name

FAILBACK_GENERATION = 1
"""A difference log stands alone: it is the first and only generation applied to its staging image."""
LOG_BLOCK_SIZE = SECTOR
_READ_SIZE = 8 * 1024 * 1024


@dataclass(frozen=True)
class DifferenceStats:
    chunks_compared: int
    chunks_sent: int
    """Chunks written to the log (whose content differs from the staging side's)."""
    bytes_in_log: int
    """Size of the sealed log file: what crosses to the primary side."""
    source_root: str
    """Hex root of the source's chunk manifest: the staging image's root once the log is applied."""
    seconds: float


def failback_object(host: str, vm: str, disk: str, what: str) -> str:
    """The recovery-storage name of a failback object of one disk: `failback/<host>/<vm>/<disk>.<what>`
    (`what` being e.g. "manifest" or "hrl"). PathOutsideRootError for names that are not safe."""
    return validate_name(f"failback/{host}/{vm}/{disk}.{what}")


def prepare_staging(
    staging_path: str | os.PathLike[str],
    size: int,
    fmt: str,
    *,
    copy_from: str | os.PathLike[str] | None,
    on_progress: Progress | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Manifest:
    """Create the staging image (sparse, `fmt` "raw" or "vhd", virtual size `size`), a copy of the disk
    at `copy_from` when given, and return its chunk manifest (the all-zero manifest without a copy).

    Any image already at `staging_path` is replaced: a rerun after a crash starts over. `copy_from` is
    checked (exists, same size) before anything is created. `on_progress(offset)` reports the copy."""
    staging_path = Path(staging_path)
    if fmt not in FORMATS:
        raise ValueError(f"unknown disk format {fmt!r} for staging image {staging_path}: expected raw or vhd")
    check_chunk_size(chunk_size)
    source = open_disk(copy_from) if copy_from is not None else None
    try:
        if source is not None and source.size != size:
            raise SizeMismatchError(
                f"cannot stage {staging_path} ({size} bytes) from {source.name} ({source.size} bytes): the "
                f"disks must have the same size"
            )
        staging_path.unlink(missing_ok=True)
        create_disk(staging_path, size, fmt)
        if source is None:
            if on_progress is not None:
                on_progress(size)
            return zero_manifest(size, chunk_size)
        with open_disk(staging_path, writable=True) as staging:
            result = copy_disk(source, staging, chunk_size=chunk_size, on_progress=on_progress)
        assert result.manifest is not None  # a copy from offset 0 sees every chunk
        return result.manifest
    finally:
        if source is not None:
            source.close()


def zero_manifest(size: int, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Manifest:
    """The manifest of an all-zero disk of `size` bytes."""
    hashes = bytearray(zero_chunk_hash(chunk_size) * chunk_count(size, chunk_size))
    if size % chunk_size:
        hashes[-HASH_SIZE:] = zero_chunk_hash(size % chunk_size)
    return Manifest(size, chunk_size, bytes(hashes))


def write_difference_log(
    source: DiskEndpoint,
    log_path: str | os.PathLike[str],
    *,
    disk_id: bytes,
    against: Manifest | None,
    on_progress: Progress | None = None,
) -> DifferenceStats:
    """Write, as a sealed replication log at `log_path`, every chunk of `source` whose checksum
    differs from `against` (the staging image's manifest); `against=None` stands for an all-zero
    staging image, so every chunk holding data is logged (a full download).

    One pass over the source's data extents: each chunk is hashed as it is read, so the source's
    manifest (its root is returned) costs no second read. A differing chunk that is zeros on the
    source is logged as zeros. The log (generation 1, first sequence number 1, 512-byte blocks,
    `disk_id`) appears at `log_path` only once sealed and durable."""
    started = time.monotonic()
    log_path = Path(log_path)
    size = source.size
    chunk_size = against.chunk_size if against is not None else DEFAULT_CHUNK_SIZE
    if against is None:
        against = zero_manifest(size, chunk_size)
    if against.size != size:
        raise SizeMismatchError(
            f"cannot compare {source.name} ({size} bytes) with a manifest of a {against.size}-byte disk"
        )
    check_chunk_size(chunk_size)
    if chunk_size > MAX_RECORD_DATA:
        raise ValueError(f"chunk size {chunk_size} exceeds the largest log record ({MAX_RECORD_DATA} bytes)")

    source_hashes = bytearray(zero_manifest(size, chunk_size).hashes)
    sent = 0
    temporary = log_path.with_name(f".{log_path.name}.writing")
    zeros = memoryview(bytes(chunk_size))
    try:
        with LogWriter.create(temporary, disk_id=disk_id, generation=FAILBACK_GENERATION, first_seq=1,
                              disk_size=size, block_size=LOG_BLOCK_SIZE) as log:
            position = 0

            def hole_up_to(end: int) -> None:
                """Chunks in [position, end) lie in holes: zeros on the source."""
                nonlocal sent
                for offset in range(position, end, chunk_size):
                    index = offset // chunk_size
                    length = min(chunk_size, size - offset)
                    if against.chunk_hash(index) != zero_chunk_hash(length):
                        log.append(offset, zeros[:length])
                        sent += 1

            size_of_window = window_size(chunk_size, _READ_SIZE)
            with ReadAhead([source], data_windows(source, chunk_size, size_of_window), size_of_window) as reader:
                for window in reader:
                    hole_up_to(window.offset)
                    view = window.view
                    for pos in range(0, window.length, chunk_size):
                        chunk = view[pos:pos + chunk_size]
                        index = (window.offset + pos) // chunk_size
                        digest = chunk_hash(chunk)
                        source_hashes[index * HASH_SIZE:(index + 1) * HASH_SIZE] = digest
                        if digest != against.chunk_hash(index):
                            log.append(window.offset + pos, chunk)
                            sent += 1
                    reader.release(window)
                    position = window.end
                    if on_progress is not None:
                        on_progress(position)
            hole_up_to(size)
            seal = log.seal()
        os.replace(temporary, log_path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_directory(log_path.parent)
    if on_progress is not None:
        on_progress(size)
    return DifferenceStats(
        chunks_compared=against.chunk_count,
        chunks_sent=sent,
        bytes_in_log=seal.size,
        source_root=Manifest(size, chunk_size, bytes(source_hashes)).root_hex,
        seconds=time.monotonic() - started,
    )


def apply_difference_log(
    log: str | os.PathLike[str] | BinaryIO, staging: DiskEndpoint, *, disk_id: bytes
) -> AppliedLog:
    """Apply a difference log to the staging image. The whole log is verified first: a corrupt,
    truncated or tampered log, or one of another disk or size, raises before any byte is written.
    Applying it again is harmless."""
    return apply_log(log, staging, expected_generation=FAILBACK_GENERATION, disk_id=disk_id,
                     disk_name=staging.name)
