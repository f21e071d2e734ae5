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
    """ASR_BROKER_URL: the Redis that carries the task messages."""
    return os.environ.get("ASR_BROKER_URL", DEFAULT_BROKER_URL)


def result_backend_url() -> str:
    """ASR_RESULT_BACKEND: where Celery keeps task results (the broker's Redis by default)."""
    return os.environ.get("ASR_RESULT_BACKEND") or broker_url()


def progress_redis_url() -> str:
    """ASR_REDIS_URL: the Redis holding live job progress (the broker's by default)."""
    return os.environ.get("ASR_REDIS_URL") or broker_url()


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


def api_max_body_bytes() -> int:
    """ASR_API_MAX_BODY_BYTES: the largest request body the API reads (1 MiB); a larger one gets 413 unread."""
    return int(env_number("ASR_API_MAX_BODY_BYTES", float(1 << 20)))


def api_docs() -> bool:
    """ASR_API_DOCS: serve /docs (Swagger UI, from the installed swagger-ui-bundle, no CDN); "off" turns it off."""
    return os.environ.get("ASR_API_DOCS", "on").strip().lower() not in ("off", "0", "false", "no")


def host_key() -> str | None:
    """ASR_HOST_KEY: the registration key a host agent presents when it starts."""
    return os.environ.get("ASR_HOST_KEY") or None


def flower_credentials() -> tuple[str, str]:
    """ASR_FLOWER_USER and ASR_FLOWER_PASSWORD: Flower's basic-auth credentials."""
    return os.environ.get("ASR_FLOWER_USER", ""), os.environ.get("ASR_FLOWER_PASSWORD", "")


# ---- the database -------------------------------------------------------------------------------------
def database_url_setting() -> str | None:
    """ASR_DATABASE_URL: the engine's database (unset: a SQLite file in ASR_HOME, see models.db)."""
    return os.environ.get("ASR_DATABASE_URL") or None


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
