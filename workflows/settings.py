"""Every `ASR_*` setting of the engine and its workers, read from the environment when asked, never at import.

Reading at call time lets one process (a test, the demo, a benchmark) point the engine at another
deployment by changing its environment, and a bad value is one ValueError naming the variable. Each
setting is a function; its default and its reason are written beside it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"


def env_number(name: str, default: float, *, minimum: float | None = None) -> float:
    """The number in environment variable `name`, or `default` when it is unset.

    Without `minimum` the value must be above zero; with it, at least `minimum`. A bad value is a
    ValueError naming the variable, raised at start-up rather than mid-job."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None
    if minimum is None and value <= 0:
        raise ValueError(f"{name}={raw!r} must be a positive number")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}={raw!r} must be at least {minimum:g}")
    return value


# ---- broker and workers ------------------------------------------------------------------------------
def broker_url() -> str:
    """ASR_BROKER_URL: the Redis that carries the task messages; rediss:// (TLS), or redis:// only with
    ASR_INSECURE_TRANSPORT=1 (workflows/transport.py). A URL naming a user without a password
    (rediss://asr-host-h1@redis:6379/0) takes it from ASR_BROKER_PASSWORD_FILE."""
    from workflows.transport import check_redis_url

    return check_redis_url("ASR_BROKER_URL", _redis_url("ASR_BROKER_URL", DEFAULT_BROKER_URL))


def result_backend_url() -> str:
    """ASR_RESULT_BACKEND: where Celery keeps task results (the broker's Redis by default)."""
    from workflows.transport import check_redis_url

    return check_redis_url("ASR_RESULT_BACKEND", _redis_url("ASR_RESULT_BACKEND", None) or broker_url())


def progress_redis_url() -> str:
    """ASR_REDIS_URL: the Redis holding live job progress (the broker's by default)."""
    from workflows.transport import check_redis_url

    return check_redis_url("ASR_REDIS_URL", _redis_url("ASR_REDIS_URL", None) or broker_url())


def _redis_url(name: str, default: str | None) -> str | None:
    raw = os.environ.get(name) or default
    return with_password_from_file(name, raw, "ASR_BROKER_PASSWORD_FILE") if raw else raw


def with_password_from_file(name: str, url: str, file_setting: str) -> str:
    """`url` (setting `name`) with the password held by the file `file_setting` names, when that is set and
    the URL names a user without a password: the password then lives in a file only its process can read (a
    compose secret, a 0600 file), not in the environment or a command line. Otherwise the URL as it is (a
    user may need no password: PostgreSQL's trust or certificate authentication, a Redis `nopass` user)."""
    from urllib.parse import quote, urlsplit, urlunsplit

    raw = os.environ.get(file_setting, "").strip()
    parts = urlsplit(url)
    if not raw or not parts.username or parts.password is not None:
        return url
    try:
        password = Path(raw).expanduser().read_text().strip()
    except OSError as exc:
        raise ValueError(f"{file_setting}={raw!r}: cannot read the password: {exc.strerror or exc}") from None
    if not password:
        raise ValueError(f"{file_setting}={raw!r} is empty")
    user_and_host = parts.netloc.rpartition("@")
    netloc = f"{user_and_host[0]}:{quote(password, safe='')}@{user_and_host[2]}"
    return urlunsplit(parts._replace(netloc=netloc))


def visibility_timeout_s() -> int:
    """ASR_VISIBILITY_TIMEOUT: longer than the longest task, or a copy still running is delivered again."""
    return int(env_number("ASR_VISIBILITY_TIMEOUT", 6 * 3600.0))


def reconcile_interval_s() -> float:
    """ASR_RECONCILE_S: how often beat sends the reconciler."""
    return env_number("ASR_RECONCILE_S", 15.0)


def tick_interval_s() -> float:
    """ASR_TICK_S: how often beat sends the replication scheduler's tick."""
    return env_number("ASR_TICK_S", 5.0)


def time_scale() -> float:
    """ASR_TIME_SCALE: divides every engine delay (retry schedules, copy frequencies, RPO thresholds), so a
    test can run a 1-2-4-8-10-30 minute back-off in seconds."""
    return env_number("ASR_TIME_SCALE", 1.0)


