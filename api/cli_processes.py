"""`asr worker|beat|api|flower`: start each process with the right queues and settings (issue 5).

Every launcher builds one command line, checks what can be checked before it (a host agent's key, Flower's
credentials, the database), then replaces itself with that program (os.execve): the process a supervisor
started *is* the worker, so its SIGTERM reaches Celery (warm shutdown) and its exit status is Celery's.
`--dry-run` prints the command and the names of the environment variables it passes (never their values:
they hold URLs with passwords and keys) and starts nothing.

Settings come from the environment only (ASR_BROKER_URL, ASR_DATABASE_URL, ...: docs/operations.md), so
one compose file or unit file sets them once for every process.
"""
from __future__ import annotations

import importlib.util
import os
import shlex
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from api.cli import _fail, _Group, main
from datapath.private import make_private_directories
from workflows import settings

__all__ = [
    "HOST_KEY_ENV", "FLOWER_USER_ENV", "FLOWER_PASSWORD_ENV", "FLOWER_BASIC_AUTH_ENV", "Launch",
    "celery_command", "worker_command",
]

HOST_KEY_ENV = "ASR_HOST_KEY"
HOST_KEY_FILE_ENV = "ASR_HOST_KEY_FILE"
HOST_KEY_FD_ENV = "ASR_HOST_KEY_FD"
HOST_NAME_ENV = "ASR_HOST_NAME"
FLOWER_USER_ENV = "ASR_FLOWER_USER"
FLOWER_PASSWORD_ENV = "ASR_FLOWER_PASSWORD"
FLOWER_BASIC_AUTH_ENV = "FLOWER_BASIC_AUTH"
# Flower opens its HTTP API to anyone when this is true and no authentication is configured; it is never
# passed on, so the API stays behind the same basic auth as the pages.
FLOWER_UNAUTHENTICATED_API_ENV = "FLOWER_UNAUTHENTICATED_API"

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_LOG_LEVEL = click.Choice(LOG_LEVELS, case_sensitive=False)
_PORT = click.IntRange(1, 65535)


@dataclass(frozen=True)
class Launch:
    """A program to exec: its argv, its whole environment, and the names this launcher set in it."""

    argv: list[str]
    env: dict[str, str]
    added: tuple[str, ...] = field(default=())

    def env_names(self) -> list[str]:
        """What --dry-run lists: the project's settings (ASR_*), Flower's (FLOWER_*), and what the
        launcher added; the rest of the environment (PATH, HOME...) is passed on as it is."""
        return sorted(name for name in self.env
                      if name.startswith(("ASR_", "FLOWER_")) or name in self.added)


def celery_command(*args: str) -> list[str]:
    # This interpreter, not whatever `celery` is first on PATH: the worker must import the same installed
    # project (the `worker` module, tasks/) as the `asr` that launched it.
    return [sys.executable, "-m", "celery", "-A", "worker", *args]


def worker_command(queues: Iterable[str], node: str, *, concurrency: int | None, loglevel: str) -> list[str]:
    """`celery -A worker worker` on `queues` as node `<node>@<hostname>`, sending task events (-E)."""
    args = ["worker", "-Q", ",".join(queues), "-n", f"{node}@%h", "-E", "-l", loglevel.upper(),
            # Gossip has every worker follow every other's events (quadratic as orchestration scales) and
            # mingle waits for the others at start; the engine coordinates through the database instead.
            "--without-gossip", "--without-mingle"]
    if concurrency is not None:
        args += ["-c", str(concurrency)]
    return celery_command(*args)


def _run(launch: Launch, dry_run: bool) -> None:
    if dry_run:
        click.echo(f"command: {shlex.join(launch.argv)}")
        click.echo(f"environment: {' '.join(launch.env_names()) or '(no ASR_* or FLOWER_* variable set)'}")
        return
    # Buffered output would be lost: exec replaces the process without flushing Python's buffers.
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(launch.argv[0], launch.argv, launch.env)
    except OSError as exc:
        _fail(f"cannot start {launch.argv[0]}: {exc}")


