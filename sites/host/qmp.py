"""A QMP (QEMU Machine Protocol) client: one short connection per command.

QEMU's `-qmp unix:...,server=on` serves one client at a time, so nothing keeps a connection open: a
command connects, negotiates (`qmp_capabilities`), executes and closes. Asynchronous events QEMU sends
in between are skipped.
"""
from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

from .errors import GuestError, GuestTimeoutError


class QmpError(GuestError):
    """QEMU refused a QMP command, or its QMP socket did not answer."""


def qmp_execute(socket_path: Path, command: str, arguments: dict | None = None, timeout: float = 5.0) -> Any:
    """Run one QMP command and return its "return" value."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.settimeout(timeout)
        try:
            connection.connect(str(socket_path))
            reader = connection.makefile("rb")
            _read_message(reader, socket_path, deadline)  # the greeting
            for name, args in (("qmp_capabilities", None), (command, arguments)):
                request: dict = {"execute": name}
                if args:
                    request["arguments"] = args
                connection.sendall(json.dumps(request).encode() + b"\n")
                while "event" in (reply := _read_message(reader, socket_path, deadline)):
                    pass
                if "error" in reply:
                    error = reply["error"]
                    raise QmpError(f"QMP {name} refused by QEMU ({socket_path}): {error.get('class')}: "
                                   f"{error.get('desc')}")
            return reply.get("return")
        except TimeoutError:
            raise GuestTimeoutError(f"QEMU did not answer QMP {command} on {socket_path} within {timeout:.0f} s") \
                from None
        except OSError as error:
            raise QmpError(f"cannot reach QEMU's QMP socket {socket_path} for {command}: {error}") from None


def _read_message(reader, socket_path: Path, deadline: float) -> dict:
    if time.monotonic() > deadline:
        raise TimeoutError
    line = reader.readline()
    if not line:
        raise QmpError(f"QEMU closed its QMP socket {socket_path}")
    try:
        return json.loads(line)
    except ValueError:
        raise QmpError(f"QEMU sent something that is not JSON on {socket_path}: {line[:200]!r}") from None
