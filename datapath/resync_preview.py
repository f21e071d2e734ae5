"""What a resync would send, found without sending anything: the disk's chunks checksummed and compared with
the manifest of the replica's last recorded version (read from the recovery storage, trusted only when its root
is the one the database recorded), so only the source is read.

An estimate: the resync itself compares the disk with the replica's actual content, so a replica damaged on
the storage since its last version makes it send more, and writes made meanwhile change what differs. The
disk is read live through its tracker (`LiveDiskView`), never through a snapshot: a preview leaves nothing
behind that a later copy or resync could mistake for its own, even when its worker dies mid-read.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from datapath.endpoint import SECTOR, DiskEndpoint
from datapath.errors import NonRecoverableError
from datapath.manifest import Manifest, compute_manifest, diff_manifests
from datapath.tracker import ReplicationTracker

Progress = Callable[[int, int], None]


class LiveDiskView:
    """The tracked disk as it is now, read-only, each read under the tracker's lock (so never half of a write)."""

    alignment = SECTOR

    def __init__(self, tracker: ReplicationTracker) -> None:
        self._tracker = tracker
        self.size = tracker.disk_size

    def read_into(self, offset: int, buf: memoryview) -> int:
        length = max(0, min(len(buf), self.size - offset))
        buf[:length] = self._tracker.read(offset, length)
        return length

    def data_extents(self, offset: int = 0, length: int | None = None) -> Iterator[tuple[int, int]]:
        end = self.size if length is None else min(self.size, offset + length)
        if end > offset:
            yield offset, end - offset  # the whole range: the tracker does not say where the holes are

    def write(self, offset: int, data: bytes | memoryview) -> None:
        raise NonRecoverableError("a live view of a tracked disk is read-only")

    def write_zeros(self, offset: int, length: int) -> None:
        raise NonRecoverableError("a live view of a tracked disk is read-only")

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class ResyncPreview:
    chunks_compared: int
    chunks_differing: int
    bytes_differing: int
    """The bytes of the differing chunks: at most what the resync sends (it sends differing blocks within them)."""
    chunk_size: int
    seconds: float


def preview_resync(source: DiskEndpoint, replica_manifest: Manifest, *,
                   on_progress: Progress | None = None) -> ResyncPreview:
    """Checksum `source` in the manifest's chunk size and count the chunks that differ from it."""
    started = time.monotonic()
    size = source.size
    source_manifest = compute_manifest(
        source, replica_manifest.chunk_size,
        on_progress=None if on_progress is None else lambda done: on_progress(done, size))
    differing = diff_manifests(source_manifest, replica_manifest)
    return ResyncPreview(
        chunks_compared=source_manifest.chunk_count, chunks_differing=len(differing),
        bytes_differing=sum(source_manifest.chunk_extent(index)[1] for index in differing),
        chunk_size=replica_manifest.chunk_size, seconds=round(time.monotonic() - started, 3))