def _settings_env(drop: Iterable[str] = ()) -> dict[str, str]:
    # Refused here, as one line, rather than by the program in a traceback: plain-text Redis URLs
    # without ASR_INSECURE_TRANSPORT (workflows/transport.py).
    try:
        for url in (settings.broker_url, settings.result_backend_url, settings.progress_redis_url):
            url()
    except ValueError as exc:
        _fail(f"{exc}; not started")
    env = dict(os.environ)
    for name in drop:
        env.pop(name, None)
    return env


def _redacted_database_url() -> str:
    from sqlalchemy.engine import make_url

    from models.db import database_url

    try:
        return make_url(database_url()).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - only for an error message; an unparsable URL shows as such
        return "(unparsable ASR_DATABASE_URL)"


def _prepare_database() -> None:
    """Create an empty database's schema or check that it is the one this release needs (models.schema:
    serialized between processes, so they may start in any order); an old schema is refused with the
    upgrade step to run; an unreachable database is one clear line, not a traceback."""
    import sqlalchemy.exc

    from models.db import dispose_engines, init_db
    from models.schema import SchemaOutOfDateError

    try:
        init_db()
    except SchemaOutOfDateError as exc:
        _fail(str(exc))
    except sqlalchemy.exc.SQLAlchemyError as exc:
        _fail(f"cannot prepare the database {_redacted_database_url()}: {getattr(exc, 'orig', None) or exc}")
    finally:
        # Nothing of this process's pool may outlive the exec as an open descriptor of the new program.
        dispose_engines()


# ---- workers -----------------------------------------------------------------------------------
_concurrency_option = click.option(
    "-c", "--concurrency", type=click.IntRange(1, 256), default=None,
    help="Child processes running tasks side by side (default: Celery's, the number of CPUs).")
_loglevel_option = click.option("-l", "--loglevel", type=_LOG_LEVEL, default="INFO", show_default=True,
                                help="Log level of the process.")
_dry_run_option = click.option("--dry-run", is_flag=True,
                               help="Print the command and the environment variable names; start nothing.")


@main.group(cls=_Group)
def worker():
    """Start a Celery worker of Site Recovery Engine (orchestration, a host's agent, or recovery side).

    Every worker reads ASR_BROKER_URL and ASR_DATABASE_URL (and the other ASR_* settings) from the
    environment, sends task events for Flower, and is exec'd in place of this command, so a supervisor's
    SIGTERM reaches it directly (warm shutdown: running steps finish or are handed back)."""


@worker.command("orchestration")
@_concurrency_option
@_loglevel_option
@_dry_run_option
def worker_orchestration(concurrency: int | None, loglevel: str, dry_run: bool):
    """The orchestration worker: queues `orchestration` and `recovery`.

    Runs the steps that decide (prerequisites, finalize, health, the replication scheduler's tick, the
    reconciler) and the recovery-side steps (apply logs, recovery points). Stateless: run as many as you
    like, on any machine that reaches Redis, the database and the recovery storage."""
    from workflows.engine import ORCHESTRATION_QUEUE, RECOVERY_QUEUE

    command = worker_command([ORCHESTRATION_QUEUE, RECOVERY_QUEUE], "orchestration",
                             concurrency=concurrency, loglevel=loglevel)
    if not dry_run:
        _prepare_database()
    _run(Launch(command, _settings_env()), dry_run)


@worker.command("recovery")
@_concurrency_option
@_loglevel_option
@_dry_run_option
def worker_recovery(concurrency: int | None, loglevel: str, dry_run: bool):
    """A recovery-side worker: queue `recovery` only.

    Applies shipped logs to the replicas and records recovery points, next to the recovery storage (for
    example in the recovery site's network), while orchestration runs elsewhere."""
    from workflows.engine import RECOVERY_QUEUE

    command = worker_command([RECOVERY_QUEUE], "recovery", concurrency=concurrency, loglevel=loglevel)
    if not dry_run:
        _prepare_database()
    _run(Launch(command, _settings_env()), dry_run)


