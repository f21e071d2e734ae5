"""The tracker service: serves a VM's disks to QEMU over NBD, each write to a tracked disk logged before the disk
has it (an untracked disk, such as a drill's test VM's, is served as it is).

    python -m sites.trackerd --socket-dir DIR --disk NAME=PATH [--disk ...] [--sync]

Each disk is served at `DIR/NAME.sock` under export name NAME, through its replication tracker
(datapath.tracker), opened once here. The tracker is thread-safe and coordinates with the host agent's
trackers through its control file, so seals, snapshots and acknowledgements go on as with any writer.

While serving, the service holds each image as QEMU does (sites/host/imagelock.py): QEMU or qemu-io
opening the image directly fails, and so does a second service. It writes `DIR/ready` once every
socket listens.

Unclean stops are detected: a `<disk>.serving` marker (pid and start time) is written and fsynced
beside each disk at start and removed after a clean stop (SIGTERM: stop accepting, finish the requests
in flight, flush tracker and disk). A marker left by a process that is gone means the previous service
died while serving: the disk is marked resync-required before it is served again. (A SIGKILL loses no
acknowledged write, as the tracker logs before writing; but a host crash with `sync` off can lose log
bytes the disk has, and nothing tells the two apart afterwards.)

`TrackerService` starts, finds and stops the process for the host agent. It runs detached (its own
session), so it outlives the worker that started it.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from datapath.disk import LocalDisk, open_disk
from datapath.durable import fsync_directory, replace_file
from datapath.errors import NonRecoverableError
from datapath.nbd import NbdServer
from datapath.tracker import NotTrackedError, ReplicationTracker

from .imagelock import ImageLock
from .processes import log_tail, process_start_ticks, wait_for_exit

log = logging.getLogger("trackerservice")

READY = "ready"
PID_FILE = "trackerservice.pid"
SERVICE_LOG = "service.log"
SERVING_SUFFIX = ".serving"
START_TIMEOUT_S = 15.0
KILL_WAIT_S = 5.0
POLL_S = 0.02
STOP_REQUEST_TIMEOUT_S = 10.0
_SOCKET_PATH_MAX = 107  # sun_path holds 108 bytes with its terminating NUL
_DISK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_PROJECT_ROOT = Path(__file__).resolve().parents[2]


class TrackerServiceError(NonRecoverableError):
    """The tracker service could not start, or was asked for something it does not serve."""


# ---- the export: a tracker seen as an NBD block device -------------------------------------------------
class TrackerExport:
    """A tracked disk as a datapath.nbd BlockExport: every write, zeroing and trim goes through the tracker."""

    def __init__(self, name: str, tracker: ReplicationTracker):
        self.name = name
        self.size = tracker.disk_size
        self.tracker = tracker

    def read(self, offset: int, length: int) -> bytes:
        return self.tracker.read(offset, length)

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        self.tracker.write(offset, data, fua=fua)

    def write_many(self, writes: list[tuple[int, memoryview, bool]]) -> None:
        self.tracker.write_many(writes)

    def write_zeroes(self, offset: int, length: int, fua: bool) -> None:
        self.tracker.write_zeroes(offset, length, fua=fua)

    def trim(self, offset: int, length: int, fua: bool) -> None:
        self.tracker.trim(offset, length, fua=fua)

    def flush(self) -> None:
        self.tracker.flush()


class PlainExport:
    """An untracked disk (a drill's test VM, a VM not protected) as a datapath.nbd BlockExport: served as it
    is, so QEMU still never opens an image itself and every guest disk is held the same way."""

    def __init__(self, name: str, disk: LocalDisk):
        self.name = name
        self.size = disk.size
        self.disk = disk

    def read(self, offset: int, length: int) -> bytes:
        buffer = bytearray(length)
        self.disk.read_into(offset, memoryview(buffer))
        return bytes(buffer)

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        self.disk.write(offset, data)
        if fua:
            self.disk.flush()

    def write_zeroes(self, offset: int, length: int, fua: bool) -> None:
        self.disk.write_zeros(offset, length)
        if fua:
            self.disk.flush()

    def trim(self, offset: int, length: int, fua: bool) -> None:
        self.write_zeroes(offset, length, fua)

    def flush(self) -> None:
        self.disk.flush()


# ---- the process ---------------------------------------------------------------------------------------
def serving_marker(disk: Path) -> Path:
    return disk.with_name(disk.name + SERVING_SUFFIX)


class _ServedDisk:
    """One disk while served: its image lock, marker, tracker and server."""

    def __init__(self, name: str, path: Path, socket_path: Path, *, sync: bool):
        self.name, self.path = name, path
        self.marker = serving_marker(path)
        self.image_lock = ImageLock(path)
        self.tracker: ReplicationTracker | None = None
        self.plain: LocalDisk | None = None
        self.server: NbdServer | None = None
        self.marker_written = False
        try:
            try:
                self.tracker = ReplicationTracker(path, sync=sync)
            except NotTrackedError:
                self.plain = open_disk(path, writable=True)
            if self.tracker is not None:
                self._check_previous_stop()
                _write_marker(self.marker)
                self.marker_written = True
            export = TrackerExport(name, self.tracker) if self.tracker is not None else PlainExport(name, self.plain)
            self.server = NbdServer(socket_path, {name: export})
            self.server.start()
        except BaseException:
            self.close(clean=True)  # nothing was served: a marker of ours goes
            raise

    def _check_previous_stop(self) -> None:
        assert self.tracker is not None
        try:
            previous = json.loads(self.marker.read_text())
        except FileNotFoundError:
            return
        except ValueError:
            previous = {"pid": "unknown", "start_ticks": None}
        pid = previous.get("pid")
        if isinstance(pid, int) and process_start_ticks(pid) == previous.get("start_ticks"):
            raise TrackerServiceError(f"disk {self.path} is served by tracker service pid {pid}")
        reason = f"tracker service stopped uncleanly (pid {pid})"
        self.tracker.mark_resync_required(reason)
        log.warning("disk %s: %s: marked resync required", self.path, reason)

    def stop_serving(self, timeout: float) -> None:
        if self.server is not None and not self.server.stop(timeout):
            log.warning("disk %s: a connection did not finish within %.0f s", self.path, timeout)

    def close(self, *, clean: bool) -> None:
        """Release everything; with `clean`, after flushing, the marker goes (a clean stop)."""
        if self.plain is not None:
            try:
                if clean:
                    self.plain.flush()
            finally:
                self.plain.close()
                self.plain = None
        if self.tracker is not None:
            try:
                if clean:
                    self.tracker.flush()
                    if self.marker_written:
                        self.marker.unlink(missing_ok=True)
                        fsync_directory(self.path.parent)
            finally:
                self.tracker.close()
                self.tracker = None
        self.image_lock.release()


def _write_marker(marker: Path) -> None:
    replace_file(marker, json.dumps({"pid": os.getpid(), "start_ticks": process_start_ticks(os.getpid())}).encode())


def serve(socket_dir: Path, disks: dict[str, Path], *, sync: bool, stop: threading.Event) -> None:
    """Serve until `stop` is set, then stop cleanly."""
    (socket_dir / READY).unlink(missing_ok=True)
    served: list[_ServedDisk] = []
    try:
        for name, path in disks.items():
            served.append(_ServedDisk(name, path, socket_dir / f"{name}.sock", sync=sync))
            log.info("serving disk %s at %s (export %r)", path, socket_dir / f"{name}.sock", name)
    except BaseException:
        # Nothing was served yet: the markers go too.
        for disk in served:
            disk.stop_serving(1.0)
            disk.close(clean=True)
        raise
    (socket_dir / READY).write_text(f"{os.getpid()}\n")
    stop.wait()
    log.info("stopping: finishing the requests in flight")
    (socket_dir / READY).unlink(missing_ok=True)
    for disk in served:
        disk.stop_serving(STOP_REQUEST_TIMEOUT_S)
    for disk in served:
        disk.close(clean=True)
    log.info("stopped cleanly")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sites.trackerd", description=__doc__.split("\n")[0])
    parser.add_argument("--socket-dir", type=Path, required=True)
    parser.add_argument("--disk", action="append", required=True, metavar="NAME=PATH")
    parser.add_argument("--sync", action="store_true", help="every write durable before it is acknowledged")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    disks = {}
    for entry in args.disk:
        name, sep, path = entry.partition("=")
        if not sep or not _DISK_NAME.fullmatch(name):
            parser.error(f"--disk {entry!r}: expected NAME=PATH with NAME of letters, digits, '.', '_', '-'")
        disks[name] = Path(path).resolve()
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        serve(args.socket_dir, disks, sync=args.sync, stop=stop)
    except Exception as exc:
        log.error("cannot serve: %s", exc)
        return 1
    return 0


# ---- the host agent's handle ---------------------------------------------------------------------------
class TrackerService:
    """The tracker service of one VM, run from `runtime_dir` (its pid file, service.log and, when the path
    is short enough, its sockets)."""

    def __init__(self, runtime_dir: str | os.PathLike[str]):
        self.runtime_dir = Path(runtime_dir).resolve()
        self._child: subprocess.Popen | None = None

    @property
    def socket_dir(self) -> Path:
        """The runtime dir, or a short folder of its own under /tmp when socket paths there would not fit."""
        if len(str(self.runtime_dir / ("x" * 64 + ".sock"))) <= _SOCKET_PATH_MAX:
            return self.runtime_dir
        digest = hashlib.sha256(str(self.runtime_dir).encode()).hexdigest()[:16]
        return Path(f"/tmp/asr-nbd-{digest}")

    def socket(self, disk_name: str) -> Path:
        return self.socket_dir / f"{disk_name}.sock"

    @property
    def log_path(self) -> Path:
        return self.runtime_dir / SERVICE_LOG

    def running(self) -> bool:
        return self._record() is not None

    def start(self, disks: dict[str, Path], *, sync: bool = False) -> int:
        """Start serving `disks` (name -> image path); returns the service's pid once every socket
        listens. Idempotent while it runs with the same disks."""
        wanted = {name: str(Path(path).resolve()) for name, path in disks.items()}
        for name in wanted:
            if not _DISK_NAME.fullmatch(name):
                raise TrackerServiceError(f"disk name {name!r}: letters, digits, '.', '_', '-' only (a socket name)")
        record = self._record()
        if record is not None:
            if record["disks"] == wanted and record.get("sync", False) == sync:
                return record["pid"]
            raise TrackerServiceError(
                f"tracker service pid {record['pid']} in {self.runtime_dir} serves {record['disks']}, not {wanted}: "
                f"stop it first")
        self.runtime_dir.mkdir(parents=True, exist_ok=True)
        socket_dir = self.socket_dir
        socket_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        (socket_dir / READY).unlink(missing_ok=True)
        command = [sys.executable, "-m", "sites.trackerd", "--socket-dir", str(socket_dir)]
        for name, path in wanted.items():
            command += ["--disk", f"{name}={path}"]
        if sync:
            command.append("--sync")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_PROJECT_ROOT), env.get("PYTHONPATH")]))
        with open(self.log_path, "ab") as service_log:
            child = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=service_log, stderr=service_log, env=env,
                cwd=self.runtime_dir,
                start_new_session=True,  # not in the starter's process group: a worker's restart spares it
            )
        self._child = child
        replace_file(self.runtime_dir / PID_FILE, _json({
            "pid": child.pid, "start_ticks": process_start_ticks(child.pid), "disks": wanted, "sync": sync}))
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (socket_dir / READY).exists():
            if child.poll() is not None:
                (self.runtime_dir / PID_FILE).unlink(missing_ok=True)
                raise TrackerServiceError(
                    f"tracker service in {self.runtime_dir} exited with code {child.returncode} while starting: "
                    f"{log_tail(self.log_path)}")
            if time.monotonic() > deadline:
                self.stop(timeout=1.0)
                raise TrackerServiceError(
                    f"tracker service in {self.runtime_dir} did not listen within {START_TIMEOUT_S:.0f} s: "
                    f"{log_tail(self.log_path)}")
            time.sleep(POLL_S)
        return child.pid

    def stop(self, timeout: float = 10.0) -> str:
        """SIGTERM (a clean stop), SIGKILL after `timeout`: "stopped", "killed" or "not-running"."""
        record = self._record()
        if record is None:
            outcome = "not-running"
        elif self._signal_and_wait(record, signal.SIGTERM, timeout):
            outcome = "stopped"
        elif self._signal_and_wait(record, signal.SIGKILL, KILL_WAIT_S):
            outcome = "killed"
        else:
            raise TrackerServiceError(f"tracker service pid {record['pid']} survived SIGKILL (stuck in the kernel?)")
        (self.runtime_dir / PID_FILE).unlink(missing_ok=True)
        if self.socket_dir != self.runtime_dir:
            shutil.rmtree(self.socket_dir, ignore_errors=True)  # ours alone: named after the runtime dir
        return outcome

    def _record(self) -> dict | None:
        """The pid file's record while its process lives (pid and start time, so a reused pid is not it)."""
        try:
            record = json.loads((self.runtime_dir / PID_FILE).read_text())
        except (FileNotFoundError, ValueError):
            return None
        return record if self._alive(record) else None

    def _alive(self, record: dict) -> bool:
        child = self._child
        if child is not None and child.pid == record["pid"] and child.poll() is not None:
            return False  # our own child, now reaped
        return process_start_ticks(record["pid"]) == record["start_ticks"]

    def _signal_and_wait(self, record: dict, signum: signal.Signals, timeout: float) -> bool:
        if not self._alive(record):
            return True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(record["pid"], signum)  # its own session and group: only it
        return wait_for_exit(lambda: self._alive(record), timeout, POLL_S)


def _json(value: dict) -> bytes:
    return json.dumps(value).encode()

