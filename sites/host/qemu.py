"""The QEMU runtime: boots a VM as a real QEMU guest, finds it again, powers it down.

A guest boots either "direct kernel" (QEMU loads its kernel and initrd files, with their command line) or
from one of its drives (`GuestSpec.boot_drive`): SeaBIOS runs that drive's boot sector, as a BIOS boots a
real machine's OS disk, and no kernel file is involved.

Celery-free and stateless: everything about a running guest is in its folder, so any process (a worker
restarted since) finds it again. While it runs the folder holds `qemu.pid` (QEMU's pid, its start time,
and where its sockets are), `console.log` (the guest's serial console; the previous boot's is kept as
`console.previous.log`) and `qemu.log` (QEMU's own messages). QEMU runs in a session of its own, so a
signal reaches it and only it, and a pid reused by another process after QEMU died is never signalled
(the start time must match, as for sites/host/supervisor.py's workload processes).

Sockets: QMP (`qmp.sock`) and the guest agent's channel (`qga.sock`) live in the folder when its path
is short enough; a unix socket path is limited to 107 bytes, so for a long folder they go to
/tmp/asr-<hash of the folder>/ instead (recorded in qemu.pid; `socket_dir` finds it). A drive's NBD
socket with a long path is reached through a symlink there too.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import GuestError, GuestTimeoutError
from .manifest import write_json_atomically
from .processes import log_tail, process_start_ticks, wait_for_exit
from .qmp import QmpError, qmp_execute

QEMU_PID = "qemu.pid"
CONSOLE_LOG = "console.log"
PREVIOUS_CONSOLE_LOG = "console.previous.log"
QEMU_LOG = "qemu.log"
QMP_SOCKET = "qmp.sock"
AGENT_SOCKET = "qga.sock"
AGENT_PORT = "org.qemu.guest_agent.0"
NETWORKS = ("none", "isolated", "user")
ACCELERATORS = ("tcg", "kvm")
MEMORY_MB = (64, 65536)
# A sun_path holds 108 bytes with its terminating NUL.
SOCKET_PATH_MAX = 107
# QEMU answers QMP well within this once it runs, even on a loaded machine under TCG.
QMP_START_TIMEOUT_S = 30.0
QMP_COMMAND_TIMEOUT_S = 5.0
QUIT_WAIT_S = 5.0
KILL_WAIT_S = 5.0
POLL_S = 0.05
_SHORT_SOCKET_ROOT = Path("/tmp")


@dataclass(frozen=True)
class GuestDrive:
    name: str
    """The disk's name in the VM: its virtio serial, and the NBD export name."""
    nbd_socket: Path | None = None
    """Served over NBD by the tracker service (export name = name)..."""
    file: Path | None = None
    """...or a raw image file opened directly (untracked VMs, tests)."""


@dataclass(frozen=True)
class GuestSpec:
    folder: Path
    """Runtime files go here: qemu.pid, console.log, qemu.log (and the sockets, when its path is short)."""
    kernel: Path | None
    """Booted directly by QEMU (-kernel), with `initrd` and `cmdline`; None with `boot_drive`."""
    initrd: Path | None
    cmdline: str
    drives: tuple[GuestDrive, ...]
    """The first is the guest's /dev/vda."""
    memory_mb: int = 256
    accel: str = "tcg"
    """"kvm" on real hosts (a host setting); TCG where /dev/kvm cannot run guests."""
    network: str = "none"
    """"none", "isolated" (a NIC with no route out) or "user" (QEMU's user-mode NAT)."""
    guest_agent: bool = True
    """A virtio-serial channel org.qemu.guest_agent.0 on qga.sock."""
    boot_drive: str | None = None
    """The name of the drive the BIOS (SeaBIOS) boots from, its boot loader loading the kernel, instead of
    QEMU loading `kernel` (which must then be None: the disk's boot loader has its own command line)."""


@dataclass(frozen=True)
class _QemuProcess:
    pid: int
    start_ticks: int
    sockets: Path


def socket_dir(folder: Path) -> Path:
    """Where a guest of `folder` has its QMP and agent sockets (the folder itself when short enough)."""
    folder = Path(folder).resolve()
    if len(str(folder / ("x" * 24))) <= SOCKET_PATH_MAX:  # room for the longest socket name used here
        return folder
    return _SHORT_SOCKET_ROOT / f"asr-{hashlib.sha256(str(folder).encode()).hexdigest()[:16]}"


