"""The native write path (datapath/writepath_build.py) against the Python it replaces: checksums and log
records (and the data path's chunk hashes) byte for byte the same as `mmh3` and LogWriter.append (the
Python reference) of each write, and the NBD request receiver taking exactly the writes it may, stopping at
everything else, on a real socket pair."""
from __future__ import annotations

import os
import random
import socket
import struct
from pathlib import Path

import mmh3
import pytest

from datapath import nbd
from datapath._writepath import ffi, lib
from datapath.logformat import LogHeader, LogState, LogWriter
from datapath.logreader import verify_log
from datapath.manifest import _hash_chunks_into, chunk_hash

KIB = 1024
DISK_SIZE = 64 * 1024 * KIB


def test_checksum_is_mmh3_x64_128_for_every_tail_length():
    rng = random.Random(3)
    for length in [*range(0, 80), 512, 4096 + 7, 65536, 65536 + 24]:
        data = rng.randbytes(length)
        digest = ffi.new("unsigned char[16]")
        lib.asr_mmh3_x64_128(data, length, digest)
        assert bytes(digest) == mmh3.mmh3_x64_128_digest(data), length


def test_chunk_hashes_are_mmh3_of_each_chunk_the_last_one_short():
    """The data path's chunk hashes (datapath.manifest: chunk_hash, and a window of chunks in one call), native
    and without the GIL, are mmh3's of each chunk, written into their slots only."""
    rng = random.Random(4)
    cases = [(4096, 4096), (4096, 3 * 4096 + 100), (65536, 65536 * 2), (KIB * KIB, 5 * KIB * KIB + 512)]
    for chunk_size, length in cases:
        data = rng.randbytes(length)
        expected = [mmh3.mmh3_x64_128_digest(data[pos:pos + chunk_size]) for pos in range(0, length, chunk_size)]
        assert [chunk_hash(memoryview(data)[pos:pos + chunk_size]) for pos in range(0, length, chunk_size)] == expected
        slots = bytearray(b"\xee" * 16 * (len(expected) + 4))
        _hash_chunks_into(memoryview(data), 2 * chunk_size, chunk_size, slots)  # the window's first chunk is 2
        assert bytes(slots[32:32 + 16 * len(expected)]) == b"".join(expected)
        assert slots[:32] == b"\xee" * 32 and slots[32 + 16 * len(expected):] == b"\xee" * 32
    for length in (0, 15, 4095, 4096, 4097):  # below and at the native threshold
        data = rng.randbytes(length)
        assert chunk_hash(data) == mmh3.mmh3_x64_128_digest(data)


def _writer(path: Path, header: LogHeader) -> LogWriter:
    return LogWriter(os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600), header, LogState.empty(header),
                     owns_fd=True)


def _append_each(writer: LogWriter, batch: list) -> int:
    """The Python reference of `append_many`: `append` of each write in order; the last sequence number."""
    return [writer.append(offset, data) for offset, data in batch][-1]


def test_native_records_are_the_python_ones_byte_for_byte(tmp_path):
    rng = random.Random(5)
    header = LogHeader(rng.randbytes(16), 3, 1000, DISK_SIZE, 512, 12345)
    # Batches of 1 to 700 records (past the 340 of one native pwritev), bytes and memoryviews, 512 B to 1 MiB.
    batches = []
    for size in (1, 2, 700, 3, 341):
        batch = []
        for _ in range(size):
            length = 512 * rng.choice([1, 2, 7, 8, 128, 2048])
            data = rng.randbytes(length)
            batch.append((512 * rng.randrange(0, (DISK_SIZE - length) // 512),
                          data if rng.random() < 0.5 else memoryview(bytearray(data))))
        batches.append(batch)
    native, python = _writer(tmp_path / "native.hrl", header), _writer(tmp_path / "python.hrl", header)
    for batch in batches:
        assert native.append_many(batch) == _append_each(python, batch)
        assert native.state == python.state
    for writer in (native, python):
        os.pwrite(writer._fd, header.encode(), 0)
        writer.seal()
        writer.close()
    assert (tmp_path / "native.hrl").read_bytes() == (tmp_path / "python.hrl").read_bytes()
    _, seal = verify_log(tmp_path / "native.hrl")
    assert seal.records == sum(len(batch) for batch in batches)


def test_a_failed_native_append_leaves_the_log_state(tmp_path):
    header = LogHeader(bytes(16), 1, 1, DISK_SIZE, 512, 0)
    path = tmp_path / "log.hrl"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDONLY)
    writer = LogWriter(fd, header, LogState.empty(header))
    with pytest.raises(OSError):
        writer.append_many([(0, bytes(512)), (512, bytes(512))])
    assert writer.state == LogState.empty(header)
    os.close(fd)


# ---- the NBD receiver -------------------------------------------------------------------------------------
def _request(command: int, offset: int, length: int, handle: int, flags: int = 0,
             magic: int = nbd.REQUEST_MAGIC) -> bytes:
    return struct.pack(">IHHQQI", magic, flags, command, handle, offset, length)


