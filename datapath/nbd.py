"""An NBD server (the Network Block Device protocol, fixed newstyle) serving block exports over a unix socket.

QEMU reaches a protected VM's disk through it, so every guest write passes through the export (the
replication tracker, wired in sites/host/trackerservice.py) before it reaches the disk. This module
knows only the protocol: the export is injected.

What is implemented, and why no more (QEMU 7.2 is the client that matters):

- Handshake: fixed newstyle. Options GO, INFO, EXPORT_NAME, LIST, ABORT. STRUCTURED_REPLY (and every
  other option) is refused, so QEMU falls back to simple replies: one reply header, then the data of a
  READ. A malformed handshake or an unknown export name closes that connection only.
- Commands: READ, WRITE, FLUSH, TRIM, WRITE_ZEROES, DISC, and the FUA flag on the writing ones. A
  request outside the export or not a whole number of sectors gets an error reply (EINVAL, or ENOSPC
  for writes past the end) and the connection goes on; an export error gets EIO (ENOSPC when the disk
  is full). Nothing a client sends kills the server.
- A thread per connection: it receives the client's requests and executes them in order, and every
  reply is sent only after the export finished the request (a WRITE is acknowledged once it is logged
  and written, a FUA one once it is durable).

The hot path is writes, and it runs mostly outside Python: the native extension (datapath/
writepath_build.py) waits for the next request, then takes every WRITE already in the socket (parsed
and checked there, each payload received straight into one of the buffers allocated once per
connection), all without the GIL; they go to the export together (`write_many`: the tracker logs
them, commits once, then writes the disk; the data is not copied between the socket and the export),
and their replies in one send, after all of them are done. Anything else the extension stops at
(another command, a write it refuses, a broken request) is handled here in Python, one request at a
time, as are the handshake and the exports without `write_many`.

One thread, not a receiving thread beside the executing one: the Python receiving thread this replaced
cost 15-20 µs of Python and GIL hand-offs per request, and a native one reading ahead (tried) cost more
CPU per request than it saved (thread wake-ups), and was slower on the 2 shared cores measured on.
"""
from __future__ import annotations

import errno
import logging
import os
import socket
import struct
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from datapath._writepath import ffi as _ffi
from datapath._writepath import lib as _lib
from datapath.buffers import aligned_buffer
from datapath.errors import LowDiskSpaceError

log = logging.getLogger(__name__)

# ---- protocol constants (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md) -----------
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_UNKNOWN = (1 << 31) + 6

INFO_EXPORT = 0
INFO_BLOCK_SIZE = 3

TFLAG_HAS_FLAGS = 1 << 0
TFLAG_SEND_FLUSH = 1 << 2
TFLAG_SEND_FUA = 1 << 3
TFLAG_SEND_TRIM = 1 << 5
TFLAG_SEND_WRITE_ZEROES = 1 << 6
TRANSMISSION_FLAGS = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_WRITE_ZEROES = 6
CMD_FLAG_FUA = 1 << 0

SECTOR = 512
MAX_REQUEST = 32 * 1024 * 1024
"""Largest READ or WRITE payload; advertised as the maximum block size (QEMU splits larger requests)."""
PREFERRED_BLOCK = 4096
MAX_OPTION_DATA = 64 * 1024
"""Option payloads are an export name and a few info requests: a larger one is a broken client."""
_DRAIN_CHUNK = 1024 * 1024
PIPELINE = 16
"""Write payloads a connection receives at once (one buffer each): as many as QEMU's NBD client keeps in
flight (16). Pages are committed as they are touched: resident is at most PIPELINE times the largest
write seen."""
BATCH_BYTES = 512 * 1024
"""Payload bytes after which a batch of writes is executed without waiting for more already sent: at
64 KiB, up to 8 writes share the tracker's lock, commit and replies' send; at 1 MiB each goes alone,
so the client refills the socket while the server writes the one it took."""
# why asr_nbd_receive_writes stopped (datapath/writepath_build.py); below 0: -errno
_RECEIVED_WAITING, _RECEIVED_OTHER, _RECEIVED_END = 0, 1, 2

_REQUEST = struct.Struct(">IHHQQI")  # magic, command flags, type, handle, offset, length
_SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, handle
_OPTION = struct.Struct(">QII")  # IHAVEOPT, option, length
_OPTION_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length


