"""The workflow benchmarks: what the job engine costs per step, protecting many VMs end to end, and a
recovery plan's failover time (RTO).

Both run against real parts started for the run and stopped after it: a private redis-server, a SQLite
database in the workdir, real `celery -A worker` worker (and beat) processes: the product's deployment
(sites/deployment.py), and for whole sites the tests' recovery-site helper (tests/recovery_site.py) on it.

- Step overhead: a job of N one-step stages of a no-op action, run in order by the engine, against a
  bare `chain(noop_task.si() × N)` of a plain Celery task, on the same broker, queue and worker, rounds
  alternating which goes first. Both are timed from the submitting call to the moment this process sees
  the end (the engine's job state in the database, the chain's last result in Redis).
- Enable protection: M VMs of one small disk each on two hosts, protected all at once through
  `workflows.protection.enable_protection` with real host workers, orchestration workers and beat; timed
  from the first submit to the last job succeeded, then every replica is compared with its source byte
  for byte. A wrong replica or a failed job raises BenchmarkError: it is not a result.
- Recovery plan: M protected VMs in a plan of G groups, failed over with `workflows.plans.start_plan`
  (a test failover, then a planned one) to the recovery host dr1 and timed from the submit to the job's
  success (the plan's RTO); per-VM RTO and RPO from the FailoverRecord rows; every recovery VM's disks
  checked against the recovery point's manifest root and the source byte for byte. Beside it, the same
  canvas shape as bare no-op Celery tasks and as no-op engine steps, to split the RTO into Celery's
  floor, the engine's coordination and the steps' work.
"""
from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from celery import chain

from benchmarks.harness import BenchmarkError, alternate, row, summary
from sites.deployment import Deployment
from sites.localservices import ServiceStartError

REPO_ROOT = Path(__file__).resolve().parent.parent
_TESTS_DIR = REPO_ROOT / "tests"
if str(_TESTS_DIR) not in sys.path:
    # The recovery-site helper of the tests (tests/recovery_site.py) is imported as a top-level module, as
    # pytest puts tests/ on the path.
    sys.path.append(str(_TESTS_DIR))

ACTION_MODULE = "benchmarks.workflow_actions"
STEP_OVERHEAD_GOAL = 1.5
"""The engine's time per step may be at most this many times the bare chain's."""
WARMUP_STEPS = 10
POLL_INTERVAL_S = 0.01
"""How often the end of the engine's job is looked for: at most 0.05 ms per step of 200 added."""
METHOD = [
    "Workflows run on real parts started for the run: a private redis-server, a SQLite database (WAL) "
    "in the workdir, `celery -A worker worker` processes (prefork) with the engine's production settings "
    "and, for enabling protection, beat.",
    f"Step overhead: after a warm-up of {WARMUP_STEPS} steps each, the engine's job of one-step stages and "
    f"the bare chain alternate (the engine first in odd rounds); each is timed from the submitting call to "
    f"the moment the benchmark sees it end (the job's state in the database, polled every "
    f"{POLL_INTERVAL_S * 1000:g} ms; the chain's last result from Redis). Per step = that time / the steps. "
    f"Every engine step must have succeeded after exactly one attempt, each claimed after the one before it "
    f"ended.",
    "Enable protection: the VMs are created first (not timed); then enable_protection of every VM is "
    "submitted at once, and the time runs to the moment every job is seen succeeded. The clock is "
    "unscaled and the policy's copy frequency is 5 min, so no delta cycle runs beside the measurement. "
    "Afterwards every item must be protected and Healthy and every replica must equal its source byte "
    "for byte; otherwise the run stops.",
    "Recovery plan (RTO): in a deployment of its own (that of the tests: heartbeat and reconciler every "
    "1 s), the plan's VMs are created and protected first (not timed), the plan is created, then its test "
    "failover and then its planned failover are each submitted with workflows.plans.start_plan and timed "
    "from that call to the job seen succeeded (polled every 10 ms): the plan's RTO. Each runs once. Per-VM "
    "RTO and RPO are the FailoverRecord rows' rto_s (from the request to the VM running) and rpo_s. "
    "Afterwards every record must be succeeded and verified with its produced manifest roots equal to "
    "the point's, every recovery VM must run on dr1, and each of its disks must have the point's root "
    "(computed again here) and equal its source byte for byte; no workload writes to the sources, and "
    "the planned failover shuts them down before the last logs ship, so the source equals the point.",
    "Recovery plan peer: the plan does real work and the peer none, so their ratio is not a speed "
    "comparison: it is the share of the RTO that Celery itself needs to carry a canvas of that shape. "
    "The peer is the plan job's shape as it ran (its stages, and in each the queue of every step) sent "
    "as a bare Celery chain of plain no-op tasks (a stage of several steps a group, a no-op barrier task "
    "between two groups), on the same queues and workers; beside it "
    "runs an engine job of no-op steps of the "
    "same shape, so the RTO splits into Celery's floor, the engine's coordination (no-op job less the "
    "floor) and the steps' work (the plan less the no-op job). Each runs once, as the plan does, after "
    "the planned failover (no delta cycle can start then); no goal is set.",
    "Messages delivered: before and after each plan job and each same-shape run, once no new message "
    "of the task (a step's task, or the no-op task) has arrived for 1 s, the workers' logs' \"Task "
    "...[id] received\" lines are counted; the difference over the steps is the deliveries per step "
    "(1.00 when every message arrives once). Celery delivers the members of a group that follows a "
    "group in a chain once per member of the first (celery/celery#8180, #8662): the peer puts a no-op "
    "barrier task between two groups; the engine sends each stage itself when the one before completes, "
    "and a copy that still finds its step running is refused while the step's heartbeat is fresh. The "
    "figures are reported; the run stops only when a job fails or a disk is wrong.",
]
_SECONDS_PER_STEP_BOUND = 0.5
"""A bound on every wait: far above any step's cost here (a few ms), so only a hang reaches it."""