class Receiver:
    """asr_nbd_receive_writes on one end of a socket pair, four 64 KiB buffers."""

    def __init__(self, capacity: int = 4, buffer_size: int = 64 * KIB):
        self.client, self.server = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.buffers = [bytearray(buffer_size) for _ in range(capacity)]
        self.exported = [ffi.from_buffer(buffer) for buffer in self.buffers]
        self.pointers = ffi.new("unsigned char *[]", self.exported)
        self.requests = ffi.new("struct asr_nbd_request[]", capacity + 1)
        self.status = ffi.new("int *")
        self.capacity, self.buffer_size = capacity, buffer_size

    def receive(self, batch_bytes: int = 1 << 30) -> tuple[list[tuple[int, int, int, int]], int]:
        count = lib.asr_nbd_receive_writes(self.server.fileno(), DISK_SIZE, self.buffer_size, batch_bytes,
                                           self.pointers, self.capacity, self.requests, self.status)
        writes = [(r.handle, r.offset, r.length, r.flags) for r in (self.requests[i] for i in range(count))]
        return writes, self.status[0]

    def other(self, count: int) -> tuple[int, int, int, int, int, int]:
        r = self.requests[count]
        return r.magic, r.flags, r.type, r.handle, r.offset, r.length

    def close(self) -> None:
        self.client.close()
        self.server.close()


def test_the_receiver_takes_the_writes_sent_and_stops_at_anything_else():
    receiver = Receiver()
    try:
        payloads = [bytes([n]) * (512 * n) for n in (1, 2, 3)]
        receiver.client.sendall(_request(nbd.CMD_WRITE, 0, 512, 1) + payloads[0]
                                + _request(nbd.CMD_WRITE, 4096, 1024, 2, nbd.CMD_FLAG_FUA) + payloads[1]
                                + _request(nbd.CMD_FLUSH, 0, 0, 3)
                                + _request(nbd.CMD_WRITE, 8192, 1536, 4) + payloads[2])
        writes, status = receiver.receive()
        assert (writes, status) == ([(1, 0, 512, 0), (2, 4096, 1024, nbd.CMD_FLAG_FUA)], 1)
        assert receiver.other(2) == (nbd.REQUEST_MAGIC, 0, nbd.CMD_FLUSH, 3, 0, 0)
        assert bytes(receiver.buffers[0][:512]) == payloads[0]
        assert bytes(receiver.buffers[1][:1024]) == payloads[1]
        assert receiver.receive() == ([(4, 8192, 1536, 0)], 0)  # then nothing more has arrived
        assert bytes(receiver.buffers[0][:1536]) == payloads[2]
    finally:
        receiver.close()


@pytest.mark.parametrize("bad", [
    _request(nbd.CMD_WRITE, DISK_SIZE - 512, 1024, 9),  # past the end
    _request(nbd.CMD_WRITE, 2**64 - 512, 1024, 9),  # offset + length overflows
    _request(nbd.CMD_WRITE, 100, 512, 9),  # unaligned offset
    _request(nbd.CMD_WRITE, 0, 100, 9),  # unaligned length
    _request(nbd.CMD_WRITE, 0, 0, 9),  # empty
    _request(nbd.CMD_WRITE, 0, 128 * KIB, 9),  # larger than a buffer
    _request(nbd.CMD_WRITE, 0, 512, 9, magic=0x12345678),  # bad magic
    _request(nbd.CMD_READ, 0, 512, 9),
    _request(nbd.CMD_DISC, 0, 0, 9),
])
def test_the_receiver_leaves_refused_requests_and_their_payload_to_python(bad):
    receiver = Receiver()
    try:
        receiver.client.sendall(_request(nbd.CMD_WRITE, 0, 512, 1) + bytes(512) + bad + b"payload")
        writes, status = receiver.receive()
        assert (writes, status) == ([(1, 0, 512, 0)], 1)
        assert receiver.other(1)[3] == 9
        receiver.client.close()
        assert receiver.server.recv(64) == b"payload"  # not consumed
    finally:
        receiver.close()


def test_the_receiver_stops_at_its_capacity_and_batch_bytes():
    receiver = Receiver(capacity=2)
    try:
        for handle in range(1, 6):
            receiver.client.sendall(_request(nbd.CMD_WRITE, 0, 4096, handle) + bytes(4096))
        assert receiver.receive() == ([(1, 0, 4096, 0), (2, 0, 4096, 0)], 0)
        assert receiver.receive(batch_bytes=4096) == ([(3, 0, 4096, 0)], 0)
        assert receiver.receive(batch_bytes=4097) == ([(4, 0, 4096, 0), (5, 0, 4096, 0)], 0)
    finally:
        receiver.close()


@pytest.mark.parametrize("cut", [0, 10, 28, 28 + 100])
def test_the_receiver_reports_the_end_of_stream_after_the_whole_writes(cut):
    """A client leaving, even within a request: the writes received whole still count."""
    receiver = Receiver()
    try:
        whole = _request(nbd.CMD_WRITE, 512, 512, 1) + bytes(512)
        receiver.client.sendall(whole + (_request(nbd.CMD_WRITE, 0, 512, 2) + bytes(512))[:cut])
        receiver.client.shutdown(socket.SHUT_WR)
        assert receiver.receive() == ([(1, 512, 512, 0)], 2)
    finally:
        receiver.close()


def test_the_receiver_reports_a_failing_socket():
    receiver = Receiver()
    try:
        receiver.server.setblocking(False)  # nothing sent: the first request cannot be waited for
        assert receiver.receive() == ([], -11)  # -EAGAIN
    finally:
        receiver.close()


def test_replies_are_sent_in_order_with_the_error():
    receiver = Receiver()
    try:
        requests = ffi.new("struct asr_nbd_request[]", 70)
        for index in range(70):
            requests[index].handle = 1000 + index
        assert lib.asr_nbd_send_replies(receiver.server.fileno(), requests, 70, 28) == 0
        received = b""
        while len(received) < 70 * 16:
            received += receiver.client.recv(4096)
        assert received == b"".join(struct.pack(">IIQ", nbd.SIMPLE_REPLY_MAGIC, 28, 1000 + index)
                                    for index in range(70))
    finally:
        receiver.close()
