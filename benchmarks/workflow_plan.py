"""The recovery-plan benchmark: a plan's failover time (RTO), split into Celery's floor, the engine's
coordination and the steps' work by running the plan job's shape as bare no-op Celery tasks and as no-op
engine steps beside it (benchmarks/workflows.py describes the method in METHOD)."""
from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery import chain

from benchmarks.harness import BenchmarkError, row, summary
from benchmarks.workflows import (
    _SECONDS_PER_JOB_BOUND,
    _SECONDS_PER_STEP_BOUND,
    ACTION_MODULE,
    POLL_INTERVAL_S,
    _check_protected,
    _seconds_between,
    _wait_for_job_end,
    _wait_for_jobs,
)
from sites.localservices import ServiceStartError, wait_until

# ---- a recovery plan's failover (RTO) -------------------------------------------------------------
PLAN_NAME = "bench-plan"
RECOVERY_HOST = "dr1"
PLAN_OPERATIONS = ("test_failover", "planned_failover")
PLAN_ACTION_MODULES = "tasks.replication," + ACTION_MODULE
"""The plan site's workers load the no-op action and task too, for the same-shape runs beside the plan."""


@dataclass(frozen=True)
class PlanSettings:
    """The recovery plan one run fails over: `vms` VMs of one raw disk of `disk_size` bytes (about half
    of it data), spread evenly over `hosts` primary hosts, in `groups` groups of near-equal size, failed
    over to the recovery host dr1."""

    vms: int
    groups: int
    hosts: int
    disk_size: int
    fill: float = 0.5
    copy_frequency_s: int = 300
    """As for enabling protection: with the clock unscaled no delta cycle is due while the plans run."""


def plan_groups(vm_ids: list[str], groups: int) -> list[list[str]]:
    """The VMs cut into `groups` consecutive groups whose sizes differ by at most one (never empty)."""
    count = min(groups, len(vm_ids))
    size, extra = divmod(len(vm_ids), count)
    cut, start = [], 0
    for number in range(count):
        end = start + size + (number < extra)
        cut.append(vm_ids[start:end])
        start = end
    return cut


def job_shape(job: dict[str, Any]) -> list[list[dict[str, str]]]:
    """The job's stages as they ran: for each stage, the name and queue of each of its steps."""
    stages: dict[int, list[dict[str, str]]] = {}
    for step in sorted(job["steps"], key=lambda step: (step["stage"], step["index"])):
        stages.setdefault(step["stage"], []).append({"name": step["name"], "queue": step["queue"]})
    return [stages[number] for number in sorted(stages)]


def run_engine_shape(shape: list[list[dict[str, str]]]) -> dict[str, Any]:
    """An engine job of no-op steps with the plan's shape (the same stages, steps and queues), timed
    from start_job to the job seen succeeded; BenchmarkError unless it succeeded. How many steps ran
    more than once (a duplicate message claiming a running step) is returned, not judged: the plan
    job is held to the same."""
    from benchmarks.workflow_actions import NOOP_ACTION
    from workflows.engine import StepSpec, get_job, start_job

    stages = [[StepSpec(step["name"], NOOP_ACTION, step["queue"]) for step in stage] for stage in shape]
    steps = sum(map(len, stages))
    started = time.perf_counter()
    job_id = start_job("bench.plan_shape", lock_key=None, stages=stages)
    state = _wait_for_job_end(job_id, timeout=10 + steps * _SECONDS_PER_STEP_BOUND)
    seconds = time.perf_counter() - started
    job = get_job(job_id)
    if state != "succeeded":
        raise BenchmarkError(f"recovery plan: the no-op job {job_id} of the plan's shape ended {state}: "
                             f"{job['error']}")
    return {"seconds": seconds, "steps": steps, "stages": len(stages), "job_id": job_id,
            "steps_run_more_than_once": sum(step["attempts"] > 1 for step in job["steps"])}


