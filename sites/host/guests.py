"""QEMU guests on a host: a VM with a guest definition (sites/host/guestdef.py) runs as a QEMU process
(sites/host/qemu.py) whose disks are served over NBD by the VM's tracker service (sites/host/trackerservice.py).

How a guest's writes reach the replication log: QEMU never opens the disk images. The tracker service, a
process of its own that outlives host-agent restarts, holds each image exclusively (QEMU's own lock bytes)
and serves it on a unix socket; a tracked disk's writes go through its ReplicationTracker, so every WRITE,
WRITE_ZEROES and TRIM is a log record before it reaches the disk, exactly as the synthetic workload's writes
are. An untracked disk (a drill's test VM) is served as it is.

The VM's runtime files live in `<vm>/run/`: QEMU's pid, QMP and guest-agent sockets and serial console log,
the tracker service's pid, sockets and log. A guest's power state is QEMU's (QMP query-status), never the
manifest's field: a guest that powered itself off is off.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import GuestBootError, GuestError, QuiesceError, VmRunningError
from .guestagent import GuestAgent
from .guestdef import BOOT_DIR, GuestDefinition
from .qemu import NETWORKS, GuestDrive, GuestSpec, QemuRuntime
from .quiesce import Quiesce
from .trackerservice import TrackerService
from .vm import STATE_OFF, VirtualMachine

RUN_DIR = "run"
# How long a guest may take to power off through ACPI before QEMU is told to quit.
POWER_DOWN_TIMEOUT_S = 30.0
_CHECK_POLL_S = 0.2


@dataclass(frozen=True)
class BootReport:
    """What a boot check found on the guest's console."""

    booted: bool
    heartbeat_s: float | None
    """From QEMU's start to the heartbeat line."""
    heartbeat_at: float | None
    """The heartbeat's wall-clock time (seconds since the epoch), for RTO."""
    check: str
    """"passed", "failed", or "none" (the definition has no application check)."""
    detail: str


