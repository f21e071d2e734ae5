"""Write throughput of a disk served over NBD by our tracker service, against qemu-nbd and the bare file.

    python -m benchmarks.nbd [--size-mib N] [--total-mib N] [--rounds N]

Also the `nbd` section of `python -m benchmarks.run` (`make bench`): `measure_section` gives its result
rows, `METHOD` and `detail_lines` its text in docs/benchmarks.md.

`qemu-img bench -w` writes the same requests (16 in flight, 64 KiB then 1 MiB) to (a) the raw image
directly, (b) a copy served by `qemu-nbd`, (c) a copy served by the tracker service (every write
logged, then written). Everything sits on tmpfs (/dev/shm when it exists) with `-t writeback`, so the
disks' speed is out of the picture and what is measured is the server's own cost per request: the
images are written in full first, and the tracker's log storage is warmed by two untimed runs, each
sealed and acknowledged (in service each seal's log is written over an acknowledged one's storage).
The sides alternate over the rounds and the best run of each is reported; the tracker's logs are
sealed and acknowledged between runs, so they do not pile up. At the end the three images must be
identical.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.harness import BenchmarkError, row
from datapath.tracker import ReplicationTracker
from sites.host.trackerservice import TrackerService
from workflows import settings

MIB = 1024 * 1024
DEPTH = 16
REQUEST_SIZES = (64 * 1024, MIB)
_COMPLETED = re.compile(r"Run completed in ([0-9.]+) seconds")


def _bench(target: str, size: int, count: int, image_opts: bool = False) -> float:
    """MB/s of `count` writes of `size` bytes, DEPTH in flight."""
    command = ["qemu-img", "bench", "-w", "-t", "writeback", "-d", str(DEPTH), "-s", str(size), "-c", str(count),
               "-f", "raw", target]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    match = _COMPLETED.search(result.stdout)
    if result.returncode != 0 or match is None:
        raise BenchmarkError(f"{' '.join(command)} failed: {result.stdout}{result.stderr}")
    return size * count / float(match.group(1)) / 1e6


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise BenchmarkError(f"{process.args} did not create {path}")
        time.sleep(0.02)


def benchmark_nbd(*, disk_mib: int = 256, total_mib: int = 1024, rounds: int = 3,
                  directory: Path | None = None) -> dict[str, Any]:
    """MB/s of the raw file, qemu-nbd and the tracker service for each request size, and the ratios
    tracker/qemu-nbd."""
    base = directory or (Path("/dev/shm") if Path("/dev/shm").is_dir() else None)
    work = Path(tempfile.mkdtemp(prefix="asr-nbd-bench-", dir=base))
    qemu_nbd: subprocess.Popen | None = None
    service = TrackerService(work / "service")
    try:
        raw, served, tracked = work / "raw.img", work / "qemu-nbd.img", work / "tracked.img"
        for image in (raw, served, tracked):
            with open(image, "wb") as f:
                f.truncate(disk_mib * MIB)
            # Allocated once, so no side pays for tmpfs page allocation in its first run only.
            subprocess.run(["qemu-img", "bench", "-w", "-q", "-t", "writeback", "-s", str(MIB), "-c",
                            str(disk_mib), "-f", "raw", str(image)], check=True, timeout=600,
                           stdout=subprocess.DEVNULL)
        ReplicationTracker.enable(tracked).close()
        # Sealed and acknowledged as a host agent's tracker would: keeping the spare log its setting says.
        tracker = ReplicationTracker(tracked, spare_max_bytes=settings.tracker_spare_max())
        qemu_socket = work / "qemu-nbd.sock"
        qemu_nbd = subprocess.Popen(["qemu-nbd", "-f", "raw", "--cache=writeback", "--persistent", "-x", "disk0",
                                     "-k", str(qemu_socket), str(served)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for(qemu_socket, qemu_nbd)
        service.start({"disk0": tracked})
        targets = {
            "raw_file": str(raw),
            "qemu_nbd": f"nbd+unix:///disk0?socket={qemu_socket}",
            "tracker_service": f"nbd+unix:///disk0?socket={service.socket('disk0')}",
        }
        # The tracker's log storage as it is in service, where each seal's new log is written over the
        # storage of a log acknowledged before (TrackerFiles.spare), as the images were written in full
        # above: two untimed runs, each sealed and acknowledged, so the first timed run's log (created at
        # the second seal) already recycles the first's.
        for _ in range(2):
            _bench(targets["tracker_service"], MIB, total_mib)
            tracker.acknowledge(tracker.seal().generation)
        results: dict[str, Any] = {"disk_mib": disk_mib, "total_mib": total_mib, "depth": DEPTH, "rounds": rounds,
                                   "directory": str(work.parent), "spare_max_bytes": tracker.spare_max_bytes,
                                   "runs": {}}
        for size in REQUEST_SIZES:
            label = f"{size // 1024}k"
            count = total_mib * MIB // size
            runs: dict[str, list[float]] = {name: [] for name in targets}
            for round_ in range(rounds):
                order = list(targets) if round_ % 2 == 0 else list(reversed(targets))
                for name in order:
                    runs[name].append(round(_bench(targets[name], size, count), 1))
                    if name == "tracker_service":
                        tracker.acknowledge(tracker.seal().generation)
            results["runs"][label] = runs
            best = {name: max(values) for name, values in runs.items()}
            results[label] = {**{f"{name}_mb_s": value for name, value in best.items()},
                              "tracker_vs_qemu_nbd": round(best["tracker_service"] / best["qemu_nbd"], 3)}
        tracker.close()
        service.stop()
        # The same writes went to all three: a server that dropped or misplaced one is not a result.
        for image in (served, tracked):
            if subprocess.run(["cmp", "-s", str(raw), str(image)], timeout=600).returncode != 0:
                raise BenchmarkError(f"{image.name} differs from {raw.name} after the same writes")
        return results
    finally:
        service.stop()
        if qemu_nbd is not None:
            qemu_nbd.terminate()
            try:
                qemu_nbd.wait(10)
            except subprocess.TimeoutExpired:
                qemu_nbd.kill()
                qemu_nbd.wait(10)
        shutil.rmtree(work, ignore_errors=True)


# ---- the `nbd` section of benchmarks.run ----------------------------------------------------------------
GOAL_RATIO = 0.9
"""The tracker service's write throughput over NBD must be at least this share of qemu-nbd's."""
DEFAULT_DISK_MIB, DEFAULT_TOTAL_MIB, QUICK_TOTAL_MIB = 256, 1024, 256
TITLE = f"Writes over NBD (qemu-img bench -w, {DEPTH} in flight)"
METHOD = [
    f"NBD writes: `qemu-img bench -w -t writeback -d {DEPTH}` writes the same requests (64 KiB, then 1 MiB; "
    "sequential offsets wrapping over the disk) to three raw images of the same size on tmpfs (/dev/shm): the "
    "file itself (context: no server), a copy served by `qemu-nbd -f raw --cache=writeback`, and a copy served "
    "by the tracker service over a Unix socket. The images are written in full once before timing. Throughput is "
    "the bytes written over the run time qemu-img reports; the three sides alternate (reversed order in even "
    "rounds) and the best run of each is judged, the median shown beside it.",
    "NBD writes: the tracker writes each byte twice, once appended to the replication log and once to the "
    "disk (qemu-nbd and the raw file once), so at equal server cost it moves twice the bytes; the tracker's "
    "log is sealed and acknowledged after each of its runs (not timed), so logs do not pile up. As in service, "
    "where each seal's new log is written over the storage of an acknowledged one (the tracker's spare log, "
    "at most ASR_TRACKER_SPARE_MAX of it: 256 MiB by default, a quarter of a run's log), "
    "the tracker's log storage is warmed like the images: two untimed runs through it, each sealed and "
    "acknowledged, before the timed ones (on this tmpfs, writing a fresh log's pages cost 3 to 5 times "
    "writing allocated ones). After the runs the three images must be identical (cmp); otherwise the run stops.",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nbd-size", type=int, metavar="MIB",
                        help=f"nbd: size of each served disk in MiB (default {DEFAULT_DISK_MIB})")
    parser.add_argument("--nbd-total", type=int, metavar="MIB",
                        help=f"nbd: MiB written per run and request size (default {DEFAULT_TOTAL_MIB}, "
                             f"{QUICK_TOTAL_MIB} with --quick)")


def checked_settings(args: argparse.Namespace) -> dict[str, int]:
    """The section's settings; ValueError with a one-line message on a bad one."""
    disk = args.nbd_size if args.nbd_size is not None else DEFAULT_DISK_MIB
    total = args.nbd_total if args.nbd_total is not None else (QUICK_TOTAL_MIB if args.quick else DEFAULT_TOTAL_MIB)
    if disk < 1 or total < 1:
        raise ValueError(f"--nbd-size {disk}, --nbd-total {total}: both must be at least 1 MiB")
    return {"nbd_disk_mib": disk, "nbd_total_mib": total}


