"""The NBD server (datapath/nbd.py) with real clients: qemu-io and qemu-img, and a small client speaking
the protocol by hand for what QEMU never sends (requests outside the disk, broken handshakes).

The export is a plain image file that also notes each request it got, so FUA and TRIM can be seen
arriving."""
from __future__ import annotations

import errno
import os
import socket
import struct
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from datapath import nbd

MIB = 1024 * 1024
DISK_SIZE = 16 * MIB
QEMU_TIMEOUT = 30


class FileExport:
    """An image file served as it is, noting every request."""

    def __init__(self, path: Path, name: str = "disk0"):
        self.name = name
        self.fd = os.open(path, os.O_RDWR)
        self.size = os.fstat(self.fd).st_size
        self.requests: list[tuple[str, int, int, bool]] = []
        self.lock = threading.Lock()

    def _note(self, *request) -> None:
        with self.lock:
            self.requests.append(request)

    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self.fd, length, offset)

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        self._note("write", offset, data.nbytes, fua)
        os.pwrite(self.fd, data, offset)

    def write_zeroes(self, offset: int, length: int, fua: bool) -> None:
        self._note("zeroes", offset, length, fua)
        os.pwrite(self.fd, bytes(length), offset)

    def trim(self, offset: int, length: int, fua: bool) -> None:
        self._note("trim", offset, length, fua)
        os.pwrite(self.fd, bytes(length), offset)

    def flush(self) -> None:
        self._note("flush", 0, 0, False)
        os.fsync(self.fd)


@contextmanager
def serving(tmp_path: Path, export_type: type[FileExport] = FileExport) -> Iterator[tuple[nbd.NbdServer, Any]]:
    """An NBD server of `export_type` over a new zeroed image `disk0.raw`; stopped (within 5 s) afterwards."""
    image = tmp_path / "disk0.raw"
    with open(image, "wb") as f:
        f.truncate(DISK_SIZE)
    export = export_type(image)
    server = nbd.NbdServer(tmp_path / "disk0.sock", {"disk0": export})
    server.start()
    try:
        yield server, export
    finally:
        assert server.stop(5.0)
        os.close(export.fd)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[nbd.NbdServer, FileExport]]:
    with serving(tmp_path) as both:
        yield both


def qemu_io(socket_path: Path, *commands: str, export: str = "disk0") -> subprocess.CompletedProcess:
    # writeback: without it qemu-io sends every write with FUA
    args = ["qemu-io", "-t", "writeback", "-f", "raw", f"nbd+unix:///{export}?socket={socket_path}"]
    for command in commands:
        args += ["-c", command]
    return subprocess.run(args, capture_output=True, text=True, timeout=QEMU_TIMEOUT)


