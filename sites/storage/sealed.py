"""Objects of the recovery storage sealed with AES-256-GCM in segments, so they stream both ways.

Layout (docs/formats.md, "Encrypted recovery storage"): a 48-byte header, then the plaintext in segments of
`segment size` bytes (the last one 0 to `segment size` bytes), each followed by its 16-byte GCM tag. The
object's key is derived from its folder's data key, a random salt in the header and the object's name; each
segment's nonce is its index and a last-segment flag, and its associated data the header, the name, the
index and the flag. So a segment changed, dropped, reordered, moved to another object, an object truncated
(its last segment lost) or stored under another name fails authentication.

A reader hands out a segment's plaintext only after its tag checked; an object that fails anywhere raises
ObjectAuthenticationError naming it, so a caller that gets an error uses nothing it was given.
"""
from __future__ import annotations

import os
import struct
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from datapath.errors import ObjectAuthenticationError

from .keys import KEY_ID_BYTES, DataKey

MAGIC = b"ASRSEAL1"
FORMAT_VERSION = 1
HEADER = struct.Struct("<8sHHI16s16s")
HEADER_SIZE = HEADER.size  # 48
TAG_SIZE = 16
SALT_SIZE = 16
SEGMENT_SIZE = 1024 * 1024
MAX_SEGMENT_SIZE = 16 * 1024 * 1024
_PURPOSE = b"asr-object-aes-gcm-v1"


def _nonce(index: int, last: bool) -> bytes:
    return struct.pack("<QB3x", index, 1 if last else 0)


def _aad(header: bytes, name: str, index: int, last: bool) -> bytes:
    encoded = name.encode()
    return header + struct.pack("<I", len(encoded)) + encoded + struct.pack("<QB", index, 1 if last else 0)