def engine_deployment(workdir: Path, workers: dict[str, list[str]]) -> Deployment:
    """Redis, a database and one prefork worker of concurrency 1 per entry of `workers` (name: queues),
    with the engine's production settings (workers get no ASR_* variable but these); this process's
    database and Celery app point at them while the deployment is entered, and its previous settings come
    back. Redis is not append-only, so its disk does not weigh on the steps."""
    return Deployment(workdir, workers={name: (queues, 1) for name, queues in workers.items()}, beat=False,
                      appendonly=False, worker_settings={"ASR_ACTION_MODULES": ACTION_MODULE})


# ---- step overhead --------------------------------------------------------------------------------
def run_engine_job(steps: int) -> dict[str, Any]:
    """A job of `steps` one-step stages of the no-op action, timed from start_job to the job seen
    succeeded; BenchmarkError unless every step ran exactly once, in order."""
    from benchmarks.workflow_actions import NOOP_ACTION
    from workflows.engine import StepSpec, get_job, start_job

    stages = [[StepSpec(f"No-op step {number}", NOOP_ACTION, "orchestration")] for number in range(1, steps + 1)]
    started = time.perf_counter()
    job_id = start_job("bench.step_overhead", lock_key=None, stages=stages)
    state = _wait_for_job_end(job_id, timeout=10 + steps * _SECONDS_PER_STEP_BOUND)
    seconds = time.perf_counter() - started
    job = get_job(job_id)
    if state != "succeeded":
        raise BenchmarkError(f"step overhead: job {job_id} ended {state}: {job['error']}")
    _check_steps_ran_once_in_order(job)
    return {"seconds": seconds, "steps": steps, "job_id": job_id,
            "job_seconds_in_database": _seconds_between(job["created_at"], job["ended_at"])} | _step_timeline(job)


def _wait_for_job_end(job_id: str, *, timeout: float) -> str:
    from models.db import session_scope
    from models.jobs import FINISHED_JOB_STATES, Job

    deadline = time.monotonic() + timeout
    while True:
        with session_scope() as session:
            state = session.get(Job, job_id).state
        if state in FINISHED_JOB_STATES:
            return state.value
        if time.monotonic() > deadline:
            raise BenchmarkError(f"job {job_id} did not end within {timeout:g} s (it is {state.value})")
        time.sleep(POLL_INTERVAL_S)


def _check_steps_ran_once_in_order(job: dict[str, Any]) -> None:
    previous_end = None
    for step in job["steps"]:
        if step["state"] != "succeeded" or step["attempts"] != 1:
            raise BenchmarkError(f"step overhead: step {step['name']!r} of job {job['id']} is {step['state']} "
                                 f"after {step['attempts']} attempt(s), not succeeded after one")
        if previous_end is not None and _seconds_between(previous_end, step["started_at"]) < 0:
            raise BenchmarkError(f"step overhead: step {step['name']!r} of job {job['id']} started before "
                                 f"the step before it ended")
        previous_end = step["ended_at"]


def _step_timeline(job: dict[str, Any]) -> dict[str, float]:
    """Where a step's time goes, from the engine's own timestamps (started_at is taken as the claim's
    transaction begins, ended_at as the success's does): from the claim to the success (the claim's
    transaction, the heartbeat thread, the action), and from the success to the next step's claim (the
    success transaction, the rest of run_step, the broker hop, the next task's start)."""
    steps = job["steps"]
    inside = [_seconds_between(step["started_at"], step["ended_at"]) for step in steps]
    between = [_seconds_between(before["ended_at"], after["started_at"])
               for before, after in zip(steps, steps[1:], strict=False)]
    return {"median_ms_claim_to_recorded": statistics.median(inside) * 1000,
            "median_ms_recorded_to_next_claim": statistics.median(between) * 1000 if between else 0.0,
            "ms_submit_to_first_claim": _seconds_between(job["created_at"], steps[0]["started_at"]) * 1000}


