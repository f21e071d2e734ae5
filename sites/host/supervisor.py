"""Supervision of a VM's workload writer process (`python -m sites.workload`).

While it runs, the VM's folder holds `workload.pid` (its pid and start time) and `workload.log`; it
writes `workload.ready` once it has opened its disks and `workload-stats.json` on exit. It runs in a
process group of its own, so a signal reaches it and only it.
"""
from __future__ import annotations

import contextlib
import enum
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import WorkloadError
from .manifest import VmStore, write_json_atomically
from .processes import log_tail, process_start_ticks, wait_for_exit
from .vm import VirtualMachine, vm_name

WORKLOAD_PID = "workload.pid"
WORKLOAD_LOG = "workload.log"
WORKLOAD_STATS = "workload-stats.json"
WORKLOAD_READY = "workload.ready"

# How long a starting workload may take to open its disks (interpreter start-up included).
WORKLOAD_START_TIMEOUT_S = 15.0
# After SIGKILL the kernel reaps promptly unless the process is stuck in the kernel (D state).
WORKLOAD_KILL_WAIT_S = 5.0
POLL_S = 0.02
_PROJECT_ROOT = Path(__file__).resolve().parents[2]


class WorkloadStop(enum.Enum):
    """How `stop_workload` ended the workload."""

    NOT_RUNNING = "not-running"
    STOPPED = "stopped"
    """Exited after SIGTERM: every write is either wholly in disk and log or not made."""
    KILLED = "killed"
    """Did not exit within the timeout and was killed: the write in progress may be torn."""


@dataclass
class _WorkloadProcess:
    """What identifies a workload process: its pid and its start time, so a pid reused by another
    process after the workload died is never mistaken for it (nor signalled)."""

    pid: int
    start_ticks: int
    child: subprocess.Popen | None = field(default=None, compare=False)


class WorkloadSupervisor(VmStore):
    """Starts, finds and stops the workload processes of a host's VMs."""

    def __init__(self, root: str | os.PathLike[str], name: str):
        super().__init__(root, name)
        self._children: dict[str, subprocess.Popen] = {}

    def workload_running(self, vm: VirtualMachine | str) -> bool:
        return self._running_workload(self.get_vm(vm_name(vm))) is not None

    def workload_stats(self, vm: VirtualMachine | str) -> dict | None:
        """The statistics the last workload wrote on exit, or None when it has not written any."""
        current = self.get_vm(vm_name(vm))
        try:
            return json.loads((current.path / WORKLOAD_STATS).read_text())
        except FileNotFoundError:
            return None

    def stop_workload(self, vm: VirtualMachine | str, timeout: float = 10.0) -> WorkloadStop:
        """Stop the workload: SIGTERM (it finishes its current write and exits), SIGKILL if it is still
        running after `timeout` seconds. Idempotent. The VM stays in its state (see `shut_down`)."""
        with self._vm_lock(vm_name(vm)) as current:
            return self._stop_workload(current, timeout)

    def _spawn_workload(self, vm: VirtualMachine, command: list[str]) -> _WorkloadProcess:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_PROJECT_ROOT), env.get("PYTHONPATH")]))
        with open(vm.path / WORKLOAD_LOG, "ab") as log:
            child = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, cwd=vm.path,
                start_new_session=True,  # its own process group: signals reach it and only it
            )
        process = _WorkloadProcess(child.pid, process_start_ticks(child.pid) or 0, child)
        self._children[vm.path.name] = child
        write_json_atomically(vm.path / WORKLOAD_PID, {"pid": process.pid, "start_ticks": process.start_ticks})
        deadline = time.monotonic() + WORKLOAD_START_TIMEOUT_S
        while not (vm.path / WORKLOAD_READY).exists():
            if child.poll() is not None:
                (vm.path / WORKLOAD_PID).unlink(missing_ok=True)
                raise WorkloadError(
                    f"workload of VM {vm.name!r} on host {self.name!r} exited with code {child.returncode} "
                    f"while starting: {log_tail(vm.path / WORKLOAD_LOG)}"
                )
            if time.monotonic() > deadline:
                self._stop_workload(vm, timeout=1.0)
                raise WorkloadError(
                    f"workload of VM {vm.name!r} on host {self.name!r} did not open its disks within "
                    f"{WORKLOAD_START_TIMEOUT_S:.0f} s: {log_tail(vm.path / WORKLOAD_LOG)}"
                )
            time.sleep(POLL_S)
        return process

    def _running_workload(self, vm: VirtualMachine) -> _WorkloadProcess | None:
        try:
            record = json.loads((vm.path / WORKLOAD_PID).read_text())
        except FileNotFoundError:
            return None
        process = _WorkloadProcess(record["pid"], record["start_ticks"], self._children.get(vm.path.name))
        return process if self._alive(process) else None

    def _alive(self, process: _WorkloadProcess) -> bool:
        if process.child is not None and process.child.pid == process.pid and process.child.poll() is not None:
            return False  # our own child, now reaped
        return process_start_ticks(process.pid) == process.start_ticks

    def _stop_workload(self, vm: VirtualMachine, timeout: float) -> WorkloadStop:
        process = self._running_workload(vm)
        if process is None:
            outcome = WorkloadStop.NOT_RUNNING
        elif self._signal_and_wait(process, signal.SIGTERM, timeout):
            outcome = WorkloadStop.STOPPED
        elif self._signal_and_wait(process, signal.SIGKILL, WORKLOAD_KILL_WAIT_S):
            outcome = WorkloadStop.KILLED
        else:
            raise WorkloadError(
                f"workload pid {process.pid} of VM {vm.name!r} on host {self.name!r} survived SIGKILL for "
                f"{WORKLOAD_KILL_WAIT_S:.0f} s (stuck in the kernel?)"
            )
        for leftover in (WORKLOAD_PID, WORKLOAD_READY):
            (vm.path / leftover).unlink(missing_ok=True)
        self._children.pop(vm.path.name, None)
        return outcome

    def _signal_and_wait(self, process: _WorkloadProcess, signum: signal.Signals, timeout: float) -> bool:
        """Signal the workload's process group; True once the workload has exited within `timeout`."""
        if not self._alive(process):
            return True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signum)
        return wait_for_exit(lambda: self._alive(process), timeout)
