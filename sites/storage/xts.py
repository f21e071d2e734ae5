"""AES-XTS (IEEE 1619) of many sectors per call, the sector number as tweak (dm-crypt's
`aes-xts-plain64`): OpenSSL's own AES-XTS, byte for byte what `cryptography`'s `modes.XTS` gives applied
sector by sector, several times faster.

Why not `cryptography` directly: it cannot change the tweak of an XTS cipher, so sector-by-sector XTS
builds a cipher per sector, about 10 µs each: 350 MB/s, slower than the data path it sits in. (Before
this module used OpenSSL, it computed the tweaks of a batch of sectors with numpy and ran AES as two ECB
calls: 0.7-1.1 GB/s, the tweaks two thirds of the time, and the restore then missed its cost goal.)

Here a small C loop (sites/storage/xts_build.py, compiled at install time against the system's
libcrypto) keeps one OpenSSL context per key and direction and, per sector, sets only the tweak and runs
EVP_CipherUpdate: OpenSSL's AES-NI XTS with no key schedule nor allocation per sector, 3.0-4.8 GB/s on one
core of the shared development machine (docs/operations.md, "What it costs", has the options measured); a
call runs without the GIL, so threads run in parallel. The equivalence with `modes.XTS` is proven byte for
byte by tests/test_xts.py.

Threads: an OpenSSL context holds the tweak of the sector it is at, so it is not shared; each thread that
uses an XtsSectors gets its own copies of the two contexts (freed with the thread's locals). XtsSectors
keeps no copy of the key: it is in OpenSSL's contexts only, in memory, which OpenSSL cleanses when it frees
them.
"""
from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

try:
    from ._xts_openssl import ffi, lib  # built by setup.py from sites/storage/xts_build.py
except ImportError as error:  # not built, or libcrypto missing: say what to do rather than a bare ImportError
    raise ImportError(
        f"sites/storage/xts.py needs its compiled part, sites.storage._xts_openssl, linked to OpenSSL 3's "
        f"libcrypto ({error}). Install libssl3 (Debian; libcrypto.so.3) and, to build it, gcc, libc6-dev, "
        f"libssl-dev and Python's headers (scripts/ensure-tools.sh gcc libc-headers openssl-headers "
        f"python-headers libcrypto), then install the package again (make install, or pip install .; a "
        f"source checkout used through PYTHONPATH: python setup.py build_ext --inplace)") from error

MAX_SECTOR = (1 << 64) - 1
"""Sector numbers are 64-bit, as dm-crypt's plain64 (the 16-byte tweak's upper half is zero)."""
_GRANULE = 16
"""Sectors are whole AES blocks: no ciphertext stealing (which dm-crypt's sectors never need either)."""
_MAX_SECTOR_SIZE = 1 << 24
"""OpenSSL's XTS takes at most 2^20 blocks under one tweak (IEEE 1619's limit on a data unit)."""
_ERROR_BYTES = 256