class QemuRuntime:
    """Starts, finds and stops QEMU guests; one runtime serves any number of guest folders."""

    def __init__(self, qemu_binary: str = "qemu-system-x86_64"):
        self.qemu_binary = qemu_binary
        self._children: dict[int, subprocess.Popen] = {}

    # ---- life cycle ---------------------------------------------------------------------------------
    def start(self, spec: GuestSpec) -> int:
        """Boot the guest detached; return QEMU's pid once QMP answers (the guest itself is still booting:
        wait for its heartbeat with `wait_for_console`)."""
        folder = Path(spec.folder).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        if self._running(folder) is not None:
            raise GuestError(f"a QEMU guest is running in {folder} already")
        if shutil.which(self.qemu_binary) is None:
            raise GuestError(f"{self.qemu_binary} is not installed (Debian: qemu-system-x86; "
                             f"scripts/ensure-tools.sh qemu-system-x86_64)")
        sockets = socket_dir(folder)
        sockets.mkdir(mode=0o700, parents=True, exist_ok=True)
        for stale in (QMP_SOCKET, AGENT_SOCKET):
            (sockets / stale).unlink(missing_ok=True)
        try:
            command = self._command(spec, folder, sockets)
        except GuestError:
            self._forget(folder, None)  # the short socket folder, an NBD symlink
            raise
        with contextlib.suppress(FileNotFoundError):
            os.replace(folder / CONSOLE_LOG, folder / PREVIOUS_CONSOLE_LOG)
        (folder / CONSOLE_LOG).touch()
        with open(folder / QEMU_LOG, "wb") as log:
            child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=folder,
                                     start_new_session=True)  # its own session: signals reach it and only it
        self._children[child.pid] = child
        process = _QemuProcess(child.pid, process_start_ticks(child.pid) or 0, sockets)
        write_json_atomically(folder / QEMU_PID, {"pid": process.pid, "start_ticks": process.start_ticks,
                                                  "sockets": str(sockets), "command": command})
        deadline = time.monotonic() + QMP_START_TIMEOUT_S
        while True:
            if not self._alive(process):
                self._forget(folder, process)
                raise GuestError(f"QEMU exited at once (code {child.poll()}) for guest {folder}: "
                                 f"{log_tail(folder / QEMU_LOG, 1500)}; console: {self.console_tail(folder, 1000)}")
            if (sockets / QMP_SOCKET).exists():
                with contextlib.suppress(GuestError):
                    qmp_execute(sockets / QMP_SOCKET, "query-status", timeout=QMP_COMMAND_TIMEOUT_S)
                    return process.pid
            if time.monotonic() > deadline:
                self._stop(folder, process)
                raise GuestError(f"QEMU of guest {folder} did not answer QMP within {QMP_START_TIMEOUT_S:.0f} s: "
                                 f"{log_tail(folder / QEMU_LOG, 1500)}")
            time.sleep(POLL_S)

    def pid(self, folder: Path) -> int | None:
        """The pid of the QEMU running for `folder`, or None."""
        process = self._running(Path(folder).resolve())
        return None if process is None else process.pid

    def started_at(self, folder: Path) -> float | None:
        """When the QEMU running for `folder` was started (seconds since the epoch), or None."""
        folder = Path(folder).resolve()
        if self._running(folder) is None:
            return None
        with contextlib.suppress(FileNotFoundError):
            return (folder / QEMU_PID).stat().st_mtime  # written right after the process was created
        return None

    def state(self, folder: Path) -> str:
        """QEMU's run state from QMP query-status ("running", "paused", "shutdown", ...), "off" when no
        QEMU runs for `folder`, "unresponsive" when it runs but QMP does not answer."""
        folder = Path(folder).resolve()
        process = self._running(folder)
        if process is None:
            return "off"
        try:
            return qmp_execute(process.sockets / QMP_SOCKET, "query-status", timeout=QMP_COMMAND_TIMEOUT_S)["status"]
        except GuestError:
            return "off" if not self._alive(process) else "unresponsive"

    def power_down(self, folder: Path, timeout: float) -> str:
        """Press the ACPI power button and wait up to `timeout` s for the guest to power off; then QMP quit
        (like pulling the plug, after QEMU flushed its own buffers), then SIGKILL. Returns how it ended:
        "acpi", "quit", "killed" or "not-running"."""
        folder = Path(folder).resolve()
        process = self._running(folder)
        if process is None:
            self._forget(folder, None)
            return "not-running"
        with contextlib.suppress(GuestError):
            qmp_execute(process.sockets / QMP_SOCKET, "system_powerdown", timeout=QMP_COMMAND_TIMEOUT_S)
        if self._wait_exit(process, timeout):
            outcome = "acpi"
        else:
            with contextlib.suppress(GuestError):
                qmp_execute(process.sockets / QMP_SOCKET, "quit", timeout=QMP_COMMAND_TIMEOUT_S)
            outcome = "quit" if self._wait_exit(process, QUIT_WAIT_S) else self._stop(folder, process)
        self._forget(folder, process)
        return outcome

    def kill(self, folder: Path) -> None:
        """Stop the guest's QEMU at once (SIGKILL: the disks keep what the guest had flushed, and maybe more)."""
        folder = Path(folder).resolve()
        process = self._running(folder)
        if process is not None:
            self._stop(folder, process)
        self._forget(folder, process)

    # ---- console ------------------------------------------------------------------------------------
    def wait_for_console(self, folder: Path, pattern: str, timeout: float, since: int = 0) -> re.Match:
        """Wait until this boot's console shows `pattern` (a regular expression, searched from byte offset
        `since`; the match's positions are byte offsets, so `match.end()` is the next `since`). Fails as
        soon as QEMU has exited, and after `timeout` s, with the console's tail."""
        folder = Path(folder).resolve()
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while True:
            process = self._running(folder)
            text = _read_console(folder / CONSOLE_LOG)
            if match := regex.search(text, since):
                return match
            if process is None:
                text = _read_console(folder / CONSOLE_LOG)  # what the guest said before QEMU went
                if match := regex.search(text, since):
                    return match
                raise GuestError(f"QEMU of guest {folder} is not running (any more), and its console never "
                                 f"showed {pattern!r}: {self.console_tail(folder)}")
            if time.monotonic() > deadline:
                raise GuestTimeoutError(f"guest {folder} did not show {pattern!r} on its console within "
                                        f"{timeout:g} s; console tail: {self.console_tail(folder)}")
            time.sleep(POLL_S * 2)

    def console_tail(self, folder: Path, max_bytes: int = 4000) -> str:
        return log_tail(Path(folder).resolve() / CONSOLE_LOG, max_bytes)

    # ---- internals ----------------------------------------------------------------------------------
    def _command(self, spec: GuestSpec, folder: Path, sockets: Path) -> list[str]:
        names = [drive.name for drive in spec.drives]
        if spec.boot_drive is not None:
            if spec.kernel is not None or spec.initrd is not None or spec.cmdline:
                raise GuestError(f"guest {folder} boots from drive {spec.boot_drive!r}: its boot loader loads the "
                                 f"kernel, so give no kernel, initrd or command line")
            if spec.boot_drive not in names:
                raise GuestError(f"guest {folder} boots from drive {spec.boot_drive!r}, which it does not have "
                                 f"(its drives: {', '.join(names) or 'none'})")
        elif spec.kernel is None:
            raise GuestError(f"guest {folder} needs a kernel or a boot drive")
        elif not Path(spec.kernel).resolve().is_file():
            raise GuestError(f"kernel {Path(spec.kernel).resolve()} of guest {folder} does not exist")
        if spec.initrd is not None and not Path(spec.initrd).is_file():
            raise GuestError(f"initrd {spec.initrd} of guest {folder} does not exist")
        if spec.accel not in ACCELERATORS:
            raise GuestError(f"accelerator {spec.accel!r} is not one of {', '.join(ACCELERATORS)}")
        if spec.network not in NETWORKS:
            raise GuestError(f"network {spec.network!r} is not one of {', '.join(NETWORKS)}")
        if not MEMORY_MB[0] <= spec.memory_mb <= MEMORY_MB[1]:
            raise GuestError(f"memory {spec.memory_mb} MB is outside {MEMORY_MB[0]}..{MEMORY_MB[1]} MB")
        if "\n" in spec.cmdline:
            raise GuestError("the kernel command line must be one line")
        command = [
            self.qemu_binary, "-nodefaults", "-nographic", "-no-reboot", "-machine", "pc", "-accel", spec.accel,
            "-m", str(spec.memory_mb),
            "-chardev", f"file,id=console,path={_option(folder / CONSOLE_LOG)}", "-serial", "chardev:console",
            "-qmp", f"unix:{_option(sockets / QMP_SOCKET)},server=on,wait=off",
        ]
        if spec.kernel is not None:
            command += ["-kernel", str(Path(spec.kernel).resolve()), "-append", spec.cmdline]
        if spec.initrd is not None:
            command += ["-initrd", str(Path(spec.initrd).resolve())]
        if len(set(names)) != len(names):
            raise GuestError(f"drive names of guest {folder} are not unique: {names}")
        for index, drive in enumerate(spec.drives):
            # bootindex: SeaBIOS tries that drive first (and only it: -nodefaults leaves no other boot device).
            boot = ",bootindex=0" if drive.name == spec.boot_drive else ""
            command += ["-blockdev", json.dumps(self._blockdev(drive, index, folder, sockets)),
                        "-device", f"virtio-blk-pci,drive=disk{index},serial={_option(drive.name[:20])}{boot}"]
        if spec.network != "none":
            restrict = ",restrict=on" if spec.network == "isolated" else ""
            command += ["-netdev", f"user,id=net0{restrict}", "-device", "virtio-net-pci,netdev=net0"]
        if spec.guest_agent:
            command += ["-device", "virtio-serial-pci",
                        "-chardev", f"socket,id=agent,path={_option(sockets / AGENT_SOCKET)},server=on,wait=off",
                        "-device", f"virtserialport,chardev=agent,name={AGENT_PORT}"]
        return command

    def _blockdev(self, drive: GuestDrive, index: int, folder: Path, sockets: Path) -> dict:
        if (drive.nbd_socket is None) == (drive.file is None):
            raise GuestError(f"drive {drive.name!r} of guest {folder} needs exactly one of nbd_socket and file")
        if drive.file is not None:
            if not Path(drive.file).is_file():
                raise GuestError(f"disk image {drive.file} of drive {drive.name!r} does not exist")
            source = {"driver": "file", "filename": str(Path(drive.file).resolve()), "discard": "unmap"}
        else:
            path = Path(drive.nbd_socket).resolve()
            if len(str(path)) > SOCKET_PATH_MAX:  # reach it through a short symlink
                link = sockets / f"nbd{index}.sock"
                link.unlink(missing_ok=True)
                link.symlink_to(path)
                path = link
            source = {"driver": "nbd", "server": {"type": "unix", "path": str(path)}, "export": drive.name}
        # Writeback caching (cache=none needs O_DIRECT, which tmpfs refuses): the guest's flushes reach
        # the image or the NBD server as flushes. discard=unmap lets the guest's TRIM through.
        return {"driver": "raw", "node-name": f"disk{index}", "discard": "unmap", "file": source}

    def _running(self, folder: Path) -> _QemuProcess | None:
        try:
            text = (folder / QEMU_PID).read_text()
            record = json.loads(text)
        except (FileNotFoundError, ValueError):
            return None
        process = _QemuProcess(record["pid"], record["start_ticks"], Path(record["sockets"]))
        if self._alive(process):
            return process
        # The guest powered itself off (or crashed): tidy up what it left, unless a new start has
        # replaced the pid file meanwhile.
        with contextlib.suppress(FileNotFoundError):
            if (folder / QEMU_PID).read_text() == text:
                self._forget(folder, process)
        return None

    def _alive(self, process: _QemuProcess) -> bool:
        child = self._children.get(process.pid)
        if child is not None and child.poll() is not None:
            self._children.pop(process.pid, None)
            return False  # our own child, now reaped
        return process_start_ticks(process.pid) == process.start_ticks

    def _wait_exit(self, process: _QemuProcess, timeout: float) -> bool:
        return wait_for_exit(lambda: self._alive(process), timeout, POLL_S)

    def _stop(self, folder: Path, process: _QemuProcess) -> str:
        if self._alive(process):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        if not self._wait_exit(process, KILL_WAIT_S):
            raise GuestError(f"QEMU pid {process.pid} of guest {folder} survived SIGKILL for {KILL_WAIT_S:.0f} s")
        return "killed"

    def _forget(self, folder: Path, process: _QemuProcess | None) -> None:
        """Remove what a guest that no longer runs left behind: its pid file and sockets."""
        (folder / QEMU_PID).unlink(missing_ok=True)
        sockets = process.sockets if process is not None else socket_dir(folder)
        for name in (QMP_SOCKET, AGENT_SOCKET):
            (sockets / name).unlink(missing_ok=True)
        for link in sockets.glob("nbd*.sock"):
            if link.is_symlink():
                link.unlink()
        if sockets != folder:
            with contextlib.suppress(OSError):
                sockets.rmdir()


def _option(value: object) -> str:
    """A value inside a QEMU -chardev/-device option list, where a comma is written as two."""
    return str(value).replace(",", ",,")


def _read_console(path: Path) -> str:
    # latin-1: one character per byte, so string offsets are the file's byte offsets.
    try:
        return path.read_bytes().decode("latin-1")
    except FileNotFoundError:
        return ""


__all__ = ["GuestDrive", "GuestSpec", "QemuRuntime", "QmpError", "socket_dir"]
