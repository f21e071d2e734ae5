"""The durable job engine with real parts: a private redis-server, real Celery worker and beat processes,
a SQLite database shared by all of them, and actions that leave their traces in files.

One set of services serves the module (a scaled clock: the 1-2-4-8-10-30 minute back-off runs in
0.1-0.2-0.4-0.8-1-3 s; heartbeat 1 s, stale after 3 s, reconciler every 0.25 s). Tests that kill a
worker start their own on their own queues; the Redis restart gets a whole deployment of its own.
"""
from __future__ import annotations

import errno
import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from engine_actions import HOOKED_KIND, read_records  # also registers the test actions for start_job
from engine_harness import ACTION_MODULES, EventCapture
from sqlmodel import func, select

from datapath.errors import DiskFormatError, LowDiskSpaceError, StorageAuthError, StorageUnavailableError
from models.db import session_scope
from models.jobs import Job, JobLock, JobStep, StepState
from sites.deployment import Deployment
from sites.localservices import wait_until
from workflows.engine import (
    ItemBusyError,
    JobStateError,
    StepSpec,
    cancel,
    execute_step,
    get_job,
    reconcile,
    resume,
    retry_now,
    start_job,
)
from workflows.items import busy_error
from workflows.progress import job_progress
from workflows.retry import is_recoverable, next_attempt_delay

TIME_SCALE = 600
ENGINE_SETTINGS = {
    "ASR_TIME_SCALE": str(TIME_SCALE),
    "ASR_HEARTBEAT_S": "1",
    "ASR_STALE_AFTER_S": "3",
    "ASR_RECONCILE_S": "0.25",
    "ASR_MAX_STEP_DEATHS": "3",
    "ASR_QUEUED_STALL_S": "600",
}
FINISHED = {"succeeded", "failed", "cancelled"}
ASR = str(Path(sys.executable).with_name("asr"))


def deployment(workdir: Path, workers: dict[str, tuple[list[str], int]], *,
               database_url: str | None = None) -> Deployment:
    """Redis (append-only), a database (default: a SQLite file), `workers` (name: (queues, concurrency))
    and beat with the engine settings above and the test actions, with this process's engine calls
    pointed at them while the deployment is entered."""
    return Deployment(workdir, workers=workers, database_url=database_url, settings=ENGINE_SETTINGS,
                      worker_settings={"ASR_ACTION_MODULES": ACTION_MODULES})


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    with deployment(tmp_path_factory.mktemp("engine"), {
        "orchestration": (["orchestration", "recovery"], 2),
        "host-h1": (["host.h1"], 3),
    }) as shared:
        yield shared


def lock_key() -> str:
    return f"item:{uuid.uuid4()}"


def wait_for_job(job_id: str, states: set[str] = FINISHED, *, timeout: float) -> dict[str, Any]:
    try:
        return wait_until(lambda: (job := get_job(job_id))["state"] in states and job, timeout=timeout,
                          what=f"job {job_id} to reach {sorted(states)}")
    except AssertionError as timed_out:
        raise AssertionError(f"{timed_out}; the job is now {get_job(job_id)}") from None


def wait_for_step(job_id: str, name: str, states: set[str], *, timeout: float) -> dict[str, Any]:
    def step_in_state() -> dict[str, Any] | None:
        step = step_named(get_job(job_id), name)
        return step if step["state"] in states else None

    return wait_until(step_in_state, timeout=timeout, what=f"step {name!r} of job {job_id} to be {states}")


def step_named(job: dict[str, Any], name: str) -> dict[str, Any]:
    return next(step for step in job["steps"] if step["name"] == name)


def at(timestamp: str | None) -> datetime:
    assert timestamp is not None
    return datetime.fromisoformat(timestamp)


def table_counts() -> tuple[int, int, int]:
    with session_scope() as session:
        return tuple(session.exec(select(func.count()).select_from(table)).one()  # type: ignore[return-value]
                     for table in (Job, JobStep, JobLock))


def lock_holder(key: str) -> str | None:
    with session_scope() as session:
        lock = session.get(JobLock, key)
        return None if lock is None else lock.job_id


# ---- the retry policy, pure ---------------------------------------------------------------------------
def test_next_attempt_delay_follows_the_long_schedule_then_every_30_minutes() -> None:
    assert [next_attempt_delay(attempt) for attempt in range(1, 9)] == [
        60, 120, 240, 480, 600, 1800, 1800, 1800,
    ]
    with pytest.raises(ValueError, match="start at 1"):
        next_attempt_delay(0)


def test_errors_are_classified_recoverable_or_not() -> None:
    for recoverable in (StorageUnavailableError("x"), LowDiskSpaceError("x"), ConnectionResetError(),
                        TimeoutError(), MemoryError(), OSError(errno.ENOSPC, "full"),
                        redis.exceptions.ConnectionError("x"), redis.exceptions.TimeoutError("x")):
        assert is_recoverable(recoverable), recoverable
    for fatal in (DiskFormatError("x"), StorageAuthError("x"), OSError(errno.EACCES, "denied"),
                  ValueError("bug"), KeyError("bug")):
        assert not is_recoverable(fatal), fatal


