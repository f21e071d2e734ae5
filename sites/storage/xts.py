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
call runs without the GIL, so threads run in parallel, and a call of megabytes is cut into parts that run
side by side on helper threads (one per other processor): the replica's reads and writes get the XTS of
every core. The equivalence with `modes.XTS` is proven byte for byte by tests/test_xts.py.

Threads: an OpenSSL context holds the tweak of the sector it is at, so it is not shared; each thread that
uses an XtsSectors gets its own copies of the two contexts (freed with the thread's locals). XtsSectors
keeps no copy of the key: it is in OpenSSL's contexts only, in memory, which OpenSSL cleanses when it frees
them.
"""
from __future__ import annotations

import operator
import os
import threading
from array import array
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

try:
    from ._xts_openssl import ffi, lib  # built by setup.py from sites/storage/xts_build.py
except ImportError as error:  # not built, or libcrypto missing: say what to do rather than a bare ImportError
    raise ImportError(
        f"sites/storage/xts.py needs its compiled part, sites.storage._xts_openssl, linked to OpenSSL 3's "
        f"libcrypto ({error}). Install libssl3 (Debian; libcrypto.so.3) and, to build it, gcc, libc6-dev, "
        f"libssl-dev and Python's headers (scripts/ensure-tools.sh gcc libc-headers openssl-headers "
        f"python-headers libcrypto), then install the package again (make install, or pip install .; a "
        f"source checkout used through PYTHONPATH: python setup.py build_ext --inplace, with setuptools 77 "
        f"or later, as pyproject.toml asks)") from error

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

    def encrypt(self, sectors: int | Sequence[int], source, target, *, zeros_stay: bool = False) -> None:
        """Encrypt the whole sectors of `source` into `target` (a writable buffer of the same length, or
        `source` itself; no other overlap). `sectors`: the first one's number (consecutive sectors), or
        each sector's number. With `zeros_stay`, a sector of zeros is left zeros (not encrypted)."""
        self._run(sectors, source, target, encrypt=True, zeros_stay=zeros_stay)

    def decrypt(self, sectors: int | Sequence[int], source, target, *, zeros_stay: bool = False) -> None:
        """Decrypt: as `encrypt`, the other way (with `zeros_stay`, a stored sector of zeros reads as zeros)."""
        self._run(sectors, source, target, encrypt=False, zeros_stay=zeros_stay)

    # ---- the work ---------------------------------------------------------------------------------
    def _run(self, sectors, source, target, *, encrypt: bool, zeros_stay: bool) -> None:
        plain = _as_sectors(source, self.sector_size, "source")
        out = _as_sectors(target, self.sector_size, "target")
        if out.readonly:
            raise ValueError("the target of an XTS operation must be writable")
        if out.nbytes != plain.nbytes:
            raise ValueError(f"source ({plain.nbytes} bytes) and target ({out.nbytes} bytes) differ in length")
        count = plain.nbytes // self.sector_size
        first, numbers = _sector_numbers(sectors, count)
        if not count:
            return
        parts = min(_helpers.count + 1, plain.nbytes // PARALLEL_PART_BYTES)
        if parts < 2:
            self._run_part(first, numbers, plain, out, encrypt, zeros_stay)
            return
        # Large calls are cut into parts run side by side: this thread takes the last, the helpers the others.
        bounds = [count * k // parts for k in range(parts + 1)]
        size = self.sector_size
        pieces = [(first + low, None if numbers is None else numbers[low:high], plain[low * size:high * size],
                   out[low * size:high * size]) for low, high in zip(bounds, bounds[1:], strict=False)]
        waiting = [_helpers.submit(self._run_part, *piece, encrypt, zeros_stay) for piece in pieces[:-1]]
        try:
            self._run_part(*pieces[-1], encrypt, zeros_stay)
        finally:
            for future in waiting:
                future.result()

    def _run_part(self, first: int, numbers: array | None, plain: memoryview, out: memoryview, encrypt: bool,
                  zeros_stay: bool) -> None:
        error = ffi.new("char[]", _ERROR_BYTES)
        # from_buffer: OpenSSL reads and writes the caller's memory, no copies.
        if not lib.asr_xts_sectors(self._context(encrypt), first,
                                   ffi.NULL if numbers is None else ffi.from_buffer("uint64_t[]", numbers),
                                   plain.nbytes // self.sector_size, ffi.from_buffer(plain),
                                   ffi.from_buffer(out, require_writable=True), self.sector_size, int(zeros_stay),
                                   error, _ERROR_BYTES):
            raise RuntimeError(f"OpenSSL's AES-XTS failed: {ffi.string(error).decode(errors='replace')}")

    def _context(self, encrypt: bool):
        """This thread's context for `encrypt` (True) or decrypt (False)."""
        contexts = self._contexts.__dict__
        context = contexts.get(encrypt)
        if context is None:
            with self._copying:  # a context is copied from one thread at a time
                context = contexts[encrypt] = _context(lib.asr_xts_copy(self._templates[encrypt]), "copy")
        return context


PARALLEL_PART_BYTES = 1024 * 1024
"""A call of at least twice this is cut into parts of at least this, run side by side on the helper threads and
the calling one: a thread hand-off costs tens of microseconds, a megabyte of XTS about 150."""


class _Helpers:
    """Threads that run parts of large XTS calls, one fewer than the machine's processors (the calling thread
    runs a part too); started at first use in each process, so a forked worker makes its own."""

    def __init__(self):
        self.count = max(0, (os.cpu_count() or 1) - 1)
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        os.register_at_fork(after_in_child=self._forget)

    def submit(self, function, *arguments):
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.count, thread_name_prefix="xts")
            return self._pool.submit(function, *arguments)

    def _forget(self) -> None:
        self._pool = None  # a forked child has none of its parent's threads
        self._lock = threading.Lock()


_helpers = _Helpers()


def _context(pointer, what: str):
    """`pointer` (a new EVP_CIPHER_CTX) freed with its Python object."""
    if pointer == ffi.NULL:
        raise RuntimeError(f"OpenSSL refused the AES-XTS {what} (EVP_CIPHER_CTX: out of memory, or no AES-XTS "
                           "in this libcrypto)")
    return ffi.gc(pointer, lib.asr_xts_free)


def _as_sectors(buffer, sector_size: int, what: str) -> memoryview:
    """`buffer` as a memoryview of bytes, checked to be contiguous whole sectors."""
    view = memoryview(buffer)
    if not view.c_contiguous:
        raise ValueError(f"the {what} of an XTS operation must be contiguous bytes")
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    if view.nbytes % sector_size:
        raise ValueError(f"the {what} of an XTS operation must be whole {sector_size}-byte sectors, "
                         f"not {view.nbytes} bytes")
    return view


def _sector_numbers(sectors, count: int) -> tuple[int, array | None]:
    """(the first sector's number, None) for consecutive sectors from an integer; (0, each sector's number)
    from a sequence of them."""
    if not isinstance(sectors, bool):
        try:
            first = operator.index(sectors)
        except TypeError:
            pass
        else:
            if not 0 <= first or first + count - 1 > MAX_SECTOR:
                raise ValueError(f"sectors {first} to {first + count - 1} are outside 0 to 2^64 - 1")
            return first, None
    try:
        values = [operator.index(value) for value in sectors if not isinstance(value, bool)]
    except TypeError:
        values = []
    if len(values) != len(sectors) or not all(0 <= value <= MAX_SECTOR for value in values):
        raise ValueError("sector numbers must be integers from 0 to 2^64 - 1")
    if len(values) != count:
        raise ValueError(f"{count} sectors need {count} sector numbers, not {len(values)}")
    return 0, array("Q", values)