class BlockExport(Protocol):
    """What the server serves: a disk of `size` bytes. Each method returns once the request is done;
    `fua` asks for it to be durable first. Raise ValueError for a request the export refuses, OSError
    (or LowDiskSpaceError) when the disk fails."""

    name: str
    size: int

    def read(self, offset: int, length: int) -> bytes | memoryview: ...

    def write(self, offset: int, data: memoryview, fua: bool) -> None: ...

    def write_zeroes(self, offset: int, length: int, fua: bool) -> None: ...

    def trim(self, offset: int, length: int, fua: bool) -> None: ...

    def flush(self) -> None: ...

    # Optional: `write` of each (offset, data, fua) in order, for the writes a connection has queued.
    # def write_many(self, writes: list[tuple[int, memoryview, bool]]) -> None: ...


class _ProtocolError(Exception):
    """The client broke the protocol: its connection is closed."""


class _Disconnect(Exception):
    """The client closed its side or asked to."""


class NbdServer:
    """Serves `exports` (by export name) on the unix socket `path`, a thread per connection."""

    def __init__(self, path: str | os.PathLike[str], exports: Mapping[str, BlockExport]):
        self.path = Path(path)
        self.exports = dict(exports)
        self._listener: socket.socket | None = None
        self._accepting: threading.Thread | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._connections: dict[threading.Thread, socket.socket] = {}

    def start(self) -> None:
        """Bind and listen (a stale socket file is replaced), then accept in a background thread."""
        self.path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(self.path))
            listener.listen(16)
        except BaseException:
            listener.close()
            raise
        self._listener = listener
        self._accepting = threading.Thread(target=self._accept_loop, name=f"nbd-accept {self.path.name}",
                                           daemon=True)
        self._accepting.start()

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop accepting, let every connection finish the request it is handling (its reply is sent),
        then close the connections. True when every connection thread ended within `timeout`."""
        self._stopping.set()
        if self._listener is not None:
            # shutdown wakes the thread blocked in accept(); close alone would not.
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
            self.path.unlink(missing_ok=True)
        if self._accepting is not None:
            self._accepting.join(timeout)
        with self._lock:
            connections = list(self._connections.items())
        for _, conn in connections:
            # Receiving ends (a thread waiting for its next request wakes with end of stream); sending
            # goes on, so a request being handled still gets its reply.
            try:
                conn.shutdown(socket.SHUT_RD)
            except OSError:
                pass
        all_ended = True
        for thread, _ in connections:
            thread.join(timeout)
            all_ended = all_ended and not thread.is_alive()
        return all_ended

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                log.exception("nbd %s: accept failed", self.path)
                continue
            thread = threading.Thread(target=self._serve_connection, args=(conn,),
                                      name=f"nbd-conn {self.path.name}", daemon=True)
            with self._lock:
                if self._stopping.is_set():
                    conn.close()
                    return
                self._connections[thread] = conn
            thread.start()

    def _serve_connection(self, conn: socket.socket) -> None:
        try:
            _Connection(conn, self.exports, self._stopping).serve()
        except Exception:
            log.exception("nbd %s: connection failed", self.path)
        finally:
            conn.close()
            with self._lock:
                self._connections.pop(threading.current_thread(), None)


class _Connection:
    """One client: its handshake, then its requests in order."""

    def __init__(self, conn: socket.socket, exports: Mapping[str, BlockExport], stopping: threading.Event):
        self.conn = conn
        self.exports = exports
        self.stopping = stopping
        self.no_zeroes = False
        self._small = bytearray(_REQUEST.size)
        self._small_view = memoryview(self._small)

    def serve(self) -> None:
        try:
            export = self._handshake()
            if export is not None:
                log.info("nbd: client connected to export %r", export.name)
                self._transmission(export)
        except _Disconnect:
            pass
        except _ProtocolError as broken:
            log.warning("nbd: closing a connection: %s", broken)
        except (BrokenPipeError, ConnectionResetError):
            pass

    # ---- receiving -------------------------------------------------------------------------------------
    def _recv_exactly(self, view: memoryview) -> None:
        done, total = 0, view.nbytes
        while done < total:
            n = self.conn.recv_into(view[done:], total - done)
            if n == 0:
                raise _Disconnect()
            done += n

    def _recv_small(self, size: int) -> memoryview:
        view = self._small_view[:size]
        self._recv_exactly(view)
        return view

    def _recv_bytes(self, size: int) -> bytes:
        buffer = bytearray(size)
        self._recv_exactly(memoryview(buffer))
        return bytes(buffer)

    def _drain(self, length: int) -> None:
        """Read and drop `length` bytes: the payload of a write refused before reading it."""
        view = memoryview(bytearray(min(length, _DRAIN_CHUNK)))
        while length:
            step = min(length, view.nbytes)
            self._recv_exactly(view[:step])
            length -= step

    # ---- handshake ----------------------------------------------------------------------------------------
    def _handshake(self) -> BlockExport | None:
        """The export the client chose, or None when it aborted or only listed."""
        self.conn.sendall(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        (client_flags,) = struct.unpack(">I", self._recv_small(4))
        if not client_flags & FLAG_FIXED_NEWSTYLE or client_flags & ~(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES):
            raise _ProtocolError(f"client flags {client_flags:#x}: only fixed newstyle is served")
        self.no_zeroes = bool(client_flags & FLAG_NO_ZEROES)
        while True:
            magic, option, length = _OPTION.unpack(self._recv_small(_OPTION.size))
            if magic != IHAVEOPT:
                raise _ProtocolError(f"option magic {magic:#x} is not IHAVEOPT")
            if length > MAX_OPTION_DATA:
                raise _ProtocolError(f"option {option} carries {length} bytes")
            data = self._recv_bytes(length)
            if option == OPT_EXPORT_NAME:
                export = self.exports.get(data.decode(errors="replace"))
                if export is None:
                    # EXPORT_NAME has no error reply: closing is the only answer.
                    raise _ProtocolError(f"unknown export {data!r}")
                reply = struct.pack(">QH", export.size, TRANSMISSION_FLAGS)
                self.conn.sendall(reply if self.no_zeroes else reply + bytes(124))
                return export
            if option == OPT_ABORT:
                self._option_reply(option, REP_ACK)
                return None
            if option == OPT_LIST:
                if length:
                    self._option_reply(option, REP_ERR_INVALID, b"LIST takes no data")
                    continue
                for name in self.exports:
                    encoded = name.encode()
                    self._option_reply(option, REP_SERVER, struct.pack(">I", len(encoded)) + encoded)
                self._option_reply(option, REP_ACK)
            elif option in (OPT_INFO, OPT_GO):
                export = self._info(option, data)
                if export is not None and option == OPT_GO:
                    return export
            else:
                # STRUCTURED_REPLY among them: refusing it keeps QEMU on simple replies.
                self._option_reply(option, REP_ERR_UNSUP, b"option not supported")

    def _info(self, option: int, data: bytes) -> BlockExport | None:
        """Answer INFO or GO; the export when the client may use it."""
        if len(data) < 6:
            self._option_reply(option, REP_ERR_INVALID, b"truncated request")
            return None
        (name_length,) = struct.unpack_from(">I", data)
        if len(data) < 4 + name_length + 2:
            self._option_reply(option, REP_ERR_INVALID, b"truncated request")
            return None
        name = data[4 : 4 + name_length].decode(errors="replace")
        (requests,) = struct.unpack_from(">H", data, 4 + name_length)
        if len(data) != 4 + name_length + 2 + 2 * requests:
            self._option_reply(option, REP_ERR_INVALID, b"malformed information requests")
            return None
        export = self.exports.get(name)
        if export is None:
            self._option_reply(option, REP_ERR_UNKNOWN, f"no export named {name!r}".encode())
            return None
        self._option_reply(option, REP_INFO, struct.pack(">HQH", INFO_EXPORT, export.size, TRANSMISSION_FLAGS))
        # Always sent: the tracker takes whole sectors, and a client that knows it (QEMU does) aligns
        # its requests, doing read-modify-write itself for smaller writes.
        self._option_reply(option, REP_INFO, struct.pack(">HIII", INFO_BLOCK_SIZE, SECTOR, PREFERRED_BLOCK,
                                                         MAX_REQUEST))
        self._option_reply(option, REP_ACK)
        return export

    def _option_reply(self, option: int, reply: int, data: bytes = b"") -> None:
        self.conn.sendall(_OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, reply, len(data)) + data)

    # ---- transmission -------------------------------------------------------------------------------------
    def _transmission(self, export: BlockExport) -> None:
        """Requests in order, each answered once the export has done it, in this one thread. The writes
        a client has sent are received together by the native extension (datapath/writepath_build.py),
        without the GIL: waiting for the first, then taking those already in the socket, each straight
        into one of PIPELINE buffers (allocated once: mmaps, whose pages are committed as they are
        touched), up to BATCH_BYTES. They go to the export together (`write_many`), and their replies in
        one send. What the extension does not take (any other command, a refused write, a broken
        request) comes back as a header and is handled here in Python."""
        self.conn.setblocking(True)  # the extension's recv waits; a socket timeout would make it fail
        buffers = [aligned_buffer(MAX_REQUEST) for _ in range(PIPELINE)]
        views = [memoryview(buffer) for buffer in buffers]
        exported = [_ffi.from_buffer(buffer, require_writable=True) for buffer in buffers]
        pointers = _ffi.new("unsigned char *[]", exported)
        requests = _ffi.new("struct asr_nbd_request[]", PIPELINE + 1)
        status = _ffi.new("int *")
        fd, size = self.conn.fileno(), export.size
        while not self.stopping.is_set():
            count = _lib.asr_nbd_receive_writes(fd, size, MAX_REQUEST, BATCH_BYTES, pointers, PIPELINE, requests,
                                                status)
            if count:
                self._run_writes(export, requests, count, views)
            why = status[0]
            if why == _RECEIVED_WAITING:
                continue
            if why == _RECEIVED_END:
                raise _Disconnect()
            if why < 0:
                raise OSError(-why, os.strerror(-why))
            request = requests[count]  # _RECEIVED_OTHER: its header only
            if request.magic != REQUEST_MAGIC:
                raise _ProtocolError(f"request magic {request.magic:#x}")
            command, handle, offset, length = request.type, request.handle, request.offset, request.length
            if command == CMD_DISC:
                return
            payload = None
            if command == CMD_WRITE:
                if length > MAX_REQUEST:
                    self._drain(length)
                    self._reply(handle, errno.EINVAL)
                    continue
                payload = views[0]
                self._recv_exactly(payload[:length])
            self._run(export, command, request.flags & CMD_FLAG_FUA != 0, handle, offset, length, payload)

    def _run_writes(self, export: BlockExport, requests, count: int, views: list[memoryview]) -> None:
        """Writes checked already (inside the export, whole sectors). With `write_many` they are done
        together and one error (the disk failing) answers them all."""
        write_many = getattr(export, "write_many", None)
        if write_many is None:
            for index in range(count):
                request = requests[index]
                self._reply(request.handle, self._call(export.write, request.offset, views[index][:request.length],
                                                       request.flags & CMD_FLAG_FUA != 0))
            return
        writes = []
        for index in range(count):
            request = requests[index]
            writes.append((request.offset, views[index][:request.length], request.flags & CMD_FLAG_FUA != 0))
        error = self._call(write_many, writes)
        result = _lib.asr_nbd_send_replies(self.conn.fileno(), requests, count, error)
        if result < 0:
            raise OSError(-result, os.strerror(-result))

    def _run(self, export: BlockExport, command: int, fua: bool, handle: int, offset: int, length: int,
             payload: memoryview | None) -> None:
        size = export.size
        if command == CMD_WRITE:
            if payload is None:
                self._reply(handle, errno.EINVAL)
                return
            error = _check(offset, length, size, writing=True)
            self._reply(handle, error or self._call(export.write, offset, payload[:length], fua))
        elif command == CMD_READ:
            error = errno.EINVAL if length > MAX_REQUEST else _check(offset, length, size, writing=False)
            if error:
                self._reply(handle, error)
                return
            try:
                data = export.read(offset, length)
            except Exception as exc:
                self._reply(handle, _errno_of(exc, export, "read", offset, length))
                return
            self.conn.sendmsg([_SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, handle), data])
        elif command == CMD_FLUSH:
            self._reply(handle, self._call(export.flush))
        elif command in (CMD_WRITE_ZEROES, CMD_TRIM):
            method = export.write_zeroes if command == CMD_WRITE_ZEROES else export.trim
            error = _check(offset, length, size, writing=True)
            self._reply(handle, error or self._call(method, offset, length, fua))
        else:
            self._reply(handle, errno.EINVAL)

    def _call(self, method, *args) -> int:
        try:
            method(*args)
        except Exception as exc:
            return _errno_of(exc, None, method.__name__, *args[:2])
        return 0

    def _reply(self, handle: int, error: int) -> None:
        self.conn.sendall(_SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle))


def _check(offset: int, length: int, size: int, *, writing: bool) -> int:
    """0, or the error a request outside the export or not made of whole sectors gets."""
    if offset % SECTOR or length % SECTOR or length == 0:
        return errno.EINVAL
    if offset + length > size:
        return errno.ENOSPC if writing else errno.EINVAL
    return 0


def _errno_of(exc: Exception, export: BlockExport | None, action: str, *where: object) -> int:
    if isinstance(exc, LowDiskSpaceError) or (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC,
                                                                                             errno.EDQUOT)):
        code = errno.ENOSPC
    elif isinstance(exc, ValueError):
        code = errno.EINVAL
    else:
        code = errno.EIO
    log.error("nbd: %s %s failed (%s): %s", action, where, errno.errorcode.get(code, code), exc,
              exc_info=code == errno.EIO)
    return code
