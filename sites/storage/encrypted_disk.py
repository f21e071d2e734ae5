"""A replica disk encrypted sector by sector: AES-256-XTS per 4 KiB sector, tweak = sector number (as
dm-crypt's `aes-xts-plain64` with 4 KiB sectors), over any backend's DiskEndpoint.

Every sector is encrypted in place, so the data path's random writes (log records, resync blocks) stay
random writes. A write that covers part of a sector reads, decrypts, patches and re-encrypts that sector
(log records are 512-byte aligned). A sector whose plaintext is all zeros is stored as zeros, and a stored
all-zero sector reads as zeros: holes stay holes (`data_extents` is the backend's) and the layout of zero
sectors is as visible as it was without encryption, the only thing about the data it shows.

The XTS is computed many sectors per call (`xts.XtsSectors`, byte for byte `cryptography`'s XTS applied to
each sector), zero sectors left out of it; a read of whole sectors is decrypted in the caller's buffer.

XTS is not authenticated: a changed sector decrypts to unpredictable bytes. Forgery is caught one level up,
by the chunk hashes of the replica's authenticated manifests (verify, drills and failover check them).
"""
from __future__ import annotations

import threading
from collections.abc import Iterator

from datapath.endpoint import DiskEndpoint
from datapath.errors import AlignmentError

from .xts import XtsSectors

SECTOR_SIZE = 4096
_PURPOSE = b"asr-disk-aes-xts-v1"
XTS_KEY_BYTES = 64  # AES-256-XTS: two 256-bit keys