def action_modules() -> list[str]:
    """ASR_ACTION_MODULES: extra modules (comma-separated) registering actions and job kinds of their own."""
    return [name.strip() for name in os.environ.get("ASR_ACTION_MODULES", "").split(",") if name.strip()]


def asr_home() -> Path:
    """ASR_HOME: the folder of this user's engine files (default database, beat schedule)."""
    return Path(os.environ.get("ASR_HOME") or Path.home() / ".asr")


# ---- the API, the host agents and Flower --------------------------------------------------------------
def api_key_hashes() -> str:
    """ASR_API_KEY_HASHES: hashes of API keys given by the environment (comma-separated), beside the database's."""
    return os.environ.get("ASR_API_KEY_HASHES", "")


def api_key_cache_s() -> float:
    """ASR_API_KEY_CACHE_S: how long the API trusts a key it has checked (30 s; 0 checks every request)."""
    return env_number("ASR_API_KEY_CACHE_S", 30.0, minimum=0.0)


def api_key_negative_cache_s() -> float:
    """ASR_API_KEY_NEGATIVE_CACHE_S: how long the API remembers a key it found invalid (5 s; 0: never)."""
    return env_number("ASR_API_KEY_NEGATIVE_CACHE_S", 5.0, minimum=0.0)


def api_auth_failures() -> int:
    """ASR_API_AUTH_FAILURES: failed key checks a client (IP address) may make per window before it gets 429
    (10); its keys are then not checked at all until the window has passed."""
    return int(env_number("ASR_API_AUTH_FAILURES", 10.0, minimum=1.0))


def api_auth_window_s() -> float:
    """ASR_API_AUTH_WINDOW_S: the window of ASR_API_AUTH_FAILURES (60 s)."""
    return env_number("ASR_API_AUTH_WINDOW_S", 60.0)


def api_trusted_proxies() -> list[str]:
    """ASR_API_TRUSTED_PROXIES: the reverse proxies in front of the API (IP addresses or networks such as
    10.0.0.0/24, comma-separated) whose X-Forwarded-For and X-Forwarded-Proto headers it believes. Unset (the
    default), it believes no one: the client is the connection's peer, so a client cannot pick the address
    that the failed-key limit (ASR_API_AUTH_FAILURES) counts against by sending those headers. `*` is refused:
    behind a proxy, list it; a client that can reach the API's port directly would otherwise be believed too."""
    import ipaddress

    raw = os.environ.get("ASR_API_TRUSTED_PROXIES", "")
    proxies = [entry.strip() for entry in raw.split(",") if entry.strip()]
    for entry in proxies:
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise ValueError(f"ASR_API_TRUSTED_PROXIES={raw!r}: {entry!r} is not an IP address or network "
                             f"(list the proxies' addresses, e.g. 10.0.0.5,10.0.1.0/24)") from None
    return proxies


def api_max_body_bytes() -> int:
    """ASR_API_MAX_BODY_BYTES: the largest request body the API reads (1 MiB); a larger one gets 413 unread."""
    return int(env_number("ASR_API_MAX_BODY_BYTES", float(1 << 20)))


def api_docs() -> bool:
    """ASR_API_DOCS: serve /docs (Swagger UI, from the installed swagger-ui-bundle, no CDN); "off" turns it off."""
    return os.environ.get("ASR_API_DOCS", "on").strip().lower() not in ("off", "0", "false", "no")


def console_session_s() -> float:
    """ASR_CONSOLE_SESSION_S: how long a web console session lasts without a request (3600 s); each request
    renews it, up to ASR_CONSOLE_SESSION_MAX_S after the login."""
    return env_number("ASR_CONSOLE_SESSION_S", 3600.0)


def console_session_max_s() -> float:
    """ASR_CONSOLE_SESSION_MAX_S: the longest a web console session lasts after its login (12 h), however busy."""
    return env_number("ASR_CONSOLE_SESSION_MAX_S", 12 * 3600.0)


def worker_remote_control() -> str:
    """ASR_WORKER_REMOTE_CONTROL: what a worker answers on the broker's broadcast channel. `off` (default):
    nothing at all (Flower then knows the worker from its events: its tasks and counters, not its queues or
    pool). `inspect`: only read-only questions (ping, stats, active and registered tasks, the queues it
    consumes), which Flower's worker pages show; never a command (shutdown, add_consumer, revoke, pool changes).
    Anyone who reaches Redis can broadcast: it has no authentication."""
    # `off` is safe with every process busy: the broker watchdog (tasks/broker_watchdog.py) notices a lost
    # connection that the broadcast subscription used to be the only one to see.
    value = os.environ.get("ASR_WORKER_REMOTE_CONTROL", "off").strip().lower()
    if value not in ("inspect", "off"):
        raise ValueError(f"ASR_WORKER_REMOTE_CONTROL={value!r} must be 'inspect' or 'off'")
    return value


