"""The `churn` section of benchmarks.run: RPO under churn.

One deployment (tests/recovery_site.py: a private redis-server, a SQLite database, real host and
orchestration workers and beat, encrypted local recovery storage), one synthetic VM per churn rate
(2, 5 and 20 MB/s by default: the reference product's standard and premium churn limits), each with one
raw disk, all protected under one policy of a 30 s copy frequency. Once every VM is protected and Healthy,
each VM's workload (sites/workload.py) writes through its disk's tracker at its rate, and for the duration
(10 min by default) every VM's RPO (`item_status`, on the database's clock) and its log backlog (the bytes of
replication log on the host not yet acknowledged: the sealed logs and the active one) are sampled every
second. At the end every workload stops, a last cycle runs and every replica is compared with its source
byte for byte. A wrong replica or a failed last cycle stops the run: it is not a result.

The goal (issue 14): at 20 MB/s the p99 RPO is at most 1.5× the copy frequency. The scheduler starts a cycle
one copy frequency after the recovery point the previous one cut (its ship step's seal; at least a quarter of
the frequency after that cycle ended), so the RPO peaks at about the copy frequency plus one cycle's length:
the goal holds while a cycle that moves 30 s of churn takes at most half the copy frequency.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks.harness import BenchmarkError, row
from datapath.tracker import RESYNC_THRESHOLD
from datapath.trackerstate import ControlFile, NotTrackedError, TrackerFiles
from sites.localservices import ServiceStartError
from sites.workload import MB

REPO_ROOT = Path(__file__).resolve().parent.parent
_TESTS_DIR = REPO_ROOT / "tests"
if str(_TESTS_DIR) not in sys.path:
    # The recovery-site helper of the tests, imported as a top-level module as pytest does (as
    # benchmarks/workflows.py does).
    sys.path.append(str(_TESTS_DIR))

DEFAULT_RATES_MB_S = (2.0, 5.0, 20.0)
DEFAULT_DURATION_S = 600.0
QUICK_DURATION_S = 120.0
COPY_FREQUENCY_S = 30
GOAL_RATE_MB_S = 20.0
"""The goal is judged on the VMs writing at this rate or more; the others' RPO is reported against the
same bound, as information."""
GOAL_FACTOR = 1.5
"""p99 RPO at most this many times the copy frequency."""
SAMPLE_INTERVAL_S = 1.0
BACKLOG_HEADROOM = 3
"""A disk is sized so that this many copy frequencies of churn stay under the resync threshold (unsent logs
at 50% of the disk): a cycle taking two copy frequencies still does not need a resync."""
MIN_DISK_SIZE = 64 << 20
DISK_UNIT = 4 << 20
FILL = 0.1
"""Initial data on each disk: its size does not weigh on the RPO, only on the initial replication."""
WRITE_SIZES = (4096, 65536)
SUSTAINED_SHARE = 0.95
"""A workload that wrote less than this share of its rate did not sustain it: its row says so, and the goal
is not met at a churn it did not see."""
SPACE_PER_DISK_SIZE = 5
"""The source, its replica, the replica's undo data of the points kept, and the logs, generously."""
RESYNC_STATES = ("resync_required", "resynchronizing")
"""models.protection.ReplicationState values (imported with the deployment, not at module import)."""
PROTECT_TIMEOUT_S = 300.0
FINAL_CYCLE_TIMEOUT_S = 300.0

