"""The `scale` section of benchmarks.run: how many protected VMs one deployment sustains (issue 14, "Scale").

Two runs, each its own deployment (tests/recovery_site.py: a private redis-server, a SQLite database, one
orchestration+recovery worker, one host agent worker per host, beat; local recovery storage), one after the
other. The main run: N synthetic VMs (1,000 by default) of one small raw disk each on two hosts, a policy of a
300 s copy frequency with the product's default RPO thresholds (warning 2×, critical 4× the copy frequency,
models/policy.py), all protected at once (timed). Once every VM is protected and Healthy, one writer process
writes a little to every disk in turn through its tracker (the library call a guest's workload makes,
sites/workload.py, but one process for every VM rather than a process per VM), and for the duration (10 min)
every VM's RPO and health are sampled on the database's clock, with the CPU of each of the deployment's process
trees. The second run does the same at a 30 s copy frequency with a tenth of the VMs (about as many cycles per
second) for a shorter time. Afterwards the writer stops, a last cycle runs on a sample of VMs, and each of their
replicas must equal its source byte for byte; a wrong replica stops the run: it is not a result.

The goal (issue 14): at least 1,000 VMs at a 5-minute copy frequency, every RPO under its warning threshold
throughout. The engine's CPU per delta cycle gives the implied capacity: N VMs at copy frequency f need N/f
cycles a second, each costing c CPU-seconds, and two cores give 2 CPU-seconds a second, so N ≤ 2·f/c.

    python -m benchmarks.scale --write-churn DISKS.json ...   (the writer process; started by the run)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks.churn import _cpu_snapshot, _percentile
from benchmarks.harness import BenchmarkError, row
from sites.localservices import ServiceStartError

REPO_ROOT = Path(__file__).resolve().parent.parent
_TESTS_DIR = REPO_ROOT / "tests"
if str(_TESTS_DIR) not in sys.path:
    sys.path.append(str(_TESTS_DIR))  # tests/recovery_site.py as a top-level module, as pytest imports it

DEFAULT_VMS = 1000
GOAL_VMS = 1000
COPY_FREQUENCY_S = 300
DEFAULT_DURATION_S = 600.0
FAST_COPY_FREQUENCY_S = 30
DEFAULT_FAST_VMS = 100
"""A tenth of the main run's VMs at a tenth of its copy frequency: about as many cycles a second."""
DEFAULT_FAST_DURATION_S = 180.0
DEFAULT_VERIFY_VMS = 20
HOSTS = ("host1", "host2")
DISK_SIZE = 2 << 20
FILL = 0.25
WRITE_SIZE = 4096
WRITES_PER_CYCLE = 2
"""Each VM gets this many writes per copy frequency, evenly spread: every cycle has something to ship."""
CORES = 2
ENGINE_TREES = ("orchestration", "host-host1", "host-host2", "beat", "redis-server")
PROTECT_SECONDS_PER_VM = 2.0
FINAL_CYCLE_TIMEOUT_S = 600.0
WRITER_STOP_TIMEOUT_S = 30.0
WRITER_START_TIMEOUT_S = 60.0