@worker.command("host")
@click.argument("name")
@click.option("--key-file", "key_file", default=None, type=click.File("r"), metavar="FILE",
              help=f"A file holding the host's registration key (printed once by `asr host add`), `-` for "
                   f"standard input; default ${HOST_KEY_FILE_ENV}, else ${HOST_KEY_ENV}.")
@click.option("--key", default=None, hidden=True, expose_value=True)
@_concurrency_option
@_loglevel_option
@_dry_run_option
def worker_host(name: str, key_file: Any, key: str | None, concurrency: int | None, loglevel: str, dry_run: bool):
    """The agent of host NAME: queue `host.NAME`.

    Runs everything that touches the host's VMs and disks (snapshots, copies, sealing and shipping logs,
    creating or starting VMs after a failover), on the machine that holds the host's VM tree. It starts
    only for a registered host, with that host's registration key, and stamps when it was last seen (every
    ASR_HOST_HEARTBEAT_S; a silent host raises an alert). The worker verifies the key itself at start and at
    every heartbeat: after `asr host rekey NAME` the running agent stops consuming its queue."""
    from models.db import validate_name
    from models.fabric import host_queue

    validate_name(name, "host")
    if key is not None:
        _fail(f"--key would show the key in the process list: give it in a file (--key-file FILE, `-` for "
              f"standard input, or {HOST_KEY_FILE_ENV}) or in {HOST_KEY_ENV}")
    for host_setting in (settings.host_upload_limit, settings.tracker_spare_max):
        try:
            host_setting()  # read by the agent's steps: a bad value refused now, not mid-job
        except ValueError as exc:
            _fail(f"{exc}; not started")
    key = _host_key(key_file)
    if not key:
        _fail(f"the registration key of host {name!r} is needed: --key-file FILE (`-`: standard input), "
              f"{HOST_KEY_FILE_ENV} or {HOST_KEY_ENV}; `asr host add` printed it when the host was registered")
    # Checked before anything is written: a wrong key or name leaves the database as it was (a
    # registered host implies the tables exist, so there is nothing to prepare first).
    _admit_host(name, key, record_seen=not dry_run)
    command = worker_command([host_queue(name)], f"host-{name}", concurrency=concurrency, loglevel=loglevel)
    # The worker proves it is this host at every host step (tasks/host_identity.py), so it gets the key:
    # through a pipe, never the environment or the command line, which other processes can read.
    env = _settings_env(drop=[HOST_KEY_ENV, HOST_KEY_FILE_ENV])
    env[HOST_NAME_ENV] = name
    if not dry_run:
        env[HOST_KEY_FD_ENV] = str(_key_pipe(key))
    _run(Launch(command, env, added=(HOST_NAME_ENV, HOST_KEY_FD_ENV)), dry_run)


def _host_key(key_file: Any) -> str | None:
    """The key from --key-file, else the file ASR_HOST_KEY_FILE names, else ASR_HOST_KEY."""
    if key_file is not None:
        return key_file.read().strip() or None
    path = os.environ.get(HOST_KEY_FILE_ENV)
    if path:
        try:
            return Path(path).read_text().strip() or None
        except OSError as exc:
            _fail(f"{HOST_KEY_FILE_ENV}={path}: {exc.strerror or exc}")
    return settings.host_key()


def _key_pipe(key: str) -> int:
    """The read end of a pipe holding `key`, inherited by the program exec'd next (which reads and closes it)."""
    read_end, write_end = os.pipe()
    with os.fdopen(write_end, "w") as pipe:
        pipe.write(key)
    os.set_inheritable(read_end, True)
    return read_end


