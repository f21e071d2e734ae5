"""Whoever reaches Redis cannot command the workers: real worker processes ignore a broadcast add_consumer
(which made the orchestration worker take a host's disk steps) and shutdown, while still answering the
read-only questions Flower asks (ASR_WORKER_REMOTE_CONTROL=inspect); by default (off) they answer nothing at
all. A plain
`celery worker -Q host.X` that did not prove it is host X (its registration key) does not start; host X's agent
runs no step of another queue pushed onto its own, and stops consuming its queue once its key no longer verifies
(`asr host rekey`).
"""
from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from engine_actions import read_records
from engine_harness import ACTION_MODULES, register_hosts
from sqlmodel import select

from models.db import session_scope
from models.fabric import Host, rekey_host
from sites.deployment import Deployment
from sites.localservices import CeleryProcess, wait_until
from tasks.host_identity import UNPROVEN_EXIT_CODE
from workflows.engine import StepSpec, get_job, start_job, step_task_name, use_dispatcher

QUIET_S = 3.0  # how long a broadcast is given to take effect (Celery acts on one within milliseconds)
AGENT_HEARTBEAT_S = 0.5


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    deployment = Deployment(tmp_path_factory.mktemp("broker"), workers={"orchestration": (["orchestration"], 1)},
                            beat=False, appendonly=False,
                            # The orchestration worker answers Flower's read-only questions (as compose.yaml
                            # sets it); the workers added below keep the default, off.
                            worker_settings={"ASR_ACTION_MODULES": ACTION_MODULES,
                                             "ASR_WORKER_REMOTE_CONTROL": "inspect"})
    with deployment.start():
        yield deployment


def default_remote_control(env: dict[str, str]) -> dict[str, str]:
    """`env` without ASR_WORKER_REMOTE_CONTROL: a worker started with it has the default."""
    return {key: value for key, value in env.items() if key != "ASR_WORKER_REMOTE_CONTROL"}


def node(site: Deployment, name: str) -> str:
    from worker import app

    replies = wait_until(lambda: app.control.inspect(timeout=1).ping(), timeout=15, what="a ping reply")
    return next(found for found in replies if found.split("@", 1)[0] == name)


def test_a_broadcast_add_consumer_leaves_a_hosts_queue_alone(site: Deployment) -> None:
    from worker import app

    orchestration = node(site, "orchestration")
    replies = app.control.broadcast("add_consumer", arguments={"queue": "host.host1"}, reply=True, timeout=2)
    assert all("error" in reply[orchestration] for reply in replies), replies
    app.control.add_consumer("host.host1", destination=[orchestration], reply=False)
    # A step message for host1's agent stays on host1's queue: no one but host1's agent takes it.
    app.send_task(step_task_name("replication.snapshot_vm"), args=["no-such-step"], queue="host.host1")
    time.sleep(QUIET_S)
    assert site.redis.client().llen("host.host1") == 1
    queues = app.control.inspect(destination=[orchestration], timeout=2).active_queues()
    assert [queue["name"] for queue in queues[orchestration]] == ["orchestration"], queues


def test_a_broadcast_shutdown_stops_no_worker(site: Deployment) -> None:
    from worker import app

    orchestration = node(site, "orchestration")
    for command in ("shutdown", "pool_restart", "pool_shrink", "autoscale", "rate_limit", "revoke", "conf"):
        app.control.broadcast(command, arguments={}, reply=False)
    time.sleep(QUIET_S)
    assert site.workers["orchestration"].process.poll() is None
    assert app.control.inspect(destination=[orchestration], timeout=2).ping() == {orchestration: {"ok": "pong"}}


def test_with_remote_control_off_a_worker_answers_nothing(site: Deployment, tmp_path: Path) -> None:
    from worker import app

    quiet = site.add_worker("quiet", ["recovery"], wait=True, env=default_remote_control(site.env))
    replies = app.control.inspect(timeout=2).ping() or {}
    assert not any(found.startswith("quiet@") for found in replies), replies
    assert any(found.startswith("orchestration@") for found in replies), replies
    app.control.broadcast("shutdown", reply=False)  # the orchestration worker ignores it too (above)
    time.sleep(QUIET_S)
    assert quiet.process.poll() is None


