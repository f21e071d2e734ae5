"""A VM's data disk: a raw, sparse image holding an ext4 file system, made on the host without mounting."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from .errors import DataDiskError

MIN_SIZE = 8 << 20
"""Below this ext4 keeps almost nothing for files after its journal and metadata."""
MKFS_TIMEOUT_S = 120


def make_data_disk(path: Path, size_bytes: int, seed_dir: Path | None = None) -> Path:
    """Create `path` as a sparse raw image of `size_bytes` with an ext4 file system, filled with a copy of
    `seed_dir`'s tree when given (mkfs.ext4 -d). Refuses to overwrite an existing file."""
    path = Path(path)
    if not isinstance(size_bytes, int) or size_bytes < MIN_SIZE or size_bytes % 512:
        raise DataDiskError(f"data disk size {size_bytes!r} must be a whole number of 512-byte sectors, "
                            f"at least {MIN_SIZE} bytes")
    if seed_dir is not None and not Path(seed_dir).is_dir():
        raise DataDiskError(f"seed folder {seed_dir} of data disk {path} is not a folder")
    mkfs = sbin_tool("mkfs.ext4")
    try:
        with open(path, "xb") as image:
            image.truncate(size_bytes)
    except FileExistsError:
        raise DataDiskError(f"data disk {path} exists already: not overwriting it") from None
    # The inode tables and journal are written now, not lazily by the guest's kernel after its first
    # mount: those writes would otherwise reach a tracked disk as a burst of replication traffic.
    command = [mkfs, "-q", "-F", "-m", "0", "-E", "lazy_itable_init=0,lazy_journal_init=0"]
    if seed_dir is not None:
        command += ["-d", str(seed_dir)]
    result = subprocess.run([*command, str(path)], capture_output=True, text=True, timeout=MKFS_TIMEOUT_S)
    if result.returncode != 0:
        path.unlink(missing_ok=True)
        raise DataDiskError(f"mkfs.ext4 of data disk {path} failed ({result.returncode}): "
                            f"{(result.stderr or result.stdout).strip()}")
    return path


def sbin_tool(name: str) -> str:
    """The path of an e2fsprogs command, also found when PATH lacks the sbin folders (non-root users)."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if found is None:
        raise DataDiskError(f"{name} is not installed (Debian: e2fsprogs; scripts/ensure-tools.sh {name})")
    return found
