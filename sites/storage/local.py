"""Recovery-site storage in a local directory: replica disks as fixed VHD files, objects as plain files.

Every name becomes a path under the root. Names come from outside, so besides `validate_name` each path
is resolved (symlinks included) and must stay inside the root before anything is read or created.
Files appear whole or not at all: they are written under a hidden temporary name in the same
directory, made durable, then renamed into place. What it creates is its owner's only: files 0600 (the
temporary ones too), folders 0700, whatever the umask (`datapath.private`).
"""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from datapath.disk import LocalDisk, create_disk, open_disk
from datapath.durable import fsync_directory
from datapath.errors import (
    DiskFormatError,
    LowDiskSpaceError,
    PathOutsideRootError,
    SizeMismatchError,
)
from datapath.private import DIRECTORY_MODE, FILE_MODE, make_private_directories
from datapath.vhd import check_fixed_vhd_size

from .base import ObjectNotFoundError, RecoveryStorage, validate_name

DEFAULT_PARALLELISM = 4
MAX_PARALLELISM = 32
_COPY_CHUNK = 4 * 1024 * 1024
"""Bytes per read when an object is copied in or out: several of a sealed object's records (1 MiB + 16 bytes
of tag) at once, so most are sealed or opened where they lie rather than gathered first."""
_NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_HIDDEN_PREFIX = "."  # validate_name refuses it, so temporary files can never collide with a name


def _raise_if_no_space(error: OSError, action: str) -> None:
    """LowDiskSpaceError, caused by `error`, when `error` says the disk is full; nothing otherwise (the
    caller re-raises `error` itself)."""
    if error.errno in _NO_SPACE_ERRNOS:
        raise LowDiskSpaceError(f"no space left {action}: {error.strerror}") from error