METHOD = [
    "Scale: per run one deployment (the tests' recovery site: a private redis-server, a SQLite database, an "
    "orchestration+recovery worker of concurrency 2, one host agent worker of concurrency 3 per host on 2 hosts, "
    "beat ticking every 1 s; local recovery storage), N synthetic VMs of one "
    f"{DISK_SIZE >> 20} MiB raw disk, {FILL:.0%} filled, spread over the hosts; a policy of the run's copy "
    "frequency with the product's default RPO thresholds (warning 2×, critical 4× the copy frequency), office "
    "hours all day (no automatic resync). Every VM is protected at once (enable protection timed from the first "
    "submit to the last job succeeded); once all are Protected and Healthy, one writer process writes "
    f"{WRITE_SIZE // 1024} KiB at a random sector-aligned offset of each disk in turn through the disk's "
    f"tracker (datapath/tracker.py, as sites/workload.py writes), {WRITES_PER_CYCLE} writes per VM per copy "
    "frequency, evenly spread (one process for all the VMs: a workload process per VM would weigh more than the "
    "engine measured).",
    "Scale: for the duration, every few seconds, every VM's RPO (now minus its latest recovery point, on the "
    "database's clock) and health are read in one query. A run holds when every sampled RPO stayed under the "
    "VM's warning threshold and no VM was ever sampled Warning or Critical. Delta cycles counted are the jobs "
    "created in the sampling window, by their end state. CPU: user+system seconds over the window from /proc of "
    "each process tree (workers with their pool processes, beat, redis-server; the writer and the sampler "
    "apart); the engine's CPU per delta cycle is the engine trees' total over the cycles that succeeded "
    "(beat's ticks and the per-tick RPO check of every item included, so it is the cost of a VM-cycle, not of "
    f"the cycle's steps alone). Implied capacity: N ≤ {CORES} cores × f / (CPU per cycle), at copy frequency "
    "f in real seconds (whatever the run's time scale), taking the whole machine and assuming the cost per "
    "cycle does not grow with N.",
    "Scale: afterwards the writer stops, one last delta cycle runs on an even sample of the VMs, and each of "
    "their replicas must equal its source byte for byte (tests/recovery_site.py verify_replica); otherwise the "
    "run stops. What limits the 30 s run is read from the CPU split per process tree, the machine's busy share "
    "and the steps' time queued and running (the job records); Python 3.11 has no perf map support, so `perf` "
    "would show only the interpreter's frames.",
]


@dataclass(frozen=True)
class ScaleRun:
    label: str
    vms: int
    copy_frequency_s: int
    duration_s: float
    time_scale: float
    verify_vms: int
    seed: int

    @property
    def cycle_s(self) -> float:
        return self.copy_frequency_s / self.time_scale

    @property
    def sample_interval_s(self) -> float:
        return max(0.5, min(5.0, self.cycle_s / 10))


# ---- the section's settings (benchmarks.run) ----------------------------------------------------------
def add_arguments(parser: Any) -> None:
    parser.add_argument("--scale-vms", type=int, default=DEFAULT_VMS, metavar="N",
                        help=f"scale: VMs protected at a {COPY_FREQUENCY_S} s copy frequency, one "
                             f"{DISK_SIZE >> 20} MiB disk each (default {DEFAULT_VMS}; the goal is {GOAL_VMS})")
    parser.add_argument("--scale-duration", type=float, default=DEFAULT_DURATION_S, metavar="SECONDS",
                        help=f"scale: how long RPO is sampled in that run (default {DEFAULT_DURATION_S:g})")
    parser.add_argument("--scale-fast-vms", type=int, default=DEFAULT_FAST_VMS, metavar="N",
                        help=f"scale: VMs of the second run, at a {FAST_COPY_FREQUENCY_S} s copy frequency; 0 "
                             f"skips it (default {DEFAULT_FAST_VMS})")
    parser.add_argument("--scale-fast-duration", type=float, default=DEFAULT_FAST_DURATION_S, metavar="SECONDS",
                        help=f"scale: how long RPO is sampled in the second run (default "
                             f"{DEFAULT_FAST_DURATION_S:g})")
    parser.add_argument("--scale-verify-vms", type=int, default=DEFAULT_VERIFY_VMS, metavar="N",
                        help=f"scale: VMs of each run given a last cycle and compared with their replica byte "
                             f"for byte, an even sample (default {DEFAULT_VERIFY_VMS}; at most the run's VMs)")
    parser.add_argument("--scale-time-scale", type=float, default=1.0, metavar="N",
                        help="scale: divide the engine's delays (the copy frequencies, so the RPO thresholds and "
                             "the writes' pace too) by N (default 1)")