def _seconds_between(start: str, end: str) -> float:
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def run_bare_chain(steps: int) -> dict[str, Any]:
    """`chain(noop_task.si() × steps)` on the orchestration queue, timed from apply_async to the last
    task's result. Only the last task stores a result, as only the engine's database records its steps."""
    from benchmarks.workflow_actions import NOOP_TASK
    from worker import app

    def noop(last: bool):
        return app.signature(NOOP_TASK, immutable=True, queue="orchestration", ignore_result=not last)

    started = time.perf_counter()
    result = chain(*(noop(number == steps) for number in range(1, steps + 1))).apply_async()
    timeout = 10 + steps * _SECONDS_PER_STEP_BOUND
    try:
        result.get(timeout=timeout, interval=POLL_INTERVAL_S)
    except Exception as exc:  # noqa: BLE001 - a timeout or a task error: either way no result
        raise BenchmarkError(f"step overhead: the bare chain of {steps} tasks did not succeed within "
                             f"{timeout:g} s: {type(exc).__name__}: {exc}") from None
    seconds = time.perf_counter() - started
    if result.state != "SUCCESS":
        raise BenchmarkError(f"step overhead: the bare chain's last task is {result.state}")
    result.forget()
    return {"seconds": seconds, "steps": steps}


def bench_step_overhead(workdir: Path, steps: int, rounds: int,
                        progress: Callable[[str], None]) -> dict[str, Any]:
    try:
        with engine_deployment(workdir / "step-overhead", {"bench-orchestration": ["orchestration", "recovery"]}):
            progress(f"step overhead: warming up ({WARMUP_STEPS} steps each)")
            run_engine_job(WARMUP_STEPS)
            run_bare_chain(WARMUP_STEPS)
            progress(f"step overhead: {rounds} round(s) of {steps} engine steps and {steps} bare chain hops")
            engine_runs, bare_runs = alternate(rounds, lambda: run_engine_job(steps),
                                               lambda: run_bare_chain(steps))
    except ServiceStartError as exc:
        raise BenchmarkError(f"step overhead: {exc}") from None
    result: dict[str, Any] = {
        "title": f"Workflow step overhead, {steps} sequential no-op steps",
        "ours_does": f"one job of {steps} one-step stages of a no-op action (start_job, then each step "
                     f"claimed, run and recorded in the database by run_step), one orchestration worker "
                     f"(prefork, concurrency 1)",
        "peer_does": f"chain(noop_task.si() × {steps}) of a plain Celery task on the same broker, queue and "
                     f"worker",
        "ours": summary(engine_runs), "peer": summary(bare_runs), "rows": [], "details": {"steps": steps},
    }
    engine_ms = result["ours"]["best_seconds"] / steps * 1000
    bare_ms = result["peer"]["best_seconds"] / steps * 1000
    engine_median_ms = result["ours"]["median_seconds"] / steps * 1000
    bare_median_ms = result["peer"]["median_seconds"] / steps * 1000
    result["rows"].append(row(
        "time per step", engine_ms, bare_ms, "ms", bare_ms / engine_ms,
        f"engine ≤ {STEP_OVERHEAD_GOAL:g}× the bare chain (ratio ≥ {1 / STEP_OVERHEAD_GOAL:.2f})",
        engine_ms <= STEP_OVERHEAD_GOAL * bare_ms,
    ) | {"ours_median": engine_median_ms, "peer_median": bare_median_ms,
         "median_ratio": bare_median_ms / engine_median_ms})
    result["details"] |= {"engine_ms_per_step": engine_ms, "bare_ms_per_step": bare_ms,
                          "engine_over_bare": engine_ms / bare_ms,
                          "engine_ms_per_step_in_database": min(
                              run["job_seconds_in_database"] for run in engine_runs) / steps * 1000}
    return result


# ---- enable protection of many VMs ----------------------------------------------------------------
@dataclass(frozen=True)
class FleetSettings:
    """The VMs one enable-protection run protects: `vms` VMs of one raw disk of `disk_size` bytes,
    about half of it data, spread evenly over `hosts` hosts."""

    vms: int
    hosts: int
    disk_size: int
    fill: float = 0.5
    copy_frequency_s: int = 300
    """The policy's copy frequency. With the clock unscaled, the first delta cycle comes 5 min after an
    item's protection: the run measures enabling protection, not replication cycles beside it."""