# ---- jobs through real workers --------------------------------------------------------------------------
def test_three_stage_job_runs_stage_by_stage_with_a_parallel_stage_on_the_host_queue(
    cluster: Deployment, tmp_path: Path
) -> None:
    log = str(tmp_path / "record.log")
    stages = [
        [StepSpec("Prerequisites check", "test.record", "orchestration", {"log": log, "label": "prereq"})],
        [StepSpec(f"Copy disk disk{n}", "test.record", "host.h1",
                  {"log": log, "label": f"disk{n}", "seconds": 1.0}) for n in range(3)],
        [StepSpec("Finalize protection", "test.record", "orchestration",
                  {"log": log, "label": "finalize", "seconds": 3.0, "ticks": 30})],
    ]
    events = EventCapture(
        "task-progress",
        lambda event: event.get("step_name") == "Finalize protection" and event["done"] < event["total"],
        timeout=60,
    )
    job_id = start_job("test.enable_protection", lock_key=lock_key(), stages=stages, target="app01")

    live = wait_until(
        lambda: [p for p in job_progress(job_id).values()
                 if p["name"] == "Finalize protection" and 0 < p["done"] < p["total"]],
        timeout=30, what="live progress of the finalize step in Redis",
    )[0]
    assert live["total"] == 30 and 0 < live["percent"] < 100
    events.join(timeout=30)
    progress_events = [event for event in events.events if event.get("job_id") == job_id]
    assert any(event["step_name"] == "Finalize protection" and 0 < event["done"] < 30 for event in progress_events)
    assert all({"step", "done", "total", "percent", "uuid"} <= event.keys() for event in progress_events)

    job = wait_for_job(job_id, timeout=30)
    assert job["state"] == "succeeded", job
    assert job["error"] is None and job["started_at"] and job["ended_at"]
    steps = job["steps"]
    assert [step["stage"] for step in steps] == [0, 1, 1, 1, 2]
    for step in steps:
        assert step["state"] == "succeeded" and step["attempts"] == 1 and step["deaths"] == 0, step
        assert at(step["started_at"]) <= at(step["heartbeat_at"]) <= at(step["ended_at"])
        assert step["result"] == {"label": step["params"]["label"]}
    assert steps[0]["queued_at"] is not None and at(steps[0]["queued_at"]) <= at(steps[0]["started_at"])
    disks = steps[1:4]
    # Stages in order, the disks in parallel, on the host's own worker.
    assert at(steps[0]["ended_at"]) <= min(at(disk["started_at"]) for disk in disks)
    assert max(at(disk["ended_at"]) for disk in disks) <= at(steps[4]["started_at"])
    assert max(at(disk["started_at"]) for disk in disks) < min(at(disk["ended_at"]) for disk in disks)
    assert all(disk["worker"].startswith("host-h1@") for disk in disks)
    assert steps[0]["worker"].startswith("orchestration@") and steps[4]["worker"].startswith("orchestration@")
    assert (steps[4]["progress_done"], steps[4]["progress_total"]) == (30, 30)
    assert job_progress(job_id)[steps[4]["id"]]["percent"] == 100.0
    labels = sorted(record["label"] for record in read_records(Path(log)))
    assert labels == ["disk0", "disk1", "disk2", "finalize", "prereq"]  # each ran exactly once
    assert lock_holder(job["lock_key"]) is None


def test_recoverable_failures_wait_on_the_long_schedule_then_succeed(cluster: Deployment, tmp_path: Path) -> None:
    log = tmp_path / "flaky.log"
    failing_attempts = 7
    job_id = start_job("test.delta_replication", lock_key=lock_key(), stages=[[StepSpec(
        "Ship replication log", "test.flaky", "orchestration", {"log": str(log), "failing_attempts": failing_attempts},
    )]])
    # Polling every 20 ms sees every wait on a quiet machine; under a loaded test run one poll can take
    # longer than the 0.1-0.4 s waits, so only the waits of 0.8 s and more must be seen. The call log
    # below proves the spacing of every attempt whether or not its wait was seen.
    waits: dict[int, tuple[datetime, datetime]] = {}

    def finished_while_recording_waits() -> dict[str, Any] | None:
        job = get_job(job_id)
        step = job["steps"][0]
        if step["state"] == "waiting_retry":
            assert job["state"] == "waiting_retry" and "unreachable" in job["error"]
            waits[step["attempts"]] = (at(step["ended_at"]), at(step["next_attempt_at"]))
        return job if job["state"] in FINISHED else None

    job = wait_until(finished_while_recording_waits, timeout=40, interval=0.02, what=f"job {job_id} to finish")
    assert job["state"] == "succeeded", job
    step = job["steps"][0]
    assert step["attempts"] == failing_attempts + 1 and step["error"] is None and step["deaths"] == 0

    schedule_s = [next_attempt_delay(attempt) / TIME_SCALE for attempt in range(1, failing_attempts + 1)]
    assert schedule_s == [0.1, 0.2, 0.4, 0.8, 1.0, 3.0, 3.0]
    assert set(waits) <= set(range(1, failing_attempts + 1))
    assert {attempt for attempt in range(1, failing_attempts + 1) if schedule_s[attempt - 1] >= 0.8} <= set(waits)
    for attempt, (failed_at, due_at) in waits.items():
        assert (due_at - failed_at).total_seconds() == pytest.approx(schedule_s[attempt - 1], abs=0.001)

    calls = read_records(log)
    # Each failing attempt made the three in-call tries; the last attempt succeeded on its first.
    assert [call["attempt"] for call in calls] == [a for a in range(1, failing_attempts + 1) for _ in range(3)] + [
        failing_attempts + 1]
    for attempt in range(1, failing_attempts + 1):
        last_try = max(call["at"] for call in calls if call["attempt"] == attempt)
        next_try = min(call["at"] for call in calls if call["attempt"] == attempt + 1)
        # Not before it was due; after it, within a reconciler period and a message hop or two.
        assert schedule_s[attempt - 1] - 0.01 <= next_try - last_try <= schedule_s[attempt - 1] + 2.5