def checked_settings(args: Any) -> dict[str, Any]:
    """The section's settings; ValueError with a one-line message on a bad one."""
    if not 1 <= args.scale_vms <= 10000:
        raise ValueError(f"--scale-vms {args.scale_vms}: from 1 to 10000")
    if not 0 <= args.scale_fast_vms <= 10000:
        raise ValueError(f"--scale-fast-vms {args.scale_fast_vms}: from 0 to 10000")
    if args.scale_duration < 5 or args.scale_fast_duration < 5:
        raise ValueError("--scale-duration and --scale-fast-duration: at least 5 s")
    if args.scale_verify_vms < 1:
        raise ValueError(f"--scale-verify-vms {args.scale_verify_vms}: at least 1")
    if not 0.1 <= args.scale_time_scale <= 100:
        raise ValueError(f"--scale-time-scale {args.scale_time_scale:g}: from 0.1 to 100")
    return {"scale_vms": args.scale_vms, "scale_duration_s": args.scale_duration,
            "scale_fast_vms": args.scale_fast_vms, "scale_fast_duration_s": args.scale_fast_duration,
            "scale_verify_vms": args.scale_verify_vms, "scale_time_scale": args.scale_time_scale,
            "scale_copy_frequency_s": COPY_FREQUENCY_S, "scale_fast_copy_frequency_s": FAST_COPY_FREQUENCY_S,
            "scale_disk_size": DISK_SIZE}


def space_needed(settings: dict[str, Any]) -> int:
    """The source, its replica and the logs, generously; the runs follow each other, each deleted after."""
    if "scale_vms" not in settings:
        return 0
    return 4 * DISK_SIZE * max(settings["scale_vms"], settings["scale_fast_vms"])


def _runs(settings: dict[str, Any]) -> list[ScaleRun]:
    runs = [ScaleRun("main", settings["scale_vms"], settings["scale_copy_frequency_s"], settings["scale_duration_s"],
                     settings["scale_time_scale"], settings["scale_verify_vms"], settings["seed"])]
    if settings["scale_fast_vms"]:
        runs.append(ScaleRun("fast", settings["scale_fast_vms"], settings["scale_fast_copy_frequency_s"],
                             settings["scale_fast_duration_s"], settings["scale_time_scale"],
                             settings["scale_verify_vms"], settings["seed"]))
    return runs


# ---- the writer process -------------------------------------------------------------------------------
def write_churn(disks: list[Path], interval_s: float, seed: int, stats_path: Path) -> None:
    """Until SIGTERM: write WRITE_SIZE bytes to each disk in turn through its tracker, one disk every
    `interval_s` / len(disks) seconds, each tracker kept open as a guest's workload keeps it (the host agent
    seals and ships through its own, sites/workload.py). Writes its counts to `stats_path` at the end."""
    from datapath.tracker import ReplicationTracker

    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _frame: stopping.append(signum))
    choices = random.Random(seed)
    trackers = [ReplicationTracker(path) for path in disks]
    stats_path.with_suffix(".ready").touch()
    spacing = interval_s / len(disks)
    started = time.monotonic()
    writes, late_max = 0, 0.0
    try:
        while not stopping:
            due = started + writes * spacing
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(min(delay, 0.2))
                continue
            late_max = max(late_max, -delay)
            tracker = trackers[writes % len(trackers)]
            offset = choices.randrange(0, tracker.disk_size - WRITE_SIZE + 1, 512)
            tracker.write(offset, os.urandom(WRITE_SIZE))
            writes += 1
    finally:
        for tracker in trackers:
            tracker.close()
        stats_path.write_text(json.dumps({"writes": writes, "bytes": writes * WRITE_SIZE,
                                          "seconds": time.monotonic() - started, "late_s_max": late_max}))


def _start_writer(workdir: Path, disks: list[Path], interval_s: float, seed: int) -> tuple[subprocess.Popen, Path]:
    disks_file, stats = workdir / "writer-disks.json", workdir / "writer-stats.json"
    disks_file.write_text(json.dumps([str(path) for path in disks]))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    with open(workdir / "writer.log", "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.scale", "--write-churn", str(disks_file), "--interval",
             str(interval_s), "--seed", str(seed), "--stats", str(stats)],
            cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    # Sampling starts once every tracker is open and writes begin (a stop before that would find no handler).
    deadline = time.monotonic() + WRITER_START_TIMEOUT_S
    while not stats.with_suffix(".ready").exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise AssertionError(f"the writer did not start (exit {process.returncode}): "
                                 f"{(workdir / 'writer.log').read_text()[-2000:]}")
        time.sleep(0.1)
    return process, stats