def bench_enable_protection(workdir: Path, fleet: FleetSettings, seed: int,
                            progress: Callable[[str], None]) -> dict[str, Any]:
    """Protect every VM of the fleet at once and time it; BenchmarkError unless every job succeeded,
    every item is protected and healthy, and every replica equals its source byte for byte."""
    from recovery_site import RecoverySite

    host_names = tuple(f"host{number}" for number in range(1, fleet.hosts + 1))
    try:
        with RecoverySite(workdir / "enable-protection", backend="local", host_names=host_names, time_scale=1,
                          policy_options={"copy_frequency_s": fleet.copy_frequency_s}) as site:
            progress(f"enable protection: creating {fleet.vms} VMs of one {fleet.disk_size >> 20} MiB disk "
                     f"on {fleet.hosts} hosts")
            vm_ids = [site.create_vm(host_names[number % fleet.hosts], f"vm{number:04d}",
                                     [("disk0", fleet.disk_size, "raw")], fill=fleet.fill, seed=seed + number)
                      for number in range(fleet.vms)]
            progress(f"enable protection: protecting {fleet.vms} VMs at once")
            started = time.perf_counter()
            job_ids = [site.protect(vm_id) for vm_id in vm_ids]
            submitted = time.perf_counter() - started
            _wait_for_jobs(site, job_ids, timeout=120 + fleet.vms * _SECONDS_PER_JOB_BOUND)
            seconds = time.perf_counter() - started
            progress(f"enable protection: {fleet.vms} jobs succeeded in {seconds:.1f} s; verifying every replica")
            jobs = [site.wait_job(job_id, timeout=1) for job_id in job_ids]
            for vm_id in vm_ids:
                _check_protected(site, vm_id)
                site.verify_replica(vm_id)
    except (AssertionError, ServiceStartError) as exc:
        raise BenchmarkError(f"enable protection: {exc}") from None
    durations = sorted(_seconds_between(job["created_at"], job["ended_at"]) for job in jobs)
    steps_per_job = {len(job["steps"]) for job in jobs}
    return {
        "title": f"Enable protection of {fleet.vms} VMs ({fleet.vms} × one {fleet.disk_size >> 20} MiB disk, "
                 f"{fleet.hosts} hosts, local backend)",
        "ours_does": f"enable_protection of every VM submitted at once, real host agent workers (one per host, "
                     f"prefork concurrency {site.host_concurrency}), an orchestration+recovery worker and beat; "
                     f"timed from the first submit to the last job seen succeeded; then every replica is "
                     f"compared with its source byte for byte",
        "peer_does": None,
        "ours": summary([{"seconds": seconds, "submit_seconds": submitted, "vms": fleet.vms}]),
        "rows": [
            row("wall time, first submit to all succeeded", seconds, None, "s", None, "none set (reported)", None),
            row("jobs per minute", fleet.vms / seconds * 60, None, "jobs/min", None, "none set (reported)", None),
        ],
        "details": {
            "vms": fleet.vms, "hosts": fleet.hosts, "disk_size": fleet.disk_size, "fill": fleet.fill,
            "copy_frequency_s": fleet.copy_frequency_s, "submit_seconds": submitted,
            "steps_per_job": sorted(steps_per_job), "job_seconds_median": statistics.median(durations),
            "job_seconds_max": durations[-1], "replicas_verified": len(vm_ids),
        },
    }


_SECONDS_PER_JOB_BOUND = 5.0
"""Bounds the wait for the whole fleet: far above a small VM's enable protection here (≈ 1 s)."""


def _wait_for_jobs(site: Any, job_ids: list[str], *, timeout: float) -> None:
    """Until every job succeeded: AssertionError (the fixture's, with the job's steps and worker logs)
    as soon as one ends otherwise, or when `timeout` s pass."""
    from sqlmodel import select

    from models.db import session_scope
    from models.jobs import Job, JobState

    deadline = time.monotonic() + timeout
    while True:
        with session_scope() as session:
            states = dict(session.exec(select(Job.id, Job.state).where(Job.id.in_(job_ids))).all())
        unfinished = [job_id for job_id in job_ids if states[job_id] != JobState.succeeded]
        if not unfinished:
            return
        ended_otherwise = [job_id for job_id in unfinished if states[job_id] in (JobState.failed, JobState.cancelled)]
        if ended_otherwise or time.monotonic() > deadline:
            # The fixture's wait reports the job's steps and every worker's log tail.
            site.wait_job((ended_otherwise or unfinished)[0], timeout=0)
        time.sleep(0.05)


def _check_protected(site: Any, vm_id: str) -> None:
    from models.protection import Health, ReplicationState

    status = site.item(vm_id)
    if status["state"] != ReplicationState.PROTECTED or status["health"] != Health.HEALTHY:
        raise AssertionError(f"VM {site.vm_name(vm_id)}: enable protection succeeded but the item is "
                             f"{status['state']} ({status['health']}): {status}")