def test_a_retried_step_of_a_parallel_stage_runs_alone_and_its_finish_carries_the_job_on_at_once(
    cluster: Deployment, tmp_path: Path
) -> None:
    log, flaky_log = tmp_path / "record.log", tmp_path / "flaky.log"
    job_id = start_job("test.delta_replication", lock_key=lock_key(), stages=[
        [StepSpec("Ship log disk0", "test.flaky", "host.h1", {"log": str(flaky_log), "failing_attempts": 1}),
         StepSpec("Ship log disk1", "test.record", "host.h1", {"log": str(log), "label": "disk1", "seconds": 1.5})],
        [StepSpec("Apply logs", "test.record", "orchestration", {"log": str(log), "label": "apply"})],
    ])
    job = wait_for_job(job_id, timeout=30)
    assert job["state"] == "succeeded", job
    disk0, disk1, apply = job["steps"]
    assert (disk0["attempts"], disk1["attempts"], apply["attempts"]) == (2, 1, 1)
    assert [record["label"] for record in read_records(log)] == ["disk1", "apply"]
    # disk0's retry succeeded while disk1 still ran; disk1, finishing last, completed the stage and sent
    # the next one itself. (With stages chained as a Celery chord, the chord never fired and the job waited
    # for the reconciler's grace, ASR_STALE_AFTER_S = 3 s, or about 40 s with production settings.)
    assert at(disk0["ended_at"]) < at(disk1["ended_at"])
    waited = (at(apply["started_at"]) - at(disk1["ended_at"])).total_seconds()
    assert waited < 1.0, f"the next stage started {waited:.2f} s after the stage completed"


def test_non_recoverable_failure_fails_the_job_at_once_and_runs_its_failure_hook(
    cluster: Deployment, tmp_path: Path
) -> None:
    log, hook_log = tmp_path / "broken.log", tmp_path / "hooks.log"
    key = lock_key()
    job_id = start_job(HOOKED_KIND, lock_key=key, target="app02", params={"hook_log": str(hook_log)}, stages=[
        [StepSpec("Prerequisites check", "test.broken_chain", "host.h1", {"log": str(log), "disk": "disk0.vhd"})],
        [StepSpec("Copy disk disk0", "test.record", "host.h1", {"log": str(tmp_path / "never.log"), "label": "x"})],
    ])
    job = wait_for_job(job_id, timeout=30)
    assert job["state"] == "failed"
    assert job["error"] == "Prerequisites check failed: disk0.vhd: broken VHD chain: parent disk not found"
    assert job["error_class"] == "datapath.errors.DiskFormatError"
    check, copy = job["steps"]
    assert check["state"] == "failed" and check["attempts"] == 1 and check["next_attempt_at"] is None
    assert check["error_class"] == "datapath.errors.DiskFormatError"
    assert copy["state"] == "cancelled" and copy["attempts"] == 0
    assert len(read_records(log)) == 1  # not even an in-call retry
    assert not (tmp_path / "never.log").exists()
    hooks = wait_until(lambda: read_records(hook_log), timeout=10, what="the failure hook")
    assert [(hook["job"], hook["state"]) for hook in hooks] == [(job_id, "failed")]
    assert hooks[0]["error"] == job["error"]
    assert lock_holder(key) is None
    assert wait_until(lambda: not get_job(job_id)["hook_pending"], timeout=10, what="hooks recorded as run")


def test_steps_run_as_tasks_named_after_their_action_and_an_action_a_worker_lacks_fails_clearly(
    cluster: Deployment, tmp_path: Path
) -> None:
    """Each step's message is the task of its action (what Flower and the worker logs show); a worker
    without that action's module fails the step naming it, instead of dropping the message."""
    from workflows.engine import action, step_task_name

    @action("test.only_in_this_process")
    def only_here(ctx, **_):  # registered here, not in the workers' ASR_ACTION_MODULES
        return None

    log = tmp_path / "named.log"
    job_id = start_job("test.delta_replication", lock_key=lock_key(), stages=[
        [StepSpec("Record", "test.record", "orchestration", {"log": str(log), "label": "a"})],
        [StepSpec("Not on the worker", "test.only_in_this_process", "orchestration", {})],
    ])
    job = wait_for_job(job_id, timeout=30)
    assert job["state"] == "failed", job
    recorded, missing = job["steps"]
    assert recorded["state"] == "succeeded" and missing["state"] == "failed" and missing["attempts"] == 0
    assert "has no task 'asr.test.only_in_this_process'" in missing["error"], missing["error"]
    assert missing["error_class"] == "datapath.errors.NonRecoverableError"
    worker_logs = "".join(process.log() for process in cluster.processes if process.log_path.exists())
    assert f"Task {step_task_name('test.record')}[{recorded['celery_task_id']}] received" in worker_logs


