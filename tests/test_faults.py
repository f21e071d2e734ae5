"""Faults injected into the ASR workflows while they run, with real parts only: a private redis-server,
real Celery workers and beat, SQLite, host trees on disk, and the recovery storage in Azurite or a local
directory (tests/recovery_site.py). A host worker is killed with SIGKILL (its whole process group) in the
middle of a copy, and again on every run of a copy; Redis is killed and started again on its append-only
file; Azurite is stopped and started again on the same port and data. After each fault the jobs finish
by themselves (or, for the copy that kills its worker every time, fail as a poison step) and every replica
equals its source byte for byte. Every wait is bounded.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest
from engine_harness import EventCapture
from recovery_site import RecoverySite

import sites.localservices
from api import service
from datapath.replication import ReplicaDisk, ReplicaState
from sites.localservices import AzuriteProcess, wait_until
from workflows.engine import get_job
from workflows.progress import job_progress

pytestmark = pytest.mark.slow

T = TypeVar("T")

MIB = 1024 * 1024
HOST = "host1"
HOST_WORKER = f"host-{HOST}"
HOST_QUEUE = f"host.{HOST}"
# The host's uplink limited to 4 MiB/s (ASR_HOST_UPLOAD_LIMIT): a 64 MiB copy lasts about 12-16 s, long enough to
# be cut in the middle, checkpointing every 20 MiB, without moving hundreds of MiB through Azurite.
SLOW_UPLINK = {"ASR_HOST_UPLOAD_LIMIT": "4M"}


# ---- helpers ------------------------------------------------------------------------------------------
def step_named(job: dict[str, Any], name: str) -> dict[str, Any]:
    return next(step for step in job["steps"] if step["name"] == name)


def at(timestamp: str | None) -> datetime:
    assert timestamp is not None
    return datetime.fromisoformat(timestamp)


def replica_state(site: RecoverySite, vm: str, disk: str) -> ReplicaState | None:
    """What the recovery side records for the disk's replica (its copy checkpoint among it)."""
    storage = site.storage()
    try:
        return ReplicaDisk(storage, ReplicaDisk.name_for(HOST, vm, disk)).load_state()
    finally:
        storage.close()


def live_percent(job_id: str, step_id: str) -> float | None:
    """The step's progress as its worker last published it to Redis."""
    record = job_progress(job_id).get(step_id)
    return None if record is None else record["percent"]


def sample_until(sample: Callable[[], T], *, timeout: float, what: str, site: RecoverySite,
                 job_ids: list[str], interval: float = 0.02) -> T:
    """Call `sample` every `interval` s until it returns something true, and return that; on timeout,
    AssertionError naming `what` with the jobs' steps and the tails of the worker logs."""
    try:
        return wait_until(sample, timeout=timeout, what=what, interval=interval)
    except AssertionError as timed_out:
        jobs = "\n".join(site.describe_job(get_job(job_id)) for job_id in job_ids)
        raise AssertionError(f"{timed_out}\n{jobs}\n{site.log_tails()}") from None


def progress_runs(events: list[dict[str, Any]], step_id: str) -> list[list[int]]:
    """The `done` values of the step's task-progress events, one list per worker process, in the order
    the runs began."""
    runs: dict[int, list[int]] = {}
    for event in events:
        if event.get("step") == step_id:
            runs.setdefault(event["pid"], []).append(event["done"])
    return list(runs.values())


class PinnedAzurite(AzuriteProcess):
    """Azurite that comes back on the port (and data directory) it first had, as a storage account's
    endpoint does after an outage: the workers' connection string names that port."""

    def start(self, timeout: float = 30.0) -> PinnedAzurite:
        if self.port is None:
            return super().start(timeout)
        port = self.port
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(sites.localservices, "free_port", lambda: port)
            return super().start(timeout)


def waiting_task_ids(site: RecoverySite, queue: str) -> list[str]:
    """The ids of the task messages waiting in `queue` on the site's Redis (kombu keeps one list per
    queue and priority, named after the queue)."""
    client = site.redis.client()
    try:
        keys = [key for key in client.keys(f"{queue}*") if client.type(key) == b"list"]
        return [json.loads(raw)["headers"]["id"] for key in keys for raw in client.lrange(key, 0, -1)]
    finally:
        client.close()