class Client:
    """Just enough of an NBD client: fixed newstyle, GO, simple replies."""

    def __init__(self, path: Path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(QEMU_TIMEOUT)
        self.sock.connect(str(path))

    def recv(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise EOFError(f"server closed after {len(data)} of {n} bytes")
            data += chunk
        return data

    def greeting(self) -> None:
        magic, opt, flags = struct.unpack(">QQH", self.recv(18))
        assert (magic, opt) == (nbd.NBDMAGIC, nbd.IHAVEOPT)
        assert flags & nbd.FLAG_FIXED_NEWSTYLE
        self.sock.sendall(struct.pack(">I", nbd.FLAG_FIXED_NEWSTYLE | nbd.FLAG_NO_ZEROES))

    def option(self, option: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        """Send an option; its replies up to the final one."""
        self.sock.sendall(struct.pack(">QII", nbd.IHAVEOPT, option, len(data)) + data)
        replies = []
        while True:
            magic, opt, reply, length = struct.unpack(">QIII", self.recv(20))
            assert (magic, opt) == (nbd.OPTION_REPLY_MAGIC, option)
            replies.append((reply, self.recv(length)))
            if reply not in (nbd.REP_SERVER, nbd.REP_INFO):
                return replies

    def go(self, name: str = "disk0") -> int:
        encoded = name.encode()
        replies = self.option(nbd.OPT_GO, struct.pack(">I", len(encoded)) + encoded + struct.pack(">H", 0))
        assert replies[-1][0] == nbd.REP_ACK, replies
        _, size, flags = struct.unpack(">HQH", replies[0][1])
        assert flags == nbd.TRANSMISSION_FLAGS
        return size

    def request(self, command: int, offset: int, length: int, data: bytes = b"", flags: int = 0,
                handle: int = 7) -> tuple[int, bytes]:
        """(error, read data) of one request."""
        self.sock.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, flags, command, handle, offset, length) + data)
        magic, error, got_handle = struct.unpack(">IIQ", self.recv(16))
        assert (magic, got_handle) == (nbd.SIMPLE_REPLY_MAGIC, handle)
        payload = self.recv(length) if command == nbd.CMD_READ and not error else b""
        return error, payload

    def close(self) -> None:
        self.sock.close()


def test_qemu_io_writes_zeroes_discards_flushes_and_reads_back(served, tmp_path):
    server, export = served
    result = qemu_io(server.path, "write -P 0xab 0 1M", "write -z 1M 1M", "discard 2M 1M", "flush",
                     "write -f -P 0xcd 4M 64k", "read -P 0xab 0 1M", "read -P 0 1M 2M", "read -P 0xcd 4M 64k",
                     "write -P 0x11 8M 3")  # sub-sector: QEMU reads, modifies and writes whole sectors
    assert result.returncode == 0, result.stderr
    assert "Pattern verification failed" not in result.stdout
    assert ("write", 0, MIB, False) in export.requests
    assert ("zeroes", MIB, MIB, False) in export.requests
    assert ("trim", 2 * MIB, MIB, False) in export.requests
    assert ("write", 4 * MIB, 64 * 1024, True) in export.requests  # FUA reaches the export
    assert ("flush", 0, 0, False) in export.requests
    assert ("write", 8 * MIB, 512, False) in export.requests
    data = (tmp_path / "disk0.raw").read_bytes()
    assert data[:MIB] == b"\xab" * MIB and data[8 * MIB : 8 * MIB + 4] == b"\x11\x11\x11\0"


def test_qemu_img_sees_the_export_and_an_unknown_export_is_refused(served):
    server, _ = served
    info = subprocess.run(["qemu-img", "info", "--output=json", f"nbd+unix:///disk0?socket={server.path}"],
                          capture_output=True, text=True, timeout=QEMU_TIMEOUT)
    assert info.returncode == 0 and f'"virtual-size": {DISK_SIZE}' in info.stdout
    unknown = qemu_io(server.path, "read 0 4k", export="nope")
    assert unknown.returncode != 0 and "no export named 'nope'" in unknown.stderr
    assert qemu_io(server.path, "read 0 4k").returncode == 0  # still serving


def test_requests_outside_the_disk_or_unaligned_get_errors_and_the_connection_goes_on(served):
    server, export = served
    client = Client(server.path)
    client.greeting()
    assert client.go() == DISK_SIZE
    assert client.request(nbd.CMD_WRITE, DISK_SIZE - 512, 1024, b"\1" * 1024)[0] == errno.ENOSPC
    assert client.request(nbd.CMD_WRITE, 2**63, 512, b"\1" * 512)[0] == errno.ENOSPC
    assert client.request(nbd.CMD_READ, DISK_SIZE, 512)[0] == errno.EINVAL
    assert client.request(nbd.CMD_WRITE_ZEROES, DISK_SIZE - 512, 4096)[0] == errno.ENOSPC
    assert client.request(nbd.CMD_TRIM, 0, 0)[0] == errno.EINVAL
    assert client.request(nbd.CMD_WRITE, 100, 512, b"\2" * 512)[0] == errno.EINVAL
    assert client.request(nbd.CMD_READ, 0, nbd.MAX_REQUEST + 512)[0] == errno.EINVAL
    assert client.request(nbd.CMD_WRITE, 0, nbd.MAX_REQUEST + 512, bytes(nbd.MAX_REQUEST + 512))[0] == errno.EINVAL
    assert client.request(99, 0, 512)[0] == errno.EINVAL
    assert not export.requests  # none of them reached the export
    assert client.request(nbd.CMD_WRITE, 512, 512, b"\3" * 512, flags=nbd.CMD_FLAG_FUA) == (0, b"")
    assert client.request(nbd.CMD_READ, 512, 512) == (0, b"\3" * 512)
    assert export.requests == [("write", 512, 512, True)]
    client.sock.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_DISC, 1, 0, 0))
    assert client.sock.recv(1) == b""  # DISC: the server closes
    client.close()


