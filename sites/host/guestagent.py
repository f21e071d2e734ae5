"""A client of the QEMU guest agent protocol, over a guest's `qga.sock` (see sites/host/qemu.py).

Every command opens a connection and first synchronises with `guest-sync-delimited` and a random id:
the agent answers it after a 0xFF byte, so anything left over from an earlier, abandoned exchange is
skipped (the protocol's own way to resynchronise). A guest without an agent accepts the connection
(QEMU holds the socket) but never answers: that is a `GuestTimeoutError` after `timeout` seconds.
"""
from __future__ import annotations

import json
import random
import socket
import time
from pathlib import Path
from typing import Any

from .errors import GuestAgentError, GuestError, GuestTimeoutError
from .qemu import AGENT_SOCKET, socket_dir

DELIMITER = b"\xff"


class GuestAgent:
    """The guest agent of the guest whose runtime folder is `folder`."""

    def __init__(self, folder: Path, timeout: float = 10.0):
        self.folder = Path(folder).resolve()
        self.timeout = timeout

    def ping(self) -> None:
        self.execute("guest-ping")

    def freeze(self) -> int:
        """Freeze the guest's file systems (the guest pauses its writer first); how many were frozen."""
        return int(self.execute("guest-fsfreeze-freeze", timeout=max(self.timeout, 40.0)))

    def thaw(self) -> int:
        return int(self.execute("guest-fsfreeze-thaw"))

    def status(self) -> str:
        """"frozen" or "thawed"."""
        return str(self.execute("guest-fsfreeze-status"))

    def shutdown(self) -> None:
        """Ask for a clean power-off; the agent does not answer it (the guest goes away)."""
        self.execute("guest-shutdown", {"mode": "powerdown"}, expect_reply=False)

    def execute(self, command: str, arguments: dict | None = None, expect_reply: bool = True,
                timeout: float | None = None) -> Any:
        """Run one agent command and return its "return" value (GuestAgentError when the agent refuses it)."""
        path = socket_dir(self.folder) / AGENT_SOCKET
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            try:
                connection.connect(str(path))
            except OSError as error:
                raise GuestError(f"cannot reach the guest agent socket {path} (is the guest running, with an "
                                 f"agent channel?): {error}") from None
            reader = _Reader(connection, deadline, command, timeout)
            sync_id = random.randrange(1, 2**31)
            connection.sendall(DELIMITER + _request("guest-sync-delimited", {"id": sync_id}))
            reader.skip_to_delimiter()
            while (reply := reader.message()).get("return") != sync_id:
                pass  # a late answer to an earlier exchange
            connection.sendall(_request(command, arguments))
            if not expect_reply:
                return None
            reply = reader.message()
        if "error" in reply:
            error = reply["error"]
            raise GuestAgentError(f"guest agent of {self.folder} refused {command}: {error.get('class')}: "
                                  f"{error.get('desc')}")
        if "return" not in reply:
            raise GuestError(f"guest agent of {self.folder} answered {command} without a return value: {reply!r}")
        return reply["return"]


def _request(command: str, arguments: dict | None) -> bytes:
    request: dict = {"execute": command}
    if arguments:
        request["arguments"] = arguments
    return json.dumps(request).encode() + b"\n"


class _Reader:
    """Reads the agent's answers with one deadline for the whole exchange."""

    def __init__(self, connection: socket.socket, deadline: float, command: str, timeout: float):
        self.connection, self.deadline, self.command, self.timeout = connection, deadline, command, timeout
        self.buffer = b""

    def _receive(self) -> None:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise self._timed_out()
        self.connection.settimeout(remaining)
        try:
            chunk = self.connection.recv(4096)
        except TimeoutError:
            raise self._timed_out() from None
        if not chunk:
            raise GuestError(f"the guest agent's channel closed during {self.command}")
        self.buffer += chunk

    def _timed_out(self) -> GuestTimeoutError:
        return GuestTimeoutError(f"the guest agent did not answer {self.command} within {self.timeout:g} s "
                                 f"(no agent in the guest, or the guest hangs)")

    def skip_to_delimiter(self) -> None:
        while DELIMITER not in self.buffer:
            self.buffer = b""
            self._receive()
        self.buffer = self.buffer[self.buffer.index(DELIMITER) + 1:]

    def message(self) -> dict:
        line = b""
        while not line.strip():
            while b"\n" not in self.buffer:
                self._receive()
            line, self.buffer = self.buffer.split(b"\n", 1)
            line = line.replace(DELIMITER, b"")
        try:
            return json.loads(line.decode())
        except ValueError:
            raise GuestError(f"the guest agent sent something that is not JSON during {self.command}: "
                             f"{line[:200]!r}") from None