def _stop_writer(process: subprocess.Popen, stats: Path, workdir: Path) -> dict[str, Any]:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(WRITER_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    if process.returncode != 0 or not stats.exists():
        raise AssertionError(f"the writer exited with {process.returncode}: "
                             f"{(workdir / 'writer.log').read_text()[-2000:]}")
    return json.loads(stats.read_text())


# ---- one run ------------------------------------------------------------------------------------------
def _run(workdir: Path, run: ScaleRun, progress: Callable[[str], None]) -> dict[str, Any]:
    from recovery_site import RecoverySite

    say = lambda message: progress(f"scale ({run.copy_frequency_s} s): {message}")  # noqa: E731
    with RecoverySite(workdir, backend="local", host_names=HOSTS, time_scale=run.time_scale,
                      policy_options={"copy_frequency_s": run.copy_frequency_s, "rpo_warning_s": None,
                                      "rpo_critical_s": None}) as site:
        say(f"creating {run.vms} VMs of one {DISK_SIZE >> 20} MiB disk on {len(HOSTS)} hosts")
        created = time.perf_counter()
        vm_ids = [site.create_vm(HOSTS[number % len(HOSTS)], f"vm{number:05d}", [("disk0", DISK_SIZE, "raw")],
                                 fill=FILL, seed=run.seed + number) for number in range(run.vms)]
        create_s = time.perf_counter() - created
        say(f"created in {create_s:.1f} s; protecting them all at once")
        started = time.perf_counter()
        job_ids = [site.protect(vm_id) for vm_id in vm_ids]
        _wait_for_jobs(site, job_ids, timeout=120 + run.vms * PROTECT_SECONDS_PER_VM)
        protect_s = time.perf_counter() - started
        item_ids = {site.item_id(vm_id): vm_id for vm_id in vm_ids}
        _wait_healthy(site, list(item_ids), timeout=60)
        warning_s = site.item(vm_ids[0])["rpo_warning_s"]
        say(f"{run.vms} VMs protected in {protect_s:.1f} s, all Healthy; RPO warning threshold {warning_s:g} s")
        disks = [site.host(site.vm_hosts[vm_id]).get_vm(f"vm{number:05d}").disks[0].path
                 for number, vm_id in enumerate(vm_ids)]
        writer, writer_stats = _start_writer(workdir, disks, run.cycle_s / WRITES_PER_CYCLE, run.seed)
        try:
            roots = {name: process.process.pid for name, process in site.workers.items()}
            roots["redis-server"] = site.redis.pid
            roots["writer"] = writer.pid
            say(f"sampling every {run.sample_interval_s:g} s for {run.duration_s:g} s")
            sampled = _sample(list(item_ids), warning_s, run, roots, say)
        finally:
            written = _stop_writer(writer, writer_stats, workdir)
        cycles = _cycles(list(item_ids), sampled["started"], sampled["ended"])
        sample = [vm_ids[round(k * (len(vm_ids) - 1) / max(1, min(run.verify_vms, len(vm_ids)) - 1))]
                  for k in range(min(run.verify_vms, len(vm_ids)))]
        say(f"writer stopped ({written['writes']} writes); a last cycle on {len(sample)} VMs and their replicas "
            f"compared byte for byte")
        _final_cycles(site, sample)
        for vm_id in sample:
            site.verify_replica(vm_id)
    return {"run": run, "create_s": create_s, "protect_s": protect_s, "warning_s": warning_s,
            "written": written, "verified": len(sample), "cycles": cycles} | sampled


def _wait_for_jobs(site: Any, job_ids: list[str], *, timeout: float) -> None:
    from sqlmodel import select

    from models.db import session_scope
    from models.jobs import Job, JobState

    deadline = time.monotonic() + timeout
    while True:
        with session_scope() as session:
            states = Counter(session.exec(select(Job.state).where(Job.id.in_(job_ids))).all())
        if states[JobState.succeeded] == len(job_ids):
            return
        failed = states[JobState.failed] + states[JobState.cancelled]
        if failed or time.monotonic() > deadline:
            with session_scope() as session:
                bad = session.exec(select(Job.id).where(Job.id.in_(job_ids),
                                                        Job.state != JobState.succeeded)).first()
            site.wait_job(bad, timeout=1)  # raises with the job's steps and the workers' logs
            raise AssertionError(f"enable protection: {dict(states)} after {timeout:g} s")
        time.sleep(1)


def _item_rows(item_ids: list[str]) -> tuple[datetime, list[Any]]:
    from sqlmodel import select

    from models.db import database_now, session_scope
    from models.protection import ProtectedItem

    with session_scope() as session:
        rows = session.exec(select(ProtectedItem.id, ProtectedItem.last_recovery_point_at, ProtectedItem.health,
                                   ProtectedItem.replication_state).where(ProtectedItem.id.in_(item_ids))).all()
        return database_now(session), list(rows)


def _wait_healthy(site: Any, item_ids: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        _, rows = _item_rows(item_ids)
        off = [(str(state).lower(), str(health).lower()) for _, _, health, state in rows
               if (str(state).lower(), str(health).lower()) != ("protected", "healthy")]
        if not off:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(off)} VMs not protected and Healthy after enable protection: "
                                 f"{Counter(off).most_common(3)}\n{site.log_tails()}")
        time.sleep(1)


