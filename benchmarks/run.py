"""`python -m benchmarks.run`: measure the data path against its peers and write the results.

Writes `benchmarks.json` (every run's figures) and `benchmarks.md` (a table: ours, the peer, the
ratio, the goal, pass or miss) into `--output` (docs/ by default), and prints the table. Goals are
judged only on what was measured in this run; a missed goal is written "miss" with its figure.
Exits 0 when every benchmark ran and every result was verified, whatever the goals say; 1 when a
benchmark failed or a result was wrong (then nothing is written); 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks.datapath import (
    CHUNK_SIZE,
    FLAT_MEMORY_SLACK,
    MAX_LOG_VOLUME,
    Bench,
    BenchmarkError,
    generate_disks,
    memory_rows,
    run_benchmarks,
    run_ours,
)
from datapath.disk import format_size, parse_size

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
SPACE_NEEDED_PER_DISK_SIZE = 5
"""The largest moment holds about 4.3 disk sizes in the workdir (source, sparse data, two targets)."""
WORKDIR_MARKER = ".sre-bench-workdir"
REQUIRED_TOOLS = ("cp", "sync", "rsync", "cmp", "qemu-img")


class UsageError(ValueError):
    """Bad arguments or an unusable machine: a one-line message, exit status 2."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Benchmark the data path (copy, sparse copy, resync, checksum scan, log apply, peak "
                    "memory) against cp, cp --sparse=always, rsync and bare mmh3, in one run on the same "
                    "generated disks; write benchmarks.md and benchmarks.json.",
    )
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
                             f"(default {DEFAULT_ROUNDS}, {QUICK_ROUNDS} with --quick)")
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


def prepare_workdir(workdir: Path, size: int) -> bool:
    """Make `workdir` ready; return True when this run created it. Refuses a directory holding
    anything but a previous run's leftovers, since it is emptied afterwards."""
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
    if free < SPACE_NEEDED_PER_DISK_SIZE * size:
        raise UsageError(f"--workdir {workdir} has {format_size(free)} free; a {format_size(size)} run needs "
                         f"about {format_size(SPACE_NEEDED_PER_DISK_SIZE * size)}")
    return created


def empty_workdir(workdir: Path) -> None:
    for entry in workdir.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def check_tools() -> None:
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if missing:
        raise UsageError(f"missing tools: {', '.join(missing)} (run `make tools`, or install coreutils, rsync, "
                         f"diffutils and qemu-utils)")


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
    }


