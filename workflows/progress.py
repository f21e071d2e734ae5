"""Live progress of running job steps, kept in Redis for dashboards and the API.

One hash per job, `asr:job:<job_id>:progress`, with one field per step holding a small JSON record.
Redis holds the live view only: the database keeps the last progress a step recorded with its heartbeat,
so losing this hash loses nothing but a few seconds of detail.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import redis

from workflows import settings

PROGRESS_TTL_S = 24 * 3600


def redis_url() -> str:
    """Where live progress goes: `ASR_REDIS_URL`, else the broker's Redis."""
    return settings.progress_redis_url()


@lru_cache(maxsize=4)
def _client(url: str) -> redis.Redis:
    # Short timeouts: a progress write must never hold up the step it reports on.
    return redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2, decode_responses=True)


def progress_key(job_id: str) -> str:
    return f"asr:job:{job_id}:progress"


def percent_of(done: int, total: int) -> float:
    if total <= 0:
        return 100.0
    return round(100.0 * min(done, total) / total, 1)


def publish_progress(
    job_id: str, step_id: str, *, name: str, done: int, total: int, updated: datetime
) -> dict[str, Any]:
    """Store one step's progress in its job's hash (which expires a day after its last update)."""
    record = {
        "step": step_id,
        "name": name,
        "done": done,
        "total": total,
        "percent": percent_of(done, total),
        "updated": updated.isoformat(),
    }
    key = progress_key(job_id)
    pipeline = _client(redis_url()).pipeline(transaction=True)
    pipeline.hset(key, step_id, json.dumps(record))
    pipeline.expire(key, PROGRESS_TTL_S)
    pipeline.execute()
    return record


def job_progress(job_id: str) -> dict[str, dict[str, Any]]:
    """The live progress of a job's steps, by step id (empty when none ran recently)."""
    fields = _client(redis_url()).hgetall(progress_key(job_id))
    return {step_id: json.loads(record) for step_id, record in fields.items()}
