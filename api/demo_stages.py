"""The stages of `asr demo` (protect, replicate, drill, failover with failback and reverse replication,
recovery plan) and the run of one backend: every stage in turn on a deployment of its own, each with its
checks, until one fails."""
from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from api.demo_realvm import REAL_VM, stage_real_vm
from api.demo_report import Check, Console, MiB, Report, Stage, compare_disks
from api.demo_site import (
    FLOWER_USER,
    PLAN_SCRIPT,
    RECOVERY_HOST,
    RECOVERY_WRITER_RATE_MB_S,
    WRITER_RATE_MB_S,
    DemoError,
    DemoSite,
)
from datapath.digest import disk_digest

FAILOVER_VM = "app01"
"""The VM drilled, failed over and failed back; the others go into the recovery plan."""
PLAN_GROUPS = (("data", ("db01",)), ("apps", ("app02", "web01")))
DELTA_ROUNDS = 3


class Interrupted(BaseException):
    """SIGTERM, handled like Ctrl-C: stop everything, report, exit non-zero."""


HEALTHY_WITHIN_S = 60.0
"""How long a newly protected VM may take to be Healthy: a few delta cycles at the demo's time scale."""

def stage_protect(d: DemoSite, stage: Stage, checks: list[Check]) -> None:
    from models.protection import RecoveryPointKind
    from workflows.engine import get_job
    from workflows.items import item_status
    from workflows.kinds.enable_protection import start as enable_protection

    for vm in d.vms.values():
        # The writer writes only through the replication tracker (as a guest's writes pass Hyper-V
        # Replica's), so tracking goes on first; enabling protection keeps disks already tracked.
        d.hosts[vm.host].enable_tracking(vm.name)
        d.start_writer(vm.name)
    d.console.say(f"  writers running on every VM ({WRITER_RATE_MB_S:g} MB/s each, through the replication tracker)")
    jobs = {}
    for vm in d.vms.values():
        job_id = d.request(lambda vm=vm: enable_protection(
            vm.vm_id, d.policy_id, recovery_storage=d.recovery_storage, storage_options=dict(d.storage_options),
            recovery_host=RECOVERY_HOST), f"enable protection of {vm.name}", stage)
        jobs[job_id] = f"protect {vm.name}"
        vm.item_id = get_job(job_id)["params"]["item_id"]
    d.wait(jobs)
    # Right after its initial copy a VM's RPO is as old as the copy's snapshot: on a slow machine that can pass
    # the (scaled) warning threshold until the next delta cycle. Healthy is what each must come to, together.
    deadline = time.monotonic() + HEALTHY_WITHIN_S
    for vm in d.vms.values():
        while (status := item_status(vm.item_id))["health"] != "Healthy" and time.monotonic() < deadline:
            time.sleep(0.5)
        checks.append(Check(f"{vm.name} protected and healthy", (status["state"], status["health"]) ==
                            ("protected", "Healthy"), f"{status['state']}, {status['health']}"
                            + "".join(f"; {error['message']}" for error in status.get("errors") or [])))
        first = d.points(vm.name)[0]
        checks.append(Check(f"{vm.name}'s first recovery point is app-consistent",
                            first.kind is RecoveryPointKind.APP_CONSISTENT, str(first.kind)))
        checks.append(Check(f"{vm.name}'s writer kept running through protection",
                            d.hosts[vm.host].workload_running(vm.name), "running"))


def stage_replicate(d: DemoSite, stage: Stage, checks: list[Check], *, corrupt: bool) -> None:
    names = list(d.vms)
    before = {vm: len(d.points(vm)) for vm in names}
    for round_number in range(1, DELTA_ROUNDS + 1):
        time.sleep(1.0)  # let the writers write something to ship
        for vm, job in d.delta_cycles(names, stage).items():
            applied = next(s["result"] for s in job["steps"] if s["name"] == "Apply logs")
            shipped = next(s["result"] for s in job["steps"] if s["name"] == "Ship logs")
            unsent = max(disk["unsent_ratio"] for disk in shipped["disks"].values())
            logs = ", ".join(f"{disk} {gens}" for disk, gens in sorted(applied["applied"].items()))
            d.console.say(f"  round {round_number} {vm}: log generations applied: {logs}; "
                          f"unsent before the cycle {unsent:.2%} of a disk")
    d.quiet_cycles(names, stage)
    for vm in names:
        d.verify_replicas(vm, checks, damage=corrupt and vm == names[1])
        made = len(d.points(vm)) - before[vm]
        checks.append(Check(f"{vm}: every cycle made a recovery point", made >= DELTA_ROUNDS + 1,
                            f"{made} new points"))
    for vm in names:
        d.start_writer(vm)
    d.console.say("  writers running again")