def test_a_second_job_on_the_same_item_is_refused_and_creates_nothing(cluster: Deployment, tmp_path: Path) -> None:
    key = lock_key()
    log = str(tmp_path / "busy.log")
    holding = [[StepSpec("Initial replication", "test.until_cancelled", "host.h1", {"log": log, "seconds": 20})]]
    first = start_job("test.enable_protection", lock_key=key, target="app03", stages=holding)
    wait_for_step(first, "Initial replication", {"running"}, timeout=20)
    before = table_counts()
    with pytest.raises(ItemBusyError, match=rf"app03 is busy with job {first} \(test.enable_protection, running\)"):
        start_job("test.resynchronize", lock_key=key, target="app03", stages=holding)
    assert table_counts() == before
    # What an operator reads (workflows.items.busy_error): the job holding the VM, or, when the holder let it go
    # between the refusal and the look, that it ended and the request can be sent again.
    item_id = key.removeprefix("item:")
    refusal = str(busy_error(item_id, "app03", "failover"))
    assert f"is busy with job {first} (test.enable_protection, running)" in refusal, refusal
    cancel(first)
    wait_until(lambda: lock_holder(key) is None, timeout=15, what="the lock to be released")
    assert str(busy_error(item_id, "app03", "failover")) == (
        f"VM 'app03' (protected item {item_id}) was busy: the workflow holding it ended just now; send the "
        f"failover request again")
    second = start_job("test.resynchronize", lock_key=key, target="app03", stages=holding)
    assert lock_holder(key) == second
    cancel(second)
    assert wait_for_job(second, timeout=15)["state"] == "cancelled"


def test_bad_job_definitions_are_refused_with_the_step_named(cluster: Deployment) -> None:
    before = table_counts()
    good = StepSpec("Prerequisites check", "test.record", "orchestration", {"log": "/dev/null", "label": "x"})
    bad_definitions = [
        ([[good, StepSpec("Copy disk", "test.no_such_action", "host.h1")]], "stage 0 step 1 .*'test.no_such_action'"),
        ([[good], [StepSpec("Copy disk", "test.record", "somewhere")]], "stage 1 step 0 .*queue 'somewhere'"),
        ([[good], []], "stage 1 .* has no steps"),
        ([[StepSpec("Copy disk", "test.record", "host.h1", {"data": b"bytes"})]], "JSON-serializable"),
    ]
    for stages, message in bad_definitions:
        with pytest.raises(ValueError, match=message):
            start_job("test.enable_protection", lock_key=lock_key(), stages=stages)
    assert table_counts() == before


def test_cancel_stops_the_running_step_then_runs_the_cleanup_hook(cluster: Deployment, tmp_path: Path) -> None:
    log, hook_log = tmp_path / "cancel.log", tmp_path / "hooks.log"
    key = lock_key()
    job_id = start_job(HOOKED_KIND, lock_key=key, params={"hook_log": str(hook_log)}, stages=[
        [StepSpec("Initial replication", "test.until_cancelled", "host.h1", {"log": str(log), "seconds": 30})],
        [StepSpec("Finalize protection", "test.record", "orchestration", {"log": str(tmp_path / "never.log"),
                                                                           "label": "x"})],
    ])
    wait_until(lambda: job_progress(job_id), timeout=20, what="the step to report progress")
    cancel(job_id)
    assert get_job(job_id)["state"] == "cancelled"
    step = wait_for_step(job_id, "Initial replication", {"cancelled"}, timeout=10)
    events = [record["event"] for record in read_records(log)]
    assert events == ["started", "stopped"]
    hooks = wait_until(lambda: read_records(hook_log), timeout=10, what="the cancel hook")
    assert [(hook["job"], hook["state"]) for hook in hooks] == [(job_id, "cancelled")]
    stopped_at = read_records(log)[1]["at"]
    assert hooks[0]["at"] >= stopped_at  # cleanup ran after the step stopped, not beside it
    assert step["attempts"] == 1
    job = get_job(job_id)
    assert step_named(job, "Finalize protection")["state"] == "cancelled"
    # The lock went with the settling of the job, which waited for the running step to stop.
    assert lock_holder(key) is None and at(job["settled_at"]) >= at(step["ended_at"])
    cancel(job_id)  # cancelling again changes nothing
    with pytest.raises(JobStateError, match="nothing to retry"):
        retry_now(job_id)


def test_retry_now_runs_a_waiting_step_at_once_and_cancel_ends_a_waiting_job(
    cluster: Deployment, tmp_path: Path
) -> None:
    # Real time here (scale 1): the first retry would be a whole minute away.
    real_time = {**cluster.env, "ASR_TIME_SCALE": "1"}
    cluster.add_worker("host-realtime", ["host.realtime"], env=real_time)
    log, hook_log = tmp_path / "flaky.log", tmp_path / "hooks.log"
    job_id = start_job("test.delta_replication", lock_key=lock_key(), stages=[[StepSpec(
        "Ship replication log", "test.flaky", "host.realtime", {"log": str(log), "failing_attempts": 1})]])
    step = wait_for_step(job_id, "Ship replication log", {"waiting_retry"}, timeout=20)
    assert (at(step["next_attempt_at"]) - at(step["ended_at"])).total_seconds() == pytest.approx(60, abs=0.001)
    assert retry_now(job_id) == [step["id"]]
    job = wait_for_job(job_id, timeout=15)
    assert job["state"] == "succeeded" and job["steps"][0]["attempts"] == 2
    with pytest.raises(JobStateError, match="succeeded: there is nothing to retry"):
        retry_now(job_id)

    waiting_id = start_job(HOOKED_KIND, lock_key=lock_key(), params={"hook_log": str(hook_log)}, stages=[[StepSpec(
        "Ship replication log", "test.flaky", "host.realtime", {"log": str(log), "failing_attempts": 5})]])
    wait_for_job(waiting_id, {"waiting_retry"}, timeout=20)
    cancel(waiting_id)
    job = get_job(waiting_id)
    assert job["state"] == "cancelled" and job["steps"][0]["state"] == "cancelled"
    hooks = wait_until(lambda: read_records(hook_log), timeout=10, what="the cancel hook")
    assert [(hook["job"], hook["state"]) for hook in hooks] == [(waiting_id, "cancelled")]
    with pytest.raises(JobStateError, match="already ended: succeeded"):
        cancel(job_id)