def test_list_abort_and_refused_options(served):
    server, _ = served
    client = Client(server.path)
    client.greeting()
    replies = client.option(nbd.OPT_LIST)
    assert replies == [(nbd.REP_SERVER, struct.pack(">I", 5) + b"disk0"), (nbd.REP_ACK, b"")]
    assert client.option(nbd.OPT_STRUCTURED_REPLY)[0][0] == nbd.REP_ERR_UNSUP
    assert client.option(nbd.OPT_INFO, struct.pack(">I", 4) + b"nope" + struct.pack(">H", 0))[0][0] == \
        nbd.REP_ERR_UNKNOWN
    assert client.option(nbd.OPT_GO, b"\0\0")[0][0] == nbd.REP_ERR_INVALID
    assert client.option(nbd.OPT_ABORT) == [(nbd.REP_ACK, b"")]
    client.close()


@pytest.mark.parametrize("garbage", [
    b"",  # connects and leaves
    b"\xff" * 4,  # unknown client flags
    struct.pack(">I", 1) + b"NOTMAGIC" + bytes(8),  # bad option magic
    struct.pack(">I", 1) + struct.pack(">QII", nbd.IHAVEOPT, nbd.OPT_GO, 2**31),  # absurd option length
    struct.pack(">I", 1) + struct.pack(">QII", nbd.IHAVEOPT, nbd.OPT_EXPORT_NAME, 4) + b"nope",  # unknown export
    struct.pack(">I", 1) + struct.pack(">QII", nbd.IHAVEOPT, nbd.OPT_EXPORT_NAME, 5) + b"disk0"
    + b"\0" * 28,  # a request with a bad magic
])
def test_a_broken_client_loses_its_connection_only(served, garbage):
    server, _ = served
    broken = Client(server.path)
    broken.recv(18)
    broken.sock.sendall(garbage)
    broken.sock.shutdown(socket.SHUT_WR)
    while broken.sock.recv(4096):  # the server closes its side
        pass
    broken.close()
    assert qemu_io(server.path, "write -P 0x5a 0 64k", "read -P 0x5a 0 64k").returncode == 0


def test_export_name_option_and_zeroes(served):
    """The oldest way in: EXPORT_NAME, then size, flags and (without NO_ZEROES) 124 zero bytes."""
    server, _ = served
    client = Client(server.path)
    client.recv(18)
    client.sock.sendall(struct.pack(">I", nbd.FLAG_FIXED_NEWSTYLE)
                        + struct.pack(">QII", nbd.IHAVEOPT, nbd.OPT_EXPORT_NAME, 5) + b"disk0")
    size, flags = struct.unpack(">QH", client.recv(10))
    assert (size, flags) == (DISK_SIZE, nbd.TRANSMISSION_FLAGS)
    assert client.recv(124) == bytes(124)
    assert client.request(nbd.CMD_FLUSH, 0, 0) == (0, b"")
    client.close()