def stage_drill(d: DemoSite, stage: Stage, checks: list[Check]) -> None:
    from models.failover import FailoverStatus
    from workflows import failover_request, kinds

    vm, item_id = FAILOVER_VM, d.vms[FAILOVER_VM].item_id
    d.stop_writer(vm)  # the latest point then holds exactly these disks
    copies = d.copy_disks(vm, "drill")
    d.run(lambda: kinds.test_failover.start(item_id, point=failover_request.PointChoice.LATEST),
          f"test failover of {vm}", stage)
    d.start_writer(vm)
    drill = d.latest_record(vm, "test")
    test_vm = drill.target_vm
    for disk in d.disks(test_vm, RECOVERY_HOST):
        ok, detail = compare_disks(copies[disk.name], disk.path)
        checks.append(Check(f"test VM {test_vm}/{disk.name} equals the source at the point", ok, detail))
    checks.append(Check("the drill verified its disks against the point's roots",
                        bool(drill.verified) and drill.produced_roots == drill.expected_roots,
                        f"verified={drill.verified}, RTO {drill.rto_s and round(drill.rto_s, 1)} s"))
    networks = {a.vm_network for a in d.hosts[RECOVERY_HOST].get_vm(test_vm).network_adapters}
    checks.append(Check("the test VM is in the isolated test network",
                        networks == {failover_request.DEFAULT_TEST_NETWORK}, ", ".join(sorted(networks))))
    count = len(d.points(vm))
    time.sleep(0.5)
    d.delta_cycles([vm], stage)
    checks.append(Check(f"{vm} keeps replicating while the test VM exists",
                        len(d.points(vm)) > count and d.state(vm) == "protected", d.state(vm)))
    d.run(lambda: kinds.test_failover_cleanup.start(item_id), f"test failover cleanup of {vm}", stage)
    left = [v.name for v in d.hosts[RECOVERY_HOST].list_vms()]
    status = d.latest_record(vm, "test").status
    checks.append(Check("cleanup deleted the test VM", test_vm not in left
                        and status is FailoverStatus.CLEANED_UP, f"{status}; recovery host VMs {left}"))


def stage_failover(d: DemoSite, stage: Stage, checks: list[Check]) -> None:
    from workflows import failover_request, kinds

    vm, item_id = FAILOVER_VM, d.vms[FAILOVER_VM].item_id
    primary_host = d.vms[vm].host
    time.sleep(0.5)  # the writer runs: the shutdown stops it and the last writes are shipped
    d.run(lambda: kinds.planned_failover.start(item_id), f"planned failover of {vm}", stage)
    record = d.latest_record(vm, "planned")
    recovery_disks = {disk.name: disk.path for disk in d.disks(vm, RECOVERY_HOST)}
    for disk in d.disks(vm):
        ok, detail = compare_disks(disk.path, recovery_disks[disk.name])
        checks.append(Check(f"recovery VM {vm}/{disk.name} equals the primary's final disk", ok, detail))
    checks.append(Check("planned failover verified, primary shut down",
                        bool(record.verified) and not d.hosts[primary_host].workload_running(vm)
                        and d.state(vm) == "failed_over", f"verified={record.verified}, {d.state(vm)}"))
    primary_before = {disk.name: disk_digest(disk.path) for disk in d.disks(vm)}

    d.run(lambda: kinds.commit_failover.start(item_id), f"commit failover of {vm}", stage)
    d.start_writer(vm, RECOVERY_HOST, RECOVERY_WRITER_RATE_MB_S)
    d.console.say(f"  writer running on the recovery VM {vm} at {RECOVERY_HOST}")
    time.sleep(1.0)
    job = d.run(lambda: kinds.failback.start(item_id, mode=failover_request.FailbackMode.MINIMIZE_DOWNTIME),
                f"failback (minimize downtime) of {vm}", stage)
    sent = [s["result"] for s in job["steps"] if s["name"].startswith("Send differences")]
    chunks = f"{sum(r['chunks_sent'] for r in sent)} of {sum(r['chunks_compared'] for r in sent)} chunks sent"
    untouched = {disk.name: disk_digest(disk.path) for disk in d.disks(vm)} == primary_before
    checks.append(Check("failback synchronized while the recovery VM ran, the primary untouched",
                        d.state(vm) == "failback_ready" and untouched
                        and d.hosts[RECOVERY_HOST].workload_running(vm), f"{d.state(vm)}; {chunks}"))
    time.sleep(0.5)
    d.run(lambda: kinds.failback_completion.start(item_id), f"complete failback of {vm}", stage)
    final = {disk.name: disk.path for disk in d.disks(vm, RECOVERY_HOST)}
    for disk in d.disks(vm):
        ok, detail = compare_disks(final[disk.name], disk.path)
        checks.append(Check(f"primary {vm}/{disk.name} equals the recovery VM's disk at its shutdown", ok, detail))
    came_back = {disk.name: disk_digest(disk.path) for disk in d.disks(vm)} != primary_before
    checks.append(Check("the recovery VM's writes came back to the primary", came_back,
                        "primary changed" if came_back else "primary unchanged"))

    d.run(lambda: kinds.commit_failback.start(item_id), f"commit failback of {vm}", stage)
    gone = vm not in [v.name for v in d.hosts[RECOVERY_HOST].list_vms()]
    checks.append(Check("commit deleted the recovery VM", gone, "deleted" if gone else "still there"))
    d.start_writer(vm)
    job = d.run(lambda: kinds.reverse_replication.start(item_id), f"reverse replication of {vm}", stage)
    resynced = [s["result"] for s in job["steps"] if s["name"].startswith("Resynchronize disk")]
    size = sum(disk.size for disk in d.disks(vm))
    sent_bytes = sum(r["bytes_sent"] for r in resynced)
    checks.append(Check("reverse replication sent only what differs", sent_bytes < size // 2,
                        f"{sent_bytes} bytes sent for {size // MiB} MiB of disks"))
    d.quiet_cycles([vm], stage)
    d.verify_replicas(vm, checks)
    checks.append(Check(f"{vm} protected again", d.state(vm) == "protected", d.state(vm)))
    d.start_writer(vm)