# ---- manual actions -------------------------------------------------------------------------------------
SWITCH_DNS = "Switch DNS to the recovery site, then resume"


def manual_step(name: str, log: Path, instructions: str = SWITCH_DNS) -> StepSpec:
    return StepSpec(name, "test.manual", "orchestration", {"log": str(log), "instructions": instructions})


def test_a_manual_action_pauses_the_job_holding_its_lock_until_an_operator_resumes_it(
    cluster: Deployment, tmp_path: Path
) -> None:
    log, manual_log, hook_log = tmp_path / "record.log", tmp_path / "manual.log", tmp_path / "hooks.log"
    key = lock_key()
    job_id = start_job(HOOKED_KIND, lock_key=key, target="app05", params={"hook_log": str(hook_log)}, stages=[
        [StepSpec("Shut down VM", "test.record", "host.h1", {"log": str(log), "label": "shutdown"})],
        [manual_step("Switch DNS", manual_log)],
        [StepSpec("Start VM at the recovery site", "test.record", "recovery", {"log": str(log), "label": "start"})],
    ])
    job = wait_for_job(job_id, {"waiting_action"}, timeout=20)
    shutdown, switch, start = job["steps"]
    assert shutdown["state"] == "succeeded"
    assert switch["state"] == "waiting_action" and switch["instructions"] == SWITCH_DNS
    assert switch["error"] is None and switch["attempts"] == 1 and switch["lease"] is None
    assert start["state"] == "pending" and start["queued_at"] is None

    # The broker redelivering the step's own message (acks late) finds nothing to run.
    outcome = execute_step(switch["id"], task_id=switch["celery_task_id"], worker="redelivered@test",
                           emit_event=lambda **_: None)
    assert (outcome.advance, outcome.state) == (False, StepState.waiting_action)
    # Reconciler rounds (beat's every 0.25 s and ours) until well past the 3 s after which a pending
    # stage behind a finished one counts as a lost continuation: this one is held back by the operator.
    rounds = 0
    while (datetime.now(at(switch["ended_at"]).tzinfo) - at(switch["ended_at"])).total_seconds() < 4.5:
        reconcile()
        rounds += 1
        time.sleep(0.2)
    assert rounds >= 10
    job = get_job(job_id)
    assert job["state"] == "waiting_action"
    assert [step["state"] for step in job["steps"]] == ["succeeded", "waiting_action", "pending"]
    assert job["steps"][2]["queued_at"] is None and job["steps"][1]["attempts"] == 1
    assert len(read_records(manual_log)) == 1
    assert [record["label"] for record in read_records(log)] == ["shutdown"]
    # The job still holds its item.
    assert lock_holder(key) == job_id
    with pytest.raises(ItemBusyError, match=rf"app05 is busy with job {job_id} \(test.hooked, waiting_action\)"):
        start_job("test.delta_replication", lock_key=key, target="app05", stages=[[StepSpec(
            "Ship logs", "test.record", "host.h1", {"log": str(log), "label": "never"})]])
    assert not read_records(hook_log)

    assert resume(job_id, note="DNS switched by ops") == [switch["id"]]
    job = wait_for_job(job_id, timeout=20)
    assert job["state"] == "succeeded", job
    assert job["error"] is None and job["ended_at"]
    shutdown, switch, start = job["steps"]
    assert switch["state"] == "succeeded" and switch["instructions"] == SWITCH_DNS
    assert switch["result"] == {"resumed": True, "note": "DNS switched by ops",
                                "resumed_at": switch["result"]["resumed_at"]}
    assert at(switch["result"]["resumed_at"]) == at(switch["ended_at"]) <= at(start["started_at"])
    assert start["state"] == "succeeded" and start["attempts"] == 1
    assert [record["label"] for record in read_records(log)] == ["shutdown", "start"]
    assert len(read_records(manual_log)) == 1  # resuming completes the manual step: it never runs again
    hooks = wait_until(lambda: read_records(hook_log), timeout=10, what="the success hook")
    assert [(hook["job"], hook["state"]) for hook in hooks] == [(job_id, "succeeded")]
    assert lock_holder(key) is None
    with pytest.raises(JobStateError, match=rf"job {job_id} \(test.hooked\) has succeeded: it has no step waiting"):
        resume(job_id)


