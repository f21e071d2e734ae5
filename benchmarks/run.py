"""`python -m benchmarks.run`: measure the data path and the workflows against their peers and write
the results.

Five sections, all by default, one with `--only`: `datapath` (benchmarks/datapath.py: copy, sparse
copy, resync both ways read and the product's resync from the stored manifest, checksum scan, log apply,
peak memory), `workflows` (benchmarks/workflows.py: the job
engine's cost per step against a bare Celery chain, enabling protection of many VMs end to end, and the
failover time (RTO) of a recovery plan of many VMs, test and planned, against the same canvas of no-op
tasks), `nbd` (benchmarks/nbd.py: write throughput of a disk served over NBD by the tracker service
against qemu-nbd and the raw file) and `churn` (benchmarks/churn.py: RPO and log backlog of synthetic VMs
writing at 2, 5 and 20 MB/s with a 30 s copy frequency, for 10 minutes) and `scale` (benchmarks/scale.py: how
many protected VMs of small disks and low churn one deployment holds with every RPO under its warning
threshold, 1,000 at a 5-minute copy frequency for 10 minutes and 100 at 30 s for 3, the engine's CPU per delta
cycle and the capacity it implies).
Writes `benchmarks.json` (every run's figures) and `benchmarks.md` (a table: ours, the peer, the
ratio, the goal, pass or miss) into `--output` (docs/ by default), and prints the table. The report
holds the sections this run measured, no others. Goals are judged only on what was measured in this
run; a missed goal is written "miss" with its figure.
Exits 0 when every benchmark ran and every result was verified, whatever the goals say; 1 when a
benchmark failed or a result was wrong (then nothing is written); 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks import churn, nbd, scale
from benchmarks.datapath import CHUNK_SIZE, measure_datapath
from benchmarks.encryption import MIN_ROUNDS as ENCRYPTION_MIN_ROUNDS
from benchmarks.harness import BenchmarkError
from benchmarks.report import all_rows, results_table, text_table, write_outputs
from benchmarks.workflow_report import measure_workflows
from datapath.disk import format_size, parse_size

SECTIONS = ("datapath", "workflows", "nbd", "churn", "scale")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SIZE = "1G"
QUICK_SIZE = "256M"
DEFAULT_ROUNDS = 3
QUICK_ROUNDS = 2
MIN_SIZE = 256 << 20
"""Memory is compared with a run on a quarter of the size. Below 64 MiB that disk is smaller than the
data path's fixed buffers (a 32 MiB read-ahead ring, a 32 MiB apply window), so it would peak lower
for that reason alone and the comparison would mislead."""
SIZE_UNIT = 4 << 20
"""Sizes are whole multiples of 4 MiB, so a quarter of one is still a whole number of MiB (a VHD's)."""
SPACE_NEEDED_PER_DISK_SIZE = 6
"""The largest moment holds about 5.5 disk sizes in the workdir: the source, the sparse disk's data, and in the
encryption benchmark a tracked copy of the source, a replica per side, and a log beside each (with its undo
log)."""
WORKDIR_MARKER = ".sre-bench-workdir"
REQUIRED_TOOLS = {"datapath": ("cp", "sync", "rsync", "cmp", "qemu-img"), "workflows": ("redis-server",),
                  "nbd": ("qemu-img", "qemu-nbd", "cmp"), "churn": ("redis-server",),
                  "scale": ("redis-server",)}
DEFAULT_STEPS = 200
QUICK_STEPS = 20
DEFAULT_VMS = 100
QUICK_VMS = 10
FLEET_HOSTS = 2
VM_DISK_SIZE = 4 << 20
WORKFLOW_SPACE_PER_VM = 3 * VM_DISK_SIZE
"""A VM's disk (sparse, half full), its replica and the replication logs beside them, generously."""
DEFAULT_PLAN_VMS = 100
"""The reference product's limit of VMs per recovery plan."""
QUICK_PLAN_VMS = 10
DEFAULT_PLAN_GROUPS = 3
MAX_PLAN_VMS = 100
MAX_PLAN_GROUPS = 20
"""A recovery plan's limits (models/plans.py)."""
PLAN_SPACE_PER_VM = 5 * VM_DISK_SIZE
"""Besides WORKFLOW_SPACE_PER_VM: the test VM's and the recovery VM's disks, written in full."""


class UsageError(ValueError):
    """Bad arguments or an unusable machine: a one-line message, exit status 2."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Benchmark the data path (copy, sparse copy, resync, product-path resync, checksum scan, "
                    "log apply, peak "
                    "memory) against cp, cp --sparse=always, rsync and bare mmh3, in one run on the same "
                    "generated disks, and the workflows (the job engine's cost per step against a bare Celery "
                    "chain; enabling protection of many VMs end to end with real workers; the test and planned "
                    "failover of a recovery plan of many VMs, its RTO), and writes over NBD through the tracker "
                    "service against qemu-nbd, and RPO under churn (synthetic VMs writing at 2, 5 and 20 MB/s, "
                    "30 s copy frequency), and scale (how many protected VMs one deployment holds at a 300 s and "
                    "a 30 s copy frequency); write benchmarks.md and benchmarks.json.",
    )
    parser.add_argument("--only", choices=SECTIONS,
                        help="run one section only (default: all); the report then holds that section alone")
    parser.add_argument("--workdir", type=Path, default=REPO_ROOT / "bench-work",
                        help="scratch directory for the generated disks (default: bench-work/ in the repo); "
                             "it must be empty or a previous run's; deleted afterwards unless --keep")
    parser.add_argument("--size", help=f"disk size, a multiple of 4 MiB, at least 256M (default {DEFAULT_SIZE}, "
                                       f"{QUICK_SIZE} with --quick); memory is also measured at a quarter of it")
    parser.add_argument("--quick", action="store_true",
                        help=f"a smaller run for a smoke test: --size {QUICK_SIZE} --rounds {QUICK_ROUNDS} "
                             f"unless given")
    parser.add_argument("--rounds", type=int,
                        help=f"rounds of ours and the peer, alternating who goes first; the best is reported "
                             f"(default {DEFAULT_ROUNDS}, {QUICK_ROUNDS} with --quick; the encryption benchmark "
                             f"runs at least {ENCRYPTION_MIN_ROUNDS} unless this is given)")
    parser.add_argument("--steps", type=int,
                        help=f"workflows: no-op steps in the step-overhead job and the bare chain (default "
                             f"{DEFAULT_STEPS}, {QUICK_STEPS} with --quick)")
    parser.add_argument("--vms", type=int,
                        help=f"workflows: VMs protected at once, one {VM_DISK_SIZE >> 20} MiB disk each on "
                             f"{FLEET_HOSTS} hosts (default {DEFAULT_VMS}, {QUICK_VMS} with --quick)")
    parser.add_argument("--plan-vms", type=int,
                        help=f"workflows: VMs in the recovery plan failed over (test, then planned), one "
                             f"{VM_DISK_SIZE >> 20} MiB disk each on {FLEET_HOSTS} hosts, at most {MAX_PLAN_VMS} "
                             f"(default {DEFAULT_PLAN_VMS}, {QUICK_PLAN_VMS} with --quick)")
    parser.add_argument("--plan-groups", type=int, default=DEFAULT_PLAN_GROUPS,
                        help=f"workflows: groups the plan's VMs are cut into, at most {MAX_PLAN_GROUPS} and at most "
                             f"the plan's VMs (default {DEFAULT_PLAN_GROUPS})")
    nbd.add_arguments(parser)
    churn.add_arguments(parser)
    scale.add_arguments(parser)
    parser.add_argument("--seed", type=int, default=1, help="seed of the generated data and damage (default 1)")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "docs",
                        help="where benchmarks.md and benchmarks.json are written (default: docs/ in the repo)")
    parser.add_argument("--keep", action="store_true", help="keep the workdir and its disks afterwards")
    return parser.parse_args(argv)


def checked_size(args: argparse.Namespace) -> int:
    text = args.size or (QUICK_SIZE if args.quick else DEFAULT_SIZE)
    try:
        size = parse_size(text)
    except ValueError as exc:
        raise UsageError(f"--size: {exc}") from None
    if size < MIN_SIZE or size % SIZE_UNIT:
        raise UsageError(f"--size {text}: the disk size must be a multiple of 4 MiB and at least 256 MiB "
                         f"(memory is also measured at a quarter of it)")
    return size


def checked_rounds(args: argparse.Namespace) -> int:
    rounds = args.rounds if args.rounds is not None else (QUICK_ROUNDS if args.quick else DEFAULT_ROUNDS)
    if rounds < 1:
        raise UsageError(f"--rounds {rounds}: at least one round is needed")
    return rounds


def checked_steps(args: argparse.Namespace) -> int:
    steps = args.steps if args.steps is not None else (QUICK_STEPS if args.quick else DEFAULT_STEPS)
    if steps < 1:
        raise UsageError(f"--steps {steps}: at least one step is needed")
    return steps


def checked_vms(args: argparse.Namespace) -> int:
    vms = args.vms if args.vms is not None else (QUICK_VMS if args.quick else DEFAULT_VMS)
    if vms < 1:
        raise UsageError(f"--vms {vms}: at least one VM is needed")
    return vms


def checked_plan(args: argparse.Namespace) -> tuple[int, int]:
    vms = args.plan_vms if args.plan_vms is not None else (QUICK_PLAN_VMS if args.quick else DEFAULT_PLAN_VMS)
    if not 1 <= vms <= MAX_PLAN_VMS:
        raise UsageError(f"--plan-vms {vms}: a recovery plan holds 1 to {MAX_PLAN_VMS} VMs")
    if not 1 <= args.plan_groups <= min(MAX_PLAN_GROUPS, vms):
        raise UsageError(f"--plan-groups {args.plan_groups}: a plan of {vms} VMs has 1 to "
                         f"{min(MAX_PLAN_GROUPS, vms)} groups (none may be empty)")
    return vms, args.plan_groups


def prepare_workdir(workdir: Path, space_needed: int) -> bool:
    """Make `workdir` ready; return True when this run created it. Refuses a directory holding
    anything but a previous run's leftovers, since it is emptied afterwards, or one on a filesystem
    with less than `space_needed` bytes free."""
    workdir = workdir.resolve()
    created = not workdir.exists()
    if created:
        workdir.mkdir(parents=True)
    elif not workdir.is_dir():
        raise UsageError(f"--workdir {workdir} exists and is not a directory")
    elif any(workdir.iterdir()) and not (workdir / WORKDIR_MARKER).exists():
        raise UsageError(f"--workdir {workdir} is not empty and not a previous benchmark run's: refusing to "
                         f"use (and later empty) it")
    else:
        empty_workdir(workdir)
    (workdir / WORKDIR_MARKER).touch()
    free = shutil.disk_usage(workdir).free
    if free < space_needed:
        raise UsageError(f"--workdir {workdir} has {format_size(free)} free; this run needs about "
                         f"{format_size(space_needed)}")
    return created


def empty_workdir(workdir: Path) -> None:
    for entry in workdir.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def check_tools(sections: tuple[str, ...]) -> None:
    missing = [tool for section in sections for tool in REQUIRED_TOOLS[section] if shutil.which(tool) is None]
    if missing:
        raise UsageError(f"missing tools: {', '.join(missing)} (run `make tools`, or install coreutils, rsync, "
                         f"diffutils, qemu-utils and redis-server)")


# ---- the machine ------------------------------------------------------------------------------------
def _first_line(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    return (done.stdout or done.stderr).splitlines()[0].strip()


def _cpu_model() -> str:
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _memory_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemTotal line")


_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")
"""/proc/self/mounts writes a space in a path as \\040."""


def _filesystem_of(path: Path) -> dict[str, str]:
    """The type, device and mount point of the filesystem holding `path` (the longest mount point
    that contains it)."""
    target = str(path.resolve())
    best = {"type": "unknown", "device": "unknown", "mount_point": "/"}
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            device, mount_point, fs_type = (_OCTAL_ESCAPE.sub(lambda m: chr(int(m[1], 8)), field)
                                            for field in line.split()[:3])
            inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
            if inside and len(mount_point) >= len(best["mount_point"]):
                best = {"type": fs_type, "device": device, "mount_point": mount_point}
    return best


def machine_info(workdir: Path) -> dict[str, Any]:
    redis_server = shutil.which("redis-server")
    return {
        "cpu": _cpu_model(),
        "nproc": len(os.sched_getaffinity(0)),
        "memory_bytes": _memory_bytes(),
        "kernel": platform.release(),
        "workdir_filesystem": _filesystem_of(workdir),
        "python": platform.python_version(),
        "mmh3": importlib.metadata.version("mmh3"),
        "cp": _first_line(["cp", "--version"]),
        "rsync": _first_line(["rsync", "--version"]),
        "qemu_img": _first_line(["qemu-img", "--version"]),
        "redis_server": _first_line([redis_server, "--version"]) if redis_server else "not installed",
        "celery": importlib.metadata.version("celery"),
    }


# ---- the run ----------------------------------------------------------------------------------------
def measure(workdir: Path, sections: tuple[str, ...], settings: dict[str, Any]) -> dict[str, Any]:
    """The sections in order, each in a directory of its own in `workdir`, timed together."""
    started = time.monotonic()

    def progress(message: str) -> None:
        print(f"[{time.monotonic() - started:6.1f} s] {message}", file=sys.stderr, flush=True)

    load_before = os.getloadavg()
    measured: dict[str, Any] = {}
    if "datapath" in sections:
        measured |= measure_datapath(workdir / "datapath", settings["size"], settings["rounds"], settings["seed"],
                                     progress, settings["encryption_rounds"])
    if "workflows" in sections:
        # The data path leaves gigabytes of writeback behind; the engine commits (fsyncs) twice a step and
        # must not be timed while that drains.
        os.sync()
        measured["workflows"] = measure_workflows(workdir / "workflows", settings, progress)
    if "nbd" in sections:
        measured["nbd"] = nbd.measure_section(settings, progress)
    if "churn" in sections:
        os.sync()
        measured["churn"] = churn.measure_section(workdir / "churn", settings, progress)
    if "scale" in sections:
        measured["scale"] = scale.measure_section(workdir / "scale", settings, progress)
    progress("done")
    return {"seconds": time.monotonic() - started, "load_average_before": load_before,
            "load_average_after": os.getloadavg()} | measured


def checked_settings(args: argparse.Namespace, sections: tuple[str, ...]) -> dict[str, Any]:
    """The run's settings, those of the sections not run left out; UsageError on a bad one."""
    settings: dict[str, Any] = {"rounds": checked_rounds(args), "seed": args.seed, "quick": args.quick}
    if "datapath" in sections:
        size = checked_size(args)
        settings |= {"size": size, "quarter_size": size // 4, "chunk_size": CHUNK_SIZE,
                     # --rounds given is taken as it is; otherwise the encryption benchmark runs more rounds.
                     "encryption_rounds": settings["rounds"] if args.rounds is not None
                     else max(settings["rounds"], ENCRYPTION_MIN_ROUNDS)}
    if "workflows" in sections:
        plan_vms, plan_groups = checked_plan(args)
        settings |= {"steps": checked_steps(args), "vms": checked_vms(args), "fleet_hosts": FLEET_HOSTS,
                     "vm_disk_size": VM_DISK_SIZE, "plan_vms": plan_vms, "plan_groups": plan_groups}
    try:
        if "nbd" in sections:
            settings |= nbd.checked_settings(args)
        if "churn" in sections:
            settings |= churn.checked_settings(args)
        if "scale" in sections:
            settings |= scale.checked_settings(args)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return settings


def space_needed(settings: dict[str, Any]) -> int:
    datapath = SPACE_NEEDED_PER_DISK_SIZE * settings.get("size", 0)
    workflows = WORKFLOW_SPACE_PER_VM * (settings.get("vms", 0) + settings.get("plan_vms", 0))
    return (datapath + workflows + PLAN_SPACE_PER_VM * settings.get("plan_vms", 0)
            + churn.space_needed(settings) + scale.space_needed(settings))


def method_of(sections: tuple[str, ...]) -> list[str]:
    method = list(METHOD) if "datapath" in sections else []
    if "workflows" in sections:
        from benchmarks.workflows import METHOD as WORKFLOW_METHOD  # imported by the run already

        method += WORKFLOW_METHOD
    return (method + (nbd.METHOD if "nbd" in sections else []) + (churn.METHOD if "churn" in sections else [])
            + (scale.METHOD if "scale" in sections else []))


def build_report(argv: list[str], sections: tuple[str, ...], settings: dict[str, Any], machine: dict[str, Any],
                 measured: dict[str, Any]) -> dict[str, Any]:
    report = {
        "format": "sre-benchmarks/2",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python -m benchmarks.run", *argv]),
        "sections": list(sections),
        "machine": machine,
        "settings": settings | ({"log_volume": measured["log_volume"]} if "datapath" in sections else {}),
        "method": method_of(sections),
    } | measured
    judged = [row["passed"] for row in all_rows(report) if row["passed"] is not None]
    judged += [step["passed"] for step in report.get("memory", {}).get("steps", [])]
    return report | {"goals_met": sum(judged), "goals_judged": len(judged)}


METHOD = [
    "The disk is random data (the AES-256-CTR keystream of the seed: incompressible), generated once per "
    "size; the sparse disk holds as many bytes of data in scattered extents over 10 times the size.",
    "Before every timed run the files it reads and writes are fsynced and dropped from the page cache "
    "(POSIX_FADV_DONTNEED), except for the warm checksum scan, which runs right after a cold one.",
    "Ours and the peer alternate: ours first in odd rounds, the peer first in even rounds. Goals are "
    "judged on the best time of the rounds; the median is shown beside it, and benchmarks.json holds "
    "every run.",
    "Ours runs in a child process timed with perf_counter around the call (interpreter start not "
    "counted); its peak memory is the child's VmHWM. Peers are timed with perf_counter around their "
    "commands, `sync FILE` included where listed.",
    "Every copy, resync and log apply result is compared with its source byte for byte by cmp (over "
    "the data extents of either file; holes read as zeros on both), and replicas are read back by "
    "qemu-img as fixed VHDs of the right size. A wrong result stops the run.",
    "Ratio: higher is better, always: the peer's time over ours, our speed over the peer's, or the "
    "peer's bytes over ours.",
    "Peak memory is measured on disks of --size and of a quarter of it (ours only, one round), with "
    "the same log volume, to show whether it grows with the disk.",
    "The encryption benchmark (encrypted against ASR_STORAGE_ENCRYPTION=off) runs an untimed warm-up round of "
    "both sides, then at least 5 rounds unless --rounds is given; each side deletes what it wrote and the "
    "machine's dirty pages are written back before the other side's next step; a side's checks run after its "
    "timed steps, not between them. Its rows are judged on the best times like the others; the medians, each "
    "round's ratio and each step's CPU time (user + system, every thread of the child) are in the details.",
]



def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    # The deployments a benchmark starts are this machine's own: its Redis on a loopback port, the machine's
    # PostgreSQL, Azurite over http. Plain text is allowed for them (and for their processes) as in the tests;
    # a TLS deployment is the tests' to check (tests/test_tls.py).
    os.environ.setdefault("ASR_INSECURE_TRANSPORT", "1")
    sections = SECTIONS if args.only is None else (args.only,)
    try:
        settings = checked_settings(args, sections)
        check_tools(sections)
        workdir = args.workdir.resolve()
        created = prepare_workdir(workdir, space_needed(settings))
    except UsageError as exc:
        print(f"benchmarks: error: {exc}", file=sys.stderr)
        return 2
    try:
        machine = machine_info(workdir)
        measured = measure(workdir, sections, settings)
    except BenchmarkError as exc:
        print(f"benchmarks: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if not args.keep:
            if created:
                shutil.rmtree(workdir)
            else:
                empty_workdir(workdir)
    report = build_report(argv, sections, settings, machine, measured)
    md_path, json_path = write_outputs(report, args.output)
    print(text_table(results_table(report)))
    print(f"\n{report['goals_met']} of {report['goals_judged']} goals met; wrote {md_path} and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
