"""Local disk images, raw or fixed VHD, as DiskEndpoints.

A fixed VHD is the raw disk followed by a 512-byte footer, so both formats are read and written the
same way; the only difference is that a VHD's virtual size stops before the footer, which is never
read, written or reported as data here.
"""
from __future__ import annotations

import ctypes
import errno
import io
import os
import re
import stat
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from types import TracebackType

from datapath.buffers import aligned_buffer, write_fully
from datapath.durable import fsync_directory
from datapath.errors import DiskFormatError, DiskNotFoundError, LowDiskSpaceError
from datapath.private import FILE_MODE
from datapath.vhd import COOKIE, FOOTER_SIZE, build_footer, parse_footer

FORMATS = ("raw", "vhd")

_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4, "P": 1024**5}
_SIZE_TEXT = re.compile(r"^\s*(?P<number>[+-]?\d+(?:\.\d+)?)\s*(?P<unit>[KMGTP]?)(?:I?B)?\s*$", re.I)

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
# Filesystems without hole punching or SEEK_DATA answer with one of these.
_UNSUPPORTED_ERRNOS = frozenset({errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL})
_NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_ZERO_WRITE_CHUNK = 1024 * 1024
_NOT_A_FILE = "{path} is not a regular file; disk images are raw or fixed VHD files"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int


