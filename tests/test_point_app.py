"""A process's Celery app pointed at one broker, another, then the first again (a test's site whose Redis
got the port an earlier site had) still sends: pointing the app away must not leave a closed connection
pool behind in kombu's process-wide registry, which hands the same pool back for an equal URL."""
from __future__ import annotations

import redis

from sites.localservices import point_app_at

SHARED_REDIS = "redis://127.0.0.1:6379"
QUEUE = "asr-test-point-app"


def test_an_app_pointed_back_at_a_broker_it_left_sends_again() -> None:
    from worker import app

    first, second = f"{SHARED_REDIS}/13", f"{SHARED_REDIS}/14"
    client = redis.Redis.from_url(first)
    client.delete(QUEUE)
    try:
        point_app_at(first)
        app.send_task("asr.point-app-probe", queue=QUEUE)
        point_app_at(second)
        point_app_at(first)
        app.send_task("asr.point-app-probe", queue=QUEUE)
        assert client.llen(QUEUE) == 2
    finally:
        client.delete(QUEUE)
        client.close()
