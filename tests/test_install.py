"""The package as a user installs it: `pip install .` into a new virtual environment, with the runtime
dependencies only (no test extra), from exactly the files the Dockerfile copies; then a worker started from
that environment connects to its broker and is ready, and `asr db upgrade` creates the schema; the installed
API serves the web console with its templates and assets (package data).

It failed before the Redis extras of celery and kombu were declared: kombu's Redis transport imports
`packaging`, which only the test extra happened to bring, and every process crashed at start.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sites.localservices import RedisServer, wait_until
from sites.pki import create_deployment_certificates

# Whole deployments (workers, beat, Redis) or real guests per test: out of the quick loop (-m "not slow").
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def dockerfile_sources() -> list[str]:
    """What the Dockerfile copies into the image before `pip install .` (its COPY sources)."""
    sources: list[str] = []
    for line in re.findall(r"^COPY (.+)$", (REPO / "Dockerfile").read_text(), re.MULTILINE):
        sources += line.split()[:-1]
    return sources


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new venv with the package installed from a copy of the Dockerfile's sources; returns its bin/."""
    root = tmp_path_factory.mktemp("install")
    source = root / "source"
    source.mkdir()
    for name in dockerfile_sources():
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so"))
        else:
            shutil.copy2(path, source / name)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    # --no-compile: byte-compiling every dependency cost this test 11 s of its 43 s of CPU (and 11 s of wall
    # time, measured 2026-12-04); the few processes started from this venv compile what they import in memory.
    answer = subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check",
                             "--no-compile", str(source)], capture_output=True, text=True, timeout=600)
    assert answer.returncode == 0, answer.stderr[-4000:]
    return venv / "bin"


def clean_env(**settings: str) -> dict[str, str]:
    # Nothing of this test run's environment that could hide a missing module (PYTHONPATH, the test venv).
    keep = {name: value for name, value in os.environ.items() if name in ("PATH", "HOME", "LANG", "TMPDIR")}
    return keep | settings


def test_a_plain_install_runs_the_schema_upgrade_and_a_worker(installed: Path, tmp_path: Path) -> None:
    database = f"sqlite:///{tmp_path / 'asr.db'}"
    # Over TLS, as a deployment runs: the installed package has everything TLS needs (sites/pki.py).
    certificates = create_deployment_certificates(tmp_path / "tls")
    redis = RedisServer(tmp_path / "redis", tls=certificates).start()
    try:
        env = clean_env(ASR_DATABASE_URL=database, ASR_BROKER_URL=redis.url, ASR_HOME=str(tmp_path / "home"),
                        **certificates.settings())
        upgrade = subprocess.run([str(installed / "asr"), "db", "upgrade"], env=env, cwd=tmp_path,
                                 capture_output=True, text=True, timeout=120)
        assert upgrade.returncode == 0 and "upgraded from (empty) to revision" in upgrade.stdout, \
            upgrade.stdout + upgrade.stderr

        log = tmp_path / "worker.log"
        with open(log, "wb") as output:
            worker = subprocess.Popen([str(installed / "asr"), "worker", "orchestration", "--concurrency", "1"],
                                      env=env, cwd=tmp_path, stdout=output, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: worker.poll() is not None or " ready." in log.read_text(errors="replace"),
                       timeout=90, what="the installed worker to be ready")
            assert worker.poll() is None, f"the installed worker exited:\n{log.read_text()[-4000:]}"
            # The transport is worker.py's Redis transport: "Connected to worker:ClosedChannelSafeRedisTransport://".
            assert re.search(r"Connected to \S*redis\S*://", log.read_text(), re.IGNORECASE), log.read_text()[-4000:]
        finally:
            worker.terminate()
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait(timeout=10)
        text = log.read_text()
        assert "Traceback" not in text and "ModuleNotFoundError" not in text, text[-4000:]
    finally:
        redis.stop()


def test_the_install_builds_the_compiled_modules(installed: Path, tmp_path: Path) -> None:
    """setup.py's cffi modules (AES-XTS, the NBD write path) are built by the plain `pip install` and load."""
    code = "import sites.storage.xts, datapath.nbd, datapath._writepath, sites.storage._xts_openssl; print('loaded')"
    answer = subprocess.run([str(installed / "python"), "-c", code],
                            env=clean_env(), cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert answer.returncode == 0 and answer.stdout.strip() == "loaded", answer.stdout + answer.stderr


def test_the_installed_api_serves_the_web_console_and_its_assets(installed: Path, tmp_path: Path) -> None:
    """The console's templates and assets are package data: the installed app renders its login page and serves
    its stylesheet and script (from the package, no CDN)."""
    script = "\n".join((
        "from starlette.testclient import TestClient",
        "from api.rest import app",
        "client = TestClient(app)",
        "for path in ('/console/login', '/console/static/console.css', '/console/static/console.js'):",
        "    answer = client.get(path)",
        "    assert answer.status_code == 200, (path, answer.status_code, answer.text[:500])",
        "assert 'name=\"api_key\"' in client.get('/console/login').text",
        "print('console served')",
    ))
    env = clean_env(ASR_DATABASE_URL=f"sqlite:///{tmp_path / 'asr.db'}", ASR_HOME=str(tmp_path / "home"))
    answer = subprocess.run([str(installed / "python"), "-c", script], env=env, cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert answer.returncode == 0 and "console served" in answer.stdout, answer.stdout + answer.stderr[-4000:]
