"""Resynchronization: make a target disk equal to a source disk, sending only the blocks that differ.

Used both ways: primary → recovery when a replica's log chain broke (resync), and recovery → primary
before failback, so the primary catches up without a full copy ("minimize downtime").

Why two levels. Each side checksums its own disk, and only checksums cross between them. Coarse chunks
(1 MiB) keep the first exchange small: 16 bytes per MiB, 16 KiB for a 1 GiB disk. But a chunk is far
bigger than a typical guest write, so sending whole differing chunks would send far too much: five
4 KiB writes scattered over a 512 MiB disk would cost 5 MiB that way, where rsync sends 116 KB. So for
each chunk whose checksums differ, the target side also sends the checksums of the chunk's small blocks
(4 KiB by default, 4 KiB of checksums per differing MiB), and the source side sends only the blocks whose
checksums differ, adjacent blocks coalesced into one write. Blocks the source holds as zeros are not
sent as data at all: they become `write_zeros` on the target (a hole punch, or a Clear Pages).

What is counted. `bytes_sent` is the literal disk data written to the target, the figure to compare with
rsync's "Literal data"; `bytes_zeroed` is what was made zero without sending data; `hash_bytes` is the
checksum lists that cross between the sides (one side's chunk manifest, plus the target's block
checksums of each differing chunk). Both endpoints are driven from this process; `block_hashes` is the
target side's part of the exchange when the sides are apart.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import groupby

from datapath.buffers import aligned_buffer
from datapath.endpoint import DiskEndpoint
from datapath.errors import AlignmentError, NonRecoverableError, SizeMismatchError
from datapath.manifest import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_CHUNK_SIZE,
    HASH_SIZE,
    Manifest,
    ReadAhead,
    check_chunk_size,
    chunk_hash,
    compute_manifest,
    diff_manifests,
    is_zero,
    split_ranges,
    zero_chunk_hash,
)

SyncProgress = Callable[[int, int], None]
"""on_progress(bytes_done, bytes_total)."""

# Differing chunks are read ahead, source and target together, this many at a time.
_READ_AHEAD_CHUNKS = 4


@dataclass
class SyncResult:
    bytes_sent: int
    """Literal disk data written to the target (compare with rsync's "Literal data")."""
    bytes_zeroed: int
    """Bytes made zero on the target with write_zeros, without sending data."""
    hash_bytes: int
    """Checksums crossing between the sides: one chunk manifest plus the target's block checksums of
    every differing chunk."""
    chunks_compared: int
    chunks_sent: int
    """Chunks with at least one differing block."""
    blocks_sent: int
    """Blocks written to the target, as data or as zeros."""
    seconds: float
    source_root: bytes
    target_root: bytes
    """The target's manifest root after the sync; equal to `source_root`."""
    target_manifest: Manifest
    """The target's chunk manifest after the sync (the source's content)."""


def hash_blocks(data: memoryview, block_size: int) -> bytes:
    """The 16-byte checksums of consecutive `block_size` blocks of `data` (the last may be short)."""
    return b"".join(chunk_hash(data[pos:pos + block_size]) for pos in range(0, len(data), block_size))


def block_hashes(
    endpoint: DiskEndpoint,
    chunk_index: int,
    chunk_size: int,
    block_size: int,
    buf: memoryview | None = None,
) -> bytes:
    """The block checksums of chunk `chunk_index` of `endpoint`: what one side sends the other for a
    chunk whose checksums differ. A chunk lying in a hole is not read. `buf`, when given, is a reused
    buffer of at least `chunk_size` bytes to read into."""
    _check_block_size(chunk_size, block_size)
    offset = chunk_index * chunk_size
    if not isinstance(chunk_index, int) or chunk_index < 0 or offset >= endpoint.size:
        raise IndexError(f"{endpoint.name}: chunk {chunk_index!r} of {chunk_size} bytes is outside the disk")
    length = min(chunk_size, endpoint.size - offset)
    if not _may_hold_data(endpoint, offset, length):
        return _zero_block_hashes(length, block_size)
    view = memoryview(buf if buf is not None else aligned_buffer(length))[:length]
    if len(view) < length:
        raise ValueError(f"buffer of {len(view)} bytes is smaller than chunk {chunk_index} ({length} bytes)")
    endpoint.read_into(offset, view)
    return hash_blocks(view, block_size)


def sync_disks(
    source: DiskEndpoint,
    target: DiskEndpoint,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    block_size: int = DEFAULT_BLOCK_SIZE,
    source_manifest: Manifest | None = None,
    target_manifest: Manifest | None = None,
    on_progress: SyncProgress | None = None,
) -> SyncResult:
    """Make `target`'s content equal to `source`'s (same size), sending only differing blocks.

    Manifests not given are computed (each on its own disk). A given manifest must describe its disk's
    current content; a source manifest found stale at a chunk raises NonRecoverableError. `block_size`
    must divide `chunk_size` and be a multiple of `target.alignment`. Ends with `target.flush()`.
    `on_progress(done, total)` counts disk bytes over the passes made: one per manifest computed (both
    at once), then the pass over the differing chunks."""
    started = time.monotonic()
    _check_sync(source, target, chunk_size, block_size, source_manifest, target_manifest)
    size = source.size
    passes = ["sync"] + [side for side, given in (("source", source_manifest), ("target", target_manifest))
                         if given is None]
    progress = _Progress(on_progress, size, passes)
    source_manifest, target_manifest = _both_manifests(
        source, target, chunk_size, source_manifest, target_manifest, progress)

    differing = diff_manifests(source_manifest, target_manifest)
    result = SyncResult(
        bytes_sent=0, bytes_zeroed=0, hash_bytes=len(target_manifest.hashes),
        chunks_compared=target_manifest.chunk_count, chunks_sent=0, blocks_sent=0, seconds=0.0,
        source_root=source_manifest.root, target_root=target_manifest.root, target_manifest=target_manifest,
    )
    synced_hashes: dict[int, bytes] = {}
    plan = split_ranges((source_manifest.chunk_extent(index) for index in differing), chunk_size)
    with ReadAhead([source, target], plan, chunk_size, ring_size=_READ_AHEAD_CHUNKS) as reader:
        for window in reader:
            index = window.offset // chunk_size
            source_chunk, target_chunk = window.views
            expected = source_manifest.chunk_hash(index)
            if chunk_hash(source_chunk) != expected:
                raise NonRecoverableError(
                    f"{source.name}: chunk {index} (offset {window.offset}) no longer matches the source "
                    f"manifest: the manifest is stale or the source changed during the sync"
                )
            _sync_chunk(target, window.offset, source_chunk, target_chunk, block_size, result)
            reader.release(window)
            synced_hashes[index] = expected
            progress.advance("sync", window.end)
    target.flush()
    result.target_manifest = target_manifest.with_chunk_hashes(synced_hashes)
    result.target_root = result.target_manifest.root
    progress.advance("sync", size)
    result.seconds = time.monotonic() - started
    return result


def _sync_chunk(
    target: DiskEndpoint,
    offset: int,
    source_chunk: memoryview,
    target_chunk: memoryview,
    block_size: int,
    result: SyncResult,
) -> None:
    """Send those blocks of a differing chunk whose checksums differ, adjacent blocks of the same kind
    (data, or zeros on the source) coalesced into one request."""
    target_blocks = hash_blocks(target_chunk, block_size)  # computed and sent by the target side
    result.hash_bytes += len(target_blocks)
    source_blocks = hash_blocks(source_chunk, block_size)
    kinds: list[str | None] = []  # per block: None (equal), "data" or "zeros"
    for number, pos in enumerate(range(0, len(source_chunk), block_size)):
        digest = source_blocks[number * HASH_SIZE:(number + 1) * HASH_SIZE]
        if digest == target_blocks[number * HASH_SIZE:(number + 1) * HASH_SIZE]:
            kinds.append(None)
            continue
        block = source_chunk[pos:pos + block_size]
        kinds.append("zeros" if digest == zero_chunk_hash(len(block)) and is_zero(block) else "data")
    sent_any = False
    for kind, run in groupby(range(len(kinds)), key=kinds.__getitem__):
        if kind is None:
            continue
        numbers = list(run)
        start, end = numbers[0] * block_size, min((numbers[-1] + 1) * block_size, len(source_chunk))
        if kind == "zeros":
            target.write_zeros(offset + start, end - start)
            result.bytes_zeroed += end - start
        else:
            target.write(offset + start, source_chunk[start:end])
            result.bytes_sent += end - start
        result.blocks_sent += len(numbers)
        sent_any = True
    result.chunks_sent += sent_any


def _may_hold_data(endpoint: DiskEndpoint, offset: int, length: int) -> bool:
    return next(iter(endpoint.data_extents(offset, length)), None) is not None


def _zero_block_hashes(length: int, block_size: int) -> bytes:
    full, tail = divmod(length, block_size)
    return zero_chunk_hash(block_size) * full + (zero_chunk_hash(tail) if tail else b"")


def _check_block_size(chunk_size: int, block_size: int) -> None:
    check_chunk_size(chunk_size)
    check_chunk_size(block_size, "block size")
    if chunk_size % block_size:
        raise ValueError(f"block size {block_size} must divide the chunk size {chunk_size}")


def _check_sync(
    source: DiskEndpoint,
    target: DiskEndpoint,
    chunk_size: int,
    block_size: int,
    source_manifest: Manifest | None,
    target_manifest: Manifest | None,
) -> None:
    if source.size != target.size:
        raise SizeMismatchError(
            f"cannot sync {source.name} ({source.size} bytes) to {target.name} ({target.size} bytes): "
            f"the disks must have the same size"
        )
    _check_block_size(chunk_size, block_size)
    if block_size % target.alignment:
        raise AlignmentError(
            f"block size {block_size} is not a multiple of {target.name}'s write alignment {target.alignment}"
        )
    for endpoint, manifest in ((source, source_manifest), (target, target_manifest)):
        if manifest is not None and (manifest.size != endpoint.size or manifest.chunk_size != chunk_size):
            raise SizeMismatchError(
                f"the manifest given for {endpoint.name} describes a {manifest.size}-byte disk in "
                f"{manifest.chunk_size}-byte chunks, not {endpoint.size} bytes in {chunk_size}-byte chunks"
            )


def _both_manifests(
    source: DiskEndpoint,
    target: DiskEndpoint,
    chunk_size: int,
    source_manifest: Manifest | None,
    target_manifest: Manifest | None,
    progress: _Progress,
) -> tuple[Manifest, Manifest]:
    """The manifests not given, computed at the same time, as the two sites would: the target's on a
    helper thread, so the reads of both disks overlap."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="target-manifest") as pool:
        target_future = None
        if target_manifest is None:
            target_future = pool.submit(compute_manifest, target, chunk_size,
                                        on_progress=progress.tracker("target", report=False))
        if source_manifest is None:
            source_manifest = compute_manifest(source, chunk_size, on_progress=progress.tracker("source"))
        if target_future is not None:
            target_manifest = target_future.result()
            progress.report()
    return source_manifest, target_manifest


class _Progress:
    """One monotonic (done, total) over passes that may run at the same time, each over the whole
    disk. Reports are made from the calling thread only; other threads just record their offsets."""

    def __init__(self, on_progress: SyncProgress | None, size: int, passes: list[str]):
        self._on_progress = on_progress
        self._total = size * len(passes)
        self._offsets = dict.fromkeys(passes, 0)  # fixed keys: safe to update from another thread
        self._reported = -1

    def tracker(self, name: str, *, report: bool = True) -> Callable[[int], None]:
        def record(offset: int) -> None:
            self._offsets[name] = offset
            if report:
                self.report()
        return record

    def advance(self, name: str, offset: int) -> None:
        self._offsets[name] = offset
        self.report()

    def report(self) -> None:
        done = sum(self._offsets.values())
        if self._on_progress is not None and done > self._reported:
            self._reported = done
            self._on_progress(done, self._total)