def run_bare_canvas(shape: list[list[dict[str, str]]]) -> dict[str, Any]:
    """`chain(stage, ...)` of the plain no-op task with the plan's shape, Celery's own way of carrying it (a
    one-step stage one signature, a larger one a group, a no-op barrier between two groups; a group followed
    by a task is a chord), each task on its step's queue; timed from apply_async to the last stage's
    results. Only the last stage stores results, as only the engine's database records its steps."""
    from celery import group

    from benchmarks.workflow_actions import NOOP_TASK
    from worker import app
    from workflows.canvas import forget_result_waiters

    def stage_signature(stage: list[dict[str, str]], last: bool):
        signatures = [app.signature(NOOP_TASK, immutable=True, queue=step["queue"], ignore_result=not last)
                      for step in stage]
        return signatures[0] if len(signatures) == 1 else group(signatures)

    links = []
    for number, stage in enumerate(shape):
        if number and len(stage) > 1 and len(shape[number - 1]) > 1:
            # A barrier between two parallel stages: without it Celery delivers the second group once per
            # member of the first, which would slow the peer down.
            links.append(app.signature(NOOP_TASK, immutable=True, queue="orchestration", ignore_result=True))
        links.append(stage_signature(stage, number == len(shape) - 1))
    steps = sum(map(len, shape))
    started = time.perf_counter()
    result = chain(*links).apply_async()
    timeout = 10 + steps * _SECONDS_PER_STEP_BOUND
    try:
        result.get(timeout=timeout, interval=POLL_INTERVAL_S)
    except Exception as exc:  # noqa: BLE001 - a timeout or a task error: either way no result
        raise BenchmarkError(f"recovery plan: the bare canvas of {steps} tasks did not succeed within "
                             f"{timeout:g} s: {type(exc).__name__}: {exc}") from None
    seconds = time.perf_counter() - started
    if not result.successful():
        raise BenchmarkError(f"recovery plan: the bare canvas's last stage is {result.state}")
    result.forget()
    forget_result_waiters()
    return {"seconds": seconds, "steps": steps, "stages": len(shape)}


