"""The workflows section's glue for benchmarks.run: running its benchmarks with the run's settings and the
lines it adds to the report's Details. The benchmarks themselves are in benchmarks/workflows.py and
benchmarks/workflow_plan.py, imported only when the section runs (they bring Celery, the database and
the tests' process helpers, which the other sections do not need)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from datapath.disk import format_size


def measure_workflows(workdir: Path, settings: dict[str, Any], progress: Callable[[str], None]) -> dict[str, Any]:
    """The job engine's cost per step against a bare Celery chain, then enabling protection of the fleet,
    then a recovery plan's test and planned failover."""
    from benchmarks.workflow_plan import PlanSettings, bench_recovery_plan
    from benchmarks.workflows import FleetSettings, bench_enable_protection, bench_step_overhead

    fleet = FleetSettings(vms=settings["vms"], hosts=settings["fleet_hosts"], disk_size=settings["vm_disk_size"])
    plan = PlanSettings(vms=settings["plan_vms"], groups=settings["plan_groups"], hosts=settings["fleet_hosts"],
                        disk_size=settings["vm_disk_size"])
    return {
        "step_overhead": bench_step_overhead(workdir, settings["steps"], settings["rounds"], progress),
        "enable_protection": bench_enable_protection(workdir, fleet, settings["seed"], progress),
    } | bench_recovery_plan(workdir, plan, settings["seed"], progress)


def workflow_detail_lines(workflows: dict[str, Any]) -> list[str]:
    """Where an engine step's time goes, and what enabling protection of the fleet took per job."""
    overhead, fleet = workflows["step_overhead"]["details"], workflows["enable_protection"]["details"]
    best_engine = min(workflows["step_overhead"]["ours"]["runs"], key=lambda run: run["seconds"])
    return [
        f"- Step overhead: the engine takes {overhead['engine_ms_per_step']:.2f} ms per step, the bare chain "
        f"{overhead['bare_ms_per_step']:.2f} ms per hop ({overhead['engine_over_bare']:.2f}×). In the engine's own "
        f"timestamps (best run, medians): {best_engine['median_ms_claim_to_recorded']:.2f} ms from a step's "
        f"claim to its success being stamped (the claim's transaction, the heartbeat thread, the action), "
        f"{best_engine['median_ms_recorded_to_next_claim']:.2f} ms from there to the next step's claim (the success "
        f"transaction, the rest of run_step, the broker hop, the next task's start); "
        f"{best_engine['ms_submit_to_first_claim']:.1f} ms from creating the job to its first claim.",
        f"- Enable protection: {fleet['vms']} VMs on {fleet['hosts']} hosts, one raw disk of "
        f"{format_size(fleet['disk_size'])} each ({fleet['fill']:.0%} data), jobs of "
        f"{', '.join(map(str, fleet['steps_per_job']))} steps; submitting took {fleet['submit_seconds']:.2f} s; "
        f"a job took {fleet['job_seconds_median']:.1f} s (median) to {fleet['job_seconds_max']:.1f} s (max) "
        f"from creation to success; {fleet['replicas_verified']} of {fleet['vms']} replicas equal their source "
        f"byte for byte, every item protected and Healthy.",
    ] + [plan_detail_line(workflows[key]) for key in workflows if key.startswith("plan_")]


def plan_detail_line(benchmark: dict[str, Any]) -> str:
    """What a recovery plan's failover took, where its time went, and what was verified."""
    details = benchmark["details"]
    label = details["operation"].replace("_", " ")
    by_step = "; ".join(f"{kind} {ms:.0f}" for kind, ms in details["median_ms_claim_to_recorded_by_step"].items())
    seconds = benchmark["ours"]["best_seconds"]
    point = ("the plan's own, recorded after each VM's shutdown" if details["operation"] == "planned_failover"
             else "those enabling protection recorded")
    return (
        f"- Recovery plan {label}: {details['vms']} VMs in {details['groups']} groups of "
        f"{', '.join(map(str, details['group_sizes']))} ({details['stages']} stages, {details['steps']} steps); "
        f"the plan's RTO {seconds:.2f} s, of which submitting (validating the plan and every VM's request, "
        f"building the stages) {details['submit_seconds']:.2f} s; the job {details['job_seconds_in_database']:.2f} s "
        f"in the database; each group {', '.join(f'{s:.2f}' for s in details['group_seconds'])} s (first claim to "
        f"last success). Per-VM RTO (request to the VM running): {details['rto_s_min']:.2f} s min, "
        f"{details['rto_s_median']:.2f} s median, {details['rto_s_max']:.2f} s max; median by group "
        f"{', '.join(f'{s:.2f}' for s in details['rto_s_median_by_group'])} s; RPO {details['rpo_s_median']:.1f} s "
        f"median, {details['rpo_s_max']:.1f} s max (the points are {point}). Median claim to success per step, "
        f"ms: {by_step}. Messages delivered (workers' logs): the plan job {details['deliveries']} for "
        f"{details['steps']} steps ({details['deliveries_per_step']:.2f} per step; "
        f"{details['steps_run_more_than_once']} "
        f"step(s) claimed again while running, {details['step_deaths']} deaths, at most {details['max_attempts']} "
        f"attempts), the no-op engine job {details['engine_same_shape_deliveries']}, the bare canvas "
        f"{details['bare_same_shape_deliveries']}. Same shape without work: the bare canvas "
        f"{details['bare_same_shape_seconds']:.2f} s, the no-op engine job "
        f"{details['engine_same_shape_seconds']:.2f} s; "
        f"read as shares of the RTO (meaningful only when every message arrives once): Celery's floor "
        f"{details['share_celery_floor']:.0%}, the engine's coordination {details['share_engine_coordination']:.0%}, "
        f"the steps' work {details['share_step_work']:.0%}. {details['records_verified']} of {details['vms']} "
        f"failover records succeeded and verified; {details['disks_compared']} recovery disks "
        f"({format_size(details['bytes_compared'])}) have the point's manifest root and equal their source byte "
        f"for byte."
    )