def stage_plan(d: DemoSite, stage: Stage, checks: list[Check]) -> None:
    from models.db import session_scope
    from models.plans import create_plan
    from workflows import kinds
    from workflows.kinds.recovery_plan import start_plan

    members = [vm for _, names in PLAN_GROUPS for vm in names]
    d.quiet_cycles(members, stage)  # the latest points then hold exactly these disks
    copies = {vm: d.copy_disks(vm, "plan") for vm in members}
    groups = []
    for name, vms in PLAN_GROUPS:
        group: dict[str, Any] = {"name": name, "vms": [d.vms[vm].vm_id for vm in vms]}
        if name == PLAN_GROUPS[0][0]:
            group["after"] = [{"kind": "script", "name": "check-data", "script": PLAN_SCRIPT, "args": {"group": name},
                               "timeout_s": 30}]
        groups.append(group)
    with session_scope() as session:
        plan_id = create_plan(session, "demo-plan", groups, "the demo's recovery plan").id
    d.console.say("  plan demo-plan: " + "; then ".join(f"group {n} ({', '.join(v)})" for n, v in PLAN_GROUPS)
                  + f"; registered script {PLAN_SCRIPT} after group {PLAN_GROUPS[0][0]}")
    job = d.run(lambda: start_plan("demo-plan", "test_failover"), "test failover of plan demo-plan", stage)
    ran = [step.get("result") or {} for step in job["steps"] if step["name"].endswith(f"action {PLAN_SCRIPT}")]
    expected = f"plan {plan_id} checked group {PLAN_GROUPS[0][0]} as "
    checks.append(Check("the plan's registered script ran once, with the plan's id, as an unprivileged user",
                        len(ran) == 1 and ran[0].get("output", "").startswith(expected)
                        and not ran[0]["output"].rstrip().endswith(" as root"), f"{ran}"))
    for vm in members:
        drill = d.latest_record(vm, "test")
        for disk in d.disks(drill.target_vm, RECOVERY_HOST):
            ok, detail = compare_disks(copies[vm][disk.name], disk.path)
            checks.append(Check(f"test VM {drill.target_vm}/{disk.name} equals the source at the point", ok, detail))
        checks.append(Check(f"{vm}'s drill verified", bool(drill.verified), f"verified={drill.verified}"))
    cleanups = {d.request(lambda vm=vm: kinds.test_failover_cleanup.start(d.vms[vm].item_id),
                          f"test failover cleanup of {vm}", stage): f"cleanup {vm}" for vm in members}
    d.wait(cleanups)
    left = [v.name for v in d.hosts[RECOVERY_HOST].list_vms()]
    checks.append(Check("every test VM cleaned up", left == [], f"recovery host VMs: {left}"))
    for vm in members:
        d.start_writer(vm)