class LocalDirectoryStorage(RecoveryStorage):
    """A recovery site in directory `root` (created if missing).

    `parallelism` (1..32, default 4) is how many writes a caller may keep in flight per disk; local
    disks take concurrent writes to distinct ranges, as page blobs do."""

    def __init__(self, root: str | os.PathLike[str], *, parallelism: int = DEFAULT_PARALLELISM):
        if (not isinstance(parallelism, int) or isinstance(parallelism, bool)
                or not 1 <= parallelism <= MAX_PARALLELISM):
            raise ValueError(
                f"parallelism must be a whole number of requests per disk from 1 to {MAX_PARALLELISM} "
                f"(default {DEFAULT_PARALLELISM}), got {parallelism!r}"
            )
        self.parallelism = parallelism
        requested = Path(root).expanduser()
        try:
            make_private_directories(requested)
        except FileExistsError as error:
            raise NotADirectoryError(f"storage root {requested} exists and is not a directory") from error
        self.root = requested.resolve(strict=True)
        self.description = f"local directory {self.root}"

    def path(self, name: str) -> Path:
        """The resolved path of `name` under the root; PathOutsideRootError if it is not a valid name
        or resolves (through symlinks) outside the root."""
        validate_name(name)
        resolved = (self.root / name).resolve()
        if not resolved.is_relative_to(self.root) or resolved == self.root:
            raise PathOutsideRootError(
                f"name {name!r} resolves to {resolved}, outside the storage root {self.root} "
                f"(through a symlink?): refusing to use it"
            )
        return resolved

    # ---- replica disks -------------------------------------------------------------------------
    def create_disk(self, name: str, size: int) -> None:
        path = self.path(name)
        try:
            check_fixed_vhd_size(size)
        except DiskFormatError as error:
            raise DiskFormatError(f"cannot create disk {name} in {self.root}: {error}") from None
        if path.exists():
            self._check_existing_disk(path, name, size)
            return
        self._make_parents(path)
        # Built under a hidden name and linked into place, so the disk never appears without its
        # footer and an existing one is never replaced.
        staging = path.with_name(f"{_HIDDEN_PREFIX}{path.name}.{uuid.uuid4().hex}.creating")
        create_disk(staging, size, fmt="vhd")  # 0600 (datapath.disk)
        try:
            try:
                os.link(staging, path)
            except FileExistsError:
                self._check_existing_disk(path, name, size)
                return
            except OSError as error:
                _raise_if_no_space(error, f"creating disk {path}")
                raise
            fsync_directory(path.parent)
        finally:
            staging.unlink(missing_ok=True)

    def _check_existing_disk(self, path: Path, name: str, size: int) -> None:
        with open_disk(path) as disk:
            self._require_vhd(disk, name)
            if disk.size != size:
                raise SizeMismatchError(
                    f"replica disk {name} ({path}) exists with virtual size {disk.size} bytes, not the "
                    f"{size} bytes asked for: delete it or use its size"
                )

    @staticmethod
    def _require_vhd(disk: LocalDisk, name: str) -> None:
        if disk.format != "vhd":
            raise DiskFormatError(
                f"replica disk {name} ({disk.path}) is not a fixed VHD (no VHD footer): replica disks "
                f"are stored as fixed VHD"
            )

    def open_disk(self, name: str) -> LocalDisk:
        disk = open_disk(self.path(name), writable=True)
        try:
            self._require_vhd(disk, name)
        except BaseException:
            disk.close()
            raise
        return disk

    def disk_exists(self, name: str) -> bool:
        return self.path(name).is_file()

    def delete_disk(self, name: str) -> None:
        self._delete(name)

    # ---- objects -------------------------------------------------------------------------------
    def put_object(self, name: str, src: BinaryIO | bytes) -> int:
        path = self.path(name)
        with self._staged(name, path, src) as (staging, size):
            os.replace(staging, path)
        fsync_directory(path.parent)
        return size

    def put_new_object(self, name: str, data: bytes) -> bool:
        path = self.path(name)
        with self._staged(name, path, data) as (staging, _):
            try:
                os.link(staging, path)  # never replaces an existing file
            except FileExistsError:
                return False
        fsync_directory(path.parent)
        return True

    @contextmanager
    def _staged(self, name: str, path: Path, src: BinaryIO | bytes) -> Iterator[tuple[Path, int]]:
        """A hidden file beside `path` holding `src`, private (FILE_MODE) and fsynced, with its size, for the
        caller to move into place; removed afterwards whatever happened (moved already, it is gone)."""
        self._make_parents(path)
        fd, staging_name = tempfile.mkstemp(
            prefix=f"{_HIDDEN_PREFIX}{path.name}.", suffix=".partial", dir=path.parent
        )
        staging = Path(staging_name)
        try:
            with open(fd, "wb") as out:
                os.fchmod(out.fileno(), FILE_MODE)
                if isinstance(src, (bytes, bytearray, memoryview)):
                    out.write(src)
                else:
                    _copy_stream(src, out)
                size = out.tell()
                out.flush()
                os.fsync(out.fileno())
            yield staging, size
        except OSError as error:
            _raise_if_no_space(error, f"storing object {name} in {self.root}")
            raise
        finally:
            staging.unlink(missing_ok=True)

    def get_object(self, name: str, dst: BinaryIO) -> int:
        with self._open_object(name) as src:
            _copy_stream(src, dst)
            return src.tell()

    def read_object(self, name: str) -> bytes:
        with self._open_object(name) as src:
            return src.read()

    def _open_object(self, name: str) -> BinaryIO:
        path = self.path(name)
        try:
            return open(path, "rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as error:
            raise ObjectNotFoundError(f"object {name} does not exist in {self.root}") from error

    def object_exists(self, name: str) -> bool:
        return self.path(name).is_file()

    def delete_object(self, name: str) -> None:
        self._delete(name)

    def list_objects(self, prefix: str = "") -> list[str]:
        if not isinstance(prefix, str):
            raise TypeError(f"a name prefix is a string, got {prefix!r}")
        # Only the directory that can hold matches is walked.
        directory = prefix.rpartition("/")[0]
        start = self.path(directory) if directory else self.root
        relative_start = f"{directory}/" if directory else ""
        return sorted(
            name for name in self._walk(start, relative_start) if name.startswith(prefix)
        )

    def _walk(self, directory: Path, relative: str) -> Iterator[str]:
        try:
            entries = list(os.scandir(directory))
        except (FileNotFoundError, NotADirectoryError):
            return
        for entry in entries:
            if entry.name.startswith(_HIDDEN_PREFIX):
                continue
            name = relative + entry.name
            # Symlinks are never followed: one could lead outside the root.
            if entry.is_dir(follow_symlinks=False):
                yield from self._walk(Path(entry.path), name + "/")
            elif entry.is_file(follow_symlinks=False):
                try:
                    yield validate_name(name)
                except PathOutsideRootError:
                    continue  # a file put there by hand, under a name the engine cannot use

    # ---- helpers -------------------------------------------------------------------------------
    def _delete(self, name: str) -> None:
        path = self.path(name)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        fsync_directory(path.parent)

    def _make_parents(self, path: Path) -> None:
        """Create the missing directories between the root and `path`, each made durable in its
        parent."""
        missing = []
        parent = path.parent
        while parent != self.root and not parent.is_dir():
            missing.append(parent)
            parent = parent.parent
        for directory in reversed(missing):
            try:
                directory.mkdir(mode=DIRECTORY_MODE, exist_ok=True)
                os.chmod(directory, DIRECTORY_MODE)
            except OSError as error:
                _raise_if_no_space(error, f"creating directory {directory}")
                raise
            fsync_directory(directory.parent)


def _copy_stream(src: BinaryIO, dst: BinaryIO) -> None:
    """Copy `src` to `dst` through one buffer, reused (shutil.copyfileobj reads into a new byte string each
    time: a megabyte of fresh memory per read, which cost the kernel more than the copy itself)."""
    readinto = getattr(src, "readinto", None)
    if readinto is None:
        shutil.copyfileobj(src, dst, _COPY_CHUNK)
        return
    with memoryview(bytearray(_COPY_CHUNK)) as buffer:
        while got := readinto(buffer):
            dst.write(buffer[:got])