# ---- the run ----------------------------------------------------------------------------------------
def measure(workdir: Path, size: int, rounds: int, seed: int) -> dict[str, Any]:
    """Every benchmark on a disk of `size` with the peers, then ours alone on a quarter-size disk for
    the memory comparison; the full-size disks are deleted before the quarter-size ones are made."""
    started = time.monotonic()

    def progress(message: str) -> None:
        print(f"[{time.monotonic() - started:6.1f} s] {message}", file=sys.stderr, flush=True)

    log_volume = min(MAX_LOG_VOLUME, size // 4)
    load_before = os.getloadavg()
    measured = {}
    for label, disk_size, with_peers, run_rounds in (("full", size, True, rounds),
                                                     ("quarter", size // 4, False, 1)):
        directory = workdir / label
        progress(f"generating a {format_size(disk_size)} disk and a sparse one in {directory}")
        disks = generate_disks(directory, disk_size, seed)
        bench = Bench(disks, directory, run_rounds, seed, log_volume, with_peers)
        measured[label] = run_benchmarks(bench, progress)
        shutil.rmtree(directory)
    baseline = run_ours("idle", 0)["peak_rss_bytes"]
    progress("done")
    return {
        "seconds": time.monotonic() - started,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "log_volume": log_volume,
        "benchmarks": measured["full"],
        "memory": {
            "baseline_peak_rss_bytes": baseline,
            "flat_slack_bytes": FLAT_MEMORY_SLACK,
            "steps": memory_rows(measured["full"], measured["quarter"], size, size // 4, baseline),
            "quarter_size_runs": measured["quarter"],
        },
    }


def build_report(argv: list[str], args: argparse.Namespace, size: int, rounds: int, machine: dict[str, Any],
                 measured: dict[str, Any]) -> dict[str, Any]:
    rows = [row for benchmark in measured["benchmarks"].values() for row in benchmark["rows"]]
    memory_steps = measured["memory"]["steps"]
    judged = [row["passed"] for row in rows if row["passed"] is not None]
    judged += [step["passed"] for step in memory_steps]
    return {
        "format": "sre-benchmarks/1",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m benchmarks.run", *argv]),
        "machine": machine,
        "settings": {"size": size, "quarter_size": size // 4, "rounds": rounds, "seed": args.seed,
                     "quick": args.quick, "chunk_size": CHUNK_SIZE, "log_volume": measured["log_volume"]},
        "method": METHOD,
        "goals_met": sum(judged),
        "goals_judged": len(judged),
    } | measured


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
]


# ---- presenting -------------------------------------------------------------------------------------
def format_value(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if unit == "bytes":
        return f"{format_size(int(value))} ({int(value):,} B)" if value >= 1024 else f"{int(value)} B"
    if unit == "s":
        return f"{value:.3f} s"
    return f"{value:.2f} {unit}"


def verdict(passed: bool | None) -> str:
    return {True: "pass", False: "miss", None: "—"}[passed]


def results_table(report: dict[str, Any]) -> list[list[str]]:
    """Rows of [benchmark, metric, ours, peer, ratio, goal, result], the memory steps last."""
    lines = []
    for benchmark in report["benchmarks"].values():
        for row in benchmark["rows"]:
            ours, peer = format_value(row["ours"], row["unit"]), format_value(row["peer"], row["unit"])
            ratio = "—" if row["ratio"] is None else f"{row['ratio']:.2f}×"
            if "median_ratio" in row:
                ours += f" (median {row['ours_median']:.3f})"
                peer += f" (median {row['peer_median']:.3f})"
                ratio += f" (median {row['median_ratio']:.2f}×)"
            lines.append([benchmark["title"], row["metric"], ours, peer, ratio, row["goal"], verdict(row["passed"])])
    memory = report["memory"]
    for step in memory["steps"]:
        lines.append([
            "Peak memory (VmHWM)", step["step"],
            f"{format_size(step['peak_rss_bytes_full'])} at {format_size(step['full_size'])}",
            f"{format_size(step['peak_rss_bytes_quarter'])} at {format_size(step['quarter_size'])}",
            "—", f"grows < {format_size(memory['flat_slack_bytes'])} at 4× the disk "
                 f"(grew {step['growth_bytes'] / (1 << 20):+.1f} MiB)",
            verdict(step["passed"]),
        ])
    return lines


TABLE_HEADER = ["Benchmark", "Metric", "Ours", "Peer", "Ratio", "Goal", "Result"]


def text_table(lines: list[list[str]]) -> str:
    """The table for a terminal: a benchmark's name only on its first line."""
    rendered = [TABLE_HEADER] + [["" if previous[0] == line[0] else line[0]] + line[1:]
                                 for previous, line in zip([[""]] + lines, lines)]
    widths = [max(len(line[column]) for line in rendered) for column in range(len(TABLE_HEADER))]
    rule = "  ".join("-" * width for width in widths)
    out = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in rendered]
    return "\n".join([out[0], rule] + out[1:])


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown(report: dict[str, Any]) -> str:
    machine = report["machine"]
    fs = machine["workdir_filesystem"]
    settings = report["settings"]
    lines = [
        "# Data-path benchmarks",
        "",
        f"Written by `{report['command']}` (`make bench`) on {report['date']}; do not edit, re-run. "
        f"The full figures of every run are in `benchmarks.json` beside this file.",
        "",
        f"**{report['goals_met']} of {report['goals_judged']} goals met.** Disk size "
        f"{format_size(settings['size'])} (memory also at {format_size(settings['quarter_size'])}), "
        f"{settings['rounds']} round(s), seed {settings['seed']}, run time {report['seconds']:.0f} s.",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        f"| CPU | {machine['cpu']}, nproc {machine['nproc']} |",
        f"| memory | {format_size(machine['memory_bytes'])} |",
        f"| kernel | {machine['kernel']} |",
        f"| workdir filesystem | {fs['type']} ({fs['device']} on {fs['mount_point']}) |",
        f"| load average (1, 5, 15 min) before / after | "
        f"{', '.join(f'{x:.2f}' for x in report['load_average_before'])} / "
        f"{', '.join(f'{x:.2f}' for x in report['load_average_after'])} |",
        f"| tools | Python {machine['python']}, mmh3 {machine['mmh3']}; {machine['cp']}; {machine['rsync']}; "
        f"{machine['qemu_img']} |",
        "",
        "## Results",
        "",
        "| " + " | ".join(TABLE_HEADER) + " |",
        "|" + "---|" * len(TABLE_HEADER),
    ]
    lines += ["| " + " | ".join(_md_cell(cell) if cell != "miss" else "**miss**" for cell in line) + " |"
              for line in results_table(report)]
    lines += ["", "## What each side runs", ""]
    for benchmark in report["benchmarks"].values():
        lines.append(f"- **{benchmark['title']}**. Ours: {benchmark['ours_does']}. "
                     f"Peer: {benchmark['peer_does'] or 'none'}.")
    lines += ["", "## Method", ""] + [f"- {item}" for item in report["method"]]
    lines += ["", "## Details", ""] + detail_lines(report)
    return "\n".join(lines) + "\n"


def detail_lines(report: dict[str, Any]) -> list[str]:
    """The figures beside the headline ones: what was moved, what crossed, what was allocated."""
    benchmarks = report["benchmarks"]
    copy, sparse, resync = benchmarks["initial_copy"], benchmarks["sparse_copy"], benchmarks["resync"]
    scan, log = benchmarks["checksum_scan"], benchmarks["log_apply"]
    best_copy = min(copy["ours"]["runs"], key=lambda run: run["seconds"])
    best_sparse = min(sparse["ours"]["runs"], key=lambda run: run["seconds"])
    ours_sync = min(resync["ours"]["runs"], key=lambda run: run["seconds"])
    peer_sync = min(resync["peer"]["runs"], key=lambda run: run["seconds"])
    details = resync["details"]
    tracked = log["tracker"]["runs"][0]
    return [
        f"- Initial copy: ours {copy['details']['ours_gb_per_s']:.2f} GB/s, cp "
        f"{copy['details']['peer_gb_per_s']:.2f} GB/s; ours read {best_copy['bytes_read']:,} B and wrote "
        f"{best_copy['bytes_written']:,} B.",
        f"- Sparse copy: {format_size(sparse['details']['virtual_size'])} virtual, "
        f"{format_size(sparse['details']['data_bytes'])} of data in {sparse['details']['data_extents']} "
        f"extents; ours read {best_sparse['bytes_read']:,} B and wrote {best_sparse['bytes_written']:,} B, leaving "
        f"{best_sparse['zero_bytes_skipped']:,} B of zeros unwritten. Allocated: source "
        f"{sparse['details']['source_allocated_bytes']:,} B, ours (replica with footer) "
        f"{best_sparse['allocated_bytes']:,} B, cp {sparse['peer']['runs'][0]['allocated_bytes']:,} B.",
        f"- Resync: {details['damaged_chunks']} damaged chunks of {format_size(details['chunk_size'])}, one "
        f"{details['damage_write_size']}-byte write each at a sector-aligned offset "
        f"({details['damaged_blocks']} blocks of {format_size(details['block_size'])} touched). Ours: bytes_sent "
        f"{ours_sync['bytes_sent']:,} B, hash_bytes {ours_sync['hash_bytes']:,} B "
        f"({ours_sync['chunks_compared']} chunks compared, {ours_sync['chunks_sent']} chunks and "
        f"{ours_sync['blocks_sent']} blocks sent). rsync: literal data {peer_sync['literal_data']:,} B, matched "
        f"{peer_sync['matched_data']:,} B, total bytes sent {peer_sync['total_bytes_sent']:,} B, received "
        f"{peer_sync['total_bytes_received']:,} B.",
        f"- Checksum scan: cold best {scan['ours']['best_seconds']:.3f} s, warm best "
        f"{scan['ours_warm']['best_seconds']:.3f} s, in-memory ceiling {scan['peer']['best_seconds']:.3f} s; "
        f"every run gave root {scan['details']['root']}.",
        f"- Log apply: {log['details']['writes']} writes through the tracker "
        f"({log['details']['records']} records, {log['details']['data_bytes']:,} B of data, log file "
        f"{log['details']['log_file_bytes']:,} B); tracker writes took {tracked['write_seconds']:.3f} s and the "
        f"seal {tracked['seal_seconds']:.3f} s; apply best "
        f"{log['ours']['best_seconds']:.3f} s, median {log['ours']['median_seconds']:.3f} s.",
        f"- Peak memory baseline (an idle child with the data-path modules imported): "
        f"{format_size(report['memory']['baseline_peak_rss_bytes'])}.",
    ]


def write_outputs(report: dict[str, Any], output: Path) -> tuple[Path, Path]:
    output.mkdir(parents=True, exist_ok=True)
    json_path, md_path = output / "benchmarks.json", output / "benchmarks.md"
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    md_path.write_text(markdown(report))
    return md_path, json_path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        size, rounds = checked_size(args), checked_rounds(args)
        check_tools()
        workdir = args.workdir.resolve()
        created = prepare_workdir(workdir, size)
    except UsageError as exc:
        print(f"benchmarks: error: {exc}", file=sys.stderr)
        return 2
    try:
        machine = machine_info(workdir)
        measured = measure(workdir, size, rounds, args.seed)
    except BenchmarkError as exc:
        print(f"benchmarks: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if not args.keep:
            if created:
                shutil.rmtree(workdir)
            else:
                empty_workdir(workdir)
    report = build_report(argv, args, size, rounds, machine, measured)
    md_path, json_path = write_outputs(report, args.output)
    print(text_table(results_table(report)))
    print(f"\n{report['goals_met']} of {report['goals_judged']} goals met; wrote {md_path} and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