class Guests(Quiesce):
    """Starts, stops, checks and quiesces the QEMU guests of a host's VMs."""

    accel = os.environ.get("ASR_QEMU_ACCEL", "tcg")
    """QEMU's accelerator on this host: "tcg" (software, works anywhere) or "kvm" on a host that has it."""

    def run_dir(self, vm: VirtualMachine) -> Path:
        return vm.path / RUN_DIR

    def guest_power_state(self, vm: VirtualMachine) -> str:
        """QEMU's own word for the guest's state ("running", "paused", "shutdown", ...), or "off"."""
        return QemuRuntime().state(self.run_dir(vm))

    def guest_running(self, vm: VirtualMachine) -> bool:
        return self.guest_power_state(vm) != STATE_OFF

    def _start_guest(self, vm: VirtualMachine, *, network: str = "none") -> int:
        """Serve the VM's disks through its tracker service and boot its QEMU guest; the QEMU pid."""
        guest = _definition(vm)
        if network not in NETWORKS:
            raise ValueError(f"guest network must be one of {NETWORKS}, got {network!r}")
        runtime = QemuRuntime()
        run = self.run_dir(vm)
        running = runtime.pid(run)
        if running is not None:
            return running
        boot = vm.path / BOOT_DIR
        missing = [name for name in guest.boot_files if not (boot / name).is_file()]
        if missing:
            raise GuestBootError(f"VM {vm.name!r} on host {self.name!r}: boot file(s) {', '.join(missing)} missing "
                                 f"from {boot}")
        run.mkdir(exist_ok=True)
        service = TrackerService(run)
        service.start({disk.name: disk.path for disk in vm.disks})
        spec = GuestSpec(
            folder=run, kernel=boot / guest.kernel if guest.kernel else None,
            initrd=boot / guest.initrd if guest.initrd else None, cmdline=guest.cmdline,
            drives=tuple(GuestDrive(disk.name, nbd_socket=service.socket(disk.name)) for disk in vm.disks),
            memory_mb=guest.memory_mb, accel=self.accel, network=network, guest_agent=guest.guest_agent,
            boot_drive=guest.boot_disk,  # the disk as the tracker serves it: its boot loader's reads are NBD reads
        )
        try:
            return runtime.start(spec)
        except BaseException:
            service.stop()
            raise

    def _stop_guest(self, vm: VirtualMachine, timeout: float) -> str:
        """Power the guest down (ACPI, then QEMU quit, then kill), then stop its tracker service, which
        flushes log and disk. Returns how QEMU ended."""
        run = self.run_dir(vm)
        outcome = QemuRuntime().power_down(run, timeout)
        TrackerService(run).stop()
        return outcome

    def check_boot(self, vm: VirtualMachine, *, timeout: float | None = None) -> BootReport:
        """Wait for the guest's heartbeat on its console since QEMU's latest start, then for its application
        check's verdict. A guest that is off, exits, or stays silent past the timeout did not boot."""
        guest = _definition(vm)
        run = self.run_dir(vm)
        runtime = QemuRuntime()
        wait = guest.boot_timeout_s if timeout is None else timeout
        started_at = runtime.started_at(run)
        if started_at is None or runtime.state(run) == STATE_OFF:
            return BootReport(False, None, None, "none", f"VM {vm.name!r} is not running")
        deadline = time.monotonic() + wait
        try:
            runtime.wait_for_console(run, guest.heartbeat, wait)
        except GuestError as exc:
            return BootReport(False, None, None, "none", str(exc)[-2000:])
        heartbeat_at = time.time()
        report = BootReport(True, max(0.0, heartbeat_at - started_at), heartbeat_at, "none", "heartbeat seen")
        if guest.check_pass is None:
            return report
        verdict = re.compile(f"(?P<passed>{guest.check_pass})|(?P<failed>{guest.check_fail})")
        try:
            match = runtime.wait_for_console(run, verdict.pattern, max(1.0, deadline - time.monotonic()))
        except GuestError as exc:
            return BootReport(True, report.heartbeat_s, heartbeat_at, "failed",
                              f"no application check verdict: {str(exc)[-1900:]}")
        line = _line_of(match)
        return BootReport(True, report.heartbeat_s, heartbeat_at,
                          "passed" if match.group("passed") is not None else "failed", line)

    def console_log(self, vm: VirtualMachine, max_bytes: int = 16000) -> str:
        return QemuRuntime().console_tail(self.run_dir(vm), max_bytes)

    # ---- quiesce through the guest agent -------------------------------------------------------------
    def _freeze(self, vm: VirtualMachine, timeout: float) -> None:
        if vm.guest is None:
            return super()._freeze(vm, timeout)
        if not self.guest_running(vm):
            return  # nothing writes
        if not vm.guest.guest_agent:
            raise QuiesceError(f"VM {vm.name!r} on host {self.name!r} has no guest agent (its definition says "
                               f"guest_agent false): its points are crash-consistent")
        try:
            GuestAgent(self.run_dir(vm), timeout=timeout).freeze()
        except GuestError as exc:
            raise QuiesceError(f"VM {vm.name!r} on host {self.name!r}: its guest agent did not freeze its file "
                               f"systems: {exc}") from None

    def _thaw(self, vm: VirtualMachine) -> None:
        if vm.guest is None:
            return super()._thaw(vm)
        if vm.guest.guest_agent and self.guest_running(vm):
            try:
                GuestAgent(self.run_dir(vm)).thaw()
            except GuestError as exc:
                raise QuiesceError(f"VM {vm.name!r} on host {self.name!r}: its guest agent did not thaw: {exc}") \
                    from None

    def _require_guest_off(self, vm: VirtualMachine, doing: str) -> None:
        if vm.guest is not None and self.guest_running(vm):
            raise VmRunningError(f"VM {vm.name!r} on host {self.name!r} is running: shut it down before {doing}")


def _definition(vm: VirtualMachine) -> GuestDefinition:
    if vm.guest is None:
        raise ValueError(f"VM {vm.name!r} is a synthetic VM, not a QEMU guest")
    return vm.guest


def _line_of(match: re.Match) -> str:
    """The console text the verdict matched (the rest of its line may hold firmware output)."""
    text = match.string
    end = text.find("\n", match.end())
    return text[match.start():end if end >= 0 else len(text)].strip()[:2000]



__all__ = ["RUN_DIR", "BootReport", "Guests"]
