"""The process launchers (`asr worker|beat|api|flower`), run as an operator runs them: the installed `asr`
in a subprocess. --dry-run shows the argument mapping; the host agent's admission check runs against a
real SQLite database; and real workers start on a private redis-server, answer a ping, and stop on
SIGTERM. Every wait is bounded.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest
from sqlmodel import select

from models.db import dispose_engines, get_engine, init_db, session_scope
from models.fabric import Host, create_site, register_host
from sites.localservices import RedisServer, free_port, wait_until

ASR = str(Path(sys.executable).with_name("asr"))
PYTHON = sys.executable
CELERY = [PYTHON, "-m", "celery", "-A", "worker"]
WORKER_FLAGS = ["-E", "-l", "INFO", "--without-gossip", "--without-mingle"]
# Nothing listens there: a worker that started by mistake would hang retrying, not exit at once.
DEAD_BROKER = "redis://127.0.0.1:9/0"


INSECURE_TRANSPORT = "ASR_INSECURE_TRANSPORT"


def clean_env(**settings: str) -> dict[str, str]:
    """This process's environment without any ASR_* or FLOWER_* variable, plus `settings`; but for
    ASR_INSECURE_TRANSPORT (conftest.py): these tests run on plain Redis and HTTP (tests/test_tls.py: TLS)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ASR_", "FLOWER_")) or k == INSECURE_TRANSPORT}
    env.update(settings)
    return env