def _sample(item_ids: list[str], warning_s: float, run: ScaleRun, roots: dict[str, int],
            say: Callable[[str], None]) -> dict[str, Any]:
    """Every sample interval for the run's duration: every VM's RPO and health, in one query."""
    from models.db import as_utc

    rpos: list[float] = []
    rpo_max: dict[str, float] = {}
    health_seen: Counter[str] = Counter()
    states_seen: Counter[str] = Counter()
    over = set()
    cpu_before = _cpu_snapshot(roots)
    started_at, _ = _item_rows(item_ids[:1])
    started, tick, next_report = time.monotonic(), 0, time.monotonic() + 60
    while (at := started + tick * run.sample_interval_s) - started < run.duration_s:
        if (delay := at - time.monotonic()) > 0:
            time.sleep(delay)
        now, rows = _item_rows(item_ids)
        for item_id, point_at, health, state in rows:
            health_seen[str(health).lower()] += 1
            states_seen[str(state).lower()] += 1
            if point_at is None:
                continue
            rpo = (now - as_utc(point_at)).total_seconds()
            rpos.append(rpo)
            rpo_max[item_id] = max(rpo, rpo_max.get(item_id, 0.0))
            if rpo >= warning_s:
                over.add(item_id)
        if time.monotonic() >= next_report:
            next_report += 60
            say(f"RPO max so far {max(rpo_max.values(), default=0):.0f} s, {len(over)} VMs over the warning "
                f"threshold; health seen {dict(health_seen)}")
        tick += 1
    cpu_after = _cpu_snapshot(roots)
    ended_at, _ = _item_rows(item_ids[:1])
    return {"started": started_at, "ended": ended_at, "seconds": time.monotonic() - started, "samples": tick,
            "rpo_s_p50": _percentile(rpos, 0.5), "rpo_s_p99": _percentile(rpos, 0.99), "rpo_s_max": max(rpos),
            "vms_over_warning": len(over), "vms_sampled": len(rpo_max), "health_seen": dict(health_seen),
            "states_seen": dict(states_seen),
            "cpu_seconds": {name: cpu_after[name] - cpu_before[name] for name in cpu_before}}