METHOD = [
    "RPO under churn: one deployment (the tests' recovery site: a private redis-server, a SQLite database, an "
    "orchestration+recovery worker of concurrency 2, one host agent worker with a process per VM or more, beat "
    "ticking every 1 s; recovery storage local and encrypted), one synthetic VM per churn rate with one raw "
    f"disk sized so that {BACKLOG_HEADROOM} copy frequencies of its churn stay under the resync threshold "
    f"(unsent logs at {RESYNC_THRESHOLD:.0%} of the disk), {FILL:.0%} filled; policy copy frequency "
    f"{COPY_FREQUENCY_S} s, office hours all day (no automatic resync starts). The VMs are protected and "
    "Healthy before the clock starts; then each VM's workload (sites/workload.py: random "
    f"{WRITE_SIZES[0] // 1024}-{WRITE_SIZES[1] // 1024} KiB writes at random sector-aligned offsets through "
    "the tracker, paced by a token bucket) starts, and the run samples every second, for the duration, every "
    "VM's RPO (item_status: now minus the latest recovery point, on the database's clock) and its log "
    "backlog (the replication log bytes on the host: the sealed logs not yet acknowledged, and the active "
    "log up to its committed end).",
    f"RPO under churn: p50, p99 and max over the samples (nearest rank). The goal, p99 ≤ {GOAL_FACTOR:g}× the "
    f"copy frequency, is judged on the VMs at {GOAL_RATE_MB_S:g} MB/s or more, and only met when the "
    f"workload wrote at least {SUSTAINED_SHARE:.0%} of its rate; the other rates are reported against the "
    "same bound. With a time scale above 1 (--churn-time-scale) the copy frequency and the goal are divided "
    "by it and the churn is not. A resync is counted when an item was ever sampled resync_required or "
    "resynchronizing, or a resynchronize job ran on it. CPU: user+system seconds over the sampling window "
    "from /proc of each process tree (workers with their pool processes, beat, redis-server, each workload) "
    "and of the whole machine (/proc/stat), which other work on the machine shares.",
    "RPO under churn: afterwards every workload stops, one last delta cycle runs per VM, and every replica "
    "must equal its source byte for byte (tests/recovery_site.py verify_replica); otherwise the run stops.",
]


