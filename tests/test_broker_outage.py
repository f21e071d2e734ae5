"""Workers and the engine across broker outages, with real parts: a private redis-server stopped and started
again on its port and append-only file, real Celery worker and beat processes, SQLite, and (for the copy)
a host tree on disk and a local recovery directory.

A worker whose Redis goes away keeps running its task, reconnects by itself and goes on serving; a long
copy rides out three Redis restarts without a death; a step whose worker is lost during an outage is
counted as interrupted, not dead, so outages never poison it; live progress backs off while Redis is away.
Every wait is bounded.
"""
from __future__ import annotations

import base64
import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
from engine_actions import read_records
from engine_harness import ACTION_MODULES
from recovery_site import RecoverySite

from sites.deployment import Deployment
from sites.localservices import AzuriteProcess, RedisServer, wait_until
from workflows import clock, progress
from workflows.engine import StepSpec, get_job, start_job

pytestmark = pytest.mark.slow

ENGINE_SETTINGS = {
    "ASR_TIME_SCALE": "600",
    "ASR_HEARTBEAT_S": "1",
    "ASR_STALE_AFTER_S": "3",
    "ASR_RECONCILE_S": "0.25",
    "ASR_MAX_STEP_DEATHS": "3",
    "ASR_QUEUED_STALL_S": "600",
}
FINISHED = {"succeeded", "failed", "cancelled"}
MIB = 1024 * 1024


def deployment(workdir: Path, workers: dict[str, tuple[list[str], int]]) -> Deployment:
    return Deployment(workdir, workers=workers, settings=ENGINE_SETTINGS,
                      worker_settings={"ASR_ACTION_MODULES": ACTION_MODULES})


def count_job(tmp_path: Path, queue: str, *, total: int, seconds_per_item: float) -> str:
    """A job of one resumable step appending 0..total-1 to items.txt (a killed run resumes where it was)."""
    return start_job("test.enable_protection", lock_key=f"item:{uuid.uuid4()}", stages=[[StepSpec(
        "Copy disk disk0", "test.count", queue,
        {"output": str(tmp_path / "items.txt"), "runs": str(tmp_path / "runs.log"), "total": total,
         "seconds_per_item": seconds_per_item})]])


def items_done(tmp_path: Path) -> int:
    output = tmp_path / "items.txt"
    return len(output.read_text().splitlines()) if output.exists() else 0


def wait_for_job(job_id: str, *, timeout: float, logs: Deployment) -> dict[str, Any]:
    try:
        return wait_until(lambda: (job := get_job(job_id))["state"] in FINISHED and job, timeout=timeout,
                          what=f"job {job_id} to finish")
    except AssertionError as timed_out:
        raise AssertionError(f"{timed_out}; the job is now {get_job(job_id)}\n{logs.log_tails(4000)}") from None


def unacked_messages(server: RedisServer, queue: str) -> list[str]:
    """The ids of the tasks of `queue` delivered and not acknowledged (kombu's hash `unacked`: delivery tag
    -> [message, exchange, routing key])."""
    client = server.client()
    try:
        entries = [json.loads(entry) for entry in client.hvals("unacked")]
    finally:
        client.close()
    return [message["headers"]["id"] for message, _exchange, routing_key in entries if routing_key == queue]


def waiting_messages(server: RedisServer, queue: str) -> int:
    """How many messages wait in `queue` (kombu's list named after it)."""
    client = server.client()
    try:
        return client.llen(queue)
    finally:
        client.close()


def worker_heartbeat(server: RedisServer, node_prefix: str, *, timeout: float) -> None:
    """Return as soon as a worker-heartbeat event of a node named `node_prefix`... is published on `server`
    (Celery's events travel as Redis pub/sub messages)."""
    client = server.client()
    subscription = client.pubsub(ignore_subscribe_messages=True)
    try:
        subscription.psubscribe("*celeryev/worker.heartbeat")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = subscription.get_message(timeout=0.1)
            if message and f'"hostname": "{node_prefix}'.encode() in base64_body(message["data"]):
                return
        raise AssertionError(f"no worker-heartbeat event of {node_prefix}* within {timeout:g} s")
    finally:
        subscription.close()
        client.close()


def base64_body(data: bytes) -> bytes:
    """The body of a kombu message as published on Redis (JSON, its body base64-encoded)."""
    return base64.b64decode(json.loads(data)["body"])


def restart(server: RedisServer, *, down_s: float) -> None:
    """Stop the deployment's redis-server, leave it down `down_s`, start it again on the same port."""
    server.stop()
    time.sleep(down_s)
    server.start()


