"""Live progress of running job steps, kept in Redis for dashboards and the API.

One hash per job, `asr:job:<job_id>:progress`, with one field per step holding a small JSON record.
Redis holds the live view only: the database keeps the last progress a step recorded with its heartbeat,
so losing this hash loses nothing but a few seconds of detail. While Redis is away, publishing backs off
(`PublishBackoff`): a step reports progress many times a second, and each try at an unreachable Redis could
cost it the connect timeout.
"""
from __future__ import annotations

import json
import threading
import time
from datetime import datetime
from functools import lru_cache
from typing import Any

import redis

from workflows import settings, transport

PROGRESS_TTL_S = 24 * 3600


class PublishBackoff:
    """When to try a Redis that failed again: not before `first_s` after a failure, doubling with each
    failure in a row up to `longest_s`; a success forgets the failures. Thread-safe (a step's progress
    and the heartbeat thread may publish at once)."""

    def __init__(self, first_s: float = 1.0, longest_s: float = 30.0) -> None:
        self.first_s = first_s
        self.longest_s = longest_s
        self._lock = threading.Lock()
        self._failures = 0
        self._next_try = float("-inf")

    def ready(self) -> bool:
        with self._lock:
            return time.monotonic() >= self._next_try

    def failed(self) -> float:
        """Record a failure; returns how long nothing will be tried."""
        with self._lock:
            wait = min(self.first_s * 2 ** self._failures, self.longest_s)
            self._failures += 1
            self._next_try = time.monotonic() + wait
            return wait

    def succeeded(self) -> None:
        with self._lock:
            self._failures = 0
            self._next_try = float("-inf")


_backoffs: dict[str, PublishBackoff] = {}
_backoffs_lock = threading.Lock()


def _backoff(url: str) -> PublishBackoff:
    with _backoffs_lock:
        return _backoffs.setdefault(url, PublishBackoff())


def redis_url() -> str:
    """Where live progress goes: `ASR_REDIS_URL`, else the broker's Redis."""
    return settings.progress_redis_url()


@lru_cache(maxsize=4)
def _client(url: str) -> redis.Redis:
    # Short timeouts: a progress write must never hold up the step it reports on.
    return redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2, decode_responses=True,
                                **transport.redis_client_options(url))


def progress_key(job_id: str) -> str:
    return f"asr:job:{job_id}:progress"


def percent_of(done: int, total: int) -> float:
    if total <= 0:
        return 100.0
    return round(100.0 * min(done, total) / total, 1)


def publish_progress(
    job_id: str, step_id: str, *, name: str, done: int, total: int, updated: datetime
) -> dict[str, Any] | None:
    """Store one step's progress in its job's hash (which expires a day after its last update). None when
    not even tried: Redis failed recently and is being given time (`PublishBackoff`); a failure now raises
    the Redis error (and starts or lengthens that wait)."""
    record = {
        "step": step_id,
        "name": name,
        "done": done,
        "total": total,
        "percent": percent_of(done, total),
        "updated": updated.isoformat(),
    }
    key, url = progress_key(job_id), redis_url()
    backoff = _backoff(url)
    if not backoff.ready():
        return None
    pipeline = _client(url).pipeline(transaction=True)
    pipeline.hset(key, step_id, json.dumps(record))
    pipeline.expire(key, PROGRESS_TTL_S)
    try:
        pipeline.execute()
    except redis.RedisError:
        backoff.failed()
        raise
    backoff.succeeded()
    return record


def job_progress(job_id: str) -> dict[str, dict[str, Any]]:
    """The live progress of a job's steps, by step id (empty when none ran recently)."""
    fields = _client(redis_url()).hgetall(progress_key(job_id))
    return {step_id: json.loads(record) for step_id, record in fields.items()}