def _cycles(item_ids: list[str], since: datetime, until: datetime) -> dict[str, Any]:
    """The delta cycles created in the window: counts by end state and per VM; the steps' time queued and
    running; the cycles' length."""
    from sqlmodel import select

    from models.db import as_utc, session_scope
    from models.jobs import Job, JobStep

    with session_scope() as session:
        jobs = session.exec(select(Job.id, Job.target, Job.state, Job.created_at, Job.ended_at).where(
            Job.kind == "delta_replication", Job.target.in_(item_ids), Job.created_at >= since,
            Job.created_at <= until)).all()
        steps = session.exec(select(JobStep.name, JobStep.queued_at, JobStep.started_at, JobStep.ended_at).where(
            JobStep.job_id.in_([job.id for job in jobs if str(job.state) == "succeeded"]))).all()
    by_state = Counter(str(job.state) for job in jobs)
    per_vm = Counter(job.target for job in jobs if str(job.state) == "succeeded")
    lengths = [(as_utc(job.ended_at) - as_utc(job.created_at)).total_seconds() for job in jobs
               if str(job.state) == "succeeded" and job.ended_at is not None]
    queued: dict[str, list[float]] = {}
    running: dict[str, list[float]] = {}
    for name, queued_at, started_at, ended_at in steps:
        if queued_at and started_at:
            queued.setdefault(name, []).append((as_utc(started_at) - as_utc(queued_at)).total_seconds())
        if started_at and ended_at:
            running.setdefault(name, []).append((as_utc(ended_at) - as_utc(started_at)).total_seconds())
    summary = lambda values: {"p50": _percentile(values, 0.5), "p99": _percentile(values, 0.99)}  # noqa: E731
    return {"created": len(jobs), "by_state": dict(by_state), "succeeded": by_state.get("succeeded", 0),
            "failed": by_state.get("failed", 0) + by_state.get("cancelled", 0),
            "per_vm_min": min((per_vm[item_id] for item_id in item_ids), default=0),
            "length_s": summary(lengths) if lengths else None,
            "step_queued_s": {name: summary(values) for name, values in queued.items()},
            "step_running_s": {name: summary(values) for name, values in running.items()}}


def _final_cycles(site: Any, vm_ids: list[str]) -> None:
    """One delta cycle on each VM, all started before any is waited for (a VM busy with the scheduler's cycle
    is tried again until its own starts)."""
    from workflows.engine import ItemBusyError
    from workflows.kinds.delta_replication import start as start_delta_replication

    pending, job_ids = {vm_id: site.item_id(vm_id) for vm_id in vm_ids}, []
    deadline = time.monotonic() + FINAL_CYCLE_TIMEOUT_S
    while pending:
        for vm_id, item_id in list(pending.items()):
            try:
                job_ids.append(start_delta_replication(item_id))
                del pending[vm_id]
            except ItemBusyError:
                pass
        if pending:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(pending)} VMs stayed busy: no last cycle could start")
            time.sleep(0.2)
    for job_id in job_ids:
        site.wait_job(job_id, max(1.0, deadline - time.monotonic()))


# ---- the result ---------------------------------------------------------------------------------------
def _figures(result: dict[str, Any]) -> dict[str, Any]:
    run: ScaleRun = result["run"]
    cpu = result["cpu_seconds"]
    engine = sum(cpu.get(name, 0.0) for name in ENGINE_TREES)
    succeeded = result["cycles"]["succeeded"]
    per_cycle = engine / succeeded if succeeded else None
    warnings = sum(result["health_seen"].get(health, 0) for health in ("warning", "critical"))
    held = result["vms_over_warning"] == 0 and warnings == 0 and result["cycles"]["failed"] == 0
    capacity = {f"{frequency}": math.floor(CORES * frequency / per_cycle) if per_cycle else None
                for frequency in (COPY_FREQUENCY_S, FAST_COPY_FREQUENCY_S)}
    busiest = max((name for name in cpu if name in ENGINE_TREES), key=lambda name: cpu[name])
    return {
        "label": run.label, "vms": run.vms, "copy_frequency_s": run.copy_frequency_s, "time_scale": run.time_scale,
        "cycle_s": run.cycle_s, "duration_s": run.duration_s, "sampled_s": result["seconds"],
        "samples": result["samples"], "sample_interval_s": run.sample_interval_s, "warning_s": result["warning_s"],
        "create_s": result["create_s"], "protect_s": result["protect_s"], "held": held,
        "rpo_s_p50": result["rpo_s_p50"], "rpo_s_p99": result["rpo_s_p99"], "rpo_s_max": result["rpo_s_max"],
        "vms_over_warning": result["vms_over_warning"], "health_seen": result["health_seen"],
        "states_seen": result["states_seen"], "cycles": result["cycles"],
        "cycles_per_s": succeeded / result["seconds"], "engine_cpu_s": engine, "cpu_s_per_cycle": per_cycle,
        "implied_capacity": capacity, "cpu_seconds": cpu, "busiest_tree": busiest,
        "machine_busy_share": cpu["machine busy"] / cpu["machine total"],
        "writer": result["written"], "replicas_verified": result["verified"],
    }