# ---- a worker rides out a Redis restart -----------------------------------------------------------------
def test_a_worker_whose_redis_restarts_keeps_running_its_task_and_serves_the_next_one(tmp_path: Path) -> None:
    with deployment(tmp_path / "deployment", {"busy": (["orchestration", "host.busy"], 2)}) as site:
        worker = site.workers["busy"]
        job_id = count_job(tmp_path, "host.busy", total=40, seconds_per_item=0.1)
        wait_until(lambda: items_done(tmp_path) >= 5, timeout=20, what="the step to get going")
        log_at_restart = len(worker.log())

        restart(site.redis, down_s=1.0)

        job = wait_for_job(job_id, timeout=40, logs=site)
        step = job["steps"][0]
        assert (job["state"], step["attempts"], step["deaths"]) == ("succeeded", 1, 0), job
        assert len(read_records(tmp_path / "runs.log")) == 1, "the step ran again across the Redis restart"
        # The same worker process, never restarted, takes the next task.
        later = start_job("test.enable_protection", lock_key=f"item:{uuid.uuid4()}", stages=[[StepSpec(
            "Prerequisites check", "test.record", "host.busy",
            {"log": str(tmp_path / "later.log"), "label": "later"})]])
        assert wait_for_job(later, timeout=20, logs=site)["state"] == "succeeded"
        assert worker.process.poll() is None, site.log_tails(4000)
        log = worker.log()[log_at_restart:]
        assert "Connection to broker lost" in log, "Redis went away without the worker noticing: nothing was tested"
        assert "Unrecoverable error" not in log, log
        # It came through the outage: a later death of this run would have been a death.
        assert (step["interruptions"], step["broker_lost_at"]) == (0, None), step
        # Its message was acknowledged after the reconnect, on the channel the outage closed: nothing is
        # left for Redis to hand out again when the visibility timeout runs out.
        # (A task's message is acknowledged just after its step is recorded: waited for, bounded.)
        wait_until(lambda: not unacked_messages(site.redis, "host.busy"), timeout=10,
                   what="no message of the host's queue to be left unacknowledged")


# ---- a worker whose only process is busy when Redis restarts --------------------------------------------
def test_a_busy_worker_without_remote_control_takes_the_next_message_after_redis_restarts(tmp_path: Path) -> None:
    # One process, busy with a step, and no broadcast subscription (remote control off): while the step runs
    # the worker reads nothing from Redis, so its event loop watches no broker socket that Redis dying would
    # close. The step ends while Redis is down: its acknowledgement fails, kombu still counts the message as
    # unacknowledged, and with a prefetch of one the consumer never asks Redis for another (it waited so
    # forever). The broker watchdog (tasks/broker_watchdog.py) sees the connection lost and has Celery restart
    # the consumer, whose new channel takes the next step's message, kept through the restart by Redis's
    # append-only file.
    with deployment(tmp_path / "deployment", {"orchestration": (["orchestration"], 1)}) as site:
        worker = site.add_worker("busy", ["host.busy"], env={**site.env, "ASR_WORKER_REMOTE_CONTROL": "off"})
        gate, log = tmp_path / "gate", tmp_path / "gated.log"
        first_job = start_job("test.enable_protection", lock_key=f"item:{uuid.uuid4()}", stages=[[StepSpec(
            "Copy disk disk0", "test.until_file", "host.busy", {"log": str(log), "gate": str(gate)})]])
        wait_until(lambda: read_records(log), timeout=20, what="the first step to start")
        second_log = tmp_path / "second.log"
        second_job = start_job("test.enable_protection", lock_key=f"item:{uuid.uuid4()}", stages=[[StepSpec(
            "Prerequisites check", "test.record", "host.busy", {"log": str(second_log), "label": "second"})]])
        wait_until(lambda: waiting_messages(site.redis, "host.busy") == 1, timeout=10,
                   what="the second step's message to wait in Redis")

        # Just after one of the worker's heartbeat events, so that its next one (2 s on, and blocking the
        # worker's loop while Redis is away) comes after the step's end and acknowledgement.
        worker_heartbeat(site.redis, "busy@", timeout=10)
        site.redis.kill()
        gate.touch()
        wait_until(lambda: "asr.test.until_file[" in worker.log() and "succeeded in" in worker.log(), timeout=10,
                   what="the first step's task to end while Redis is down")
        time.sleep(0.5)  # its acknowledgement fails meanwhile
        site.redis.start()

        assert wait_for_job(first_job, timeout=20, logs=site)["state"] == "succeeded"
        assert wait_for_job(second_job, timeout=20, logs=site)["state"] == "succeeded"
        assert [record["label"] for record in read_records(second_log)] == ["second"]
        assert worker.process.poll() is None, site.log_tails(4000)
        assert "Connection to broker lost" in worker.log() and "Unrecoverable error" not in worker.log()