@dataclass(frozen=True)
class ChurnSettings:
    rates_mb_s: tuple[float, ...]
    duration_s: float
    time_scale: float = 1.0
    copy_frequency_s: int = COPY_FREQUENCY_S
    seed: int = 1

    @property
    def cycle_s(self) -> float:
        """The copy frequency in real seconds."""
        return self.copy_frequency_s / self.time_scale

    @property
    def goal_s(self) -> float:
        return GOAL_FACTOR * self.cycle_s

    def disk_size(self, rate_mb_s: float) -> int:
        per_cycle = rate_mb_s * MB * self.cycle_s
        wanted = max(MIN_DISK_SIZE, math.ceil(BACKLOG_HEADROOM * per_cycle / RESYNC_THRESHOLD))
        return -(-wanted // DISK_UNIT) * DISK_UNIT


# ---- the section's settings (benchmarks.run) ----------------------------------------------------------
def add_arguments(parser: Any) -> None:
    parser.add_argument("--churn-rates", metavar="MB/S,...",
                        help="churn: the VMs' write rates in MB/s, one VM each (default "
                             f"{','.join(f'{rate:g}' for rate in DEFAULT_RATES_MB_S)})")
    parser.add_argument("--churn-duration", type=float, metavar="SECONDS",
                        help=f"churn: how long RPO is sampled under churn (default {DEFAULT_DURATION_S:g}, "
                             f"{QUICK_DURATION_S:g} with --quick)")
    parser.add_argument("--churn-time-scale", type=float, default=1.0, metavar="N",
                        help=f"churn: divide the engine's delays (the {COPY_FREQUENCY_S} s copy frequency, so "
                             "the goal too) by N; the churn and the data path are not scaled (default 1)")


def checked_settings(args: Any) -> dict[str, Any]:
    """The section's settings; ValueError with a one-line message on a bad one."""
    rates = DEFAULT_RATES_MB_S
    if args.churn_rates is not None:
        try:
            rates = tuple(float(text) for text in args.churn_rates.split(","))
        except ValueError:
            raise ValueError(f"--churn-rates {args.churn_rates}: a comma-separated list of MB/s") from None
    if not rates or any(not 0 < rate <= 1000 for rate in rates):
        raise ValueError(f"--churn-rates {args.churn_rates}: every rate must be above 0 and at most 1000 MB/s")
    duration = args.churn_duration if args.churn_duration is not None else (
        QUICK_DURATION_S if args.quick else DEFAULT_DURATION_S)
    if duration < 5:
        raise ValueError(f"--churn-duration {duration:g}: at least 5 s")
    if not 0.1 <= args.churn_time_scale <= 100:
        raise ValueError(f"--churn-time-scale {args.churn_time_scale:g}: from 0.1 to 100")
    return {"churn_rates_mb_s": list(rates), "churn_duration_s": duration,
            "churn_time_scale": args.churn_time_scale, "churn_copy_frequency_s": COPY_FREQUENCY_S}


def space_needed(settings: dict[str, Any]) -> int:
    if "churn_rates_mb_s" not in settings:
        return 0
    churn = _churn_settings(settings)
    return sum(SPACE_PER_DISK_SIZE * churn.disk_size(rate) for rate in churn.rates_mb_s)


def _churn_settings(settings: dict[str, Any]) -> ChurnSettings:
    return ChurnSettings(rates_mb_s=tuple(settings["churn_rates_mb_s"]), duration_s=settings["churn_duration_s"],
                         time_scale=settings["churn_time_scale"], copy_frequency_s=settings["churn_copy_frequency_s"],
                         seed=settings["seed"])


# ---- CPU from /proc ------------------------------------------------------------------------------------
_TICK = os.sysconf("SC_CLK_TCK")


def _process_table() -> dict[int, tuple[int, float]]:
    """{pid: (ppid, CPU seconds of it and its reaped children)} of every process readable now."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # After the command: state, ppid, ... utime (14th field), stime, cutime, cstime.
        table[int(entry.name)] = (int(fields[1]), sum(int(value) for value in fields[11:15]) / _TICK)
    return table


def _tree_cpu(table: dict[int, tuple[int, float]], root: int) -> float:
    """CPU seconds of `root` and every descendant alive (their reaped children included)."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    total, stack = 0.0, [root]
    while stack:
        pid = stack.pop()
        if pid in table:
            total += table[pid][1]
        stack.extend(children.get(pid, []))
    return total


def _machine_busy_s() -> tuple[float, float]:
    """(busy, total) CPU seconds of every CPU since boot (/proc/stat; iowait counts as idle)."""
    with open("/proc/stat") as stat:
        values = [int(value) for value in stat.readline().split()[1:]]
    idle = values[3] + values[4]
    return (sum(values[:8]) - idle) / _TICK, sum(values[:8]) / _TICK


def _cpu_snapshot(roots: dict[str, int]) -> dict[str, float]:
    table = _process_table()
    snapshot = {name: _tree_cpu(table, pid) for name, pid in roots.items()}
    own = os.times()
    snapshot["benchmark (sampler)"] = own.user + own.system
    snapshot["machine busy"], snapshot["machine total"] = _machine_busy_s()
    return snapshot


# ---- the run ------------------------------------------------------------------------------------------
def _backlog_bytes(disk_paths: Iterable[Path]) -> int:
    """Replication log bytes on the host not yet acknowledged: the sealed logs (each file as long as the
    log) and the active one up to its committed end, read from the control file (its file may be longer:
    an acknowledged log's storage it is written over, datapath/trackerstate.py TrackerFiles.spare)."""
    total = 0
    for path in disk_paths:
        files = TrackerFiles(path)
        for log in [files.sealed(g) for g in files.sealed_generations()]:
            try:
                total += log.stat().st_size
            except FileNotFoundError:
                continue  # acknowledged (deleted) between the listing and the stat
        try:
            control = ControlFile.open(files.control, path)
        except NotTrackedError:
            continue
        try:
            total += control.read().log.end
        finally:
            os.close(control.fd)
    return total


def _percentile(values: list[float], share: float) -> float:
    """Nearest rank."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def _seconds_between(start: str, end: str) -> float:
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def _cycle_profile(site: Any, vm_id: str, since: datetime, until: datetime) -> dict[str, Any]:
    """The VM's delta cycles created in the window (not the last cycle, after the workload stopped): how many,
    their length, and each step's median."""
    from models.db import as_utc
    from workflows.engine import get_job

    jobs = [get_job(job.id) for job in site.jobs(vm_id, kind="delta_replication")
            if since <= as_utc(job.created_at) <= until]
    done = [job for job in jobs if job["state"] == "succeeded"]
    lengths = [_seconds_between(job["created_at"], job["ended_at"]) for job in done]
    by_step: dict[str, list[float]] = {}
    shipped = []
    for job in done:
        for step in job["steps"]:
            if step["started_at"] and step["ended_at"]:
                by_step.setdefault(step["name"], []).append(_seconds_between(step["started_at"], step["ended_at"]))
            if step["name"].startswith("Ship") and isinstance(step.get("result"), dict):
                shipped.append(sum(disk.get("shipped_bytes", 0) for disk in step["result"].get("disks", {}).values()))
    return {
        "cycles": len(jobs), "cycles_succeeded": len(done),
        "cycles_failed": sum(job["state"] in ("failed", "cancelled") for job in jobs),
        "cycle_s_median": statistics.median(lengths) if lengths else None,
        "cycle_s_max": max(lengths) if lengths else None,
        "step_s_median": {name: statistics.median(values) for name, values in by_step.items()},
        "step_s_max": {name: max(values) for name, values in by_step.items()},
        "shipped_bytes_median": statistics.median(shipped) if shipped else None,
        "shipped_bytes_max": max(shipped) if shipped else None,
    }


def bench_rpo_under_churn(workdir: Path, churn: ChurnSettings, progress: Callable[[str], None]) -> dict[str, Any]:
    from recovery_site import RecoverySite

    from models.protection import Health, ReplicationState

    vms = [(f"churn{number:02d}-{rate:g}mbs".replace(".", "p"), rate, churn.disk_size(rate))
           for number, rate in enumerate(churn.rates_mb_s)]
    try:
        with RecoverySite(workdir / "churn", backend="local", host_names=("host1",), time_scale=churn.time_scale,
                          host_concurrency=max(3, len(vms)),
                          policy_options={"copy_frequency_s": churn.copy_frequency_s}) as site:
            host = site.host("host1")
            sizes = ", ".join(f"{rate:g} MB/s on {size >> 20} MiB" for _, rate, size in vms)
            progress(f"churn: creating {len(vms)} VMs ({sizes})")
            vm_ids = [site.create_vm("host1", name, [("disk0", size, "raw")], fill=FILL, seed=churn.seed + number)
                      for number, (name, _, size) in enumerate(vms)]
            progress("churn: protecting them")
            for job_id in [site.protect(vm_id) for vm_id in vm_ids]:
                site.wait_job(job_id, timeout=PROTECT_TIMEOUT_S)
            for vm_id in vm_ids:
                status = site.item(vm_id)
                if (status["state"], status["health"]) != (ReplicationState.PROTECTED, Health.HEALTHY):
                    raise AssertionError(f"VM {site.vm_name(vm_id)} is {status['state']} ({status['health']}) "
                                         f"after enable protection: {status}")
            disks = {vm_id: [disk.path for disk in host.get_vm(name).disks]
                     for vm_id, (name, _, _) in zip(vm_ids, vms, strict=True)}
            for number, (name, rate, _) in enumerate(vms):
                host.start_workload(name, rate_mb_s=rate, write_sizes=WRITE_SIZES, seed=churn.seed + 100 + number)
            roots = {name: process.process.pid for name, process in site.workers.items()}
            roots["redis-server"] = site.redis.pid
            for name, _, _ in vms:
                roots[f"workload {name}"] = json.loads((host.get_vm(name).path / "workload.pid").read_text())["pid"]
            progress(f"churn: sampling RPO and log backlog every {SAMPLE_INTERVAL_S:g} s for "
                     f"{churn.duration_s:g} s, copy frequency {churn.cycle_s:g} s")
            samples, cpu_before, window = _sample(site, vm_ids, disks, churn.duration_s, roots, progress)
            cpu_after = _cpu_snapshot(roots)
            progress("churn: stopping the workloads, a last cycle each, verifying every replica")
            stats, profiles, verified = {}, {}, 0
            for vm_id, (name, _, _) in zip(vm_ids, vms, strict=True):
                site.final_cycle(vm_id, timeout=FINAL_CYCLE_TIMEOUT_S)
                stats[vm_id] = host.workload_stats(name) or {}
                profiles[vm_id] = _cycle_profile(site, vm_id, window["started"], window["ended"])
                resyncs = site.jobs(vm_id, kind="resynchronize")
                profiles[vm_id]["resync_jobs"] = len(resyncs)
            for vm_id in vm_ids:
                site.verify_replica(vm_id)
                verified += 1
            host_concurrency = site.host_concurrency
    except (AssertionError, ServiceStartError) as exc:
        raise BenchmarkError(f"RPO under churn: {exc}") from None
    return _result(churn, vms, vm_ids, samples, stats, profiles, cpu_before, cpu_after, window, verified,
                   host_concurrency)


Samples = dict[str, list[dict[str, Any]]]


def _sample(site: Any, vm_ids: list[str], disks: dict[str, list[Path]], duration_s: float, roots: dict[str, int],
            progress: Callable[[str], None]) -> tuple[Samples, dict[str, float], dict[str, Any]]:
    """Every SAMPLE_INTERVAL_S for `duration_s`: each VM's RPO, state and log backlog."""
    from workflows.clock import now
    from workflows.items import item_status

    item_ids = {vm_id: site.item_id(vm_id) for vm_id in vm_ids}
    samples: dict[str, list[dict[str, Any]]] = {vm_id: [] for vm_id in vm_ids}
    cpu_before = _cpu_snapshot(roots)
    started, started_at = time.monotonic(), now()
    next_report = started + 60
    tick = 0
    while True:
        at = started + tick * SAMPLE_INTERVAL_S
        if at - started >= duration_s:
            break
        delay = at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        for vm_id in vm_ids:
            status = item_status(item_ids[vm_id])
            samples[vm_id].append({"t": round(time.monotonic() - started, 2), "rpo_s": status["rpo_s"],
                                   "state": status["state"], "backlog_bytes": _backlog_bytes(disks[vm_id])})
        if time.monotonic() >= next_report:
            next_report += 60
            progress("churn: " + "; ".join(
                f"{site.vm_name(vm_id)} RPO {samples[vm_id][-1]['rpo_s']} s, backlog "
                f"{samples[vm_id][-1]['backlog_bytes'] / MB:.0f} MB" for vm_id in vm_ids))
        tick += 1
    return samples, cpu_before, {"started": started_at, "ended": now(),
                                     "seconds": time.monotonic() - started}


def _result(churn: ChurnSettings, vms: list[tuple[str, float, int]], vm_ids: list[str],
            samples: dict[str, list[dict[str, Any]]], stats: dict[str, dict[str, Any]],
            profiles: dict[str, dict[str, Any]], cpu_before: dict[str, float], cpu_after: dict[str, float],
            window: dict[str, Any], verified: int, host_concurrency: int) -> dict[str, Any]:
    per_vm, rows = [], []
    for vm_id, (name, rate, size) in zip(vm_ids, vms, strict=True):
        rpos = [sample["rpo_s"] for sample in samples[vm_id] if sample["rpo_s"] is not None]
        backlog = [sample["backlog_bytes"] for sample in samples[vm_id]]
        states = sorted({sample["state"] for sample in samples[vm_id]})
        written = stats[vm_id].get("bytes", 0)
        seconds = stats[vm_id].get("seconds") or 0.0
        achieved = written / seconds / MB if seconds else 0.0
        resync_sampled = any(state in RESYNC_STATES for state in states)
        figures = {
            "vm": name, "rate_mb_s": rate, "disk_size": size, "samples": len(samples[vm_id]),
            "rpo_s_p50": _percentile(rpos, 0.5), "rpo_s_p99": _percentile(rpos, 0.99), "rpo_s_max": max(rpos),
            "backlog_bytes_max": max(backlog), "backlog_ratio_max": max(backlog) / size,
            "states_seen": states, "resync_needed": resync_sampled or profiles[vm_id]["resync_jobs"] > 0,
            "workload_bytes": written, "workload_seconds": seconds, "workload_mb_s": achieved,
            "sustained": achieved >= SUSTAINED_SHARE * rate,
        } | profiles[vm_id]
        per_vm.append(figures)
        judged = rate >= GOAL_RATE_MB_S
        goal = (f"p99 ≤ {GOAL_FACTOR:g}× the copy frequency ({churn.goal_s:g} s)" if judged else
                f"none set (reported; the {GOAL_RATE_MB_S:g} MB/s goal's bound is {churn.goal_s:g} s)")
        note = "" if figures["sustained"] else f"; the workload reached only {achieved:.1f} MB/s"
        rows.append(row(f"RPO at {rate:g} MB/s, p99 (p50 {figures['rpo_s_p50']:.1f} s, max "
                        f"{figures['rpo_s_max']:.1f} s, resync "
                        f"{'needed' if figures['resync_needed'] else 'none'}{note})",
                        figures["rpo_s_p99"], None, "s", None, goal,
                        (figures["sustained"] and figures["rpo_s_p99"] <= churn.goal_s) if judged else None)
                    | {"ours_p50": figures["rpo_s_p50"]})
        at_seal = (figures["shipped_bytes_max"] or 0) / size
        rows.append(row(f"log backlog at {rate:g} MB/s, max sampled (of a {size >> 20} MiB disk; unsent when a "
                        f"cycle sealed at most {at_seal:.0%}, resync from {RESYNC_THRESHOLD:.0%})",
                        figures["backlog_bytes_max"], None, "bytes", None, "none set (reported)", None))
    cpu = {name: cpu_after[name] - cpu_before[name] for name in cpu_before}
    wall = window["seconds"]
    rates = ", ".join(f"{rate:g}" for rate in churn.rates_mb_s)
    return {
        "title": f"RPO under churn ({rates} MB/s, copy frequency {churn.cycle_s:g} s, {wall / 60:.1f} min)",
        "ours_does": f"one synthetic VM per rate writing through its tracker, protected with a "
                     f"{churn.copy_frequency_s} s copy frequency"
                     f"{f' (time scale {churn.time_scale:g}: {churn.cycle_s:g} s)' if churn.time_scale != 1 else ''}"
                     f" by real workers and beat (one host agent worker, prefork concurrency {host_concurrency}), "
                     f"encrypted local recovery storage; RPO and log backlog sampled every {SAMPLE_INTERVAL_S:g} s; "
                     f"afterwards a last cycle and every replica compared with its source byte for byte",
        "peer_does": None,
        "rows": rows,
        "details": {
            "rates_mb_s": list(churn.rates_mb_s), "duration_s": churn.duration_s, "sampled_s": wall,
            "copy_frequency_s": churn.copy_frequency_s, "time_scale": churn.time_scale, "cycle_s": churn.cycle_s,
            "goal_s": churn.goal_s, "replicas_verified": verified, "vms": per_vm,
            "cpu_seconds": cpu, "cpu_share_of_machine": cpu["machine busy"] / cpu["machine total"],
            "samples": {vm["vm"]: samples[vm_id] for vm, vm_id in zip(per_vm, vm_ids, strict=True)},
        },
    }


def measure_section(workdir: Path, settings: dict[str, Any], progress: Callable[[str], None]) -> dict[str, Any]:
    return {"rpo_under_churn": bench_rpo_under_churn(workdir, _churn_settings(settings), progress)}


def detail_lines(section: dict[str, Any]) -> list[str]:
    details = section["rpo_under_churn"]["details"]
    lines = []
    for vm in details["vms"]:
        steps = ", ".join(f"{name} {seconds:.2f}" for name, seconds in vm["step_s_median"].items())
        cycle = ("no cycle finished" if vm["cycle_s_median"] is None else
                 f"a cycle took {vm['cycle_s_median']:.1f} s median, {vm['cycle_s_max']:.1f} s max "
                 f"(median per step, s: {steps}); shipped {(vm['shipped_bytes_median'] or 0) / MB:.0f} MB per "
                 f"cycle median, {(vm['shipped_bytes_max'] or 0) / MB:.0f} MB max "
                 f"({(vm['shipped_bytes_max'] or 0) / vm['disk_size']:.0%} of the disk: what was unsent when the "
                 f"cycle sealed, the figure the resync check holds to {RESYNC_THRESHOLD:.0%}; the sampled backlog "
                 f"also counts the writes made while a cycle runs)")
        lines.append(
            f"- RPO under churn, {vm['rate_mb_s']:g} MB/s ({vm['vm']}, a {vm['disk_size'] >> 20} MiB raw disk): "
            f"the workload wrote {vm['workload_bytes'] / MB:.0f} MB in {vm['workload_seconds']:.0f} s "
            f"({vm['workload_mb_s']:.2f} MB/s{'' if vm['sustained'] else ', short of its rate'}); RPO p50 "
            f"{vm['rpo_s_p50']:.1f} s, p99 {vm['rpo_s_p99']:.1f} s, max {vm['rpo_s_max']:.1f} s over "
            f"{vm['samples']} samples; log backlog max {vm['backlog_bytes_max'] / MB:.0f} MB "
            f"({vm['backlog_ratio_max']:.0%} of the disk); {vm['cycles_succeeded']} of {vm['cycles']} cycles "
            f"succeeded, {cycle}; states seen: {', '.join(vm['states_seen'])}; resync "
            f"{'needed' if vm['resync_needed'] else 'not needed'} ({vm['resync_jobs']} resynchronize jobs).")
    cpu = details["cpu_seconds"]
    wall = details["sampled_s"]
    processes = "; ".join(f"{name} {seconds:.1f} s ({seconds / wall:.0%} of a core)" for name, seconds in cpu.items()
                          if not name.startswith("machine"))
    lines.append(
        f"- RPO under churn, CPU over the {wall:.0f} s sampled (user+system, each process tree): {processes}; "
        f"the machine was busy {details['cpu_share_of_machine']:.0%} of its CPU time (all its work, not only "
        f"this run's). {details['replicas_verified']} of {len(details['vms'])} replicas equal their source byte "
        f"for byte after the last cycle.")
    return lines