def _rows(main: dict[str, Any], fast: dict[str, Any] | None) -> list[dict[str, Any]]:
    minutes = main["sampled_s"] / 60
    note = "" if main["held"] else (f"; did not hold: {main['vms_over_warning']} VMs over the threshold, health "
                                    f"seen {main['health_seen']}, {main['cycles']['failed']} cycles failed")
    rows = [
        row(f"VMs sustained at a {main['copy_frequency_s']} s copy frequency, every RPO under its warning "
            f"threshold ({main['warning_s']:g} s) for {minutes:.1f} min{note}",
            main["vms"] if main["held"] else None, None, "VMs", None, f"≥ {GOAL_VMS} VMs",
            main["held"] and main["vms"] >= GOAL_VMS),
        row(f"RPO of {main['vms']} VMs at {main['copy_frequency_s']} s, p99 (p50 {main['rpo_s_p50']:.0f} s, "
            f"max {main['rpo_s_max']:.0f} s)", main["rpo_s_p99"], None, "s", None, "none set (reported)", None),
        row(f"enable protection of {main['vms']} VMs at once, wall time", main["protect_s"], None, "s", None,
            "none set (reported)", None),
        _cpu_row(main),
    ]
    if fast is not None:
        note = "held" if fast["held"] else (f"did not hold: {fast['vms_over_warning']} VMs over the threshold, "
                                            f"{fast['cycles']['failed']} cycles failed")
        rows += [
            row(f"VMs at a {fast['copy_frequency_s']} s copy frequency for {fast['sampled_s'] / 60:.1f} min "
                f"(a short run; {note}; RPO p99 {fast['rpo_s_p99']:.1f} s, max {fast['rpo_s_max']:.1f} s, "
                f"warning {fast['warning_s']:g} s)", fast["vms"] if fast["held"] else None, None, "VMs", None,
                "none set (reported)", None),
            _cpu_row(fast),
        ]
    for frequency in (COPY_FREQUENCY_S, FAST_COPY_FREQUENCY_S):
        figures = main if frequency == main["copy_frequency_s"] or fast is None else fast
        capacity = figures["implied_capacity"][str(frequency)]
        rows.append(row(f"implied capacity at a {frequency} s copy frequency ({CORES} cores × {frequency} s / the "
                        f"CPU per cycle of the {figures['copy_frequency_s']} s run)", capacity, None, "VMs",
                        None, "none set (reported)", None))
    return rows


def _cpu_row(figures: dict[str, Any]) -> dict[str, Any]:
    return row(f"engine CPU per delta cycle at {figures['copy_frequency_s']} s ({figures['cycles']['succeeded']} "
               f"cycles of {figures['vms']} VMs, {figures['cycles_per_s']:.2f}/s; all engine processes)",
               figures["cpu_s_per_cycle"] or 0.0, None, "CPU s", None, "none set (reported)", None)


def measure_section(workdir: Path, settings: dict[str, Any], progress: Callable[[str], None]) -> dict[str, Any]:
    results = []
    try:
        for run in _runs(settings):
            os.sync()
            results.append(_figures(_run(workdir / f"scale-{run.label}", run, progress)))
    except (AssertionError, ServiceStartError) as exc:
        raise BenchmarkError(f"scale: {exc}") from None
    main, fast = results[0], results[1] if len(results) > 1 else None
    scaled = f" (time scale {main['time_scale']:g})" if main["time_scale"] != 1 else ""
    return {"scale": {
        "title": f"Scale: {main['vms']} VMs at a {main['copy_frequency_s']} s copy frequency for "
                 f"{main['sampled_s'] / 60:.1f} min" + (f", {fast['vms']} VMs at {fast['copy_frequency_s']} s for "
                                                         f"{fast['sampled_s'] / 60:.1f} min" if fast else "") + scaled,
        "ours_does": "synthetic VMs of one small disk, protected at once, written to a little through their "
                     "trackers by one writer process, replicated by real workers and beat on 2 hosts; every "
                     "VM's RPO and health sampled; afterwards a last cycle on a sample and their replicas "
                     "compared with their source byte for byte",
        "peer_does": None,
        "rows": _rows(main, fast),
        "details": {"runs": results},
    }}