# ---- a long copy rides out three Redis restarts --------------------------------------------------------
@pytest.mark.azure
def test_three_redis_restarts_during_a_long_copy_do_not_poison_it(tmp_path: Path, azurite: AzuriteProcess) -> None:
    copy = "Copy disk disk0"
    size = 96 * MIB
    # Long enough a copy for three restarts: the host's uplink limited to 4 MiB/s makes it about 24 s. Two
    # processes on the host: with a free one its agent keeps reading its queue while the copy runs, so each
    # restart breaks a connection it is using.
    with RecoverySite(tmp_path, backend="azure", azurite=azurite, appendonly=True, host_concurrency=2,
                      env={"ASR_MAX_STEP_DEATHS": "3", "ASR_HOST_UPLOAD_LIMIT": "4M"},
                      policy_options={"copy_frequency_s": 900}) as site:
        vm_id = site.create_vm("host1", "app01", [("disk0", size, "vhd")], fill=1.0, seed=31)
        host_worker = site.workers["host-host1"]
        job_id = site.protect(vm_id)

        def copy_step() -> dict[str, Any]:
            return next(step for step in get_job(job_id)["steps"] if step["name"] == copy)

        for restart_no in range(1, 4):
            done_before = copy_step()["progress_done"]

            def copying_further(done_before: int = done_before) -> bool:
                step = copy_step()
                return step["state"] == "running" and done_before < step["progress_done"] < size

            try:
                wait_until(copying_further, timeout=60, interval=0.1,
                           what=f"the copy to make progress before Redis restart {restart_no}")
            except AssertionError as timed_out:
                raise AssertionError(f"{timed_out}: {copy_step()}\n{site.log_tails()}") from None
            restart(site.redis, down_s=0.5)
            # Reconnected before the next restart: else two restarts are one outage to the worker.
            wait_until(lambda restart_no=restart_no: host_worker.log().count("Connected to") > restart_no,
                       timeout=20, what=f"the host worker to reconnect after Redis restart {restart_no}")

        job = site.wait_job(job_id, timeout=180)
        step = next(step for step in job["steps"] if step["name"] == copy)
        assert (step["state"], step["attempts"], step["deaths"], step["interruptions"]) == ("succeeded", 1, 0, 0), step
        assert host_worker.process.poll() is None, site.log_tails()
        assert host_worker.log().count("Connection to broker lost") >= 3, "fewer outages than meant: nothing was tested"
        item = site.item(vm_id)
        assert (item["state"], item["health"]) == ("protected", "Healthy"), item
        site.final_cycle(vm_id)
        site.verify_replica(vm_id)


# ---- a step whose worker is lost during an outage ----------------------------------------------------------
def test_a_step_whose_worker_is_lost_during_each_of_three_outages_is_interrupted_not_poisoned(tmp_path: Path) -> None:
    # The reconciler runs on a worker of its own; the step's worker is killed while Redis is down (as when a
    # supervisor restarts workers during an outage), three times: with ASR_MAX_STEP_DEATHS 3 those would be a
    # poison message's three deaths.
    with deployment(tmp_path / "deployment", {"orchestration": (["orchestration"], 1)}) as site:
        site.add_worker("busy", ["host.busy"])
        job_id = count_job(tmp_path, "host.busy", total=200, seconds_per_item=0.05)
        for outage in range(1, 4):
            done_before = items_done(tmp_path)
            wait_until(lambda done_before=done_before: items_done(tmp_path) >= done_before + 3, timeout=30,
                       what=f"the step to make progress before outage {outage}")
            site.redis.stop()
            wait_until(lambda: get_job(job_id)["steps"][0].get("broker_lost_at"), timeout=10,
                       what=f"the worker to mark its step at outage {outage}")
            site.stop_process("busy", kill=True)
            site.redis.start()
            step = wait_until(lambda: (s := get_job(job_id)["steps"][0])["state"] == "queued" and s, timeout=20,
                              what=f"the reconciler to queue the step again after outage {outage}")
            assert (step["deaths"], step["interruptions"]) == (0, outage), step
            site.add_worker("busy", ["host.busy"])

        job = wait_for_job(job_id, timeout=60, logs=site)
        step = job["steps"][0]
        assert (job["state"], step["attempts"], step["deaths"], step["interruptions"]) == ("succeeded", 4, 0, 3), job
        assert step["broker_lost_at"] is None, step
        assert (tmp_path / "items.txt").read_text().splitlines() == [str(item) for item in range(200)]


# ---- live progress while Redis is away ------------------------------------------------------------------
def test_progress_publishing_backs_off_while_redis_is_away_and_resumes_when_it_is_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = RedisServer(tmp_path / "redis").start()
    try:
        monkeypatch.setenv("ASR_REDIS_URL", server.url)
        job_id, step_id = str(uuid.uuid4()), str(uuid.uuid4())

        def publish(done: int) -> dict[str, Any] | None:
            return progress.publish_progress(job_id, step_id, name="Copy disk disk0", done=done, total=10,
                                             updated=clock.now())

        assert publish(1) is not None
        server.stop()
        with pytest.raises(redis.RedisError):
            publish(2)
        # Backing off: the next reports within the wait are not even tried (each try could cost the step
        # the connect timeout).
        tried = time.monotonic()
        assert [publish(done) for done in range(3, 8)] == [None] * 5
        assert time.monotonic() - tried < 0.5
        server.start()
        record = wait_until(lambda: publish(8), timeout=10, what="progress to be published again")
        assert record["done"] == 8
        assert progress.job_progress(job_id)[step_id]["done"] == 8
    finally:
        server.stop()
