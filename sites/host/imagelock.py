"""Holding a disk image the way QEMU holds one, so that QEMU and its tools cannot open it beside us.

QEMU's file driver (block/file-posix.c) takes open file description locks (F_OFD_SETLK, one byte each)
on the image: a shared lock on byte 100+i for each permission i it uses, and on byte 200+i for each
permission it does not let others have. Before opening, it checks that nobody holds byte 200+i for a
permission it wants, nor byte 100+i for one it refuses to share, and fails with "Failed to get ...
lock" otherwise. Taking every byte of both ranges here makes any QEMU open of the image fail that way,
while the tracker service's own reads and writes (locks are advisory) go on.

A further exclusive lock on byte 400, which QEMU never touches, is the tracker service's own: a second
service on the same image finds it taken.
"""
from __future__ import annotations

import errno
import fcntl
import os
import struct
from pathlib import Path

PERMISSIONS = ("consistent read", "write", "write unchanged", "resize", "graph modification")
PERM_BASE = 100
SHARED_BASE = 200
SERVICE_BYTE = 400

# struct flock on x86-64 and aarch64 Linux: l_type, l_whence, l_start, l_len, l_pid (0 for OFD locks).
_FLOCK = struct.Struct("hhqqi4x")


class ImageBusyError(Exception):
    """Another process (a tracker service, QEMU, qemu-img) holds the image."""


def _lock(fd: int, kind: int, byte: int, *, test: bool = False) -> bool:
    """Take (or with `test` only probe) a one-byte OFD lock; False when another holder conflicts."""
    request = _FLOCK.pack(kind, os.SEEK_SET, byte, 1, 0)
    if test:
        answer = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, request)
        return _FLOCK.unpack(answer)[0] == fcntl.F_UNLCK
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, request)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


class ImageLock:
    """The image held for the tracker service until `release` (or the process's death)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDWR)
        try:
            if not _lock(self._fd, fcntl.F_WRLCK, SERVICE_BYTE):
                raise ImageBusyError(f"disk image {self.path} is served by another tracker service")
            for i, permission in enumerate(PERMISSIONS):
                # Probe with an exclusive lock: any shared holder of these bytes is QEMU's open.
                for base in (PERM_BASE, SHARED_BASE):
                    if not _lock(self._fd, fcntl.F_WRLCK, base + i, test=True):
                        raise ImageBusyError(
                            f"disk image {self.path} is open in QEMU or a QEMU tool (it holds its "
                            f"{permission!r} lock): stop it before serving the disk")
            for i in range(len(PERMISSIONS)):
                for base in (PERM_BASE, SHARED_BASE):
                    if not _lock(self._fd, fcntl.F_RDLCK, base + i):
                        raise ImageBusyError(f"disk image {self.path}: QEMU took its locks meanwhile")
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Closing the descriptor drops every lock it holds."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
