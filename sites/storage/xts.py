"""AES-XTS (IEEE 1619) over many sectors per library call: the same ciphertext as `cryptography`'s
`modes.XTS` applied sector by sector with the sector number as tweak (dm-crypt's `aes-xts-plain64`), at
a fraction of the cost.

Why batched: `cryptography` cannot change the tweak of an XTS cipher, so sector-by-sector XTS builds a
cipher per sector, about 10 µs each: 350 MiB/s, slower than the data path it sits in. Here the XTS
construction is done over a whole batch of sectors with numpy, and AES itself is two ECB calls per batch
(ECB is AES on each 16-byte block alone, which XTS is made of):

    for sector s, block j (16 bytes) of its plaintext P:
        T_0 = AES-ECB(K2, s as 16 bytes little-endian)          (one ECB call for the batch's sectors)
        T_j = T_0 · x^j in GF(2^128), x^128 = x^7 + x^2 + x + 1 (IEEE 1619's "multiply by alpha")
        C_j = AES-ECB(K1, P_j xor T_j) xor T_j                  (one ECB call for the batch's blocks)

with K1, K2 the first and second half of the XTS key. A sector is a whole number of 128-byte groups
(eight blocks), so no ciphertext stealing is ever needed.

The tweaks are the work to do well: 256 per 4 KiB sector. Multiplying by x^8 moves a tweak's bytes
(little-endian) up by one and folds the byte pushed out back into the two low bytes (by x^7+x^2+x+1,
from a 256-entry table). So the tweaks j = r, r+8, r+16, ... of one sector (a "lane", r = 0..7) are
16-byte windows of a single byte sequence that follows a recurrence with a lag of 15 bytes: a batch
computes each lane's sequence 15 bytes per numpy step, copies every window out once, and fixes the low
byte of each (see `_tweaks`). The equivalence with `modes.XTS` is proven byte for byte by tests/test_xts.py.

Memory: a batch of at most BATCH_SECTORS sectors at a time (three buffers of its size), whatever the
length of the call.
"""
from __future__ import annotations

import threading
from collections.abc import Sequence

# numpy: the batch's XTS arithmetic (table look-ups, xors, strided copies) runs in its compiled loops,
# without the GIL; mature, and already the reference for vectorised byte arithmetic in Python.
import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

BLOCK_SIZE = 16
LANES = 8
"""Tweaks j and j+8 differ by x^8, a whole-byte shift: tweak j belongs to lane j mod 8."""
BATCH_SECTORS = 256
"""Sectors per batch (1 MiB of 4 KiB sectors): large enough that numpy's cost per call is small beside
its work, small enough that a batch's buffers stay in cache (measured: 128-256 beat 16-64 and 1024)."""
MAX_SECTOR = (1 << 64) - 1
"""Sector numbers are 64-bit, as dm-crypt's plain64 (the 16-byte tweak's upper half is zero)."""
_LAG = 15
"""A lane's byte sequence: a_k depends on a_{k-15} and a_{k-16} only, so 15 bytes are made per step."""

_FOLD = [c ^ (c << 1) ^ (c << 2) ^ (c << 7) for c in range(256)]
"""Byte c pushed out past bit 127 comes back as c·(x^7+x^2+x+1): up to 15 bits."""
_FOLD_LOW = np.array([value & 0xFF for value in _FOLD], dtype=np.uint8)
_FOLD_HIGH = np.array([value >> 8 for value in _FOLD], dtype=np.uint8)
_NEXT = np.array([(_FOLD[pair >> 8] & 0xFF ^ _FOLD[pair & 0xFF] >> 8) | (_FOLD[pair >> 8] & 0xFF) << 8
                  for pair in range(1 << 16)], dtype="<u2")
"""For the byte pair (a_(k-15), a_(k-16)) read as a little-endian 16-bit number: a_k in its low byte,
z_(k-1) in its high byte (see `XtsSectors._tweaks`)."""
_U64 = np.dtype("<u8")


