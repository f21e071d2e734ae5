"""An initramfs archive: cpio "newc" format, gzip-compressed, written in Python.

Written here rather than with a cpio command because Debian machines often lack GNU cpio, and so that the
archive needs no root: the one device node the kernel needs before devtmpfs (/dev/console) is an entry of
the archive, not a node on the host. Entries carry a fixed owner (root) and time, so the same tree gives
the same bytes (and the same SHA-256) on every build.
"""
from __future__ import annotations

import gzip
import stat
from dataclasses import dataclass
from pathlib import Path

_TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class Entry:
    path: str
    """Inside the archive, without a leading slash."""
    mode: int
    """Type and permission bits (stat.S_IFREG | 0o755, ...)."""
    data: bytes = b""
    """A file's content or a symlink's target."""
    rdev: tuple[int, int] = (0, 0)


def directory(path: str) -> Entry:
    return Entry(path, stat.S_IFDIR | 0o755)


def file(path: str, data: bytes, executable: bool = False) -> Entry:
    return Entry(path, stat.S_IFREG | (0o755 if executable else 0o644), data)


def symlink(path: str, target: str) -> Entry:
    return Entry(path, stat.S_IFLNK | 0o777, target.encode())


def char_device(path: str, major: int, minor: int) -> Entry:
    return Entry(path, stat.S_IFCHR | 0o600, rdev=(major, minor))


def tree(root: Path, prefix: str = "") -> list[Entry]:
    """The folders and regular files under `root`, as entries under `prefix`, parents first."""
    entries = []
    for path in sorted(root.rglob("*")):
        name = f"{prefix}/{path.relative_to(root)}".lstrip("/")
        if path.is_symlink():
            entries.append(symlink(name, str(path.readlink())))
        elif path.is_dir():
            entries.append(directory(name))
        else:
            entries.append(file(name, path.read_bytes(), executable=bool(path.stat().st_mode & 0o111)))
    return entries


def write_initramfs(target: Path, entries: list[Entry]) -> None:
    """Write `entries` (parents before children) as a gzip-compressed newc archive at `target`."""
    archive = bytearray()
    for inode, entry in enumerate(entries, start=1):
        _append(archive, entry.path, inode, entry.mode, 1 if not stat.S_ISDIR(entry.mode) else 2, entry.data,
                entry.rdev)
    _append(archive, _TRAILER, 0, 0, 1, b"", (0, 0))
    archive.extend(b"\0" * (-len(archive) % 512))
    target.write_bytes(gzip.compress(bytes(archive), compresslevel=6, mtime=0))


def _append(archive: bytearray, name: str, inode: int, mode: int, nlink: int, data: bytes,
            rdev: tuple[int, int]) -> None:
    encoded = name.encode() + b"\0"
    fields = (inode, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
    archive.extend(b"070701" + b"".join(b"%08X" % value for value in fields))
    archive.extend(encoded)
    archive.extend(b"\0" * (-len(archive) % 4))
    archive.extend(data)
    archive.extend(b"\0" * (-len(archive) % 4))
