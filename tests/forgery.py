"""What an attacker with write access to the recovery storage does: the tools of tests/test_encryption.py.

`mmh3_fixup` is the outside review's forgery of a replica chunk: MurmurHash3 x64 128 is invertible one
16-byte block at a time, so after any replaced prefix one block can be chosen that brings the hash's state
back to the original's; the chunk then has the original hash. `source_blocks_in` looks for a disk's 4 KiB
blocks anywhere inside stored bytes.
"""
from __future__ import annotations

import struct

MASK = (1 << 64) - 1
C1, C2 = 0x87C37B91114253D5, 0x4CF5AD432745937F
INV_C1, INV_C2, INV_5 = pow(C1, -1, 1 << 64), pow(C2, -1, 1 << 64), pow(5, -1, 1 << 64)
BLOCK = 4096


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & MASK


def _rotr(x: int, r: int) -> int:
    return ((x >> r) | (x << (64 - r))) & MASK


def _step(h1: int, h2: int, block: bytes) -> tuple[int, int]:
    k1, k2 = struct.unpack("<QQ", block)
    k1 = _rotl(k1 * C1 & MASK, 31) * C2 & MASK
    h1 ^= k1
    h1 = (_rotl(h1, 27) + h2) & MASK
    h1 = (h1 * 5 + 0x52DCE729) & MASK
    k2 = _rotl(k2 * C2 & MASK, 33) * C1 & MASK
    h2 ^= k2
    h2 = (_rotl(h2, 31) + h1) & MASK
    h2 = (h2 * 5 + 0x38495AB5) & MASK
    return h1, h2


def _state_after(data: bytes) -> tuple[int, int]:
    h1 = h2 = 0  # seed 0
    for start in range(0, len(data), 16):
        h1, h2 = _step(h1, h2, data[start:start + 16])
    return h1, h2


def _block_reaching(before: tuple[int, int], after: tuple[int, int]) -> bytes:
    """The 16-byte block that takes the hash state `before` to `after`."""
    h1, h2 = before
    target1, target2 = after
    mixed2 = _rotr(((target2 - 0x38495AB5) * INV_5 - target1) & MASK, 31)
    k2 = _rotr((h2 ^ mixed2) * INV_C1 & MASK, 33) * INV_C2 & MASK
    mixed1 = _rotr(((target1 - 0x52DCE729) * INV_5 - h2) & MASK, 27)
    k1 = _rotr((h1 ^ mixed1) * INV_C2 & MASK, 31) * INV_C1 & MASK
    return struct.pack("<QQ", k1, k2)


def mmh3_fixup(chunk: bytes, payload: bytes, length: int = BLOCK) -> bytes:
    """`chunk` with its first `length` bytes replaced by `payload` (padded with spaces) and a 16-byte fix-up,
    so that mmh3 of the result equals mmh3 of `chunk`."""
    assert len(payload) <= length - 16 and length % 16 == 0 and len(chunk) >= length
    prefix = payload.ljust(length - 16, b" ")
    fixup = _block_reaching(_state_after(prefix), _state_after(chunk[:length]))
    return prefix + fixup + chunk[length:]


def source_blocks_in(blocks: dict[int, bytes], stored: bytes) -> list[int]:
    """Offsets (keys of `blocks`, the source's non-zero 4 KiB blocks) of the blocks found anywhere inside
    `stored`. A block stored at position p has its bytes at offsets s + 8m (s = -p mod 8) at 8-aligned
    positions, so for each s one word of every block at such an offset is looked for among the stored bytes'
    aligned words (a C-level set intersection); each candidate is then compared whole."""
    anchors: dict[int, list[tuple[int, int]]] = {}
    for offset, block in blocks.items():
        data_from = len(block) - len(block.lstrip(b"\0"))
        for shift in range(8):
            # The first word of this alignment with some variety in it: zeros (a block written in part) or
            # a repeated byte would match all over the stored data.
            for position in range(data_from + (shift - data_from) % 8, BLOCK - 7, 8):
                word = block[position:position + 8]
                if len(set(word)) > 3:
                    anchors.setdefault(int.from_bytes(word, "little"), []).append((offset, position))
                    break
    words = memoryview(stored)[:len(stored) // 8 * 8].cast("Q")
    hits = set(anchors).intersection(words)
    found: set[int] = set()
    if hits:
        for index, word in enumerate(words):
            if word in hits:
                for offset, position in anchors[word]:
                    start = index * 8 - position
                    if start >= 0 and stored[start:start + BLOCK] == blocks[offset]:
                        found.add(offset)
    return sorted(found)