class XtsSectors:
    """AES-XTS of whole sectors of `sector_size` bytes under `key` (two AES keys: 32 bytes for
    AES-128-XTS, 64 for AES-256-XTS), the sector number as tweak, many sectors per call."""

    def __init__(self, key: bytes, sector_size: int = 4096, batch_sectors: int = BATCH_SECTORS):
        if len(key) not in (32, 64):
            raise ValueError(f"an AES-XTS key is 32 or 64 bytes, not {len(key)}")
        half = len(key) // 2
        if key[:half] == key[half:]:  # as OpenSSL refuses (IEEE 1619 requires the two keys to differ)
            raise ValueError("the two halves of an AES-XTS key must differ")
        if sector_size <= 0 or sector_size % (LANES * BLOCK_SIZE):
            raise ValueError(f"an XTS sector here is a positive multiple of {LANES * BLOCK_SIZE} bytes, "
                             f"not {sector_size}")
        if batch_sectors <= 0:
            raise ValueError(f"a batch holds at least one sector, not {batch_sectors}")
        self._data_key = algorithms.AES(key[:half])
        self._tweak_key = algorithms.AES(key[half:])
        self.sector_size = sector_size
        self._steps = sector_size // BLOCK_SIZE // LANES
        self._batch = batch_sectors
        # Each thread's working buffers, made once: allocating megabytes per call costs more than the XTS
        # (fresh pages fault in, and freeing them makes every core of the process flush its TLB).
        self._scratch = threading.local()

    def encrypt(self, sectors: int | Sequence[int] | np.ndarray, source, target) -> None:
        """Encrypt the whole sectors of `source` into `target` (a writable buffer of the same length, or
        `source` itself; no other overlap). `sectors`: the first one's number (consecutive sectors), or
        each sector's number."""
        self._run(sectors, source, target, decrypt=False)

    def decrypt(self, sectors: int | Sequence[int] | np.ndarray, source, target) -> None:
        """Decrypt: as `encrypt`, the other way."""
        self._run(sectors, source, target, decrypt=True)

    # ---- the work ---------------------------------------------------------------------------------
    def _run(self, sectors, source, target, *, decrypt: bool) -> None:
        plain = _as_sectors(source, self.sector_size, "source")
        out = _as_sectors(target, self.sector_size, "target")
        if not out.flags.writeable:
            raise ValueError("the target of an XTS operation must be writable")
        if out.shape != plain.shape:
            raise ValueError(f"source ({plain.size} bytes) and target ({out.size} bytes) differ in length")
        numbers = _sector_numbers(sectors, len(plain))
        if not len(plain):
            return
        cipher = Cipher(self._data_key, modes.ECB())
        blocks = cipher.decryptor() if decrypt else cipher.encryptor()
        tweak_cipher = Cipher(self._tweak_key, modes.ECB()).encryptor()
        scratch = self._buffers()
        mixed, crypted = scratch.mixed, scratch.crypted
        for start in range(0, len(plain), self._batch):
            stop = min(start + self._batch, len(plain))
            count = stop - start
            tweaks = self._tweaks(tweak_cipher, numbers[start:stop], scratch)
            np.bitwise_xor(plain[start:stop], tweaks, out=mixed[:count])
            blocks.update_into(memoryview(mixed[:count].reshape(-1)), memoryview(crypted))
            result = crypted[:count * self.sector_size].reshape(count, self.sector_size)
            np.bitwise_xor(result, tweaks, out=out[start:stop])

    def _buffers(self) -> threading.local:
        scratch = self._scratch
        if not hasattr(scratch, "mixed"):
            batch, steps = self._batch, self._steps
            scratch.mixed = np.empty((batch, self.sector_size), dtype=np.uint8)
            scratch.crypted = np.empty(batch * self.sector_size + BLOCK_SIZE, dtype=np.uint8)  # update_into: +15
            scratch.tweaks = np.empty((batch, steps, LANES), dtype="V16")
            scratch.sequence = np.empty((batch, LANES, steps + _LAG), dtype=np.uint8)
            scratch.lows = np.empty((batch, LANES, steps), dtype=np.uint8)
        return scratch

    def _tweaks(self, tweak_cipher, numbers: np.ndarray, scratch: threading.local) -> np.ndarray:
        """Every block's tweak for the sectors `numbers`: (sectors, sector_size) bytes, block j of
        sector s at bytes 16j..16j+15 of row s, T_0(s)·x^j (in `scratch`, until the next call)."""
        count, steps = len(numbers), self._steps
        plain_tweaks = np.zeros((count, 2), dtype=_U64)
        plain_tweaks[:, 0] = numbers
        first = np.frombuffer(tweak_cipher.update(plain_tweaks.tobytes()), dtype=_U64).reshape(count, 2)
        starts = _times_x_powers(first[:, :1], first[:, 1:])
        # Lane r's tweak number m (j = 8m + r) is, as bytes 0..15: [z_m, a_m, a_(m-1), ..., a_(m-14)].
        # Multiplying by x^8 moves every byte up one place and folds the byte leaving, a_(m-14), back into
        # bytes 0 and 1: z_(m+1) = FOLD_LOW[a_(m-14)] and a_(m+1) = z_m ^ FOLD_HIGH[a_(m-14)]. So, from
        # k = 2 on, a_k = FOLD_LOW[a_(k-16)] ^ FOLD_HIGH[a_(k-15)] and z_(k-1) = FOLD_LOW[a_(k-16)]: both
        # from one look-up of the byte pair (a_(k-15), a_(k-16)), made 15 k at a time.
        # `sequence` holds lane r's a_k at index steps - k (k from steps down to -14): bytes 1..15 of
        # tweak m are then the window of 16 bytes at index steps - 1 - m (its byte 0, a_(m+1), is
        # replaced by z_m, kept in `lows` at the same index).
        length = steps + _LAG
        sequence = scratch.sequence[:count]
        lows = scratch.lows[:count]
        sequence[:, :, steps:] = starts[:, :, 1:]  # a_0 .. a_(-14): bytes 1..15 of T_0·x^r
        lows[:, :, steps - 1] = starts[:, :, 0]  # z_0
        sequence[:, :, steps - 1] = starts[:, :, 0] ^ _FOLD_HIGH[sequence[:, :, length - 1]]  # a_1
        for high in range(steps - 1, 0, -_LAG):  # indices [low, high) from the pairs at [low + 15, high + 16)
            low = max(0, high - _LAG)
            pairs = np.ndarray(shape=(count, LANES, high - low), dtype="<u2", buffer=sequence,
                               offset=low + _LAG, strides=(sequence.strides[0], sequence.strides[1], 1))
            made = np.take(_NEXT, pairs).view(np.uint8).reshape(count, LANES, high - low, 2)
            sequence[:, :, low:high] = made[..., 0]
            lows[:, :, low:high] = made[..., 1]
        # The windows as 16-byte items (a view: item (s, i, r) starts at byte i of lane r's sequence),
        # copied out in tweak order, j = 8m + r with m = steps - 1 - i; then each one's byte 0.
        windows = np.ndarray(shape=(count, steps, LANES), dtype="V16", buffer=sequence,
                             strides=(sequence.strides[0], 1, sequence.strides[1]))
        tweaks = scratch.tweaks[:count]
        tweaks[...] = windows[:, ::-1]
        as_bytes = tweaks.view(np.uint8).reshape(count, steps, LANES, BLOCK_SIZE)
        as_bytes[..., 0] = lows.transpose(0, 2, 1)[:, ::-1]
        return as_bytes.reshape(count, self.sector_size)


def _times_x_powers(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """(n, 8, 16) bytes: the n tweaks given as 64-bit halves (n, 1), each times x^0 .. x^7 (a 128-bit
    little-endian shift left by r, the r bits pushed out folded back in by x^7+x^2+x+1)."""
    shifts = np.arange(LANES, dtype=np.uint64)
    back = np.uint64(64) - shifts  # numpy shifts by 64 give 0
    out = high >> back
    powers = np.empty((len(low), LANES, 2), dtype=_U64)
    powers[:, :, 1] = (high << shifts) | (low >> back)
    powers[:, :, 0] = (low << shifts) ^ out ^ (out << np.uint64(1)) ^ (out << np.uint64(2)) ^ (out << np.uint64(7))
    return powers.view(np.uint8)


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
