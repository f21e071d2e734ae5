"""Programs an operator gave us, run safely: a minimal environment, an unprivileged user, a time limit,
bounded output with the secrets of this process blanked out.

A worker's environment holds the database URL, the broker URL and the storage credentials; a child that
inherits it can print them (and a recovery plan's script output lands in the job record, readable by any
API key). So children get only what they need: PATH, LANG and the variables their caller names.
"""
from __future__ import annotations

import contextlib
import os
import pwd
import re
import signal
import subprocess
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

CHILD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CHILD_LANG = "C.UTF-8"
REDACTED = "[REDACTED]"

# Variables whose values are secrets: named so, or one of the engine's URLs (which may carry a password).
_SECRET_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|KEY|KEK|CONNECTION_STRING|CREDENTIAL|SAS|_URL$|_DSN$|"
                          r"^ASR_RESULT_BACKEND$", re.IGNORECASE)
# Shorter values are not blanked out: "1" or "yes" would blank out half the output and hide nothing.
_MIN_SECRET_CHARS = 6
# After a kill, how long the output pipe may take to close (a descendant that left the group may hold it).
_KILL_WAIT_S = 5.0


def minimal_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a child: PATH, LANG and `extra`; nothing of this process's own."""
    return {"PATH": CHILD_PATH, "LANG": CHILD_LANG, **(extra or {})}


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """The values of the secret variables of `environ` (this process's by default), longest first, with the
    password inside each URL and each `key=value` part of a connection string too."""
    environ = os.environ if environ is None else environ
    found: set[str] = set()
    for name, value in environ.items():
        if not value or not _SECRET_NAME.search(name):
            continue
        found.add(value)
        with contextlib.suppress(ValueError):
            parts = urlsplit(value)
            if parts.password:
                found.add(parts.password)
        for part in value.split(";"):  # Azure connection strings: AccountKey=...;BlobEndpoint=...
            key, sep, secret = part.partition("=")
            if sep and re.search(r"key|secret|signature|password|token", key, re.IGNORECASE):
                found.add(secret)
    return sorted((value for value in found if len(value) >= _MIN_SECRET_CHARS), key=len, reverse=True)


def redact(text: str, secrets: Iterable[str]) -> str:
    """`text` with every occurrence of each secret replaced by [REDACTED]."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return text


def unprivileged_user(name: str) -> pwd.struct_passwd | None:
    """The account a child runs as: `name` when this process runs as root, else None (it runs as this
    process's own user, which is not root). ValueError when `name` is unknown or is root itself."""
    if os.geteuid() != 0:
        return None
    try:
        account = pwd.getpwnam(name)
    except KeyError:
        raise ValueError(f"user {name!r} does not exist on this machine: set ASR_PLAN_SCRIPT_USER "
                         f"to an unprivileged user") from None
    if account.pw_uid == 0:
        raise ValueError(f"user {name!r} is root: set ASR_PLAN_SCRIPT_USER to an unprivileged user")
    return account


@dataclass(frozen=True)
class ChildRun:
    """How a child ended: its exit code (None when it was killed for overrunning), the tail of its merged
    stdout and stderr (at most the cap, secrets blanked out) and how many bytes it wrote in all."""

    exit_code: int | None
    output: str
    output_bytes: int
    timed_out: bool

    @property
    def truncated(self) -> bool:
        return self.output_bytes > len(self.output.encode(errors="replace"))


def run_child(
    argv: Sequence[str], *, env: Mapping[str, str], timeout_s: float, output_cap: int,
    secrets: Sequence[str] = (), user: pwd.struct_passwd | None = None, cwd: str = "/",
) -> ChildRun:
    """Run `argv` with exactly `env`, in its own process group (a timeout kills the whole group), as `user`
    (with its groups only) when given. Only the last `output_cap` bytes of its output are kept in memory.
    OSError when it cannot be started."""
    credentials = {}
    if user is not None:
        credentials = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    process = subprocess.Popen(
        list(argv), env=dict(env), cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, start_new_session=True, close_fds=True, **credentials,
    )
    # Keep a margin beyond the cap so a secret cut at the start of the tail is still recognised whole.
    margin = max((len(secret.encode()) for secret in secrets), default=0)
    tail = bytearray()
    total = [0]

    def drain() -> None:
        assert process.stdout is not None
        while chunk := process.stdout.read1(65536):
            total[0] += len(chunk)
            tail.extend(chunk)
            if len(tail) > output_cap + margin:
                del tail[: len(tail) - output_cap - margin]

    reader = threading.Thread(target=drain, name="child-output", daemon=True)
    reader.start()
    timed_out = False
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    reader.join(_KILL_WAIT_S)
    if process.stdout is not None:
        with contextlib.suppress(OSError):
            process.stdout.close()
    text = redact(bytes(tail).decode(errors="replace"), secrets)
    kept = text.encode(errors="replace")[-output_cap:].decode(errors="replace")
    return ChildRun(None if timed_out else process.returncode, kept, total[0], timed_out)