def _admit_host(name: str, key: str, *, record_seen: bool) -> None:
    """Exit 2 with a clear message unless NAME is registered, `key` is its key and its VM tree is here;
    then stamp last_seen_at (unless only checking)."""
    import sqlalchemy.exc
    from sqlmodel import select

    from models.db import clock_now, dispose_engines, session_scope
    from models.fabric import Host, verify_host_key

    _require_existing_sqlite_file(f"host {name!r} is not registered")
    try:
        with session_scope() as session:
            host = session.exec(select(Host).where(Host.name == name)).first()
            if host is None:
                _fail(f"host {name!r} is not registered in {_redacted_database_url()}: register it with "
                      f"`asr host add {name} ROOT --site SITE` and start its agent with the key it prints")
            if not verify_host_key(host, key):
                _fail(f"the key given for host {name!r} is not its registration key: the agent was not "
                      f"started (if the key is lost, `asr host rekey {name}` issues a new one)")
            if not Path(host.root).is_dir():
                _fail(f"the VM tree of host {name!r} ({host.root}) is not a directory on this machine: "
                      f"start the agent where the host's root is mounted")
            if record_seen:
                host.last_seen_at = clock_now()
                session.add(host)
    except sqlalchemy.exc.SQLAlchemyError as exc:
        _fail(f"cannot read the registered hosts from {_redacted_database_url()}: "
              f"{getattr(exc, 'orig', None) or exc}")
    finally:
        dispose_engines()


def _require_existing_sqlite_file(what: str) -> None:
    # Connecting to SQLite creates a missing file: a check that only reads must not leave one behind.
    from sqlalchemy.engine import make_url

    from models.db import database_url

    url = make_url(database_url())
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:") \
            and not Path(url.database).exists():
        _fail(f"{what}: the database {url.database} does not exist (check ASR_DATABASE_URL)")


# ---- beat, API, Flower -------------------------------------------------------------------------
@main.command("beat")
@click.option("-s", "--schedule", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where beat keeps its last-run times (default: beat-schedule in ASR_HOME, ~/.asr).")
@_loglevel_option
@_dry_run_option
def beat(schedule: Path | None, loglevel: str, dry_run: bool):
    """Celery beat: sends the reconciler (every ASR_RECONCILE_S), the replication tick and the delivery of
    alerts to the webhook (every ASR_TICK_S) to the orchestration queue.

    Run exactly one per deployment: two would only send every tick twice. Nothing is lost while it is
    down; the jobs' due times live in the database and the next tick picks them up."""
    if schedule is None:
        schedule = settings.asr_home() / "beat-schedule"
    command = celery_command("beat", "-l", loglevel.upper(), "-s", str(schedule))
    if not dry_run:
        make_private_directories(schedule.parent)  # 0700 when created here (ASR_HOME)
    _run(Launch(command, _settings_env()), dry_run)


@main.command("api")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0 in a container).")
@click.option("--port", type=_PORT, default=8000, show_default=True, help="TCP port to listen on.")
@_loglevel_option
@_dry_run_option
def api(host: str, port: int, loglevel: str, dry_run: bool):
    """The REST API (`uvicorn api.rest:app`): every operator operation over HTTPS, with API keys.

    HTTPS with ASR_TLS_CERT_FILE and ASR_TLS_KEY_FILE (`asr certs create`); plain HTTP only with
    ASR_INSECURE_TRANSPORT=1.

    Submitting an operation returns its job id at once (202); the job runs on the workers, so the API can
    be restarted or scaled without touching running jobs. Its OpenAPI document is in docs/openapi.json.
    The operator's web console is at /console/ (log in with an API key; docs/console.md).

    Behind a reverse proxy, set ASR_API_TRUSTED_PROXIES to its addresses: only then are its
    X-Forwarded-For headers believed (the failed-key limit counts per client address)."""
    command = [sys.executable, "-m", "uvicorn", "api.rest:app", "--host", host, "--port", str(port),
               "--log-level", loglevel.lower(), *_proxy_options(),
               *_https_options("the REST API", "--ssl-certfile={}", "--ssl-keyfile={}")]
    if not dry_run:
        for module, why in (("uvicorn", "uvicorn is not installed: pip install the project (pip install -e .)"),
                            ("api.rest", "api/rest.py (the REST API) is missing from this installation")):
            if importlib.util.find_spec(module) is None:
                _fail(why)
        _prepare_database()
    _run(Launch(command, _settings_env()), dry_run)


