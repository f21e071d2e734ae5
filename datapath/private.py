"""Files and folders only their owner can read: 0600 and 0700, whatever the process's umask.

Disk images, replication logs, recovery-storage objects and the engine's database hold a guest's data or
what protects it; nobody else on the machine has to read them. `os.open` and `mkdir` take a mode, but the
umask can only take bits away from it, never make it exact, so each file or folder made here also has its
mode set explicitly once created.
"""
from __future__ import annotations

import os
from pathlib import Path

FILE_MODE = 0o600
DIRECTORY_MODE = 0o700


def make_private_directories(path: str | os.PathLike[str]) -> list[Path]:
    """Create `path` and its missing parents, each 0700; returns those created (outermost first). Folders
    that exist already are left as they are: they may be shared ones (/srv, a mount point) the operator
    chose. FileExistsError when `path` or a parent exists and is not a folder."""
    path = Path(path)
    missing = []
    directory = path
    while not directory.is_dir():
        missing.append(directory)
        if directory.parent == directory:
            break
        directory = directory.parent
    created = []
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=DIRECTORY_MODE)
        except FileExistsError:
            if not directory.is_dir():
                raise
            continue  # made meanwhile by another process: its mode is that process's business
        os.chmod(directory, DIRECTORY_MODE)
        created.append(directory)
    return created


def create_private_file(path: str | os.PathLike[str]) -> bool:
    """Create `path` empty and 0600 unless it exists; returns whether it was created. A file that exists and
    is this user's is made 0600 too (one made before this rule, or by a tool with a wider umask)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        if os.stat(path).st_uid == os.getuid():
            os.chmod(path, FILE_MODE)
        return False
    try:
        os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)
    return True


def write_new_private_file(path: str | os.PathLike[str], text: str, *, overwrite: bool = False) -> None:
    """Write `text` to a new file at `path`, 0600 from its first byte, and fsync it; FileExistsError if it
    exists (unless `overwrite`): a secret is never written over another one by accident."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    fd = os.open(path, flags, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