def host_key() -> str | None:
    """ASR_HOST_KEY: the registration key a host agent presents when it starts."""
    return os.environ.get("ASR_HOST_KEY") or None


def host_agent_name() -> str | None:
    """ASR_HOST_NAME: the host whose agent this process is (`asr worker host NAME` sets it); None for every
    other process."""
    return os.environ.get("ASR_HOST_NAME") or None


def host_upload_limit() -> int | None:
    """ASR_HOST_UPLOAD_LIMIT: the most bytes per second a host agent sends to the recovery storage, all its
    processes together (disk copies, resyncs, shipped logs), as a number with an optional K, M or G suffix
    (binary: 8M is 8 MiB/s); unset or 0: no limit. As Azure Site Recovery's agent throttling, it keeps a
    host's uplink usable for its own work while an initial copy runs."""
    return _env_bytes("ASR_HOST_UPLOAD_LIMIT", 0, "a number of bytes per second (like 8M)") or None


def tracker_spare_max() -> int:
    """ASR_TRACKER_SPARE_MAX: the most of an acknowledged replication log's storage a host keeps per disk for
    the next log to be written over (datapath/tracker.py, SPARE_MAX_BYTES: 256M), K, M or G suffixes; 0 keeps
    none. Space for speed, as a database recycles its write-ahead log: a log written over kept storage costs
    the host less than one allocating as it grows (docs/operations.md, "What it costs")."""
    from datapath.tracker import SPARE_MAX_BYTES

    return _env_bytes("ASR_TRACKER_SPARE_MAX", SPARE_MAX_BYTES, "a size in bytes (like 256M or 1G)")


def _env_bytes(name: str, default: int, what: str) -> int:
    """A byte count in environment variable `name`: a number with an optional K, M or G suffix (binary),
    from 0 to 1P; `default` when unset or blank. A bad value is a ValueError naming the variable."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    number, unit = (raw[:-1], raw[-1].upper()) if raw[-1].upper() in "KMG" else (raw, "")
    try:
        value = float(number) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[unit]
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not {what}") from None
    if not 0 <= value < 1 << 50:  # also refuses nan and inf
        raise ValueError(f"{name}={raw!r} must be from 0 to 1P")
    return int(value)


def flower_credentials() -> tuple[str, str]:
    """ASR_FLOWER_USER and ASR_FLOWER_PASSWORD: Flower's basic-auth credentials."""
    return os.environ.get("ASR_FLOWER_USER", ""), os.environ.get("ASR_FLOWER_PASSWORD", "")


# ---- transport security (TLS) -------------------------------------------------------------------------
def _file_setting(name: str) -> Path | None:
    raw = os.environ.get(name)
    if not raw:
        return None
    path = Path(raw)
    if not path.is_file():
        raise ValueError(f"{name}={raw!r} is not a readable file")
    return path


def insecure_transport() -> bool:
    """ASR_INSECURE_TRANSPORT: "1" allows plain-text connections (redis://, http:// storage endpoints,
    PostgreSQL without sslmode=verify-full), each logged as a WARNING once per process. Unset: refused."""
    return os.environ.get("ASR_INSECURE_TRANSPORT", "").strip().lower() in ("1", "true", "yes", "on")


def tls_ca_file() -> Path | None:
    """ASR_TLS_CA_FILE: the CA (PEM) clients verify Redis, the API, Flower, Azurite and PostgreSQL with
    (`asr certs create` makes one); unset: the system's CAs."""
    return _file_setting("ASR_TLS_CA_FILE")


def tls_server_certificate() -> tuple[Path, Path] | None:
    """ASR_TLS_CERT_FILE and ASR_TLS_KEY_FILE: the certificate and key `asr api` and `asr flower` serve
    HTTPS with (both or neither)."""
    return _file_pair("ASR_TLS_CERT_FILE", "ASR_TLS_KEY_FILE")


