"""Local service processes the tests and the demo start and stop themselves (Azurite now).

Each service is a child process bound to 127.0.0.1 on a free port, with its data in a temporary
directory; `start` waits (bounded) until the port answers and `stop` ends the process and waits for it.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

REPO_ROOT = Path(__file__).resolve().parents[1]
AZURITE_BLOB = REPO_ROOT / ".tools" / "node_modules" / ".bin" / "azurite-blob"

# The Azurite development account; its key is published in Azurite's documentation.
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)

LOCALHOST = "127.0.0.1"


class ServiceStartError(RuntimeError):
    """A service could not be started; the message says what to do."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOCALHOST, 0))
        return probe.getsockname()[1]


def port_answers(port: int, host: str = LOCALHOST) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _log_tail(log_path: Path, limit: int = 2000) -> str:
    try:
        return log_path.read_text(errors="replace")[-limit:].strip() or "(no output)"
    except OSError:
        return "(no log)"


class AzuriteProcess:
    """Azurite's blob service from the project-local install, on 127.0.0.1 and a free port."""

    def __init__(self, workdir: Path, *, executable: Path = AZURITE_BLOB, debug_log: Path | None = None):
        """`debug_log`: where Azurite writes its debug log, which records every request's headers (slow;
        for tests that check what went over the wire)."""
        self.workdir = Path(workdir)
        self.executable = Path(executable)
        self.debug_log = debug_log
        self.port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log_path = self.workdir / "azurite.log"

    @property
    def blob_endpoint(self) -> str:
        if self.port is None:
            raise RuntimeError("Azurite is not started")
        return f"http://{LOCALHOST}:{self.port}/{AZURITE_ACCOUNT}"

    def connection_string(self, account_key: str = AZURITE_ACCOUNT_KEY) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={account_key};"
            f"BlobEndpoint={self.blob_endpoint};"
        )

    def start(self, timeout: float = 30.0) -> AzuriteProcess:
        if not os.access(self.executable, os.X_OK):
            raise ServiceStartError(
                f"Azurite is not installed at {self.executable}: run `make install` or `make test` (they install Azurite "
                f"into .tools with npm)"
            )
        data_dir = self.workdir / "data"
        data_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        command = [
            str(self.executable), "--blobHost", LOCALHOST, "--blobPort", str(self.port),
            "--location", str(data_dir), "--silent", "--disableTelemetry", "--skipApiVersionCheck",
            "--loose",
        ]
        if self.debug_log is not None:
            command += ["--debug", str(self.debug_log)]
        with open(self._log_path, "ab") as log:
            # A session of its own, so stop() can end node and anything it spawned together.
            self._process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not port_answers(self.port):
            if self._process.poll() is not None:
                raise ServiceStartError(
                    f"Azurite exited with status {self._process.returncode} before listening on port "
                    f"{self.port}; its output: {_log_tail(self._log_path)}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise ServiceStartError(
                    f"Azurite did not listen on port {self.port} within {timeout:.0f} s; its output: "
                    f"{_log_tail(self._log_path)}"
                )
            time.sleep(0.1)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=timeout)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def __enter__(self) -> AzuriteProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