# ---- a host worker killed in the middle of a copy -------------------------------------------------------
@pytest.mark.azure
def test_host_worker_killed_mid_copy_resumes_from_the_checkpoint_on_a_new_worker(
    tmp_path: Path, azurite: AzuriteProcess
) -> None:
    size = 64 * MIB
    copy = "Copy disk disk0"
    with RecoverySite(tmp_path, backend="azure", azurite=azurite, env=SLOW_UPLINK) as site:
        vm_id = site.create_vm(HOST, "app01", [("disk0", size, "vhd")], fill=1.0, seed=11)
        finished = EventCapture(
            "task-progress", lambda event: event.get("step_name") == copy and event["done"] == event["total"],
            timeout=180,
        )
        job_id = site.protect(vm_id)
        step_id = step_named(get_job(job_id), copy)["id"]

        def mid_copy_with_a_checkpoint() -> bool:
            percent = live_percent(job_id, step_id)
            if percent is None or not 10 < percent < 90:
                return False
            state = replica_state(site, "app01", "disk0")
            return state is not None and state.copy_checkpoint > 0

        sample_until(mid_copy_with_a_checkpoint, timeout=90, interval=0.1, site=site, job_ids=[job_id],
                     what="the copy to be between 10% and 90% with a checkpoint recorded")
        site.stop_process(HOST_WORKER, kill=True)

        state = replica_state(site, "app01", "disk0")
        checkpoint = state.copy_checkpoint
        assert not state.initial_copy_done and 0 < checkpoint < size, state
        step = step_named(get_job(job_id), copy)
        assert step["state"] == "running" and step["attempts"] == 1 and step["deaths"] == 0, step

        # No host worker exists now: only the reconciler can notice the silent heartbeat and queue the
        # copy again (ASR_STALE_AFTER_S = 3 s, reconciler every second).
        requeued = wait_until(
            lambda: (s := step_named(get_job(job_id), copy))["deaths"] == 1 and s["state"] == "queued" and s,
            timeout=15, what="the reconciler to queue the copy again after its worker died",
        )
        assert requeued["attempts"] == 1
        site.start_host_worker(HOST)

        job = site.wait_job(job_id, timeout=120)
        step = step_named(job, copy)
        assert (step["state"], step["attempts"], step["deaths"]) == ("succeeded", 2, 1), step
        assert step["progress_done"] == step["progress_total"] == size
        assert all(other["attempts"] == 1 for other in job["steps"] if other["name"] != copy)

        finished.join(timeout=30)
        first_run, second_run = progress_runs([e for e in finished.events if e.get("job_id") == job_id], step_id)
        assert max(first_run) < size, first_run
        # The second run started from the checkpoint: its first durable offset is past it, never 0.
        assert second_run[0] > checkpoint and second_run[-1] == size, (checkpoint, second_run)
        assert second_run == sorted(second_run)

        state = replica_state(site, "app01", "disk0")
        assert state.initial_copy_done and state.copy_checkpoint == size
        item = site.item(vm_id)
        assert (item["state"], item["health"]) == ("protected", "Healthy"), item
        site.verify_replica(vm_id)