def tls_client_certificate() -> tuple[Path, Path] | None:
    """ASR_TLS_CLIENT_CERT_FILE and ASR_TLS_CLIENT_KEY_FILE: the certificate and key presented to Redis
    (mutual TLS, for a Redis started with --tls-auth-clients yes); both or neither."""
    return _file_pair("ASR_TLS_CLIENT_CERT_FILE", "ASR_TLS_CLIENT_KEY_FILE")


def _file_pair(cert_name: str, key_name: str) -> tuple[Path, Path] | None:
    cert, key = _file_setting(cert_name), _file_setting(key_name)
    if (cert is None) != (key is None):
        raise ValueError(f"{cert_name} and {key_name} go together: set both or neither")
    return None if cert is None or key is None else (cert, key)


# ---- recovery storage ---------------------------------------------------------------------------------
def storage_roots() -> list[str]:
    """ASR_STORAGE_ROOTS: the folders (absolute, separated by ':') file:// recovery storage may be inside. Unset:
    none, so no local recovery storage (sites/storage/policy.py). The API and every worker need the same."""
    return [root for root in os.environ.get("ASR_STORAGE_ROOTS", "").split(":") if root.strip()]


def storage_account_urls() -> list[str]:
    """ASR_STORAGE_ACCOUNT_URLS: the https:// storage account addresses (comma-separated) an item's account_url
    may name; unset: none (the workers would send signed requests to whatever address a request gave)."""
    return [url.strip() for url in os.environ.get("ASR_STORAGE_ACCOUNT_URLS", "").split(",") if url.strip()]


# ---- recovery plans' scripts -------------------------------------------------------------------------
def plan_scripts_dir() -> Path | None:
    """ASR_PLAN_SCRIPTS_DIR: the folder of the scripts recovery plans may run (its `scripts.toml` declares
    them and their arguments; sites/planscripts.py). Unset: no script is registered, and a plan with a script
    action is refused. The API (checking plans) and the orchestration workers (running them) need the same."""
    raw = os.environ.get("ASR_PLAN_SCRIPTS_DIR")
    return Path(raw) if raw else None


def plan_script_user() -> str:
    """ASR_PLAN_SCRIPT_USER: whom a plan's script runs as when its worker runs as root (`nobody`): never as
    root, whose files include the database and the storage credentials."""
    return os.environ.get("ASR_PLAN_SCRIPT_USER") or "nobody"


def plan_script_output_bytes() -> int:
    """ASR_PLAN_SCRIPT_OUTPUT_BYTES: how much of a script's output (its last bytes) the job record keeps (4 KiB):
    enough to see why it failed; a script cannot fill the database."""
    return int(env_number("ASR_PLAN_SCRIPT_OUTPUT_BYTES", 4096.0, minimum=64.0))


# ---- the database -------------------------------------------------------------------------------------
def database_url_setting() -> str | None:
    """ASR_DATABASE_URL: the engine's database (unset: a SQLite file in ASR_HOME, see models.db). A URL naming
    a role without a password (postgresql://asr_host_h1@db/asr) takes it from ASR_DATABASE_PASSWORD_FILE."""
    raw = os.environ.get("ASR_DATABASE_URL") or None
    return with_password_from_file("ASR_DATABASE_URL", raw, "ASR_DATABASE_PASSWORD_FILE") if raw else None


def sqlite_busy_timeout_s() -> float:
    """ASR_SQLITE_BUSY_TIMEOUT_S: how long a SQLite writer waits for another process's transaction before
    giving up with "database is locked": long enough for any of our short transactions, short enough that
    a stuck writer is reported."""
    return env_number("ASR_SQLITE_BUSY_TIMEOUT_S", 30.0)


# ---- the job engine ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class EngineSettings:
    heartbeat_s: float  # how often a running step proves it is alive
    stale_after_s: float  # a heartbeat older than this means the worker vanished
    max_step_deaths: int  # a step whose worker died this many times fails as a poison message
    queued_stall_s: float  # a message queued this long without a claim is presumed lost

    @classmethod
    def from_env(cls) -> EngineSettings:
        """ASR_HEARTBEAT_S (10), ASR_STALE_AFTER_S (3 heartbeats), ASR_MAX_STEP_DEATHS (3),
        ASR_QUEUED_STALL_S (600)."""
        heartbeat_s = env_number("ASR_HEARTBEAT_S", 10.0, minimum=0.05)
        return cls(
            heartbeat_s=heartbeat_s,
            stale_after_s=env_number("ASR_STALE_AFTER_S", 3 * heartbeat_s, minimum=heartbeat_s),
            max_step_deaths=int(env_number("ASR_MAX_STEP_DEATHS", 3, minimum=1)),
            queued_stall_s=env_number("ASR_QUEUED_STALL_S", 600.0, minimum=1.0),
        )