def detail_lines(section: dict[str, Any]) -> list[str]:
    lines = []
    for run in section["scale"]["details"]["runs"]:
        cycles = run["cycles"]
        wall = run["sampled_s"]
        steps = "; ".join(f"{name} queued p50 {cycles['step_queued_s'].get(name, {}).get('p50', 0):.2f} s / p99 "
                          f"{cycles['step_queued_s'].get(name, {}).get('p99', 0):.2f} s, ran p50 {value['p50']:.2f} s"
                          f" / p99 {value['p99']:.2f} s" for name, value in cycles["step_running_s"].items())
        length = cycles["length_s"] or {"p50": 0.0, "p99": 0.0}
        cpu = "; ".join(f"{name} {seconds:.1f} s ({seconds / wall:.0%} of a core)"
                        for name, seconds in run["cpu_seconds"].items() if not name.startswith("machine"))
        capacity = ", ".join(f"{count} VMs at {frequency} s" for frequency, count in run["implied_capacity"].items())
        lines += [
            f"- Scale, {run['vms']} VMs at a {run['copy_frequency_s']} s copy frequency (cycle {run['cycle_s']:g} s "
            f"real): created in {run['create_s']:.0f} s, protected at once in {run['protect_s']:.1f} s; sampled "
            f"{run['samples']} times over {wall:.0f} s; RPO p50 {run['rpo_s_p50']:.1f} s, p99 "
            f"{run['rpo_s_p99']:.1f} s, max {run['rpo_s_max']:.1f} s against a warning threshold of "
            f"{run['warning_s']:g} s ({'held' if run['held'] else 'did not hold'}: {run['vms_over_warning']} VMs "
            f"over it; health samples {run['health_seen']}). Delta cycles created in the window "
            f"{cycles['created']} ({cycles['by_state']}), at least {cycles['per_vm_min']} succeeded per VM, "
            f"{run['cycles_per_s']:.2f} succeeded a second; a cycle took p50 {length['p50']:.1f} s, p99 "
            f"{length['p99']:.1f} s from creation to end; per step: {steps}. The writer made "
            f"{run['writer']['writes']} writes of {WRITE_SIZE // 1024} KiB (at most {run['writer']['late_s_max']:.1f}"
            f" s behind its pace).",
            f"- Scale, {run['vms']} VMs at {run['copy_frequency_s']} s, CPU over the {wall:.0f} s sampled "
            f"(user+system, each process tree): {cpu}; the machine was busy {run['machine_busy_share']:.0%} of its "
            f"CPU time (all its work, not only this run's). Engine CPU {run['engine_cpu_s']:.1f} s, "
            f"{run['cpu_s_per_cycle'] or 0:.3f} s per succeeded cycle; the busiest tree: {run['busiest_tree']}. "
            f"Implied capacity ({CORES} cores × f / CPU per cycle): {capacity}. {run['replicas_verified']} "
            f"replicas of a last cycle equal their source byte for byte.",
        ]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale",
                                     description="The scale benchmark's writer process (benchmarks.run starts it).")
    parser.add_argument("--write-churn", type=Path, required=True, metavar="DISKS.json",
                        help="a JSON list of tracked disk paths to write to in turn")
    parser.add_argument("--interval", type=float, required=True, metavar="SECONDS",
                        help="each disk is written once per this many seconds")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--stats", type=Path, required=True, metavar="FILE")
    args = parser.parse_args(argv)
    write_churn([Path(path) for path in json.loads(args.write_churn.read_text())], args.interval, args.seed,
                args.stats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