STAGES: tuple[tuple[str, str], ...] = (
    ("start", "Start Redis, the database, workers, beat and Flower"),
    ("register", "Register sites, hosts, networks, a policy; create 4 VMs"),
    ("protect", "Protect every VM with its writer running"),
    ("replicate", "Delta cycles; every replica checked byte for byte"),
    ("drill", f"Test failover of {FAILOVER_VM} to the latest point, cleanup"),
    ("failover", f"Planned failover, failback and reverse replication of {FAILOVER_VM}"),
    ("plan", "Recovery plan test failover of the other VMs, cleanup"),
    ("real-vm", f"A real QEMU guest ({REAL_VM}): protect, planned failover, boot and its own data check"),
)


def run_backend(backend: str, workdir: Path, console: Console, report: Report, *, time_scale: float, seed: int,
                inject: str | None, keep_up: bool = False) -> DemoSite | None:
    """Run the stages on `backend`'s own deployment, then stop it; with `keep_up`, a deployment whose stages
    all passed is returned running instead (the caller closes it)."""
    from sites.localservices import ServiceStartError

    stages = [Stage(backend, key, title) for key, title in STAGES]
    report.stages += stages
    deployment = DemoSite(workdir, backend, console, time_scale=time_scale, seed=seed)
    actions: dict[str, Callable[[Stage, list[Check]], None]] = {
        "start": lambda stage, checks: checks.extend(deployment.start()),
        "register": lambda stage, checks: checks.extend(deployment.register()),
        "protect": lambda stage, checks: stage_protect(deployment, stage, checks),
        "replicate": lambda stage, checks: stage_replicate(deployment, stage, checks,
                                                           corrupt=inject == "corrupt-replica"),
        "drill": lambda stage, checks: stage_drill(deployment, stage, checks),
        "failover": lambda stage, checks: stage_failover(deployment, stage, checks),
        "plan": lambda stage, checks: stage_plan(deployment, stage, checks),
        "real-vm": lambda stage, checks: stage_real_vm(deployment, stage, checks, report),
    }
    kept = False
    try:
        for number, stage in enumerate(stages, 1):
            console.say(f"[{backend}] {number}/{len(stages)} {stage.title}")
            started = time.monotonic()
            try:
                actions[stage.stage](stage, stage.checks)
            except (KeyboardInterrupt, Interrupted):
                stage.status, stage.error = "interrupted", "interrupted"
                stage.seconds = round(time.monotonic() - started, 2)
                raise
            except (DemoError, ServiceStartError) as error:  # says what went wrong: no traceback needed
                stage.error = str(error)
            except Exception as error:  # noqa: BLE001 - reported as the stage's failure, then cleanup
                stage.error = f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=4)}"
            finally:
                stage.seconds = round(time.monotonic() - started, 2)
            stage.status = "passed" if stage.error is None and all(c.ok for c in stage.checks) else "failed"
            for check in stage.checks:
                if not check.ok:
                    console.say(f"  FAIL {check.check}: {check.detail}")
            if stage.error:
                console.say(f"  FAIL {stage.error}")
            console.say(f"[{backend}] {stage.stage}: {stage.status} in {stage.seconds:.1f} s "
                        f"({sum(c.ok for c in stage.checks)}/{len(stage.checks)} checks passed)")
            if not stage.ok:
                console.say(f"[{backend}] stopping here: the remaining stages build on this one")
                break
        if deployment.flower is not None and all(s.ok for s in stages):
            status, tasks = deployment.flower_get("/api/tasks?limit=100000")
            names = sorted({t.get("name") or "?" for t in (tasks or {}).values()})
            report.flower[backend] = {"url": deployment.flower.url, "user": FLOWER_USER,
                                      "tasks_seen": len(tasks or {}), "task_names": names}
            stages[-1].checks.append(Check("Flower saw the run's tasks", status == 200 and bool(tasks),
                                           f"HTTP {status}, {len(tasks or {})} tasks"))
            if not stages[-1].checks[-1].ok:
                stages[-1].status = "failed"
        kept = keep_up and all(s.ok for s in stages)
    finally:
        if not kept:
            console.say(f"[{backend}] stopping everything the demo started")
            deployment.close()
    return deployment if kept else None