class EncryptedDisk:
    """`inner` (a replica disk as stored) seen in plaintext through AES-XTS with `key` (64 bytes).
    Its virtual size must be a whole number of 4 KiB sectors (replica disks are whole MiB)."""

    def __init__(self, inner: DiskEndpoint, key: bytes):
        if inner.size % SECTOR_SIZE:
            inner.close()
            raise ValueError(f"{inner.name}: an encrypted disk is whole {SECTOR_SIZE}-byte sectors, "
                             f"not {inner.size} bytes")
        self._inner = inner
        self._xts = XtsSectors(key, SECTOR_SIZE)
        self._partial = threading.Lock()
        self._write_buffers = threading.local()  # each thread's ciphertext buffer, reused (see _ciphertext_buffer)
        self.name = inner.name
        self.size = inner.size
        # The data path aligns its writes to this (log apply reads the edges itself, once per coalesced
        # run), so they need no read-modify-write here; a write aligned only to the backend's own alignment
        # is still taken, a partial sector read-modified-written.
        self.alignment = max(SECTOR_SIZE, inner.alignment)
        self._write_alignment = inner.alignment

    def __repr__(self) -> str:
        return f"EncryptedDisk({self._inner!r})"

    def __enter__(self) -> EncryptedDisk:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def inner(self) -> DiskEndpoint:
        return self._inner

    # ---- sectors --------------------------------------------------------------------------------
    def _encrypt_into(self, first_sector: int, plain: memoryview, out: memoryview) -> None:
        """Encrypt whole sectors `plain` (sector `first_sector` on) into `out`; sectors of zeros stay zeros
        (in the native loop, sites/storage/xts_build.py)."""
        self._xts.encrypt(first_sector, plain, out, zeros_stay=True)

    def _ciphertext_buffer(self, length: int) -> memoryview:
        """This thread's buffer for the ciphertext of a write of `length` bytes: kept between writes (a
        backend keeps no reference to what it was given once `write` returns), since allocating megabytes
        per write costs more than encrypting them."""
        buffer = getattr(self._write_buffers, "buffer", None)
        if buffer is None or len(buffer) < length:
            buffer = self._write_buffers.buffer = memoryview(bytearray(length))
        return buffer[:length]

    def _read_plain(self, start: int, end: int) -> bytearray:
        """Plaintext of the whole sectors [start, end)."""
        data = bytearray(end - start)
        with memoryview(data) as view:
            self._read_sectors(start, view)
        return data

    def _read_sectors(self, start: int, view: memoryview) -> None:
        """Read the whole sectors at `start` into `view` and decrypt them there (stored zero sectors read as
        zeros)."""
        self._inner.read_into(start, view)
        self._xts.decrypt(start // SECTOR_SIZE, view, view, zeros_stay=True)

    # ---- DiskEndpoint ---------------------------------------------------------------------------
    def read_into(self, offset: int, buf: memoryview) -> int:
        with memoryview(buf) as outer, outer.cast("B") as view:
            length = len(view)
            self._check_range(offset, length, "read")
            if length == 0:
                return 0
            start = offset - offset % SECTOR_SIZE
            end = -(-(offset + length) // SECTOR_SIZE) * SECTOR_SIZE
            if start == offset and end == offset + length:  # whole sectors (the data path's reads): in place
                self._read_sectors(start, view)
                return length
            plain = self._read_plain(start, end)
            view[:] = memoryview(plain)[offset - start:offset - start + length]
            return length

    def write(self, offset: int, data: bytes | memoryview) -> None:
        with memoryview(data) as outer, outer.cast("B") as view:
            self._check_range(offset, len(view), "write")
            if not view:
                return
            self._write_plain(offset, view)

    def write_zeros(self, offset: int, length: int) -> None:
        self._check_range(offset, length, "write zeros")
        if length == 0:
            return
        start = -(-offset // SECTOR_SIZE) * SECTOR_SIZE  # whole sectors inside the range: holes
        end = (offset + length) // SECTOR_SIZE * SECTOR_SIZE
        if start < end:
            self._inner.write_zeros(start, end - start)
        else:
            start = end = offset
        if offset < start:
            self._write_plain(offset, memoryview(bytes(start - offset)))
        if end < offset + length:
            self._write_plain(end, memoryview(bytes(offset + length - end)))

    def _write_plain(self, offset: int, view: memoryview) -> None:
        length = len(view)
        start = offset - offset % SECTOR_SIZE
        end = -(-(offset + length) // SECTOR_SIZE) * SECTOR_SIZE
        if start == offset and end == offset + length:
            out = self._ciphertext_buffer(length)
            self._encrypt_into(start // SECTOR_SIZE, view, out)
            self._inner.write(start, out)
            return
        # Part of a sector: read-modify-write, one at a time so that two writes to different parts of one
        # sector (from two threads) do not undo each other.
        with self._partial:
            plain = bytearray(end - start)
            if offset != start:  # the head sector's other bytes
                plain[:SECTOR_SIZE] = self._read_plain(start, start + SECTOR_SIZE)
            if offset + length != end and (end - SECTOR_SIZE > start or offset == start):
                plain[-SECTOR_SIZE:] = self._read_plain(end - SECTOR_SIZE, end)
            plain[offset - start:offset - start + length] = view
            out = bytearray(len(plain))
            self._encrypt_into(start // SECTOR_SIZE, memoryview(plain), memoryview(out))
            self._inner.write(start, memoryview(out))

    def data_extents(self, offset: int = 0, length: int | None = None) -> Iterator[tuple[int, int]]:
        return self._inner.data_extents(offset, length)

    def flush(self) -> None:
        self._inner.flush()

    def close(self) -> None:
        self._inner.close()

    def _check_range(self, offset: int, length: int, action: str) -> None:
        if (not isinstance(offset, int) or not isinstance(length, int)
                or isinstance(offset, bool) or isinstance(length, bool)):
            raise TypeError(f"{self.name}: {action} offset and length must be integers")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(
                f"{self.name}: cannot {action} {length} bytes at offset {offset}: outside the disk [0, {self.size})"
            )
        if action != "read" and (offset % self._write_alignment or length % self._write_alignment):
            raise AlignmentError(
                f"{self.name}: cannot {action} {length} bytes at offset {offset}: offsets and lengths must be "
                f"multiples of {self._write_alignment}"
            )


def disk_key_purpose() -> bytes:
    return _PURPOSE
