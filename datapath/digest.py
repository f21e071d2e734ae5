"""A digest of a disk's contents: proof that a disk did or did not change, without a copy to compare with."""
from __future__ import annotations

import hashlib
from pathlib import Path

from datapath.disk import open_disk

_READ_SIZE = 4 * 1024 * 1024


def disk_digest(path: Path | str) -> str:
    """sha256 (hex) of the disk's guest-visible bytes, whatever its format (a VHD's footer excluded)."""
    digest = hashlib.sha256()
    with open_disk(path) as disk:
        buffer = bytearray(_READ_SIZE)
        for offset in range(0, disk.size, len(buffer)):
            view = memoryview(buffer)[:min(len(buffer), disk.size - offset)]
            disk.read_into(offset, view)
            digest.update(view)
    return digest.hexdigest()