class XtsSectors:
    """AES-XTS of whole sectors of `sector_size` bytes under `key` (two AES keys: 32 bytes for
    AES-128-XTS, 64 for AES-256-XTS), the sector number as tweak, many sectors per call."""

    def __init__(self, key: bytes, sector_size: int = 4096):
        if len(key) not in (32, 64):
            raise ValueError(f"an AES-XTS key is 32 or 64 bytes, not {len(key)}")
        half = len(key) // 2
        if key[:half] == key[half:]:  # as OpenSSL refuses (IEEE 1619 requires the two keys to differ)
            raise ValueError("the two halves of an AES-XTS key must differ")
        if sector_size <= 0 or sector_size % _GRANULE or sector_size > _MAX_SECTOR_SIZE:
            raise ValueError(f"an XTS sector here is a positive multiple of {_GRANULE} bytes up to 16 MiB, "
                             f"not {sector_size}")
        self.sector_size = sector_size
        # The contexts each thread copies (keyed once here: an error shows at once, not at first use).
        self._templates = {encrypt: _context(lib.asr_xts_new(bytes(key), len(key), int(encrypt)), "key")
                           for encrypt in (True, False)}
        self._copying = threading.Lock()
        self._contexts = threading.local()

    def encrypt(self, sectors: int | Sequence[int] | np.ndarray, source, target) -> None:
        """Encrypt the whole sectors of `source` into `target` (a writable buffer of the same length, or
        `source` itself; no other overlap). `sectors`: the first one's number (consecutive sectors), or
        each sector's number."""
        self._run(sectors, source, target, encrypt=True)

    def decrypt(self, sectors: int | Sequence[int] | np.ndarray, source, target) -> None:
        """Decrypt: as `encrypt`, the other way."""
        self._run(sectors, source, target, encrypt=False)

    # ---- the work ---------------------------------------------------------------------------------
    def _run(self, sectors, source, target, *, encrypt: bool) -> None:
        plain = _as_sectors(source, self.sector_size, "source")
        out = _as_sectors(target, self.sector_size, "target")
        if not out.flags.writeable:
            raise ValueError("the target of an XTS operation must be writable")
        if out.shape != plain.shape:
            raise ValueError(f"source ({plain.size} bytes) and target ({out.size} bytes) differ in length")
        numbers = np.ascontiguousarray(_sector_numbers(sectors, len(plain)))
        if not len(plain):
            return
        error = ffi.new("char[]", _ERROR_BYTES)
        # from_buffer: OpenSSL reads and writes the caller's memory, no copies.
        if not lib.asr_xts_sectors(self._context(encrypt), ffi.from_buffer("uint64_t[]", numbers), len(plain),
                                   ffi.from_buffer(plain), ffi.from_buffer(out, require_writable=True),
                                   self.sector_size, error, _ERROR_BYTES):
            raise RuntimeError(f"OpenSSL's AES-XTS failed: {ffi.string(error).decode(errors='replace')}")

    def _context(self, encrypt: bool):
        """This thread's context for `encrypt` (True) or decrypt (False)."""
        contexts = self._contexts.__dict__
        context = contexts.get(encrypt)
        if context is None:
            with self._copying:  # a context is copied from one thread at a time
                context = contexts[encrypt] = _context(lib.asr_xts_copy(self._templates[encrypt]), "copy")
        return context


def _context(pointer, what: str):
    """`pointer` (a new EVP_CIPHER_CTX) freed with its Python object."""
    if pointer == ffi.NULL:
        raise RuntimeError(f"OpenSSL refused the AES-XTS {what} (EVP_CIPHER_CTX: out of memory, or no AES-XTS "
                           "in this libcrypto)")
    return ffi.gc(pointer, lib.asr_xts_free)


def _as_sectors(buffer, sector_size: int, what: str) -> np.ndarray:
    array = buffer if isinstance(buffer, np.ndarray) else np.frombuffer(buffer, dtype=np.uint8)
    if array.dtype != np.uint8 or not array.flags.c_contiguous:
        raise ValueError(f"the {what} of an XTS operation must be contiguous bytes")
    if array.size % sector_size:
        raise ValueError(f"the {what} of an XTS operation must be whole {sector_size}-byte sectors, "
                         f"not {array.size} bytes")
    return array.reshape(-1, sector_size)


def _sector_numbers(sectors, count: int) -> np.ndarray:
    if isinstance(sectors, (int, np.integer)) and not isinstance(sectors, bool):
        first = int(sectors)
        if not 0 <= first or first + count - 1 > MAX_SECTOR:
            raise ValueError(f"sectors {first} to {first + count - 1} are outside 0 to 2^64 - 1")
        return np.arange(first, first + count, dtype=np.uint64)
    if not isinstance(sectors, np.ndarray):  # a sequence of Python integers
        values = list(sectors)
        if not all(isinstance(value, (int, np.integer)) and not isinstance(value, bool) and 0 <= value <= MAX_SECTOR
                   for value in values):
            raise ValueError("sector numbers must be integers from 0 to 2^64 - 1")
        sectors = np.array(values, dtype=np.uint64)
    if sectors.shape != (count,):
        raise ValueError(f"{count} sectors need {count} sector numbers, not shape {sectors.shape}")
    if sectors.dtype.kind not in "iu" or (sectors.dtype.kind == "i" and count and sectors.min() < 0):
        raise ValueError("sector numbers must be integers from 0 to 2^64 - 1")
    return sectors.astype(np.uint64, copy=False)