@pytest.fixture(scope="module")
def host_keys(site: Deployment, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return register_hosts(tmp_path_factory.mktemp("roots"), ("host1", "host2"))


def host1_agent(site: Deployment, host_keys: dict[str, str]) -> CeleryProcess:
    """Host1's agent, as `asr worker host host1` starts it (its name and key, remote control left at its
    default, off), with a heartbeat (and key verification) every AGENT_HEARTBEAT_S."""
    if "host-host1" not in site.workers:
        site.add_worker("host-host1", ["host.host1"], env={
            **default_remote_control(site.env), "ASR_HOST_NAME": "host1", "ASR_HOST_KEY": host_keys["host1"],
            "ASR_HOST_HEARTBEAT_S": str(AGENT_HEARTBEAT_S)})
    return site.workers["host-host1"]


def test_a_worker_that_did_not_prove_it_is_the_host_does_not_start(site: Deployment, host_keys: dict[str, str],
                                                                   tmp_path: Path) -> None:
    # Plain `celery worker -Q host.host1`, bypassing the launcher: one with no key at all, one holding host2's
    # valid key and claiming host2, one with host1's name but host2's key.
    rogues = {"rogue-nokey": {}, "rogue-host2": {"ASR_HOST_NAME": "host2", "ASR_HOST_KEY": host_keys["host2"]},
              "rogue-wrongkey": {"ASR_HOST_NAME": "host1", "ASR_HOST_KEY": host_keys["host2"]}}
    log = tmp_path / "copy.log"
    job_id = start_job("test.failover", lock_key=None, stages=[
        [StepSpec("Copy disk disk0", "test.record", "host.host1", {"log": str(log), "label": "copy"})]])
    expected = {"rogue-nokey": "was not started as the agent of host 'host1'",
                "rogue-host2": "was not started as the agent of host 'host1'",
                "rogue-wrongkey": "does not hold the registration key of host 'host1'"}
    queued = site.redis.client().lrange("host.host1", 0, -1)
    started = {name: site.add_worker(name, ["host.host1"], env={**site.env, **identity}, wait=False)
               for name, identity in rogues.items()}
    for name, rogue in started.items():
        wait_until(lambda rogue=rogue: rogue.process.poll() is not None, timeout=60, what=f"{name} to exit")
        assert rogue.process.returncode == UNPROVEN_EXIT_CODE, (name, rogue.process.returncode, rogue.log()[-2000:])
        assert f"this worker does not start: this worker {expected[name]}" in rogue.log(), rogue.log()[-2000:]
        assert " ready." not in rogue.log()
        site.stop_process(name)
    step = get_job(job_id)["steps"][0]
    assert step["state"] == "queued" and step["worker"] is None and step["error"] is None, step
    assert read_records(log) == []
    assert site.redis.client().lrange("host.host1", 0, -1) == queued

    # Host1's own agent, started with its key, takes the step and runs it.
    host1_agent(site, host_keys)
    job = wait_until(lambda: (job := get_job(job_id))["state"] in ("succeeded", "failed") and job, timeout=60,
                     what="host1's agent to run the step")
    assert job["state"] == "succeeded", job
    assert job["steps"][0]["worker"].startswith("host-host1@"), job["steps"][0]
    assert [record["label"] for record in read_records(log)] == ["copy"]


class MessagesHeld:
    """A dispatcher that sends nothing: the job's steps wait queued as if their messages were in flight (the
    orchestration worker would otherwise run its step before the test could hand it to host1's agent)."""

    def send_stage(self, steps: object) -> None:
        pass

    def dispatch_hooks(self, job_id: str) -> None:
        pass

    def report_lost_run(self, task_id: str, *, failed: bool, reason: str) -> None:
        pass


def test_a_hosts_agent_answers_no_broadcast_runs_only_its_queues_steps_and_stops_when_rekeyed(
        site: Deployment, host_keys: dict[str, str], tmp_path: Path) -> None:
    from worker import app

    agent = host1_agent(site, host_keys)
    admin = site.redis.client()
    # Remote control is off by default: the agent answers not even a ping (the orchestration worker, set to
    # inspect, does, read-only).
    replies = app.control.inspect(timeout=1).ping() or {}
    assert any(found.startswith("orchestration@") for found in replies), replies
    assert not any(found.startswith("host-host1@") for found in replies), replies

    # An orchestration step's id on host1's queue, as host1's broker user may push it: plainly, and with the
    # sender's routing key claiming it came on the orchestration queue. The agent runs neither and drops both.
    log = tmp_path / "orchestration.log"
    previous = use_dispatcher(MessagesHeld())
    try:
        job_id = start_job("test.failover", lock_key=None, stages=[
            [StepSpec("Start VM app01", "test.record", "orchestration", {"log": str(log), "label": "start"})]])
    finally:
        use_dispatcher(previous)
    before = get_job(job_id)["steps"][0]
    assert before["state"] == "queued", before
    task = step_task_name("test.record")
    app.send_task(task, args=[before["id"]], queue="host.host1")
    app.send_task(task, args=[before["id"]], queue="forgeries")
    forged = json.loads(admin.rpop("forgeries"))
    forged["properties"]["delivery_info"]["routing_key"] = "orchestration"
    admin.lpush("host.host1", json.dumps(forged))
    refusal = re.compile(rf"step {before['id']} refused on host-host1@\S+: step {before['id']} \(Start VM app01\) "
                         r"belongs to queue 'orchestration', not to 'host.host1'")
    wait_until(lambda: len(refusal.findall(agent.log())) == 2, timeout=30, what="the agent to refuse both messages")
    assert admin.llen("host.host1") == 0, "a refused message was handed back"
    assert get_job(job_id)["steps"][0] == before
    assert read_records(log) == []

    # Host1 rekeyed: at its next heartbeat the running agent finds its key no longer verifies and stops
    # consuming host1's queue; a step sent there stays queued.
    with session_scope() as session:
        rekey_host(session, session.exec(select(Host).where(Host.name == "host1")).one())
    wait_until(lambda: "this worker stops consuming queue host.host1" in agent.log(), timeout=10 * AGENT_HEARTBEAT_S,
               what="the agent to stop consuming its queue")
    later = tmp_path / "later.log"
    job_id = start_job("test.failover", lock_key=None, stages=[
        [StepSpec("Copy disk disk1", "test.record", "host.host1", {"log": str(later), "label": "later"})]])
    time.sleep(QUIET_S)
    assert admin.llen("host.host1") == 1
    step = get_job(job_id)["steps"][0]
    assert step["state"] == "queued" and step["worker"] is None, step
    assert read_records(later) == [] and agent.process.poll() is None
