"""The stand-in for a guest OS: a process that writes to a running VM's disks at a configurable churn.

Every write goes through the disk's replication tracker, as a guest's writes go through Hyper-V's
tracker: a write that reached the image without reaching the log would silently break replication, so
a disk that is not tracked is refused outright.

SIGTERM (or SIGINT) is only noted by the handler; the loop checks it between writes, so a stop never
leaves a write half in the disk and half in the log. The workload then closes its trackers, writes its
statistics and exits 0.

Quiesce, as a VSS writer freezes I/O for a consistent snapshot: while the freeze-request file exists
the workload makes no write. Between writes it checks for the file; once it holds its writes it writes
the request's token to the frozen file, then waits until the request goes away (or carries a new token,
which it acknowledges in turn). A stop request still ends it within the usual latency. A request that
no process holds the quiesce lock for any more was left by a quiescer that died: it is ignored, so a
crash of the host agent never leaves the guest frozen.

    python -m sites.workload --disk a.raw --disk b.vhd --rate 2 --seed 7 --stats stats.json
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import random
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from datapath.durable import replace_file
from datapath.errors import DataPathError, DiskNotFoundError
from datapath.tracker import NotTrackedError, ReplicationTracker

SECTOR = 512
MB = 1_000_000
"""Churn is quoted in MB/s (10^6 bytes), as the reference product quotes it."""

# The loop sleeps in slices this long at most, so a stop request is seen within about this time.
MAX_SLEEP_S = 0.05
# How long the token bucket may save up unused rate: bounds the burst after an idle spell.
BURST_S = 0.1
# While frozen, how often the request (thaw, new token) and the stop flag are looked at.
FREEZE_POLL_S = 0.01
# While writing, how often the freeze request is looked for: a file lookup per write cost an unpaced
# workload 12% of its writes; this adds at most this much to the time a freeze takes.
FREEZE_CHECK_S = 0.002

EXIT_OK = 0
EXIT_FAILED = 1


class StopRequest:
    """Set from a signal handler; read by the write loop between writes."""

    def __init__(self) -> None:
        self.signal_name: str | None = None

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def install(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        self.signal_name = signal.Signals(signum).name


class FreezeControl:
    """The guest's side of a quiesce: the freeze request, the acknowledgement, the quiescer's lock."""

    def __init__(self, request: Path, frozen: Path, quiesce_lock: Path | None = None):
        self.request = request
        self.frozen = frozen
        self.quiesce_lock = quiesce_lock
        self._abandoned: str | None = None
        self._next_check = 0.0
        self.freezes = 0
        self.frozen_seconds = 0.0

    def requested(self, now: float) -> bool:
        """Whether a live freeze request stands; looked up at most every FREEZE_CHECK_S. Writes made
        between lookups are harmless: the quiescer waits for the acknowledgement, which only `hold`
        gives."""
        if now < self._next_check:
            return False
        self._next_check = now + FREEZE_CHECK_S
        token = self._token()
        return token is not None and token != self._abandoned

    def hold(self, stop: StopRequest) -> None:
        """Make no write until the request is withdrawn, abandoned, or a stop is requested."""
        started = time.monotonic()
        acknowledged = None
        self.freezes += 1
        try:
            while not stop.requested:
                token = self._token()
                if token is None or token == self._abandoned:
                    return
                if not self._quiescer_alive():
                    self._abandoned = token
                    return
                if token != acknowledged:
                    _write_small_file(self.frozen, token)
                    acknowledged = token
                time.sleep(FREEZE_POLL_S)
        finally:
            self.frozen.unlink(missing_ok=True)
            self.frozen_seconds += time.monotonic() - started

    def _token(self) -> str | None:
        try:
            return self.request.read_text()
        except FileNotFoundError:
            return None

    def _quiescer_alive(self) -> bool:
        """A quiescer holds its lock for as long as its request stands; a lock anyone can take means
        the request outlived the process that made it."""
        if self.quiesce_lock is None:
            return True
        try:
            fd = os.open(self.quiesce_lock, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # releases the lock if it was taken
        return False


def _write_small_file(path: Path, text: str) -> None:
    """Readers poll this file: they see the old content or the whole new one."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_text(text)
    os.replace(temporary, path)