def test_two_operators_resuming_at_once_resume_the_step_once(cluster: Deployment, tmp_path: Path) -> None:
    log, manual_log = tmp_path / "record.log", tmp_path / "manual.log"
    job_id = start_job("test.failover", lock_key=lock_key(), stages=[
        [manual_step("Confirm application shutdown", manual_log, "Stop the application tier, then resume")],
        [StepSpec("Fail over VM", "test.record", "recovery", {"log": str(log), "label": "failover"})],
    ])
    waiting = wait_for_step(job_id, "Confirm application shutdown", {"waiting_action"}, timeout=20)
    assert waiting["instructions"] == "Stop the application tier, then resume"
    start_together = threading.Barrier(2)
    outcomes: dict[str, list[str] | JobStateError] = {}

    def operator(note: str) -> None:
        start_together.wait()
        try:
            outcomes[note] = resume(job_id, note=note)
        except JobStateError as refused:
            outcomes[note] = refused

    operators = [threading.Thread(target=operator, args=(note,)) for note in ("alice", "bob")]
    for thread in operators:
        thread.start()
    for thread in operators:
        thread.join(timeout=30)
    resumed = {note: steps for note, steps in outcomes.items() if isinstance(steps, list)}
    refused = {note: error for note, error in outcomes.items() if isinstance(error, JobStateError)}
    assert list(resumed.values()) == [[waiting["id"]]] and len(refused) == 1, outcomes
    assert "no step waiting for an operator" in str(next(iter(refused.values())))
    job = wait_for_job(job_id, timeout=20)
    assert job["state"] == "succeeded", job
    assert job["steps"][0]["result"]["note"] == next(iter(resumed))
    assert [record["label"] for record in read_records(log)] == ["failover"]
    assert len(read_records(manual_log)) == 1


def test_cancel_ends_a_job_waiting_for_an_operator_and_frees_its_lock(cluster: Deployment, tmp_path: Path) -> None:
    manual_log, hook_log, never = tmp_path / "manual.log", tmp_path / "hooks.log", tmp_path / "never.log"
    key = lock_key()
    job_id = start_job(HOOKED_KIND, lock_key=key, params={"hook_log": str(hook_log)}, stages=[
        [manual_step("Switch DNS", manual_log)],
        [StepSpec("Start VM at the recovery site", "test.record", "recovery", {"log": str(never), "label": "x"})],
    ])
    wait_for_job(job_id, {"waiting_action"}, timeout=20)
    assert lock_holder(key) == job_id
    cancel(job_id)
    job = get_job(job_id)
    assert job["state"] == "cancelled"
    assert [step["state"] for step in job["steps"]] == ["cancelled", "cancelled"]
    # Nothing of it was running: the cancel itself settled the job and let go of its lock.
    assert job["settled_at"] is not None and lock_holder(key) is None
    hooks = wait_until(lambda: read_records(hook_log), timeout=10, what="the cancel hook")
    assert [(hook["job"], hook["state"]) for hook in hooks] == [(job_id, "cancelled")]
    with pytest.raises(JobStateError, match="has cancelled: it has no step waiting for an operator"):
        resume(job_id)
    assert get_job(job_id)["steps"][0]["state"] == "cancelled"
    assert len(read_records(manual_log)) == 1 and not never.exists()


def test_an_operator_wait_shows_before_a_retry_wait_and_resume_leaves_the_retry_to_its_schedule(
    cluster: Deployment, tmp_path: Path
) -> None:
    # Real time for the flaky step (scale 1): its retry stays a minute away while the operator acts.
    cluster.add_worker("host-operator-rt", ["host.operatorrt"], env={**cluster.env, "ASR_TIME_SCALE": "1"})
    log, flaky_log, manual_log = tmp_path / "record.log", tmp_path / "flaky.log", tmp_path / "manual.log"
    job_id = start_job("test.failover", lock_key=lock_key(), stages=[
        [StepSpec("Ship log disk0", "test.flaky", "host.operatorrt", {"log": str(flaky_log), "failing_attempts": 1}),
         manual_step("Confirm application shutdown", manual_log)],
        [StepSpec("Fail over VM", "test.record", "recovery", {"log": str(log), "label": "failover"})],
    ])
    ship = wait_for_step(job_id, "Ship log disk0", {"waiting_retry"}, timeout=20)
    confirm = wait_for_step(job_id, "Confirm application shutdown", {"waiting_action"}, timeout=20)
    assert get_job(job_id)["state"] == "waiting_action"

    assert resume(job_id) == [confirm["id"]]
    job = get_job(job_id)
    assert job["state"] == "waiting_retry"
    assert [step["state"] for step in job["steps"]] == ["waiting_retry", "succeeded", "pending"]
    assert job["steps"][1]["result"]["note"] == ""
    with pytest.raises(JobStateError, match=rf"job {job_id} \(test.failover\) has no step waiting for an operator"):
        resume(job_id)

    # The operator's verb for it: `asr jobs retry` runs the waiting step now, a minute early.
    retried = subprocess.run([ASR, "jobs", "retry", job_id, "--json"], capture_output=True, text=True, timeout=60,
                             env=cluster.env)
    assert retried.returncode == 0, retried.stderr
    assert json.loads(retried.stdout)["launched_steps"] == [ship["id"]], retried.stdout
    job = wait_for_job(job_id, timeout=20)
    assert job["state"] == "succeeded", job
    assert [step["attempts"] for step in job["steps"]] == [2, 1, 1]
    assert [record["label"] for record in read_records(log)] == ["failover"]
    assert len(read_records(manual_log)) == 1