@main.command("flower")
@click.option("--port", type=_PORT, default=5555, show_default=True, help="TCP port of Flower's web UI and API.")
@click.option("--address", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0 in a container).")
@_dry_run_option
def flower(port: int, address: str, dry_run: bool):
    """Flower: live workers, tasks (readable names such as asr.replication.copy_disk) and task events.

    Authentication is always on: HTTP basic auth with the user and password from ASR_FLOWER_USER and
    ASR_FLOWER_PASSWORD (it refuses to start without them). Flower's HTTP API (/api/workers, /api/tasks,
    ...) is behind the same credentials; it is never opened to unauthenticated clients. Flower 2.2.0
    itself leaves /healthcheck and /metrics (Prometheus counters) open: publish its port with care.
    HTTPS with ASR_TLS_CERT_FILE and ASR_TLS_KEY_FILE; plain HTTP only with ASR_INSECURE_TRANSPORT=1."""
    user, password = settings.flower_credentials()
    if not user or not password:
        _fail(f"Flower runs with authentication on: set {FLOWER_USER_ENV} and {FLOWER_PASSWORD_ENV} "
              f"(HTTP basic auth for its pages and its API); not started")
    # Flower splits its basic-auth setting at ',' (several users) and each entry at the first ':'.
    if ":" in user or "," in user:
        _fail(f"{FLOWER_USER_ENV} may not contain ':' or ','")
    if "," in password:
        _fail(f"{FLOWER_PASSWORD_ENV} may not contain ','")
    # Through the environment, not --basic-auth: the command line is visible to every user of the machine.
    env = _settings_env(drop=[FLOWER_UNAUTHENTICATED_API_ENV, FLOWER_USER_ENV, FLOWER_PASSWORD_ENV])
    env[FLOWER_BASIC_AUTH_ENV] = f"{user}:{password}"
    command = celery_command("flower", f"--port={port}", f"--address={address}",
                             *_https_options("Flower", "--certfile={}", "--keyfile={}"))
    _run(Launch(command, env, added=(FLOWER_BASIC_AUTH_ENV,)), dry_run)


def _proxy_options() -> list[str]:
    """uvicorn's options for forwarded headers: believed from ASR_API_TRUSTED_PROXIES only. (uvicorn's own
    default believes any connection from 127.0.0.1, so anyone on the API's machine could pick the address
    the failed-key limit counts.)"""
    try:
        proxies = settings.api_trusted_proxies()
    except ValueError as exc:
        _fail(f"{exc}; not started")
    if not proxies:
        return ["--no-proxy-headers"]
    return ["--proxy-headers", f"--forwarded-allow-ips={','.join(proxies)}"]


def _https_options(server: str, cert_option: str, key_option: str) -> list[str]:
    """The options that make `server` serve HTTPS with ASR_TLS_CERT_FILE and ASR_TLS_KEY_FILE; without
    them, plain HTTP only when ASR_INSECURE_TRANSPORT allows it (logged), else exit 2 with what to set."""
    from workflows.transport import InsecureTransportError, check_server_transport

    try:
        certificate = settings.tls_server_certificate()
        if certificate is None:
            check_server_transport(server)
            return []
    except (InsecureTransportError, ValueError) as exc:
        _fail(f"{exc}; not started")
    cert, key = certificate
    return [cert_option.format(cert), key_option.format(key)]