# ---- Redis killed and restarted on its append-only file -----------------------------------------------
def test_redis_killed_and_restarted_while_three_vms_are_being_protected(tmp_path: Path) -> None:
    vm_names = ("app01", "app02", "app03")
    # One task at a time on the host: the other jobs' host steps wait as messages in Redis. No delta
    # cycle before the test is done looking (the longest copy frequency, 15 minutes: 90 s scaled).
    with RecoverySite(tmp_path, appendonly=True, host_concurrency=1,
                      policy_options={"copy_frequency_s": 900}) as site:
        vm_ids = [site.create_vm(HOST, name, [("disk0", "256M", "raw"), ("disk1", "32M", "vhd")], fill=0.75,
                                 seed=number) for number, name in enumerate(vm_names, start=1)]
        job_ids = [site.protect(vm_id) for vm_id in vm_ids]

        def copying_while_messages_wait() -> list[str]:
            copying = any(step["name"].startswith("Copy disk") and step["state"] == "running"
                          for job_id in job_ids for step in get_job(job_id)["steps"])
            return waiting_task_ids(site, HOST_QUEUE) if copying else []

        waiting = sample_until(copying_while_messages_wait, timeout=60, site=site, job_ids=job_ids,
                               what="a copy to run while messages of other steps wait in the host's queue")
        before = [get_job(job_id) for job_id in job_ids]
        assert all(job["state"] != "succeeded" for job in before), [job["state"] for job in before]
        assert any(step["state"] == "running" for job in before for step in job["steps"])
        host_log_at_kill = len(site.workers[HOST_WORKER].log())
        # SIGKILL: Redis gets no chance to write anything more. It runs with appendfsync always (every
        # write is fsynced before Redis answers it), so every message it took is in the append-only file.
        site.redis.kill()
        time.sleep(2.0)  # workers and heartbeats carry on against a dead broker for a while
        site.redis.start()
        # The workers ride it out: they reconnect by themselves, and the task a worker ran when the
        # connection broke runs on to its end (worker.py: nothing cancels it).
        exited = {name: process.process.returncode for name, process in site.workers.items()
                  if process.process.poll() is not None}
        assert not exited, f"processes exited when Redis restarted: {exited}\n{site.log_tails()}"

        for job_id in job_ids:
            job = site.wait_job(job_id, timeout=150)
            assert all(step["state"] == "succeeded" for step in job["steps"]), site.describe_job(job)
        # The messages that still waited in Redis when it died were delivered after it came back.
        host_log = site.workers[HOST_WORKER].log()
        after_kill = [task_id for task_id in waiting if f"[{task_id}] received" not in host_log[:host_log_at_kill]]
        assert after_kill, f"every waiting message {waiting} was taken before Redis died: nothing was tested"
        lost = [task_id for task_id in after_kill if f"[{task_id}] received" not in host_log[host_log_at_kill:]]
        assert not lost, f"messages waiting in Redis when it was killed never arrived: {lost}"
        for vm_id in vm_ids:
            item = site.item(vm_id)
            assert (item["state"], item["health"], item["recovery_points"]) == ("protected", "Healthy", 1), item
            site.wait_idle(vm_id, timeout=30)
            site.verify_replica(vm_id)


# ---- the recovery storage away for a while ----------------------------------------------------------------
@pytest.mark.azure
def test_storage_outage_mid_copy_waits_on_the_retry_schedule_then_the_job_succeeds(tmp_path: Path) -> None:
    copy = "Copy disk disk0"
    retries_to_see = 4
    azurite = PinnedAzurite(tmp_path / "azurite").start()
    try:
        # The longest copy frequency (15 minutes, 1.5 s scaled): delta cycles do not crowd the scheduler.
        with RecoverySite(tmp_path / "site", backend="azure", azurite=azurite, time_scale=600, env=SLOW_UPLINK,
                          policy_options={"copy_frequency_s": 900}) as site:
            vm_id = site.create_vm(HOST, "app01", [("disk0", "64M", "vhd")], fill=0.75, seed=21)
            job_id = site.protect(vm_id)
            step_id = step_named(get_job(job_id), copy)["id"]
            sample_until(lambda: (live_percent(job_id, step_id) or 0) > 10, timeout=60, site=site,
                         job_ids=[job_id], what="the copy to pass 10%")
            azurite.stop()
            assert step_named(get_job(job_id), copy)["state"] == "running"

            waits: dict[int, dict[str, Any]] = {}  # by attempt: the step as it waited after that attempt
            health_seen: set[str] = set()

            def record_waits() -> bool:
                step = step_named(get_job(job_id), copy)
                if step["state"] == "waiting_retry":
                    waits.setdefault(step["attempts"], step)
                    health_seen.add(site.item(vm_id)["health"])
                assert step["state"] in ("running", "waiting_retry", "queued"), site.describe_job(get_job(job_id))
                return len(waits) >= retries_to_see

            sample_until(record_waits, timeout=90, site=site, job_ids=[job_id],
                         what=f"{retries_to_see} retries of the copy while storage is down")
            azurite.start()

            job = site.wait_job(job_id, timeout=90)
            step = step_named(job, copy)
            # Azurite takes about a second to come back: the next attempt may still find it down.
            assert step["state"] == "succeeded" and step["attempts"] > retries_to_see, step
            assert sorted(waits) == list(range(1, retries_to_see + 1))
            assert {waiting["error_class"] for waiting in waits.values()} == {"datapath.errors.StorageUnavailableError"}
            # 1, 2, 4 and 8 minutes after the failed attempts, scaled by 600.
            recorded = [
                round((at(waits[attempt]["next_attempt_at"]) - at(waits[attempt]["ended_at"])).total_seconds(), 3)
                for attempt in sorted(waits)
            ]
            assert recorded == [0.1, 0.2, 0.4, 0.8], recorded
            item = site.item(vm_id)
            assert (item["state"], item["health"]) == ("protected", "Healthy"), item
            site.verify_replica(vm_id)
            # While it retried, the item showed a warning to watch, not an error for an administrator.
            assert health_seen == {"Warning"}, f"item health while the copy waited for a retry: {health_seen}"
    finally:
        azurite.stop()