def measure_section(settings: dict[str, Any], progress: Callable[[str], None]) -> dict[str, Any]:
    """The section's one benchmark: its rows are the tracker against qemu-nbd per request size (judged)
    and against the raw file (reported)."""
    progress(f"nbd: {settings['rounds']} round(s) of {settings['nbd_total_mib']} MiB written to the raw file, "
             f"qemu-nbd and the tracker service, per request size")
    results = benchmark_nbd(disk_mib=settings["nbd_disk_mib"], total_mib=settings["nbd_total_mib"],
                            rounds=settings["rounds"])
    rows = []
    for size in REQUEST_SIZES:
        label = f"{size // 1024}k"
        runs = results["runs"][label]
        best = {name: max(values) for name, values in runs.items()}
        median = {name: statistics.median(values) for name, values in runs.items()}
        results[label] |= {f"{name}_median_mb_s": value for name, value in median.items()}
        for peer, goal in (("qemu_nbd", f"tracker ≥ {GOAL_RATIO:g}× qemu-nbd"), ("raw_file", None)):
            ratio = best["tracker_service"] / best[peer]
            rows.append(row(f"tracker over NBD vs {peer.replace('_', '-') if goal else 'the raw file'}, "
                            f"{_size_text(size)} writes", best["tracker_service"], best[peer], "MB/s", ratio,
                            goal or "none set (reported)", ratio >= GOAL_RATIO if goal else None)
                        | {"ours_median": median["tracker_service"], "peer_median": median[peer],
                           "median_ratio": median["tracker_service"] / median[peer]})
    return {"write_throughput": {
        "title": TITLE,
        "ours_does": "the tracker service (sites/host/trackerservice.py, datapath/nbd.py) serving the image over a "
                     "Unix socket: each write appended to the replication log, then written to the disk",
        "peer_does": "qemu-nbd -f raw --cache=writeback serving a copy of the image; for context, qemu-img "
                     "writing the raw file itself",
        "rows": rows, "details": results,
    }}


def _size_text(size: int) -> str:
    return f"{size // 1024} KiB" if size < MIB else f"{size // MIB} MiB"


def detail_lines(section: dict[str, Any]) -> list[str]:
    details = section["write_throughput"]["details"]
    figures = "; ".join(
        f"{_size_text(size)} writes: raw file {details[label]['raw_file_mb_s']:.0f}, qemu-nbd "
        f"{details[label]['qemu_nbd_mb_s']:.0f}, tracker {details[label]['tracker_service_mb_s']:.0f} MB/s"
        for size, label in ((size, f"{size // 1024}k") for size in REQUEST_SIZES))
    spare = details.get("spare_max_bytes")
    kept = "" if spare is None else f", the tracker's spare log at most {spare // MIB} MiB"
    return [f"- NBD writes: {details['disk_mib']} MiB disks in {details['directory']}, {details['total_mib']} MiB "
            f"written per run{kept}, best of {details['rounds']}: {figures}. Every run's figures are in "
            f"benchmarks.json."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=256, help="size of each disk")
    parser.add_argument("--total-mib", type=int, default=1024, help="bytes written per run")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps(benchmark_nbd(disk_mib=args.size_mib, total_mib=args.total_mib, rounds=args.rounds), indent=2))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