def asr(*args: str, env: dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([ASR, *args], env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def dry_run(*args: str, env: dict[str, str]) -> tuple[list[str], list[str]]:
    """(argv, environment names) that `asr ARGS --dry-run` prints."""
    proc = asr(*args, "--dry-run", env=env)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    lines = dict(line.split(": ", 1) for line in proc.stdout.strip().splitlines())
    assert set(lines) == {"command", "environment"}, proc.stdout
    names = [] if lines["environment"].startswith("(") else lines["environment"].split()
    names = [name for name in names if name != INSECURE_TRANSPORT]  # every test's, not what it checks
    return shlex.split(lines["command"]), names


@pytest.fixture
def fabric(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A SQLite database with host1 (root exists) and host2 (root missing) registered: their keys and the URL."""
    url = f"sqlite:///{tmp_path / 'asr.db'}"
    engine = get_engine(url)
    init_db(engine)
    (tmp_path / "hosts" / "host1").mkdir(parents=True)
    with session_scope(engine) as session:
        site = create_site(session, "primary")
        _, key1 = register_host(session, "host1", str(tmp_path / "hosts" / "host1"), site=site)
        _, key2 = register_host(session, "host2", str(tmp_path / "hosts" / "host2"), site=site)
    yield {"url": url, "host1": key1, "host2": key2}
    dispose_engines()


def last_seen(url: str, name: str):
    with session_scope(get_engine(url)) as session:
        return session.exec(select(Host).where(Host.name == name)).one().last_seen_at


def dump(url: str) -> list[str]:
    """Every row of the SQLite database, as SQL: what "changes nothing" compares."""
    with closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as connection:
        return list(connection.iterdump())


# ---- --dry-run: the argument mapping --------------------------------------------------------------
def test_worker_dry_runs_map_options_to_celery_arguments(tmp_path: Path) -> None:
    env = clean_env(ASR_BROKER_URL="redis://broker:6379/0", ASR_DATABASE_URL=f"sqlite:///{tmp_path / 'x.db'}",
                    ASR_HEARTBEAT_S="5")
    argv, names = dry_run("worker", "orchestration", env=env)
    assert argv == [*CELERY, "worker", "-Q", "orchestration,recovery", "-n", "orchestration@%h", *WORKER_FLAGS]
    assert names == ["ASR_BROKER_URL", "ASR_DATABASE_URL", "ASR_HEARTBEAT_S"]

    argv, _ = dry_run("worker", "orchestration", "--concurrency", "3", "--loglevel", "debug", env=env)
    assert argv == [*CELERY, "worker", "-Q", "orchestration,recovery", "-n", "orchestration@%h", "-E", "-l",
                    "DEBUG", "--without-gossip", "--without-mingle", "-c", "3"]

    argv, names = dry_run("worker", "recovery", "-c", "2", env=env)
    assert argv == [*CELERY, "worker", "-Q", "recovery", "-n", "recovery@%h", *WORKER_FLAGS, "-c", "2"]
    assert names == ["ASR_BROKER_URL", "ASR_DATABASE_URL", "ASR_HEARTBEAT_S"]
    # A dry run prepares nothing: not even the SQLite file.
    assert not (tmp_path / "x.db").exists()


def test_beat_and_api_dry_runs(tmp_path: Path) -> None:
    env = clean_env(ASR_HOME=str(tmp_path / "home"), ASR_RECONCILE_S="15")
    argv, names = dry_run("beat", env=env)
    assert argv == [*CELERY, "beat", "-l", "INFO", "-s", str(tmp_path / "home" / "beat-schedule")]
    assert names == ["ASR_HOME", "ASR_RECONCILE_S"]
    assert not (tmp_path / "home").exists()  # the schedule's folder is made only for a real start

    argv, _ = dry_run("beat", "--schedule", str(tmp_path / "s" / "beat"), "-l", "warning", env=env)
    assert argv == [*CELERY, "beat", "-l", "WARNING", "-s", str(tmp_path / "s" / "beat")]

    argv, names = dry_run("api", env=clean_env())
    assert argv == [PYTHON, "-m", "uvicorn", "api.rest:app", "--host", "127.0.0.1", "--port", "8000",
                    "--log-level", "info", "--no-proxy-headers"]
    assert names == []
    argv, _ = dry_run("api", "--host", "0.0.0.0", "--port", "8123", "--loglevel", "ERROR", env=clean_env())
    assert argv[-7:] == ["--host", "0.0.0.0", "--port", "8123", "--log-level", "error", "--no-proxy-headers"]
    # Forwarded headers believed from the listed proxies only (docs/api.md, ASR_API_TRUSTED_PROXIES).
    argv, _ = dry_run("api", env=clean_env(ASR_API_TRUSTED_PROXIES="10.0.0.5, 10.1.0.0/16"))
    assert argv[-2:] == ["--proxy-headers", "--forwarded-allow-ips=10.0.0.5,10.1.0.0/16"], argv

    proc = asr("api", "--port", "70000", "--dry-run", env=clean_env())
    assert proc.returncode == 2 and "70000" in proc.stderr, proc.stderr


def test_flower_dry_run_passes_the_credentials_in_the_environment_only() -> None:
    password = "s3cret-Pa55"
    env = clean_env(ASR_FLOWER_USER="operator", ASR_FLOWER_PASSWORD=password, ASR_BROKER_URL="redis://b:1/0",
                    FLOWER_UNAUTHENTICATED_API="true")
    argv, names = dry_run("flower", env=env)
    assert argv == [*CELERY, "flower", "--port=5555", "--address=127.0.0.1"]
    # Basic auth through FLOWER_BASIC_AUTH; the API is never opened to unauthenticated clients; the
    # project's copies of the credentials are not handed on.
    assert names == ["ASR_BROKER_URL", "FLOWER_BASIC_AUTH"]
    argv, _ = dry_run("flower", "--port", "5600", "--address", "0.0.0.0", env=env)
    assert argv[-2:] == ["--port=5600", "--address=0.0.0.0"]
    proc = asr("flower", "--dry-run", env=env)
    assert password not in proc.stdout + proc.stderr


@pytest.mark.parametrize("settings, message", [
    ({}, "set ASR_FLOWER_USER and ASR_FLOWER_PASSWORD"),
    ({"ASR_FLOWER_USER": "operator"}, "set ASR_FLOWER_USER and ASR_FLOWER_PASSWORD"),
    ({"ASR_FLOWER_PASSWORD": "pw"}, "set ASR_FLOWER_USER and ASR_FLOWER_PASSWORD"),
    ({"ASR_FLOWER_USER": "op:erator", "ASR_FLOWER_PASSWORD": "pw"}, "ASR_FLOWER_USER may not contain"),
    ({"ASR_FLOWER_USER": "operator", "ASR_FLOWER_PASSWORD": "a,b"}, "ASR_FLOWER_PASSWORD may not contain"),
], ids=["none", "no-password", "no-user", "colon-in-user", "comma-in-password"])
def test_flower_refuses_to_start_without_usable_credentials(settings: dict[str, str], message: str) -> None:
    for extra in ([], ["--dry-run"]):
        proc = asr("flower", *extra, env=clean_env(ASR_BROKER_URL=DEAD_BROKER, **settings))
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert proc.stderr.startswith("asr: error: ") and message in proc.stderr, proc.stderr
        assert "command:" not in proc.stdout and "flower" not in proc.stdout.lower()


# ---- the host agent's admission ------------------------------------------------------------------
def test_host_agent_dry_run_admits_the_registered_host_with_its_key(fabric: dict[str, str]) -> None:
    env = clean_env(ASR_DATABASE_URL=fabric["url"], ASR_BROKER_URL=DEAD_BROKER, ASR_HOST_KEY=fabric["host1"])
    argv, names = dry_run("worker", "host", "host1", env=env)
    assert argv == [*CELERY, "worker", "-Q", "host.host1", "-n", "host-host1@%h", *WORKER_FLAGS]
    # The key is not in the worker's environment: a started worker gets it through a pipe (ASR_HOST_KEY_FD).
    assert names == ["ASR_BROKER_URL", "ASR_DATABASE_URL", "ASR_HOST_NAME"]
    env.pop("ASR_HOST_KEY")
    key_file = Path(fabric["url"].removeprefix("sqlite:///")).with_name("host1.key")
    key_file.write_text(fabric["host1"] + "\n")
    argv, _ = dry_run("worker", "host", "host1", "--key-file", str(key_file), "-c", "4", env=env)
    assert argv[-2:] == ["-c", "4"]
    argv, _ = dry_run("worker", "host", "host1", env={**env, "ASR_HOST_KEY_FILE": str(key_file)})
    proc = subprocess.run([ASR, "worker", "host", "host1", "--key-file", "-", "--dry-run"], env=env,
                          input=fabric["host1"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and fabric["host1"] not in proc.stdout + proc.stderr, proc.stderr
    # --key would put the key in the process list: refused, naming the ways that do not.
    proc = asr("worker", "host", "host1", "--key", fabric["host1"], "--dry-run", env=env)
    assert proc.returncode == 2 and "--key would show the key in the process list" in proc.stderr, proc.stderr
    assert fabric["host1"] not in proc.stdout + proc.stderr
    assert last_seen(fabric["url"], "host1") is None  # a dry run records nothing


@pytest.mark.parametrize("args, key_of, message", [
    (["host1"], "not-the-key", "is not its registration key"),
    (["host1"], "host2", "is not its registration key"),  # another host's key
    (["nosuch"], "host1", "host 'nosuch' is not registered"),
    (["host1"], "", "the registration key of host 'host1' is needed"),
    (["../host1"], "host1", "invalid host name '../host1'"),
    (["host2"], "host2", "is not a directory on this machine"),
], ids=["wrong-key", "other-hosts-key", "unknown-host", "no-key", "path-in-name", "root-missing"])
def test_host_agent_refuses_and_starts_nothing(fabric: dict[str, str], args: list[str], key_of: str | None,
                                               message: str) -> None:
    env = clean_env(ASR_DATABASE_URL=fabric["url"], ASR_BROKER_URL=DEAD_BROKER)
    if key_of is not None:
        env["ASR_HOST_KEY"] = fabric.get(key_of, key_of)
    before = dump(fabric["url"])
    started = time.monotonic()
    # A worker that started would hang on the dead broker; the refusal is immediate (timeout: bounded).
    proc = asr("worker", "host", *args, env=env, timeout=30)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("asr: error: ") and message in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr  # one line, no traceback
    assert "celery" not in (proc.stdout + proc.stderr).lower()
    assert time.monotonic() - started < 20
    assert last_seen(fabric["url"], "host1") is None and last_seen(fabric["url"], "host2") is None
    assert dump(fabric["url"]) == before


@pytest.mark.parametrize(("name", "value"), [("ASR_TRACKER_SPARE_MAX", "lots"), ("ASR_HOST_UPLOAD_LIMIT", "-8M")])
def test_host_agent_refuses_a_bad_setting_of_its_steps_before_it_starts(fabric: dict[str, str], name: str,
                                                                        value: str) -> None:
    env = clean_env(ASR_DATABASE_URL=fabric["url"], ASR_BROKER_URL=DEAD_BROKER, ASR_HOST_KEY=fabric["host1"],
                    **{name: value})
    proc = asr("worker", "host", "host1", env=env, timeout=30)
    assert proc.returncode == 2 and f"{name}={value!r}" in proc.stderr and "not started" in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert last_seen(fabric["url"], "host1") is None


def test_host_agent_refuses_when_the_database_does_not_exist(tmp_path: Path) -> None:
    env = clean_env(ASR_DATABASE_URL=f"sqlite:///{tmp_path / 'none.db'}", ASR_BROKER_URL=DEAD_BROKER,
                    ASR_HOST_KEY="whatever")
    proc = asr("worker", "host", "host1", env=env)
    assert proc.returncode == 2 and "host 'host1' is not registered" in proc.stderr, proc.stderr
    assert not (tmp_path / "none.db").exists()


# ---- real starts ----------------------------------------------------------------------------------
def test_workers_start_answer_over_the_broker_and_stop_on_sigterm(tmp_path: Path, fabric: dict[str, str]) -> None:
    redis_server = RedisServer(tmp_path / "redis").start()
    fresh_db = f"sqlite:///{tmp_path / 'fresh.db'}"
    processes: dict[str, subprocess.Popen[bytes]] = {}
    logs = {name: tmp_path / f"{name}.log" for name in ("orchestration", "host1")}

    def launch(name: str, args: list[str], env: dict[str, str]) -> None:
        with open(logs[name], "wb") as log:
            processes[name] = subprocess.Popen([ASR, *args], env=env, stdin=subprocess.DEVNULL, stdout=log,
                                               stderr=subprocess.STDOUT, start_new_session=True)

    try:
        # The orchestration worker on a database nobody prepared: it creates the tables first.
        launch("orchestration", ["worker", "orchestration", "-c", "1"],
               clean_env(ASR_BROKER_URL=redis_server.url, ASR_DATABASE_URL=fresh_db,
                         ASR_WORKER_REMOTE_CONTROL="inspect"))
        launch("host1", ["worker", "host", "host1", "-c", "1"],
               clean_env(ASR_BROKER_URL=redis_server.url, ASR_DATABASE_URL=fabric["url"],
                         ASR_HOST_KEY=fabric["host1"]))

        def ready(name: str, node: str) -> bool:
            text = logs[name].read_text(errors="replace")
            assert processes[name].poll() is None, f"{name} exited {processes[name].returncode}:\n{text}"
            return re.search(rf"^.*{re.escape(node)}@\S+ ready\.$", text, re.MULTILINE) is not None

        wait_until(lambda: ready("orchestration", "orchestration"), timeout=30, interval=0.1,
                   what="the orchestration worker to be ready")
        wait_until(lambda: ready("host1", "host-host1"), timeout=30, interval=0.1,
                   what="the agent of host1 to be ready")

        for name, process in processes.items():
            # exec'd: the process the supervisor started is the Celery worker itself, so signals reach it.
            cmdline = Path(f"/proc/{process.pid}/cmdline").read_bytes().split(b"\0")
            assert cmdline[1:4] == [b"-m", b"celery", b"-A"], (name, cmdline)
        environ = Path(f"/proc/{processes['host1'].pid}/environ").read_bytes().split(b"\0")
        assert not any(item.startswith(b"ASR_HOST_KEY=") for item in environ)
        assert fabric["host1"].encode() not in b"\0".join(environ) + b"\0".join(cmdline)
        assert b"ASR_HOST_NAME=host1" in environ
        assert last_seen(fabric["url"], "host1") is not None

        with session_scope(get_engine(fresh_db)) as session:  # the tables exist now
            assert session.exec(select(Host)).all() == []

        # A real round trip through the broker: the orchestration worker (remote control set to inspect) answers
        # with its queues; the host's agent answers nothing (remote control is off by default).
        answer = subprocess.run([*CELERY, "inspect", "active_queues", "--timeout", "5", "--json"],
                                env=clean_env(ASR_BROKER_URL=redis_server.url), capture_output=True, text=True,
                                timeout=30)
        assert answer.returncode == 0, answer.stdout + answer.stderr
        queues = {node.split("@")[0]: sorted(queue["name"] for queue in info)
                  for node, info in json.loads(answer.stdout).items()}
        assert queues == {"orchestration": ["orchestration", "recovery"]}, queues

        for process in processes.values():
            process.send_signal(signal.SIGTERM)
        for name, process in processes.items():
            assert process.wait(timeout=20) == 0, (name, logs[name].read_text(errors="replace")[-2000:])
    finally:
        for process in processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        redis_server.stop()


def test_api_and_beat_start_and_stop_on_sigterm(tmp_path: Path) -> None:
    redis_server = RedisServer(tmp_path / "redis").start()
    port = free_port()
    env = clean_env(ASR_BROKER_URL=redis_server.url, ASR_DATABASE_URL=f"sqlite:///{tmp_path / 'api.db'}")
    schedule = tmp_path / "beat" / "schedule"
    logs = {name: tmp_path / f"{name}.log" for name in ("api", "beat")}
    processes: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name, args in (("api", ["api", "--port", str(port)]), ("beat", ["beat", "--schedule", str(schedule)])):
            with open(logs[name], "wb") as log:
                processes[name] = subprocess.Popen([ASR, *args], env=env, stdin=subprocess.DEVNULL, stdout=log,
                                                   stderr=subprocess.STDOUT, start_new_session=True)

        def healthy() -> bool:
            assert processes["api"].poll() is None, logs["api"].read_text(errors="replace")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
                    return response.status == 200
            except OSError:
                return False

        wait_until(healthy, timeout=30, interval=0.2, what="asr api to answer /healthz")
        wait_until(lambda: "beat: Starting" in logs["beat"].read_text(errors="replace"), timeout=30,
                   interval=0.1, what="asr beat to start")
        assert schedule.parent.is_dir()  # made for beat's schedule file
        with session_scope(get_engine(env["ASR_DATABASE_URL"])) as session:  # the API prepared the tables
            assert session.exec(select(Host)).all() == []
        for name, process in processes.items():
            cmdline = Path(f"/proc/{process.pid}/cmdline").read_bytes().split(b"\0")
            assert cmdline[1:3] == [b"-m", b"uvicorn" if name == "api" else b"celery"], (name, cmdline)
            process.send_signal(signal.SIGTERM)
        for name, process in processes.items():
            # uvicorn shuts down gracefully, then re-raises the signal it caught (status -15): a clean stop.
            expected = -signal.SIGTERM if name == "api" else 0
            assert process.wait(timeout=20) == expected, (name, logs[name].read_text(errors="replace")[-2000:])
        assert "Finished server process" in logs["api"].read_text(errors="replace")
    finally:
        for process in processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        redis_server.stop()