# ---- jobs holding several locks ---------------------------------------------------------------------
def test_a_job_holding_several_locks_keeps_each_item_busy_and_frees_them_all_when_it_ends(
    cluster: Deployment, tmp_path: Path
) -> None:
    manual_log, never = tmp_path / "manual.log", tmp_path / "never.log"
    keys = [lock_key() for _ in range(3)]
    plan = start_job("test.recovery_plan_failover", lock_key=keys, target="plan01", stages=[
        [manual_step("Confirm failover of plan01", manual_log, "Confirm the failover, then resume")],
    ])
    wait_for_job(plan, {"waiting_action"}, timeout=20)
    job = get_job(plan)
    assert job["lock_key"] is None and job["lock_keys"] == keys
    assert [lock_holder(key) for key in keys] == [plan] * 3

    before = table_counts()
    one_step = [[StepSpec("Ship logs", "test.record", "host.h1", {"log": str(never), "label": "never"})]]
    for number, key in enumerate(keys):
        with pytest.raises(ItemBusyError,
                           match=rf"^app{number} is busy with job {plan} "
                                 rf"\(test.recovery_plan_failover, waiting_action\)$"):
            start_job("test.delta_replication", lock_key=key, target=f"app{number}", stages=one_step)
    # Another plan sharing items with it is refused, naming the first of them it asked for, and takes
    # none of its keys, not even the free ones.
    free = [lock_key(), lock_key()]
    with pytest.raises(ItemBusyError,
                       match=rf"^plan02: {keys[2]} is busy with job {plan} \(test.recovery_plan_failover"):
        start_job("test.recovery_plan_failover", lock_key=[free[0], keys[2], free[1], keys[0]], target="plan02",
                  stages=one_step)
    with pytest.raises(ItemBusyError, match=rf"^{keys[1]} is busy with job {plan} "):
        start_job("test.recovery_plan_failover", lock_key=(free[1], keys[1]), stages=one_step)
    for bad, message in (([free[0], ""], "lock key must be a non-empty string"),
                         (7, "lock_key must be a string, a sequence of strings or None, not int")):
        with pytest.raises(ValueError, match=message):
            start_job("test.recovery_plan_failover", lock_key=bad, stages=one_step)
    assert table_counts() == before
    assert lock_holder(free[0]) is None and lock_holder(free[1]) is None

    resume(plan)
    assert wait_for_job(plan, timeout=20)["state"] == "succeeded"
    assert [lock_holder(key) for key in keys] == [None] * 3
    # Each item is free for a job of its own again; a key given twice is taken once.
    single = start_job("test.delta_replication", lock_key=keys[1], stages=[[manual_step("Wait", manual_log)]])
    twice = start_job("test.recovery_plan_failover", lock_key=[keys[0], keys[2], keys[0]],
                      stages=[[manual_step("Wait", manual_log)]])
    assert (get_job(single)["lock_key"], get_job(single)["lock_keys"]) == (keys[1], [keys[1]])
    assert get_job(twice)["lock_keys"] == [keys[0], keys[2]]
    assert [lock_holder(key) for key in keys] == [twice, single, twice]
    for job_id in (single, twice):
        cancel(job_id)
        assert wait_for_job(job_id, timeout=15)["state"] == "cancelled"
    # A step may still have been running its action when cancelled: the locks go once it stopped.
    wait_until(lambda: [lock_holder(key) for key in keys] == [None] * 3, timeout=15,
               what="every lock of the cancelled jobs to be released")
    assert not never.exists()


# ---- faults -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_step_whose_worker_is_killed_resumes_on_another_worker_without_doing_anything_twice(
    cluster: Deployment, tmp_path: Path
) -> None:
    output, runs = tmp_path / "items.txt", tmp_path / "runs.log"
    total = 40
    victim = cluster.add_worker("victim", ["host.victim"])
    job_id = start_job("test.enable_protection", lock_key=lock_key(), stages=[[StepSpec(
        "Copy disk disk0", "test.count", "host.victim",
        {"output": str(output), "runs": str(runs), "total": total, "seconds_per_item": 0.1})]])
    wait_until(lambda: output.exists() and len(output.read_text().splitlines()) >= 8, timeout=20,
               what="the first run to get going")
    victim.kill()
    done_at_kill = len(output.read_text().splitlines())
    assert done_at_kill < total
    cluster.add_worker("rescuer", ["host.victim"])

    job = wait_for_job(job_id, timeout=40)
    assert job["state"] == "succeeded", job
    assert output.read_text().splitlines() == [str(item) for item in range(total)]  # none twice, none lost
    first_run, second_run = read_records(runs)
    assert first_run["resumed_at"] == 0 and second_run["resumed_at"] == done_at_kill
    assert first_run["pid"] != second_run["pid"]
    step = job["steps"][0]
    assert step["attempts"] == 2 and step["deaths"] == 1 and step["worker"].startswith("rescuer@")


