"""The REST API as it is deployed, for tests: `uvicorn api.rest:app` as a real subprocess on a free port, and a
whole deployment behind it (`api_deployment`: tests/test_api.py, tests/test_console_browser.py).

(A helper module, as tests/recovery_site.py: test modules import none from another.)
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from recovery_site import RecoverySite

from api import service
from api.client import SiteRecoveryClient
from sites.localservices import LOCALHOST, free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT = 30


class ApiServer:
    """`python -m uvicorn api.rest:app` on 127.0.0.1 and a free port, in a session of its own."""

    def __init__(self, env: dict[str, str], workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://{LOCALHOST}:{self.port}"
        self.log_path = workdir / "api.log"
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "api.rest:app", "--host", LOCALHOST, "--port", str(self.port)],
                cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"the API server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"the API server did not answer within {START_TIMEOUT} s:\n{self.log()}")
            time.sleep(0.1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)


class ApiDeployment:
    """A RecoverySite with the API in front of it: an admin key (`key`), a reader's and an operator's
    (`role_keys`), and a key known only by its hash in ASR_API_KEY_HASHES (`env_key`, admin)."""

    def __init__(self, site: RecoverySite, server: ApiServer, key: str, env_key: str,
                 role_keys: dict[str, str]) -> None:
        self.site, self.server, self.key, self.env_key = site, server, key, env_key
        self.role_keys = role_keys
        self.url = server.url

    def client(self, key: str | None = None) -> SiteRecoveryClient:
        return SiteRecoveryClient(self.url, self.key if key is None else key, timeout=30)


@contextmanager
def api_deployment(workdir: Path, *, server_env: dict[str, str] | None = None,
                   **site_options: Any) -> Iterator[ApiDeployment]:
    """A deployment (tests/recovery_site.py: one host, recovery host dr1, real time; `site_options` are
    RecoverySite's) and its API server, for a module's tests (a module-scoped fixture of the module wraps it).
    `server_env`: settings of the API server over these (ASR_API_KEY_CACHE_S, say)."""
    with RecoverySite(workdir, **{"recovery_host_names": ("dr1",), "time_scale": 1, **site_options}) as site:
        key = service.create_api_key("tests", "admin")["key"]
        role_keys = {role: service.create_api_key(f"tests-{role}", role)["key"] for role in ("reader", "operator")}
        # A second key known only by its hash in the environment, as a deployment without DB writes has it.
        env_key = "env-only-key-0123456789"
        env = {**site.env, "ASR_API_KEY_HASHES": f"not-a-hash,{service.hash_api_key(env_key)}",
               "ASR_API_KEY_CACHE_S": "0",  # every request checks its key: revocation takes effect at once
               **(server_env or {})}
        server = ApiServer(env, workdir)
        try:
            yield ApiDeployment(site, server, key, env_key, role_keys)
        except BaseException:
            print(server.log())
            raise
        finally:
            server.stop()