def test_stop_finishes_the_request_in_flight(tmp_path):
    image = tmp_path / "disk0.raw"
    with open(image, "wb") as f:
        f.truncate(DISK_SIZE)
    export = FileExport(image)
    entered, release = threading.Event(), threading.Event()
    plain_write = export.write

    def slow_write(offset, data, fua):
        entered.set()
        release.wait(10)
        plain_write(offset, data, fua)

    export.write = slow_write
    server = nbd.NbdServer(tmp_path / "disk0.sock", {"disk0": export})
    server.start()
    client = Client(server.path)
    client.greeting()
    client.go()
    replies = []
    writer = threading.Thread(target=lambda: replies.append(client.request(nbd.CMD_WRITE, 0, 512, b"\7" * 512)))
    writer.start()
    assert entered.wait(10)
    stopper = threading.Thread(target=server.stop, args=(10.0,))
    stopper.start()
    release.set()
    stopper.join(15)
    writer.join(15)
    assert replies == [(0, b"")]  # acknowledged before the connection closed
    assert image.read_bytes()[:512] == b"\7" * 512
    assert not server.path.exists()
    client.close()
    os.close(export.fd)


class BatchingExport(FileExport):
    """An export taking queued writes together, as the tracker does (`write_many`), noting each batch."""

    def __init__(self, path: Path):
        super().__init__(path)
        self.batches: list[int] = []

    def write_many(self, writes: list[tuple[int, memoryview, bool]]) -> None:
        self.batches.append(len(writes))
        for offset, data, fua in writes:
            self.write(offset, data, fua)


def test_pipelined_requests_are_answered_in_order_and_batched(tmp_path):
    """Many requests sent at once, as QEMU keeps 16 in flight: the writes among them reach `write_many`
    in batches, the others (refused writes among them) are answered as when sent one by one, in order."""
    with serving(tmp_path, BatchingExport) as (server, export):
        image = tmp_path / "disk0.raw"
        client = Client(server.path)
        try:
            client.greeting()
            client.go()
            sent, expected, contents = b"", [], bytearray(DISK_SIZE)

            def request(command, offset, length, data=b"", flags=0, error=0):
                nonlocal sent
                handle = len(expected) + 100
                sent += struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, flags, command, handle, offset, length) + data
                expected.append((handle, error))

            for n in range(6):  # a run of writes (small: the socket takes them all in one piece, so they batch)
                request(nbd.CMD_WRITE, MIB + n * 4096, 4096, bytes([n + 1]) * 4096)
                contents[MIB + n * 4096:MIB + (n + 1) * 4096] = bytes([n + 1]) * 4096
            request(nbd.CMD_WRITE, DISK_SIZE - 512, 1024, b"\1" * 1024, error=errno.ENOSPC)
            request(nbd.CMD_WRITE, 100, 512, b"\2" * 512, error=errno.EINVAL)
            request(nbd.CMD_WRITE, 4096, 512, b"\3" * 512, flags=nbd.CMD_FLAG_FUA)
            contents[4096:4608] = b"\3" * 512
            request(nbd.CMD_FLUSH, 0, 0)
            request(nbd.CMD_WRITE, 8192, 512, b"\4" * 512)
            contents[8192:8704] = b"\4" * 512
            request(nbd.CMD_WRITE, 0, nbd.MAX_REQUEST + 512, bytes(nbd.MAX_REQUEST + 512), error=errno.EINVAL)
            request(nbd.CMD_WRITE, 9216, 1024, b"\5" * 1024)
            contents[9216:10240] = b"\5" * 1024
            sender = threading.Thread(target=client.sock.sendall, args=(sent,))
            sender.start()
            replies = [struct.unpack(">IIQ", client.recv(16)) for _ in expected]
            sender.join(QEMU_TIMEOUT)
            assert [(handle, error) for _, error, handle in replies] == expected
            assert {magic for magic, _, _ in replies} == {nbd.SIMPLE_REPLY_MAGIC}
            assert client.request(nbd.CMD_READ, 0, 2 * MIB) == (0, bytes(contents[:2 * MIB]))
            assert image.read_bytes() == bytes(contents)
            assert ("write", 4096, 512, True) in export.requests
            assert sum(export.batches) == 9 and max(export.batches) > 1
        finally:
            client.close()