@pytest.mark.slow
def test_a_poison_step_fails_after_max_deaths_instead_of_looping(cluster: Deployment, tmp_path: Path) -> None:
    log, hook_log = tmp_path / "poison.log", tmp_path / "hooks.log"
    cluster.add_worker("poisoned", ["host.poisoned"])
    job_id = start_job(HOOKED_KIND, lock_key=lock_key(), params={"hook_log": str(hook_log)}, stages=[[StepSpec(
        "Apply replication log", "test.kill_own_worker", "host.poisoned", {"log": str(log)})]])
    job = wait_for_job(job_id, timeout=45)
    reason = "worker died 3 times while running this step (poison message?)"
    assert job["state"] == "failed" and job["error"] == f"Apply replication log failed: {reason}"
    step = job["steps"][0]
    assert step["state"] == "failed" and step["error"] == reason and step["deaths"] == 3
    assert step["error_class"] == "workflows.engine.errors.PoisonStepError"
    assert len(read_records(log)) == 3
    hooks = wait_until(lambda: read_records(hook_log), timeout=10, what="the failure hook")
    assert [(hook["job"], hook["state"]) for hook in hooks] == [(job_id, "failed")]


@pytest.mark.slow
def test_jobs_queued_running_and_started_while_redis_is_down_all_complete(tmp_path: Path) -> None:
    # A deployment of its own: its Redis is killed. The worker running the step rides the outage out: it
    # keeps running the step (nothing cancels it, so it runs once), reconnects by itself, and goes on
    # serving, the reconciler's queue among the rest; nobody starts a worker for it.
    output, runs = tmp_path / "items.txt", tmp_path / "runs.log"
    total = 40

    def later_job(label: str) -> str:
        return start_job("test.enable_protection", lock_key=lock_key(), stages=[[StepSpec(
            "Prerequisites check", "test.record", "host.later", {"log": str(tmp_path / "later.log"), "label": label},
        )]])

    with deployment(tmp_path / "deployment", {"restarted": (["orchestration", "host.busy"], 2)}) as private:
        queued_id = later_job("queued")
        running_id = start_job("test.enable_protection", lock_key=lock_key(), stages=[[StepSpec(
            "Copy disk disk0", "test.count", "host.busy",
            {"output": str(output), "runs": str(runs), "total": total, "seconds_per_item": 0.1})]])
        wait_until(lambda: output.exists() and len(output.read_text().splitlines()) >= 5, timeout=20,
                   what="the running job to get going")
        assert get_job(queued_id)["steps"][0]["state"] == "queued"

        private.redis.kill()
        offline_id = later_job("offline")  # recorded, not sent: the reconciler sends it later
        offline = get_job(offline_id)
        assert offline["state"] == "queued" and offline["steps"][0]["state"] == "pending"
        private.redis.start()
        assert get_job(running_id)["steps"][0]["state"] == "running"
        private.add_worker("later", ["host.later"])

        for job_id in (queued_id, running_id, offline_id):
            job = wait_for_job(job_id, timeout=40)
            assert job["state"] == "succeeded", job
        assert output.read_text().splitlines() == [str(item) for item in range(total)]
        assert len(read_records(runs)) == 1, read_records(runs)
        restarted = private.workers["restarted"]
        assert restarted.process.poll() is None, private.log_tails(4000)
        assert "Connection to broker lost" in restarted.log(), "the worker never saw Redis go: nothing was tested"
        running = get_job(running_id)["steps"][0]
        assert (running["attempts"], running["deaths"], running["interruptions"]) == (1, 0, 0), running
        assert sorted(record["label"] for record in read_records(tmp_path / "later.log")) == ["offline", "queued"]


def test_the_engine_runs_on_postgresql_too(postgres_admin: sa.Engine, tmp_path: Path) -> None:
    """The conditional updates (claims with subqueries, job state by CASE, settling, resume, several
    locks taken at once or not at all) on PostgreSQL."""
    schema = f"asr_engine_{uuid.uuid4().hex[:12]}"
    with postgres_admin.connect() as connection:
        connection.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    database_url = postgres_admin.url.update_query_dict({"options": f"-csearch_path={schema}"})
    log, flaky_log = tmp_path / "record.log", tmp_path / "flaky.log"
    try:
        with deployment(tmp_path / "deployment", {"pg": (["orchestration", "host.pg"], 2)},
                        database_url=database_url.render_as_string(hide_password=False)):
            key, other = lock_key(), lock_key()
            job_id = start_job("test.delta_replication", lock_key=[key, other], target="app04", stages=[
                [StepSpec("Ship log disk0", "test.flaky", "host.pg", {"log": str(flaky_log), "failing_attempts": 2}),
                 StepSpec("Ship log disk1", "test.record", "host.pg", {"log": str(log), "label": "disk1"})],
                [manual_step("Confirm", tmp_path / "manual.log")],
                [StepSpec("Apply logs", "test.record", "orchestration", {"log": str(log), "label": "apply"})],
            ])
            before = table_counts()
            with pytest.raises(ItemBusyError, match=f"app05: {other} is busy with job {job_id}"):
                start_job("test.resynchronize", lock_key=[lock_key(), other], target="app05", stages=[[StepSpec(
                    "Resynchronize", "test.record", "host.pg", {"log": str(log), "label": "never"})]])
            assert table_counts() == before
            wait_for_job(job_id, {"waiting_action"}, timeout=40)
            assert [lock_holder(held) for held in (key, other)] == [job_id, job_id]
            assert len(resume(job_id, note="checked")) == 1
            job = wait_for_job(job_id, timeout=40)
            assert job["state"] == "succeeded", job
            assert [step["attempts"] for step in job["steps"]] == [3, 1, 1, 1]
            assert [record["label"] for record in read_records(log)] == ["disk1", "apply"]
            assert lock_holder(key) is None and lock_holder(other) is None
    finally:
        with postgres_admin.connect() as connection:
            connection.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