# ---- encryption of the recovery storage ---------------------------------------------------------------
def storage_encryption() -> bool:
    """ASR_STORAGE_ENCRYPTION: "on" (default) encrypts everything the engine stores in the recovery storage
    (sites/storage/encrypted.py); "off" stores it in clear, which is insecure and logged as such by every
    process that opens the storage. Anything else is refused, so a typo never turns encryption off."""
    raw = os.environ.get("ASR_STORAGE_ENCRYPTION", "on").strip().lower()
    if raw in ("on", "1", "true", "yes"):
        return True
    if raw in ("off", "0", "false", "no"):
        return False
    raise ValueError(f"ASR_STORAGE_ENCRYPTION={raw!r} must be 'on' or 'off'")


def storage_kek_file() -> Path | None:
    """ASR_STORAGE_KEK_FILE: the file holding the deployment's key-encryption key (`asr keys create` writes
    one, mode 0600). Every process that opens the recovery storage needs it; it is never stored in the
    database or the storage."""
    raw = os.environ.get("ASR_STORAGE_KEK_FILE", "").strip()
    return Path(raw).expanduser() if raw else None


def storage_kek() -> str | None:
    """ASR_STORAGE_KEK: the key-encryption key itself (base64 of 32 bytes), for platforms that hand secrets
    over in the environment; use ASR_STORAGE_KEK_FILE otherwise (never both)."""
    return os.environ.get("ASR_STORAGE_KEK", "").strip() or None


# ---- alerts ---------------------------------------------------------------------------------------------
ALERT_SECRET_MIN_BYTES = 16


def alert_webhook_url() -> str | None:
    """ASR_ALERT_WEBHOOK_URL: where alerts are POSTed (workflows/webhook.py); https, or http only with
    ASR_INSECURE_TRANSPORT=1. Unset: alerts are recorded (`asr alerts list`) and not sent."""
    from workflows.transport import check_http_url

    raw = os.environ.get("ASR_ALERT_WEBHOOK_URL", "").strip()
    return check_http_url("ASR_ALERT_WEBHOOK_URL", raw) if raw else None


def alert_webhook_secret() -> bytes:
    """ASR_ALERT_WEBHOOK_SECRET_FILE: the file holding the secret that signs each alert (HMAC-SHA256), shared
    with the receiver; required with a webhook (an unsigned alert could be forged by anyone who can reach the
    receiver). Only the orchestration workers that send alerts need it."""
    raw = os.environ.get("ASR_ALERT_WEBHOOK_SECRET_FILE", "").strip()
    if not raw:
        raise ValueError("ASR_ALERT_WEBHOOK_SECRET_FILE is not set: a webhook needs a secret to sign its alerts "
                         "(e.g. `head -c 32 /dev/urandom | base64 > FILE`, given to the receiver too)")
    try:
        secret = Path(raw).expanduser().read_bytes().strip()
    except OSError as exc:
        raise ValueError(f"ASR_ALERT_WEBHOOK_SECRET_FILE={raw}: {exc.strerror or exc}") from None
    if len(secret) < ALERT_SECRET_MIN_BYTES:
        raise ValueError(f"ASR_ALERT_WEBHOOK_SECRET_FILE={raw}: the secret has {len(secret)} bytes, fewer than "
                         f"{ALERT_SECRET_MIN_BYTES}")
    return secret


def alert_host_silent_s() -> float:
    """ASR_ALERT_HOST_SILENT_S: a host agent not heard from for this long raises host_silent (default 300 s:
    five missed heartbeats)."""
    return env_number("ASR_ALERT_HOST_SILENT_S", 300.0)


def host_heartbeat_s() -> float:
    """ASR_HOST_HEARTBEAT_S: how often a host agent stamps its host's last_seen_at (default 60 s)."""
    return env_number("ASR_HOST_HEARTBEAT_S", 60.0)
