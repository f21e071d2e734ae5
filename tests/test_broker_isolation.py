"""Whoever reaches Redis cannot command the workers: real worker processes ignore a broadcast add_consumer
(which made the orchestration worker take a host's disk steps) and shutdown, while still answering the
read-only questions Flower asks; with ASR_WORKER_REMOTE_CONTROL=off they answer nothing at all. And a plain
`celery worker -Q host.X` that did not prove it is host X (its registration key) runs none of X's steps.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from engine_actions import read_records
from engine_harness import ACTION_MODULES, register_hosts

from sites.deployment import Deployment
from sites.localservices import wait_until
from workflows.engine import StepSpec, get_job, start_job, step_task_name

QUIET_S = 3.0  # how long a broadcast is given to take effect (Celery acts on one within milliseconds)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    deployment = Deployment(tmp_path_factory.mktemp("broker"), workers={"orchestration": (["orchestration"], 1)},
                            beat=False, appendonly=False, worker_settings={"ASR_ACTION_MODULES": ACTION_MODULES})
    with deployment.start():
        yield deployment


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

    quiet = site.add_worker("quiet", ["recovery"], wait=True,
                            env={**site.env, "ASR_WORKER_REMOTE_CONTROL": "off"})
    replies = app.control.inspect(timeout=2).ping() or {}
    assert not any(found.startswith("quiet@") for found in replies), replies
    assert any(found.startswith("orchestration@") for found in replies), replies
    app.control.broadcast("shutdown", reply=False)  # the orchestration worker ignores it too (above)
    time.sleep(QUIET_S)
    assert quiet.process.poll() is None


def test_a_worker_that_did_not_prove_it_is_the_host_runs_none_of_its_steps(site: Deployment, tmp_path: Path) -> None:
    keys = register_hosts(tmp_path, ("host1", "host2"))
    # Consumers of host1's queue: one with no key at all, one holding host2's valid key and claiming host1,
    # one with host1's name but host2's key.
    rogues = {"rogue-nokey": {}, "rogue-host2": {"ASR_HOST_NAME": "host2", "ASR_HOST_KEY": keys["host2"]},
              "rogue-wrongkey": {"ASR_HOST_NAME": "host1", "ASR_HOST_KEY": keys["host2"]}}
    log = tmp_path / "copy.log"
    job_id = start_job("test.failover", lock_key=None, stages=[
        [StepSpec("Copy disk disk0", "test.record", "host.host1", {"log": str(log), "label": "copy"})]])
    expected = {"rogue-nokey": "was not started as the agent of host 'host1'",
                "rogue-host2": "was not started as the agent of host 'host1'",
                "rogue-wrongkey": "does not hold the registration key of host 'host1'"}
    for name, identity in rogues.items():  # one at a time: each, alone on the queue, gets the message
        rogue = site.add_worker(name, ["host.host1"], env={**site.env, **identity})
        wait_until(lambda rogue=rogue: "refused" in rogue.log(), timeout=30, what=f"{name} to refuse the step")
        assert expected[name] in rogue.log(), rogue.log()[-2000:]
        site.stop_process(name)
        step = get_job(job_id)["steps"][0]
        assert step["state"] == "queued" and step["worker"] is None and step["error"] is None, step
        assert read_records(log) == []

    # Host1's own agent, started with its key, takes the step (the impostors hand it back) and runs it.
    site.add_worker("host-host1", ["host.host1"], env={**site.env, "ASR_HOST_NAME": "host1",
                                                       "ASR_HOST_KEY": keys["host1"]})
    job = wait_until(lambda: (job := get_job(job_id))["state"] in ("succeeded", "failed") and job, timeout=60,
                     what="host1's agent to run the step")
    assert job["state"] == "succeeded", job
    assert job["steps"][0]["worker"].startswith("host-host1@"), job["steps"][0]
    assert [record["label"] for record in read_records(log)] == ["copy"]