class TokenBucket:
    """Paces writes to `rate` bytes per second.

    A write may start once the bucket is not in debt; it then takes its whole size, possibly going into
    debt. Unused rate accumulates for at most `BURST_S` seconds."""

    def __init__(self, rate: float, now: float):
        self.rate = rate
        self._tokens = 0.0
        self._updated = now

    def wait_time(self, now: float) -> float:
        """Seconds to wait before the next write may start (0 when unpaced or not in debt)."""
        if self.rate <= 0:
            return 0.0
        self._tokens = min(self._tokens + (now - self._updated) * self.rate, self.rate * BURST_S)
        self._updated = now
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    def spend(self, nbytes: int) -> None:
        if self.rate > 0:
            self._tokens -= nbytes


class RandomData:
    """Incompressible, reproducible data: the AES-256-CTR keystream of a key derived from the seed.

    Several GB/s, where `random.randbytes` manages about 0.2 GB/s, so an unpaced workload measures the
    tracker and not the data generator."""

    def __init__(self, seed: int, max_size: int):
        key = hashlib.sha256(f"sites.workload data {seed}".encode()).digest()
        self._keystream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
        self._zeros = memoryview(bytes(max_size))

    def take(self, size: int) -> bytes:
        return self._keystream.update(self._zeros[:size])


@dataclass
class DiskStats:
    writes: int = 0
    bytes: int = 0


@dataclass
class WorkloadStats:
    seed: int
    rate_mb_s: float
    writes: int = 0
    bytes: int = 0
    seconds: float = 0.0
    stopped_by: str = ""
    """"duration", the signal's name, or "error"."""
    error: str | None = None
    freezes: int = 0
    frozen_seconds: float = 0.0
    disks: dict[str, DiskStats] = field(default_factory=dict)

    def record(self, disk: str, size: int) -> None:
        self.writes += 1
        self.bytes += size
        per_disk = self.disks[disk]
        per_disk.writes += 1
        per_disk.bytes += size


class TrackedDisk:
    """One disk the workload writes to, opened through its tracker."""

    def __init__(self, path: Path):
        self.path = path
        self.tracker = open_tracker(path)
        self.size = self.tracker.disk_size

    def close(self) -> None:
        self.tracker.close()


def open_tracker(path: Path) -> ReplicationTracker:
    if not path.is_file():
        raise DiskNotFoundError(f"disk {path} does not exist")
    try:
        return ReplicationTracker(path)
    except NotTrackedError as exc:
        raise NotTrackedError(
            f"{exc}: refusing to write to it, since writes that bypass the tracker never reach the "
            f"replication log and silently break replication; enable tracking first"
        ) from None