# ---- a copy whose worker dies every time ------------------------------------------------------------------
@pytest.mark.azure
def test_copy_whose_worker_dies_every_time_fails_as_poison_then_resumes_from_its_checkpoint(
    tmp_path: Path, azurite: AzuriteProcess
) -> None:
    copy = "Copy disk disk0"
    max_deaths = 3
    with RecoverySite(tmp_path, backend="azure", azurite=azurite,
                      env={**SLOW_UPLINK, "ASR_MAX_STEP_DEATHS": str(max_deaths)}) as site:
        vm_id = site.create_vm(HOST, "app01", [("disk0", "64M", "vhd")], fill=0.75, seed=31)
        job_id = site.protect(vm_id)

        def copying_in_run(run: int) -> Callable[[], bool]:
            def copying() -> bool:
                step = step_named(get_job(job_id), copy)
                # A heartbeat after the start: this run has been copying for a second.
                return (step["state"] == "running" and step["attempts"] == run
                        and at(step["heartbeat_at"]) > at(step["started_at"]))
            return copying

        for run in range(1, max_deaths + 1):
            sample_until(copying_in_run(run), timeout=60, interval=0.05, site=site, job_ids=[job_id],
                         what=f"run {run} of the copy to be copying")
            site.stop_process(HOST_WORKER, kill=True)
            if run < max_deaths:
                wait_until(lambda run=run: step_named(get_job(job_id), copy)["deaths"] == run, timeout=15,
                           what=f"the reconciler to count death {run} of the copy's worker")
                site.start_host_worker(HOST)

        job = site.wait_job(job_id, timeout=30, states=("failed",))
        reason = f"worker died {max_deaths} times while running this step (poison message?)"
        assert job["error"] == f"{copy} failed: {reason}", job["error"]
        assert job["error_class"] == "workflows.engine.errors.PoisonStepError"
        step = step_named(job, copy)
        assert (step["state"], step["attempts"], step["deaths"], step["error"]) == ("failed", max_deaths, max_deaths,
                                                                                  reason), step
        assert all(later["state"] == "cancelled" for later in job["steps"] if later["stage"] > step["stage"])
        # The failure hook: Critical with the reason, the state left where the job failed, the item free.
        wait_until(lambda: site.item(vm_id)["health"] == "Critical", timeout=15, what="the item to turn Critical")
        item = site.item(vm_id)
        assert item["state"] == "initial_replication" and item["active_job"] is None, item
        assert [(error["code"], error["message"]) for error in item["errors"]] == [
            ("enable_protection_failed", job["error"])], item["errors"]
        state = replica_state(site, "app01", "disk0")
        assert not state.initial_copy_done and state.copy_checkpoint < state.size, state

        # The way out (issue 12: this was a dead end): `jobs restart` resumes the same job from the
        # poisoned copy, which resumes from its checkpoint, and the VM ends protected and Healthy.
        checkpoint = state.copy_checkpoint
        site.start_host_worker(HOST)
        answer = service.restart_job(job_id)
        assert (answer["job_id"], answer["recovery"]) == (job_id, "resumed"), answer
        job = site.wait_job(job_id, timeout=120)
        step = step_named(job, copy)
        assert (step["state"], step["deaths"], step["attempts"]) == ("succeeded", 0, max_deaths + 1), step
        assert step["result"]["resumed_from"] >= checkpoint, step["result"]
        wait_until(lambda: site.item(vm_id)["health"] == "Healthy", timeout=15, what="the item to be Healthy")
        assert site.item(vm_id)["state"] == "protected"
        site.verify_replica(vm_id)