def sealed_size(plain_size: int, segment_size: int = SEGMENT_SIZE) -> int:
    segments = max(1, -(-plain_size // segment_size))
    return HEADER_SIZE + plain_size + segments * TAG_SIZE


class Sealer:
    """Seals one object's plaintext segment by segment (`header`, then `seal_into(segment, last, record)` in
    order)."""

    def __init__(self, data_key: DataKey, name: str, segment_size: int = SEGMENT_SIZE):
        salt = os.urandom(SALT_SIZE)
        self.name = name
        self.segment_size = segment_size
        self.header = HEADER.pack(MAGIC, FORMAT_VERSION, HEADER_SIZE, segment_size,
                                  bytes.fromhex(data_key.key_id), salt)
        self._aead = AESGCM(data_key.derive(_PURPOSE, name, 32, salt))
        self._index = 0

    def seal_into(self, segment: bytes | memoryview, last: bool, record: memoryview) -> None:
        """Seal the next segment into `record` (exactly the segment's length and the tag's)."""
        self._aead.encrypt_into(_nonce(self._index, last), segment, _aad(self.header, self.name, self._index, last),
                                record)
        self._index += 1


def seal_bytes(data: bytes, data_key: DataKey, name: str, segment_size: int = SEGMENT_SIZE) -> bytes:
    sealer = Sealer(data_key, name, segment_size)
    sealed = bytearray(sealed_size(len(data), segment_size))
    sealed[:HEADER_SIZE] = sealer.header
    view, out = memoryview(data), memoryview(sealed)
    offsets = range(0, max(len(view), 1), segment_size)
    for n, start in enumerate(offsets):
        segment = view[start:start + segment_size]
        position = HEADER_SIZE + start + n * TAG_SIZE
        sealer.seal_into(segment, n == len(offsets) - 1, out[position:position + len(segment) + TAG_SIZE])
    return bytes(sealed)


class SealingReader:
    """A reader of the sealed object of `src`'s plaintext, for a backend's `put_object` to stream.

    The plaintext is read into two segment buffers in turn (a segment is the last one only when nothing
    follows it, so the next one is read before a segment is sealed), each segment sealed in one call: by
    `readinto` straight into the caller's buffer where the whole record fits, else into one record buffer,
    reused, from which reads take their bytes; `read` returns them as a new byte string (as a reader must).
    Slicing and joining byte strings made sealing several times slower than AES-GCM itself, and a new
    megabyte per segment cost the kernel more (fresh pages) than the encryption."""

    def __init__(self, src: BinaryIO, data_key: DataKey, name: str, segment_size: int = SEGMENT_SIZE):
        self._src = src
        self._sealer = Sealer(data_key, name, segment_size)
        self._segments = (bytearray(segment_size), bytearray(segment_size))
        self._current = 0
        self._current_length = self._read_segment(self._segments[0])
        self._records = memoryview(bytearray(segment_size + TAG_SIZE))
        self._record = memoryview(self._sealer.header)  # the sealed bytes being handed out, from `_position` on
        self._position = 0
        self._done = False
        self._scratch = bytearray()  # `read`'s
        self.plain_bytes = 0

    def _read_segment(self, segment: bytearray) -> int:
        """Fill `segment` from the source (all of it unless the source ends first); its length."""
        readinto = getattr(self._src, "readinto", None)
        filled = 0
        with memoryview(segment) as view:
            while filled < len(view):
                if readinto is not None:
                    got = readinto(view[filled:])
                else:
                    piece = self._src.read(len(view) - filled)
                    got = len(piece)
                    view[filled:filled + got] = piece
                if not got:
                    break
                filled += got
        return filled

    def _next_record(self, into: memoryview | None = None) -> int:
        """Seal the next segment: into `into` when given (room for the whole record, which is then handed out
        already), else into the record buffer to be handed out from; the record's length, 0 when the last one
        was sealed before."""
        if self._done:
            return 0
        segment, length = self._segments[self._current], self._current_length
        following = 0
        if length == self._sealer.segment_size:
            following = self._read_segment(self._segments[1 - self._current])
        last = not following
        target = (self._records if into is None else into)[:length + TAG_SIZE]
        with memoryview(segment) as view:
            self._sealer.seal_into(view[:length], last, target)
        self._record = self._records[:0] if into is not None else target
        self._position = 0
        self.plain_bytes += length
        self._current, self._current_length = 1 - self._current, following
        self._done = last
        return length + TAG_SIZE

    def readinto(self, buffer) -> int:
        """Fill `buffer` with the next sealed bytes (all of it unless the object ends first); how many. A
        record that fits whole where the buffer is at is sealed there, not copied."""
        with memoryview(buffer) as outer, outer.cast("B") as view:
            filled = 0
            whole = self._sealer.segment_size + TAG_SIZE
            while filled < len(view):
                if self._position == len(self._record):
                    if len(view) - filled >= whole:
                        sealed = self._next_record(view[filled:])
                        if not sealed:
                            break
                        filled += sealed
                        continue
                    if not self._next_record():
                        break
                take = min(len(view) - filled, len(self._record) - self._position)
                view[filled:filled + take] = self._record[self._position:self._position + take]
                self._position += take
                filled += take
            return filled

    def read(self, size: int = -1) -> bytes:
        """The next `size` sealed bytes (fewer at the end), as a new byte string: filled through one buffer
        kept for the reads (a backend's client reads its blocks this way, megabytes at a time; a new buffer
        per read would be fresh pages each time)."""
        if size is None or size < 0:
            return b"".join(iter(lambda: self.read(1 << 24), b""))
        if len(self._scratch) < size:
            self._scratch = bytearray(size)
        with memoryview(self._scratch) as view:
            return bytes(view[:self.readinto(view[:size])])


class OpeningWriter:
    """A writer for a backend's `get_object`: takes the sealed object's bytes, writes the plaintext of each
    segment to `dst` once its tag checked; `finish()` checks the last one and that nothing is missing.

    A record (segment and tag) that arrives whole with more bytes after it is opened where it lies in what
    was written; the others are gathered in one record buffer first. Each is decrypted into one plaintext
    buffer, handed to `dst.write` (which, as any writer, keeps no reference to it)."""

    def __init__(self, dst: BinaryIO, data_key: DataKey, name: str, where: str):
        self._dst = dst
        self._data_key = data_key
        self._name = name
        self._where = where
        self._header_bytes = bytearray()
        self._header: bytes | None = None
        self._aead: AESGCM | None = None
        self._segment_size = 0
        self._held = bytearray()  # a record not yet known to be the last one, `_filled` bytes of it
        self._filled = 0
        self._plain = bytearray()
        self._index = 0
        self.plain_bytes = 0

    def _fail(self, why: str) -> ObjectAuthenticationError:
        return ObjectAuthenticationError(
            f"object {self._name} in {self._where} fails authentication: {why}; it was altered, truncated, "
            f"replaced or renamed, and none of it is used", object_name=self._name)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        with memoryview(data) as outer, outer.cast("B") as whole:
            view = whole
            if self._header is None:
                take = min(HEADER_SIZE - len(self._header_bytes), len(view))
                self._header_bytes += view[:take]
                view = view[take:]
                if len(self._header_bytes) < HEADER_SIZE:
                    return len(whole)
                self._open_header(bytes(self._header_bytes))
            record = self._segment_size + TAG_SIZE
            # A full record is the last one only if nothing follows it, so one is always held back.
            while view:
                if self._filled == record:
                    self._open_segment(memoryview(self._held), last=False)
                    self._filled = 0
                if self._filled == 0 and len(view) > record:
                    self._open_segment(view[:record], last=False)
                    view = view[record:]
                    continue
                take = min(record - self._filled, len(view))
                self._held[self._filled:self._filled + take] = view[:take]
                self._filled += take
                view = view[take:]
            return len(whole)

    def finish(self) -> int:
        if self._header is None:
            raise self._fail(f"it is {len(self._header_bytes)} bytes, shorter than the {HEADER_SIZE}-byte header")
        if self._filled < TAG_SIZE:
            raise self._fail("its last segment is missing")
        with memoryview(self._held) as held:
            self._open_segment(held[:self._filled], last=True)
        self._filled = 0
        return self.plain_bytes

    def _open_header(self, header: bytes) -> None:
        magic, version, header_size, segment_size, key_id, salt = HEADER.unpack(header)
        if magic != MAGIC or version != FORMAT_VERSION or header_size != HEADER_SIZE:
            raise self._fail("it is not a sealed object of format version 1 (bad header)")
        if not 0 < segment_size <= MAX_SEGMENT_SIZE:
            raise self._fail(f"its header gives a segment size of {segment_size} bytes")
        if key_id.hex() != self._data_key.key_id:
            raise self._fail(
                f"it was sealed with data key {key_id.hex()}, not its folder's data key {self._data_key.key_id}")
        assert len(key_id) == KEY_ID_BYTES
        self._header = header
        self._segment_size = segment_size
        self._held = bytearray(segment_size + TAG_SIZE)
        self._plain = bytearray(segment_size)
        self._aead = AESGCM(self._data_key.derive(_PURPOSE, self._name, 32, salt))

    def _open_segment(self, record: memoryview, last: bool) -> None:
        assert self._aead is not None and self._header is not None
        length = len(record) - TAG_SIZE
        with memoryview(self._plain) as plain:
            try:
                self._aead.decrypt_into(_nonce(self._index, last), record,
                                        _aad(self._header, self._name, self._index, last), plain[:length])
            except InvalidTag:
                where = "its last segment" if last else f"segment {self._index}"
                raise self._fail(f"{where} does not authenticate") from None
            self._index += 1
            self._dst.write(plain[:length])
        self.plain_bytes += length


def open_bytes(raw: bytes, data_key: DataKey, name: str, where: str) -> bytes:
    """The plaintext of sealed object `raw`; ObjectAuthenticationError naming it if any of it fails."""
    import io

    out = io.BytesIO()
    writer = OpeningWriter(out, data_key, name, where)
    writer.write(raw)
    writer.finish()
    return out.getvalue()
