"""Quiesce: a VM held at an application-consistent state, as VSS holds a Hyper-V VM for a snapshot.

The host talks to the workload through files in the VM's folder: `workload.freeze` asks it to hold its
writes (holding the request's token), `workload.frozen` is its answer (holding the token it honours),
and `quiesce.lock` is held by the quiescer for the whole quiesce. Pre and post commands run around
the consistent point, with a minimal environment (sites/childprocess.py).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

from sites.childprocess import minimal_env

from .errors import QuiesceError, VmSpecError
from .processes import LOG_TAIL_BYTES
from .supervisor import POLL_S, WorkloadSupervisor
from .vm import VirtualMachine, checked_command, vm_name

WORKLOAD_FREEZE = "workload.freeze"
"""Present while a quiesce asks the workload to hold its writes; holds the request's token."""
WORKLOAD_FROZEN = "workload.frozen"
"""Written by the workload once it holds its writes; holds the token of the request it honours."""
QUIESCE_LOCK = "quiesce.lock"

# After a quiesce command is killed for overrunning, how long its output pipes may take to close.
_QUIESCE_COMMAND_KILL_WAIT_S = 5.0


class Quiesce(WorkloadSupervisor):
    """The quiesce of a host's VMs: their commands, the freeze of their workloads."""

    def set_quiesce_commands(
        self, vm: VirtualMachine | str, pre: Sequence[str] | None, post: Sequence[str] | None
    ) -> VirtualMachine:
        """Set the commands (argv lists) a quiesce runs before and after the consistent point; None
        removes one. They run in the VM's folder with ASR_VM, ASR_HOST and ASR_VM_DIR set."""
        where = f"VM {vm_name(vm)!r} on host {self.name!r}"
        pre_argv = checked_command(pre, f"{where}: quiesce pre command", VmSpecError)
        post_argv = checked_command(post, f"{where}: quiesce post command", VmSpecError)
        with self._vm_lock(vm_name(vm)) as current:
            if (current.quiesce_pre, current.quiesce_post) != (pre_argv, post_argv):
                current.quiesce_pre, current.quiesce_post = pre_argv, post_argv
                self._write_manifest(current)
            return current

    @contextlib.contextmanager
    def quiesce(self, vm: VirtualMachine | str, timeout: float = 10.0) -> Iterator[VirtualMachine]:
        """Hold the VM at an application-consistent state for the body of the `with`, as VSS does for
        a Hyper-V snapshot: the workload stops writing between two writes and says so, then the pre
        command runs; after the body the post command runs and the workload resumes, whatever
        happened (the post command runs whenever the pre command was started).

        QuiesceError when another quiesce of the VM holds it past `timeout`, the workload does not
        acknowledge within `timeout`, or a command fails or overruns `timeout` (each phase gets
        `timeout` seconds). A post failure after a failed body is added to the body's error as a note.

        A host agent that dies mid-quiesce does not leave the guest frozen: the workload notices that
        no process holds the quiesce lock any more and resumes."""
        if not timeout > 0:
            raise ValueError(f"quiesce timeout must be positive, got {timeout!r}")
        current = self.get_vm(vm_name(vm))
        with self._quiesce_lock(current, timeout):
            try:
                self._freeze(current, timeout)
            except BaseException:
                self._thaw(current)
                raise
            failure: BaseException | None = None
            try:
                self._run_quiesce_command(current, "pre", current.quiesce_pre, timeout)
                yield current
            except BaseException as exc:
                failure = exc
                raise
            finally:
                try:
                    self._run_quiesce_command(current, "post", current.quiesce_post, timeout)
                except QuiesceError as post_failure:
                    if failure is None:
                        raise
                    failure.add_note(f"and then: {post_failure}")
                finally:
                    self._thaw(current)

    def workload_frozen(self, vm: VirtualMachine | str) -> bool:
        """Whether the VM's workload currently acknowledges a freeze (holds its writes)."""
        current = self.get_vm(vm_name(vm))
        request = _read_token(current.path / WORKLOAD_FREEZE)
        return request is not None and _read_token(current.path / WORKLOAD_FROZEN) == request \
            and self._running_workload(current) is not None

    @contextlib.contextmanager
    def _quiesce_lock(self, vm: VirtualMachine, timeout: float) -> Iterator[None]:
        """One quiesce at a time per VM. Held for the whole quiesce: the workload takes a free lock
        beside a freeze request as the sign that its quiescer died."""
        deadline = time.monotonic() + timeout
        with open(vm.path / QUIESCE_LOCK, "a") as lock:
            while True:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise QuiesceError(
                            f"VM {vm.name!r} on host {self.name!r}: another quiesce has held it for over "
                            f"{timeout:g} s"
                        ) from None
                    time.sleep(POLL_S)
            yield

    def _freeze(self, vm: VirtualMachine, timeout: float) -> None:
        """Ask the workload to hold its writes and wait until it says it does. The request is left in
        place even when no workload runs, so a workload started meanwhile starts frozen."""
        token = uuid.uuid4().hex
        ack = vm.path / WORKLOAD_FROZEN
        ack.unlink(missing_ok=True)
        _write_token(vm.path / WORKLOAD_FREEZE, token)
        deadline = time.monotonic() + timeout
        while _read_token(ack) != token:
            workload = self._running_workload(vm)
            if workload is None:
                return  # nothing writes, and a workload starting now sees the request first
            if time.monotonic() > deadline:
                raise QuiesceError(
                    f"VM {vm.name!r} on host {self.name!r}: its workload (pid {workload.pid}) did not "
                    f"acknowledge the freeze within {timeout:g} s"
                )
            time.sleep(POLL_S)

    def _thaw(self, vm: VirtualMachine) -> None:
        (vm.path / WORKLOAD_FREEZE).unlink(missing_ok=True)
        (vm.path / WORKLOAD_FROZEN).unlink(missing_ok=True)

    def _clear_abandoned_freeze(self, vm: VirtualMachine) -> None:
        """Remove a freeze request no quiesce holds any more (its quiescer died), so a workload
        starting now does not start frozen."""
        with open(vm.path / QUIESCE_LOCK, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return  # a quiesce is in progress: a workload starting now must start frozen
            self._thaw(vm)

    def _run_quiesce_command(
        self, vm: VirtualMachine, phase: str, argv: tuple[str, ...] | None, timeout: float
    ) -> None:
        if not argv:
            return
        where = f"VM {vm.name!r} on host {self.name!r}: quiesce {phase} command {list(argv)!r}"
        # Nothing of the agent's own environment (its database and broker URLs, storage credentials, host key):
        # PATH, LANG and the VM's variables only.
        env = minimal_env({"ASR_VM": vm.name, "ASR_HOST": self.name, "ASR_VM_DIR": str(vm.path)})
        try:
            process = subprocess.Popen(
                argv, cwd=vm.path, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, start_new_session=True,  # its own group: a timeout kills all of it
            )
        except OSError as exc:
            raise QuiesceError(f"{where} could not be started: {exc}") from None
        try:
            _, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            try:
                _, stderr = process.communicate(timeout=_QUIESCE_COMMAND_KILL_WAIT_S)
            except subprocess.TimeoutExpired:  # a descendant left the group and holds the pipe
                process.kill()
                stderr = b""
            raise QuiesceError(
                f"{where} did not finish within {timeout:g} s and was killed: {_text_tail(stderr)}"
            ) from None
        if process.returncode != 0:
            raise QuiesceError(f"{where} exited with code {process.returncode}: {_text_tail(stderr)}")


def _write_token(path: Path, token: str) -> None:
    """Write a small file whole or not at all (readers poll it); durability does not matter."""
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    temporary.write_text(token)
    os.replace(temporary, path)


def _read_token(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def _text_tail(data: bytes) -> str:
    return data[-LOG_TAIL_BYTES:].decode(errors="replace").strip() or "(no output)"