def run(
    disks: Sequence[TrackedDisk],
    *,
    rate_bytes_s: float,
    min_size: int,
    max_size: int,
    seed: int,
    duration_s: float,
    stop: StopRequest,
    stats: WorkloadStats,
    freeze: FreezeControl | None = None,
) -> None:
    """Write random data at random sector-aligned places until the duration ends or a stop arrives,
    counting each completed write in `stats` (so a failure still reports what was written before it).
    With `freeze`, no write is made while a freeze is requested."""
    choices = random.Random(seed)
    data = RandomData(seed, max_size)
    started = time.monotonic()
    deadline = started + duration_s if duration_s > 0 else float("inf")
    bucket = TokenBucket(rate_bytes_s, started)
    try:
        while True:
            now = time.monotonic()
            if stop.requested or now >= deadline:
                break
            if freeze is not None and freeze.requested(now):
                freeze.hold(stop)
                continue
            wait = bucket.wait_time(now)
            if wait > 0:
                time.sleep(min(wait, MAX_SLEEP_S, deadline - now))
                continue
            disk = disks[choices.randrange(len(disks))]
            size = min(choices.randrange(min_size, max_size + 1, SECTOR), disk.size)
            offset = choices.randrange(0, disk.size - size + 1, SECTOR)
            disk.tracker.write(offset, data.take(size))
            bucket.spend(size)
            stats.record(str(disk.path), size)
    finally:
        stats.seconds = time.monotonic() - started
        if freeze is not None:
            stats.freezes, stats.frozen_seconds = freeze.freezes, freeze.frozen_seconds
    stats.stopped_by = stop.signal_name or "duration"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sites.workload",
        description="Write random data to tracked disks at a given churn, standing in for a VM's guest. "
        "Every write goes through the disk's replication tracker. SIGTERM finishes the current write, "
        "writes the statistics and exits 0.",
    )
    parser.add_argument("--disk", action="append", required=True, type=Path, metavar="PATH",
                        help="a tracked disk image to write to (repeatable)")
    parser.add_argument("--rate", type=float, default=2.0, metavar="MB/s",
                        help="churn in MB/s (10^6 bytes), across all disks; 0 writes as fast as possible")
    parser.add_argument("--min-size", type=int, default=4096, metavar="BYTES",
                        help="smallest write, a multiple of 512 (default 4096)")
    parser.add_argument("--max-size", type=int, default=65536, metavar="BYTES",
                        help="largest write, a multiple of 512 (default 65536)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed for places, sizes and data (default: random, recorded in the stats)")
    parser.add_argument("--duration", type=float, default=0.0, metavar="SECONDS",
                        help="stop after this long; 0 runs until SIGTERM")
    parser.add_argument("--stats", type=Path, metavar="FILE", help="write statistics as JSON here on exit")
    parser.add_argument("--ready-file", type=Path, metavar="FILE",
                        help="create this file once every disk is open and the write loop starts")
    parser.add_argument("--freeze-file", type=Path, metavar="FILE",
                        help="while this file exists, make no write (quiesce); needs --frozen-file")
    parser.add_argument("--frozen-file", type=Path, metavar="FILE",
                        help="write the freeze request's content here once writes are held")
    parser.add_argument("--quiesce-lock", type=Path, metavar="FILE",
                        help="the lock a quiescer holds while its request stands; a request whose lock "
                             "is free was abandoned and is ignored")
    args = parser.parse_args(argv)
    if args.min_size <= 0 or args.min_size % SECTOR or args.max_size % SECTOR or args.max_size < args.min_size:
        parser.error(f"--min-size {args.min_size} and --max-size {args.max_size} must be positive multiples "
                     f"of {SECTOR} with min <= max")
    if len({path.resolve() for path in args.disk}) != len(args.disk):
        parser.error("each --disk may be given once (one tracker per disk and process)")
    if args.rate < 0 or args.duration < 0:
        parser.error("--rate and --duration must not be negative")
    if (args.freeze_file is None) != (args.frozen_file is None):
        parser.error("--freeze-file and --frozen-file go together")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    stop = StopRequest()
    stop.install()  # first, so a stop during start-up is honoured rather than killing the process
    args = parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**63)
    disks: list[TrackedDisk] = []
    try:
        for path in args.disk:
            disks.append(TrackedDisk(path))
    except DataPathError as exc:
        for disk in disks:
            disk.close()
        print(f"sites.workload: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if args.ready_file:
        args.ready_file.touch()
    exit_code = EXIT_OK
    stats = WorkloadStats(seed=seed, rate_mb_s=args.rate, disks={str(d.path): DiskStats() for d in disks})
    try:
        freeze = FreezeControl(args.freeze_file, args.frozen_file, args.quiesce_lock) if args.freeze_file else None
        run(disks, rate_bytes_s=args.rate * MB, min_size=args.min_size, max_size=args.max_size,
            seed=seed, duration_s=args.duration, stop=stop, stats=stats, freeze=freeze)
    except (DataPathError, OSError) as exc:
        stats.stopped_by, stats.error = "error", str(exc)
        print(f"sites.workload: write failed: {exc}", file=sys.stderr)
        exit_code = EXIT_FAILED
    finally:
        for disk in disks:
            disk.close()
    if args.stats:
        replace_file(args.stats, json.dumps(asdict(stats), indent=2, sort_keys=True).encode())
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