def bench_recovery_plan(workdir: Path, plan: PlanSettings, seed: int,
                        progress: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """Protect the plan's VMs, create the plan, run its test failover, then its planned failover, each
    timed from the submitting call to the job seen succeeded and verified; then each job's shape once
    as no-op engine steps and once as bare Celery tasks. Returns one benchmark per operation
    ({"plan_test_failover": ..., ...}); BenchmarkError unless every job succeeded and every recovery
    VM's disks hold the recovery point."""
    from recovery_site import RecoverySite

    from benchmarks.workflow_actions import NOOP_TASK
    from models.db import session_scope
    from models.plans import create_plan
    from workflows.engine import get_job, is_step_task
    from workflows.kinds.recovery_plan import start_plan

    host_names = tuple(f"host{number}" for number in range(1, plan.hosts + 1))
    measured: dict[str, dict[str, Any]] = {}
    try:
        with RecoverySite(workdir / "recovery-plan", backend="local", host_names=host_names,
                          recovery_host_names=(RECOVERY_HOST,), time_scale=1,
                          policy_options={"copy_frequency_s": plan.copy_frequency_s},
                          env={"ASR_ACTION_MODULES": PLAN_ACTION_MODULES}) as site:
            progress(f"recovery plan: creating and protecting {plan.vms} VMs of one {plan.disk_size >> 20} MiB "
                     f"disk on {plan.hosts} hosts (not timed)")
            vm_ids = [site.create_vm(host_names[number % plan.hosts], f"pvm{number:04d}",
                                     [("disk0", plan.disk_size, "raw")], fill=plan.fill, seed=seed + number)
                      for number in range(plan.vms)]
            _wait_for_jobs(site, [site.protect(vm_id) for vm_id in vm_ids],
                           timeout=120 + plan.vms * _SECONDS_PER_JOB_BOUND)
            for vm_id in vm_ids:
                _check_protected(site, vm_id)
            groups = plan_groups(vm_ids, plan.groups)
            with session_scope() as session:
                create_plan(session, PLAN_NAME, [{"name": f"group{number}", "vms": members}
                                                 for number, members in enumerate(groups, 1)])
            for operation in PLAN_OPERATIONS:
                label = operation.replace("_", " ")
                _wait_idle(site, vm_ids)
                before = _settled_deliveries(site, is_step_task)
                progress(f"recovery plan: {label} of {plan.vms} VMs in {len(groups)} groups")
                started = time.perf_counter()
                job_id = start_plan(PLAN_NAME, operation)
                submitted = time.perf_counter() - started
                state = _wait_for_job_end(job_id, timeout=60 + plan.vms * _SECONDS_PER_PLAN_VM_BOUND)
                seconds = time.perf_counter() - started
                job = get_job(job_id)
                if state != "succeeded":
                    raise AssertionError(f"the plan's {operation} job {job_id} ended {state}: {job['error']}\n"
                                         f"{site.describe_job(job)}\n{site.log_tails()}")
                deliveries = _settled_deliveries(site, is_step_task) - before
                progress(f"recovery plan: {label} succeeded in {seconds:.1f} s; verifying every recovery VM's disks")
                measured[operation] = {"seconds": seconds, "submit_seconds": submitted, "job": job,
                                       "deliveries": deliveries,
                                       "verified": _verify_plan_failover(site, operation, job, vm_ids, groups)}
            # After the planned failover every item is failed over: beat starts no delta cycle beside these.
            for operation in PLAN_OPERATIONS:
                shape = job_shape(measured[operation]["job"])
                progress(f"recovery plan: the {operation.replace('_', ' ')}'s shape ({len(shape)} stages, "
                         f"{sum(map(len, shape))} steps) as no-op engine steps, then as bare Celery tasks")
                before = _settled_deliveries(site, is_step_task)
                engine_run = run_engine_shape(shape)
                engine_run["deliveries"] = _settled_deliveries(site, is_step_task) - before
                before = _settled_deliveries(site, NOOP_TASK)
                bare_run = run_bare_canvas(shape)
                bare_run["deliveries"] = _settled_deliveries(site, NOOP_TASK) - before
                measured[operation] |= {"shape": shape, "engine_run": engine_run, "bare_run": bare_run}
    except (AssertionError, ServiceStartError) as exc:
        raise BenchmarkError(f"recovery plan: {exc}") from None
    return {f"plan_{operation}": _plan_result(plan, operation, measured[operation])
            for operation in PLAN_OPERATIONS}


_SECONDS_PER_PLAN_VM_BOUND = 10.0
"""Bounds the wait for a plan's job: far above a small VM's share of it here (well under 1 s)."""
_RECEIVED = re.compile(r"Task ([\w.]+)\[[0-9a-f-]+\] received")
_QUIET_S = 1.0
_SETTLE_BOUND_S = 60.0


def _deliveries(site: Any, task_name: str | Callable[[str], bool]) -> int:
    """How many messages of the task (a name, or a test of names) the site's workers have received so
    far (their logs' "Task name[id] received" lines: duplicates of one message each count)."""
    matches = task_name if callable(task_name) else task_name.__eq__
    return sum(1 for process in site.workers.values() if process.log_path.exists()
               for name in _RECEIVED.findall(process.log()) if matches(name))


def _settled_deliveries(site: Any, task_name: str | Callable[[str], bool]) -> int:
    """`_deliveries` once no new message of the task has arrived for a second (at most a minute): late
    duplicates of one run neither land in the next nor go uncounted."""
    deadline = time.monotonic() + _SETTLE_BOUND_S
    count, quiet_since = _deliveries(site, task_name), time.monotonic()
    while time.monotonic() - quiet_since < _QUIET_S and time.monotonic() < deadline:
        time.sleep(0.2)
        current = _deliveries(site, task_name)
        if current != count:
            count, quiet_since = current, time.monotonic()
    return count


def _wait_idle(site: Any, vm_ids: list[str]) -> None:
    """Until no job holds any of the VMs (a plan is refused while one does)."""

    from workflows.items import active_jobs

    item_ids = [site.item_id(vm_id) for vm_id in vm_ids]
    wait_until(lambda: not active_jobs(item_ids), timeout=120, what="every VM of the plan to be free of jobs")


def _verify_plan_failover(site: Any, operation: str, job: dict[str, Any], vm_ids: list[str],
                          groups: list[list[str]]) -> dict[str, Any]:
    """Every VM of the plan has a succeeded, verified failover record of this job whose produced roots are
    the point's; its recovery VM runs on dr1 and each of its disks has the point's manifest root
    (computed here) and equals the source disk byte for byte: the source is unchanged since the point
    (no workload writes to it; the planned failover shut it down before the last logs were shipped).
    AssertionError naming the VM and disk otherwise. Returns the per-VM figures."""
    from sqlmodel import select

    from datapath.compare import first_difference
    from datapath.disk import open_disk
    from datapath.manifest import compute_manifest
    from models.db import session_scope
    from models.failover import FailoverKind, FailoverRecord, FailoverStatus
    from models.protection import ProtectedItem, recovery_points

    kind = {"test_failover": FailoverKind.TEST, "planned_failover": FailoverKind.PLANNED}[operation]
    item_state = {"test_failover": "protected", "planned_failover": "failed_over"}[operation]
    group_of = {vm_id: number for number, members in enumerate(groups, 1) for vm_id in members}
    with session_scope() as session:
        records = {record.item_id: record for record in
                   session.exec(select(FailoverRecord).where(FailoverRecord.job_id == job["id"])).all()}
        latest_points = {vm_id: recovery_points(session, session.get(ProtectedItem, site.item_id(vm_id)))[-1].id
                         for vm_id in vm_ids}
    if len(records) != len(vm_ids):
        raise AssertionError(f"{operation} job {job['id']}: {len(records)} failover records for {len(vm_ids)} VMs")
    recovery = site.host(RECOVERY_HOST)
    per_vm, disks_compared, bytes_compared = [], 0, 0
    for vm_id in vm_ids:
        name = site.vm_name(vm_id)
        record = records.get(site.item_id(vm_id))
        what = f"{operation} of VM {name}"
        if record is None:
            raise AssertionError(f"{what}: no failover record in job {job['id']}")
        if (record.kind is not kind or record.status is not FailoverStatus.SUCCEEDED or record.verified is not True
                or record.rto_s is None or record.rpo_s is None):
            raise AssertionError(f"{what}: record {record.id} is {record.kind} {record.status}, verified "
                                 f"{record.verified}, rto_s {record.rto_s}, rpo_s {record.rpo_s}")
        if record.point_id != latest_points[vm_id]:
            raise AssertionError(f"{what}: restored point {record.point_id}, not the latest {latest_points[vm_id]}")
        if (record.produced_roots != record.expected_roots or not record.expected_roots
                or None in record.expected_roots.values()):
            raise AssertionError(f"{what}: produced roots {record.produced_roots}, the point's {record.expected_roots}")
        if site.item(vm_id)["state"] != item_state:
            raise AssertionError(f"{what}: the item is {site.item(vm_id)['state']}, not {item_state}")
        source_vm = site.host(site.vm_hosts[vm_id]).get_vm(name)
        if kind is FailoverKind.PLANNED and (source_vm.state != "off"
                                             or site.host(site.vm_hosts[vm_id]).workload_running(name)):
            raise AssertionError(f"{what}: the source VM is {source_vm.state} after a planned failover")
        target_vm = recovery.get_vm(record.target_vm)
        if target_vm.state != "running":
            raise AssertionError(f"{what}: recovery VM {target_vm.name} on {RECOVERY_HOST} is {target_vm.state}")
        if sorted(disk.name for disk in target_vm.disks) != sorted(record.expected_roots):
            raise AssertionError(f"{what}: recovery VM disks {[d.name for d in target_vm.disks]}, the point has "
                                 f"{sorted(record.expected_roots)}")
        for disk in source_vm.disks:
            with open_disk(target_vm.disk(disk.name).path) as restored, open_disk(disk.path) as source:
                root = compute_manifest(restored).root_hex
                if root != record.expected_roots[disk.name]:
                    raise AssertionError(f"{what}: disk {disk.name} of {target_vm.name} has root {root}, the "
                                         f"point's is {record.expected_roots[disk.name]}")
                if restored.size != source.size:
                    raise AssertionError(f"{what}: disk {disk.name} of {target_vm.name} is {restored.size} bytes, "
                                         f"the source {source.size}")
                offset = first_difference(source, restored)
                if offset is not None:
                    raise AssertionError(f"{what}: disk {disk.name} of {target_vm.name} differs from the source "
                                         f"first at offset {offset}")
                disks_compared += 1
                bytes_compared += source.size
        per_vm.append({"vm": name, "group": group_of[vm_id], "rto_s": record.rto_s, "rpo_s": record.rpo_s,
                       "point_id": record.point_id, "target_vm": record.target_vm})
    return {"vms": per_vm, "disks_compared": disks_compared, "bytes_compared": bytes_compared}


def _step_kind(name: str) -> str:
    """A plan step's name without the VM it is about ("pvm0001: Restore disk disk0" -> "Restore disk disk0")."""
    return name.split(": ", 1)[1] if ": " in name else name


def _plan_timeline(job: dict[str, Any], groups: int) -> dict[str, Any]:
    """Where the plan job's time went, from the engine's own timestamps: each group's span (its first
    claim to its last success) and, per kind of step, the median time from claim to success."""
    by_kind: dict[str, list[float]] = {}
    for step in job["steps"]:
        by_kind.setdefault(_step_kind(step["name"]), []).append(_seconds_between(step["started_at"], step["ended_at"]))
    stages_per_group = len({step["stage"] for step in job["steps"]}) // groups
    spans = []
    for number in range(groups):
        steps = [step for step in job["steps"]
                 if number * stages_per_group <= step["stage"] < (number + 1) * stages_per_group]
        spans.append(_seconds_between(min(step["started_at"] for step in steps),
                                      max(step["ended_at"] for step in steps)))
    return {"group_seconds": spans, "stages_per_group": stages_per_group,
            "median_ms_claim_to_recorded_by_step": {kind: statistics.median(times) * 1000
                                                     for kind, times in by_kind.items()}}


def _plan_result(plan: PlanSettings, operation: str, measured: dict[str, Any]) -> dict[str, Any]:
    job, shape, per_vm = measured["job"], measured["shape"], measured["verified"]["vms"]
    engine_run, bare_run = measured["engine_run"], measured["bare_run"]
    seconds, engine_s, bare_s = measured["seconds"], engine_run["seconds"], bare_run["seconds"]
    steps, stages = sum(map(len, shape)), len(shape)
    groups = max(vm["group"] for vm in per_vm)
    rto = sorted(vm["rto_s"] for vm in per_vm)
    rpo = sorted(vm["rpo_s"] for vm in per_vm)
    label = operation.replace("_", " ")
    same_shape = f"the plan job's {stages} stages ({steps} steps) on the same queues and workers"
    per_step = measured["deliveries"] / steps
    result = {
        "title": f"Recovery plan {label}, {plan.vms} VMs in {groups} groups ({plan.vms} × one "
                 f"{plan.disk_size >> 20} MiB disk, {plan.hosts} hosts → {RECOVERY_HOST}, local backend)",
        "ours_does": f"start_plan(plan, {operation!r}) of a plan of {plan.vms} protected VMs in {groups} groups: "
                     f"the groups one after another, the VMs of a group side by side, each VM's own "
                     f"{label} stages (recovery point, recovery VM on {RECOVERY_HOST}, restore, verify, start); "
                     f"real host agent workers (prefork concurrency 3 each), an orchestration+recovery worker "
                     f"(concurrency 2) and beat; timed from the submitting call to the job seen succeeded; then "
                     f"every recovery VM's disks are checked against the point and the source byte for byte",
        "peer_does": f"no work, the floor Celery itself sets for this canvas: chain(stage, ...) of {same_shape}, "
                     f"each step a plain no-op task, a stage of several steps a group, as the engine builds its "
                     f"canvas; one run, as the plan's",
        "ours": summary([{"seconds": seconds, "submit_seconds": measured["submit_seconds"], "job_id": job["id"],
                          "deliveries": measured["deliveries"]}]),
        "peer": summary([bare_run]),
        "engine_same_shape": summary([engine_run]),
        "rows": [
            row("RTO of the plan, submit to job succeeded", seconds, bare_s, "s", bare_s / seconds,
                "none set (reported)", None),
            row("per-VM RTO (FailoverRecord.rto_s), median", statistics.median(rto), None, "s", None,
                "none set (reported)", None),
            row("per-VM RTO (FailoverRecord.rto_s), max", rto[-1], None, "s", None, "none set (reported)", None),
            row("the same shape as no-op engine steps", engine_s, bare_s, "s", bare_s / engine_s,
                "none set (reported)", None),
            row("messages delivered per step (plan job; peer: per task)", per_step,
                bare_run["deliveries"] / steps, "×", None, "none set (reported); 1.00 is each once", None),
        ],
        "details": {
            "operation": operation, "vms": plan.vms, "groups": groups, "hosts": plan.hosts,
            "recovery_host": RECOVERY_HOST, "disk_size": plan.disk_size, "fill": plan.fill,
            "copy_frequency_s": plan.copy_frequency_s, "stages": stages, "steps": steps,
            "group_sizes": [sum(vm["group"] == number for vm in per_vm) for number in range(1, groups + 1)],
            "submit_seconds": measured["submit_seconds"],
            "job_seconds_in_database": _seconds_between(job["created_at"], job["ended_at"]),
            "rto_s_median": statistics.median(rto), "rto_s_min": rto[0], "rto_s_max": rto[-1],
            "rto_s_median_by_group": [statistics.median(vm["rto_s"] for vm in per_vm if vm["group"] == number)
                                      for number in range(1, groups + 1)],
            "rpo_s_median": statistics.median(rpo), "rpo_s_max": rpo[-1],
            "deliveries": measured["deliveries"], "deliveries_per_step": per_step,
            "steps_run_more_than_once": sum(step["attempts"] > 1 for step in job["steps"]),
            "step_deaths": sum(step["deaths"] for step in job["steps"]),
            "max_attempts": max(step["attempts"] for step in job["steps"]),
            "engine_same_shape_seconds": engine_s, "engine_same_shape_deliveries": engine_run["deliveries"],
            "bare_same_shape_seconds": bare_s, "bare_same_shape_deliveries": bare_run["deliveries"],
            "share_celery_floor": bare_s / seconds,
            "share_engine_coordination": (engine_s - bare_s) / seconds,
            "share_step_work": (seconds - engine_s) / seconds,
            "records_verified": len(per_vm), "disks_compared": measured["verified"]["disks_compared"],
            "bytes_compared": measured["verified"]["bytes_compared"],
            "per_vm": per_vm,
        } | _plan_timeline(job, groups),
    }
    return result