def parse_size(text: str) -> int:
    """Bytes in a size such as "64M", "10G", "512K", "1T", "1.5G", "64MiB", "10GB" or "4096".

    Units are binary whatever the spelling (GB means GiB, as disk tools use it); case-insensitive."""
    match = _SIZE_TEXT.match(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(
            f"invalid size {text!r}: expected a number with an optional unit K, M, G, T or P "
            f"(binary; KiB/KB spellings accepted), e.g. 64M, 10G, 4096"
        )
    size = Decimal(match["number"]) * _UNITS[match["unit"].upper()]
    if size <= 0:
        raise ValueError(f"invalid size {text!r}: a size must be greater than zero")
    if size != size.to_integral_value():
        raise ValueError(f"invalid size {text!r}: it is not a whole number of bytes ({size})")
    return int(size)


def format_size(n: int) -> str:
    """A human-readable binary size: "512 B", "64.0 MiB", "1.0 GiB"."""
    if n < 1024:
        return f"{n} B"
    value = n / 1024
    units = ["KiB", "MiB", "GiB", "TiB", "PiB"]
    while round(value, 1) >= 1024 and len(units) > 1:
        value /= 1024
        units.pop(0)
    return f"{value:.1f} {units[0]}"


def detect_format(path: str | os.PathLike[str]) -> str:
    """"vhd" if `path` ends with a valid fixed-VHD footer matching its length, "raw" otherwise.

    A tail that starts with the VHD cookie but is corrupt or describes another size raises
    DiskFormatError: such a file is a damaged VHD, and reading it as raw would hand its footer out as
    disk data."""
    fd = _open_existing(Path(path), os.O_RDONLY)
    try:
        return _detect_open_format(fd, os.fstat(fd).st_size, str(path))
    finally:
        os.close(fd)


def create_disk(path: str | os.PathLike[str], size: int, fmt: str = "raw") -> None:
    """Create a sparse disk image of virtual size `size`: raw (a positive multiple of 512 bytes) or a
    fixed VHD (a whole number of MiB, at most 8 TiB with its footer). No data is written but the VHD
    footer. Refuses to replace an existing file (FileExistsError); leaves nothing behind on error."""
    path = Path(path)
    if fmt not in FORMATS:
        raise ValueError(f"unknown disk format {fmt!r} for {path}: expected one of {', '.join(FORMATS)}")
    if fmt == "vhd":
        try:
            footer = build_footer(size)
        except DiskFormatError as exc:
            raise DiskFormatError(f"cannot create {path}: {exc}") from None
    else:
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0 or size % 512:
            raise DiskFormatError(
                f"cannot create {path}: a raw disk's size must be a positive multiple of 512 bytes, "
                f"got {size!r}"
            )
        footer = b""
    # A guest's data: its owner's only (0600 whatever the umask).
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        try:
            os.fchmod(fd, FILE_MODE)
            os.ftruncate(fd, size + len(footer))
            if footer:
                _pwrite_all(fd, memoryview(footer), size, str(path))
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException as exc:
        os.unlink(path)
        if isinstance(exc, OSError) and exc.errno in _NO_SPACE_ERRNOS:
            raise LowDiskSpaceError(f"no space left to create {path} ({format_size(size)})") from exc
        raise
    fsync_directory(path.parent)  # a new file survives a crash only with its directory entry


def open_disk(path: str | os.PathLike[str], writable: bool = False) -> LocalDisk:
    """Open a raw or fixed-VHD disk image; DiskNotFoundError if it does not exist."""
    return LocalDisk(path, writable=writable)


class LocalDisk:
    """A raw or fixed-VHD image file as a DiskEndpoint.

    Reads and writes use pread/pwrite on one descriptor, so threads may read and write different
    ranges concurrently."""

    alignment = 1

    def __init__(self, path: str | os.PathLike[str], *, writable: bool = False):
        self.path = Path(path)
        self.name = str(path)
        self.writable = writable
        fd = _open_existing(self.path, os.O_RDWR if writable else os.O_RDONLY)
        try:
            file_size = os.fstat(fd).st_size
            self.format = _detect_open_format(fd, file_size, self.name)
            self.size = file_size - FOOTER_SIZE if self.format == "vhd" else file_size
            if self.format == "raw":
                _check_raw_size(file_size, self.name)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def __repr__(self) -> str:
        mode = "rw" if self.writable else "ro"
        return f"LocalDisk({self.name!r}, {self.format}, {format_size(self.size)}, {mode})"

    def __enter__(self) -> LocalDisk:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def fileno(self) -> int:
        self._require_open()
        return self._fd

    def read_into(self, offset: int, buf: memoryview) -> int:
        """Fill `buf` with the disk's bytes at `offset`; holes read as zeros."""
        self._require_open()
        # Views are released explicitly: a view left alive by an exception would keep the caller
        # from closing its mmap buffer.
        with memoryview(buf) as outer, outer.cast("B") as view:
            self._check_range(offset, len(view), "read")
            done = 0
            while done < len(view):
                n = os.preadv(self._fd, [view[done:]], offset + done)
                if n == 0:
                    # The file shrank under us (it is within the virtual size, so it should not):
                    # what is missing reads as a hole would.
                    view[done:] = bytes(len(view) - done)
                    break
                done += n
            return len(view)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self._require_writable()
        with memoryview(data) as outer, outer.cast("B") as view:
            self._check_range(offset, len(view), "write")
            _pwrite_all(self._fd, view, offset, self.name)

    def write_gathered(self, offset: int, buffers: list[memoryview]) -> None:
        """`write` of the buffers one after the other from `offset`, in one pwritev where it can: the
        contiguous writes of a batch cost one system call."""
        self._require_writable()
        self._check_range(offset, sum(memoryview(b).nbytes for b in buffers), "write")
        try:
            write_fully(self._fd, buffers, offset)
        except OSError as exc:
            if exc.errno in _NO_SPACE_ERRNOS:
                raise LowDiskSpaceError(f"no space left writing {self.name} at offset {offset}: {exc.strerror}") \
                    from exc
            raise

    def write_zeros(self, offset: int, length: int) -> None:
        """Make [offset, offset+length) read as zeros by punching a hole, or by writing zeros where
        the filesystem cannot punch."""
        self._require_writable()
        self._check_range(offset, length, "write zeros")
        if length == 0:
            return
        if not punch_hole(self._fd, offset, length, self.name):
            self._write_zero_bytes(offset, length)

    def data_extents(self, offset: int = 0, length: int | None = None) -> Iterator[tuple[int, int]]:
        """(offset, length) of the allocated ranges within [offset, offset+length), clipped to the
        virtual size (a VHD footer is never an extent). The whole range where SEEK_DATA is missing."""
        self._require_open()
        if not isinstance(offset, int) or offset < 0 or offset > self.size:
            raise ValueError(f"{self.name}: extent offset {offset!r} is outside [0, {self.size}]")
        if length is not None and (not isinstance(length, int) or length < 0):
            raise ValueError(f"{self.name}: extent length {length!r} must be a non-negative integer")
        end = self.size if length is None else min(offset + length, self.size)
        return self._walk_extents(offset, end)

    def flush(self) -> None:
        self._require_open()
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def _walk_extents(self, position: int, end: int) -> Iterator[tuple[int, int]]:
        while position < end:
            try:
                data_start = os.lseek(self._fd, position, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data after `position`
                    return
                if exc.errno in _UNSUPPORTED_ERRNOS:
                    yield position, end - position
                    return
                raise
            if data_start >= end:
                return
            data_end = min(os.lseek(self._fd, data_start, os.SEEK_HOLE), end)
            yield data_start, data_end - data_start
            position = data_end

    def _write_zero_bytes(self, offset: int, length: int) -> None:
        zeros = aligned_buffer(min(length, _ZERO_WRITE_CHUNK))
        try:
            with memoryview(zeros) as view:
                end = offset + length
                while offset < end:
                    step = min(len(view), end - offset)
                    _pwrite_all(self._fd, view[:step], offset, self.name)
                    offset += step
        finally:
            zeros.close()

    def _check_range(self, offset: int, length: int, action: str) -> None:
        if not isinstance(offset, int) or not isinstance(length, int):
            raise TypeError(f"{self.name}: {action} offset and length must be integers")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(
                f"{self.name}: cannot {action} {length} bytes at offset {offset}: outside the disk "
                f"[0, {self.size})"
            )

    def _require_open(self) -> None:
        if self._fd < 0:
            raise ValueError(f"{self.name}: the disk is closed")

    def _require_writable(self) -> None:
        self._require_open()
        if not self.writable:
            # UnsupportedOperation is both an OSError and a ValueError, as io's own read-only files use.
            raise io.UnsupportedOperation(f"{self.name}: the disk is open read-only")


_MAX_LAYERS = 8


def local_file_beneath(endpoint: object) -> LocalDisk | None:
    """The local file disk that `endpoint` is or reads and writes at the same offsets: an endpoint layered
    over another (the encrypted replica disk, the throttled one, a recovery point's view of its replica)
    exposes that one as `inner`. None when there is no local file beneath (a page blob). The data path asks
    it for the kernel's read-ahead and writeback hints, which would otherwise stop at the first layer."""
    for _ in range(_MAX_LAYERS):
        if isinstance(endpoint, LocalDisk):
            return endpoint
        endpoint = getattr(endpoint, "inner", None)
        if endpoint is None:
            return None
    return None


def _open_existing(path: Path, flags: int) -> int:
    try:
        fd = os.open(path, flags)
    except FileNotFoundError as exc:
        raise DiskNotFoundError(f"disk image {path} does not exist") from exc
    except IsADirectoryError as exc:  # opening a directory for writing; read-only opens succeed
        raise DiskFormatError(_NOT_A_FILE.format(path=path)) from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise DiskFormatError(_NOT_A_FILE.format(path=path))
    return fd


def _detect_open_format(fd: int, file_size: int, name: str) -> str:
    if file_size < FOOTER_SIZE:
        return "raw"
    tail = os.pread(fd, FOOTER_SIZE, file_size - FOOTER_SIZE)
    if not tail.startswith(COOKIE):
        return "raw"
    footer = parse_footer(tail, source=name)
    if footer.current_size != file_size - FOOTER_SIZE:
        raise DiskFormatError(
            f"{name}: VHD footer says the disk is {footer.current_size} bytes but the file holds "
            f"{file_size - FOOTER_SIZE} bytes before the footer: truncated or extended VHD"
        )
    return "vhd"


def _check_raw_size(file_size: int, name: str) -> None:
    if file_size == 0 or file_size % 512:
        raise DiskFormatError(
            f"{name}: a raw disk image is a positive whole number of 512-byte sectors, but the file "
            f"is {file_size} bytes"
        )


def punch_hole(fd: int, offset: int, length: int, name: str = "") -> bool:
    """Make [offset, offset+length) of the file read as zeros without writing (the file's size stays).
    False where the filesystem cannot punch holes: the caller writes zeros instead."""
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in _NO_SPACE_ERRNOS:
        raise LowDiskSpaceError(f"no space left on the device of {name or 'a file'} to punch a hole")
    if err not in _UNSUPPORTED_ERRNOS:
        raise OSError(err, f"punching a hole at {offset}+{length}: {os.strerror(err)}", name or None)
    return False


def _pwrite_all(fd: int, view: memoryview, offset: int, name: str) -> None:
    done = 0
    try:
        while done < len(view):
            done += os.pwrite(fd, view[done:], offset + done)
    except OSError as exc:
        if exc.errno in _NO_SPACE_ERRNOS:
            raise LowDiskSpaceError(
                f"no space left writing {name} at offset {offset + done}: {exc.strerror}"
            ) from exc
        raise
