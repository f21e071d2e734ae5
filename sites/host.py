"""The protected (primary) host: its VMs, their disks, replication tracking and guest workloads.

A host is a directory tree. Each VM lives in `<root>/vms/<vm>/`: its manifest `vm.json`, its disk
images (`<disk>.raw` or `<disk>.vhd`), the trackers' replication logs beside them, and while its
workload runs, `workload.pid`, `workload.log` and (on exit) `workload-stats.json`. A failback stages
each disk's incoming image as `.<file>.failback` beside it; a quiesce talks to the workload through
`workload.freeze` and `workload.frozen`, and `quiesce.lock` says a quiesce is in progress.

Names of hosts, VMs, disks and networks come from outside (API calls, manifests) and become path
segments, so each is checked against one rule before anything is built from it, and every path is
checked to resolve inside the root.
"""
from __future__ import annotations

import contextlib
import enum
import fcntl
import hashlib
import ipaddress
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from datapath.disk import FORMATS, create_disk, open_disk, parse_size
from datapath.durable import fsync_directory, replace_file
from datapath.errors import (
    DiskFormatError,
    DiskNotFoundError,
    NonRecoverableError,
    PathOutsideRootError,
    RecoverableError,
    SizeMismatchError,
)
from datapath.tracker import NotTrackedError, ReplicationTracker

MIB = 1024 * 1024
MANIFEST = "vm.json"
LOCK_FILE = "vm.lock"
WORKLOAD_PID = "workload.pid"
WORKLOAD_LOG = "workload.log"
WORKLOAD_STATS = "workload-stats.json"
WORKLOAD_READY = "workload.ready"
WORKLOAD_FREEZE = "workload.freeze"
"""Present while a quiesce asks the workload to hold its writes; holds the request's token."""
WORKLOAD_FROZEN = "workload.frozen"
"""Written by the workload once it holds its writes; holds the token of the request it honours."""
QUIESCE_LOCK = "quiesce.lock"
STAGING_SUFFIX = ".failback"
DISK_SUFFIX = {"raw": ".raw", "vhd": ".vhd"}

VM_GENERATIONS = (1, 2)
STATE_RUNNING = "running"
STATE_OFF = "off"
STATES = (STATE_RUNNING, STATE_OFF)

# A first character of letter or digit keeps every name valid as a recovery-storage object name too
# (sites.storage.base.validate_name), so a VM that can be created can also be protected.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

# How long a starting workload may take to open its disks (interpreter start-up included).
WORKLOAD_START_TIMEOUT_S = 15.0
# After SIGKILL the kernel reaps promptly unless the process is stuck in the kernel (D state).
WORKLOAD_KILL_WAIT_S = 5.0
_POLL_S = 0.02
_LOG_TAIL_BYTES = 2000
# After a quiesce command is killed for overrunning, how long its output pipes may take to close.
_QUIESCE_COMMAND_KILL_WAIT_S = 5.0
_PROJECT_ROOT = Path(__file__).resolve().parents[1]


class InvalidNameError(PathOutsideRootError):
    """A host, VM, disk or network name that is not a safe single path segment."""


class VmNotFoundError(NonRecoverableError):
    """The VM does not exist on this host."""


class VmExistsError(NonRecoverableError):
    """A VM of that name already exists on this host."""


class VmSpecError(NonRecoverableError):
    """A VM definition that cannot be created: no disks, duplicate names, bad size, format or
    generation."""


class VmManifestError(NonRecoverableError):
    """A VM's manifest is unreadable or inconsistent."""


class VmRunningError(NonRecoverableError):
    """The operation needs the VM shut down (or its workload stopped) first."""


class DiskProtectedError(NonRecoverableError):
    """A write that bypasses the tracker was asked for on a tracked disk."""


class WorkloadError(NonRecoverableError):
    """The workload process failed to start, or could not be stopped."""


class NetworkConfigError(NonRecoverableError):
    """A network adapter the VM does not have, or a subnet or IP address that is not valid."""


class QuiesceError(RecoverableError):
    """The VM could not be brought to an application-consistent state: the workload did not hold its
    writes in time, or a pre/post quiesce command failed or timed out. Trying again may succeed."""


class WorkloadStop(enum.Enum):
    """How `stop_workload` ended the workload."""

    NOT_RUNNING = "not-running"
    STOPPED = "stopped"
    """Exited after SIGTERM: every write is either wholly in disk and log or not made."""
    KILLED = "killed"
    """Did not exit within the timeout and was killed: the write in progress may be torn."""


def validate_segment(name: str, kind: str) -> str:
    """Return `name` if it is a valid host/VM/disk/network name; InvalidNameError otherwise."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidNameError(
            f"invalid {kind} name {name!r}: use 1 to 64 letters, digits, '.', '_' or '-', starting with "
            f"a letter or digit (no path separators, no '..')"
        )
    return name


@dataclass(frozen=True)
class NetworkAdapter:
    name: str
    vm_network: str
    """The VM network it connects to; network mapping pairs it with a recovery-site network."""
    subnet: str | None = None
    """The subnet it is attached to, in CIDR form (a failed-over VM's NIC gets the mapped subnet)."""
    public_ip: str | None = None

    def to_manifest(self) -> dict:
        # Unset fields are left out, so manifests of VMs that never had them stay as they were.
        entry = {"name": self.name, "vm_network": self.vm_network}
        if self.subnet is not None:
            entry["subnet"] = self.subnet
        if self.public_ip is not None:
            entry["public_ip"] = self.public_ip
        return entry


@dataclass(frozen=True)
class VirtualDisk:
    id: str
    """A stable UUID: the disk's identity for replication, whatever its name or file."""
    name: str
    file: str
    """The image's file name in the VM's folder."""
    size: int
    """Virtual (guest-visible) size in bytes, without a VHD footer."""
    format: str
    path: Path


@dataclass
class VirtualMachine:
    name: str
    id: str
    generation: int
    """The Hyper-V VM generation: 1 (BIOS) or 2 (UEFI)."""
    state: str
    disks: list[VirtualDisk]
    network_adapters: list[NetworkAdapter]
    path: Path
    """The VM's folder on the host."""
    host: str
    quiesce_pre: tuple[str, ...] | None = None
    """Command (argv) run in the VM's folder once its writes are held, before a consistent point."""
    quiesce_post: tuple[str, ...] | None = None
    """Command run after the consistent point, before writes resume."""

    def adapter(self, name: str) -> NetworkAdapter:
        for adapter in self.network_adapters:
            if adapter.name == name:
                return adapter
        raise NetworkConfigError(
            f"VM {self.name!r} on host {self.host!r} has no network adapter {name!r} "
            f"(its adapters: {', '.join(a.name for a in self.network_adapters) or 'none'})"
        )

    def disk(self, name: str) -> VirtualDisk:
        for disk in self.disks:
            if disk.name == name:
                return disk
        raise DiskNotFoundError(
            f"VM {self.name!r} on host {self.host!r} has no disk {name!r} "
            f"(its disks: {', '.join(d.name for d in self.disks)})"
        )

    def to_manifest(self) -> dict:
        manifest = {
            "name": self.name,
            "id": self.id,
            "generation": self.generation,
            "state": self.state,
            "disks": [
                {"id": d.id, "name": d.name, "file": d.file, "size": d.size, "format": d.format}
                for d in self.disks
            ],
            "network_adapters": [a.to_manifest() for a in self.network_adapters],
        }
        if self.quiesce_pre is not None or self.quiesce_post is not None:
            manifest["quiesce"] = {
                "pre": list(self.quiesce_pre) if self.quiesce_pre is not None else None,
                "post": list(self.quiesce_post) if self.quiesce_post is not None else None,
            }
        return manifest


@dataclass
class _WorkloadProcess:
    """What identifies a workload process: its pid and its start time, so a pid reused by another
    process after the workload died is never mistaken for it (nor signalled)."""

    pid: int
    start_ticks: int
    child: subprocess.Popen | None = field(default=None, compare=False)


class Host:
    """A protected host rooted at `root`; `name` is its identity in messages and in the recovery site."""

    def __init__(self, root: str | os.PathLike[str], name: str):
        self.name = validate_segment(name, "host")
        self.root = Path(root).resolve()
        self._children: dict[str, subprocess.Popen] = {}

    def __repr__(self) -> str:
        return f"Host({str(self.root)!r}, {self.name!r})"

    @property
    def vms_dir(self) -> Path:
        return self.root / "vms"

    # ---- VMs ------------------------------------------------------------------------------------
    def create_vm(
        self,
        name: str,
        disks: Sequence[tuple[str, int | str, str]],
        *,
        networks: Sequence[str] = ("default",),
        generation: int = 1,
    ) -> VirtualMachine:
        """Create a VM, off, with sparse all-zero disks of (name, size, format "raw"|"vhd").

        Everything is checked before anything is written, and the VM folder appears whole or not at
        all (it is assembled in a hidden staging folder and renamed into place)."""
        folder = self._vm_dir(name)
        disk_specs = self._check_disk_specs(name, disks)
        adapters = [
            NetworkAdapter(f"nic{i}", validate_segment(network, "network")) for i, network in enumerate(networks)
        ]
        if generation not in VM_GENERATIONS:
            raise VmSpecError(f"VM {name!r}: generation must be 1 or 2, got {generation!r}")
        if folder.exists():
            raise VmExistsError(f"VM {name!r} already exists on host {self.name!r} ({folder})")

        self.vms_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".creating-{name}-", dir=self.vms_dir))
        staging.chmod(0o755)  # mkdtemp's 0700 would keep other local readers (image tools) out
        try:
            vm_disks = []
            for disk_name, size, fmt in disk_specs:
                file = disk_name + DISK_SUFFIX[fmt]
                create_disk(staging / file, size, fmt)
                vm_disks.append(VirtualDisk(str(uuid.uuid4()), disk_name, file, size, fmt, folder / file))
            vm = VirtualMachine(name, str(uuid.uuid4()), generation, STATE_OFF, vm_disks, adapters, folder, self.name)
            _write_json_atomically(staging / MANIFEST, vm.to_manifest())
            try:
                os.rename(staging, folder)
            except OSError as exc:  # created meanwhile by someone else
                raise VmExistsError(f"VM {name!r} already exists on host {self.name!r} ({folder})") from exc
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        fsync_directory(self.vms_dir)
        return vm

    def get_vm(self, name: str) -> VirtualMachine:
        """The VM as its manifest describes it; VmNotFoundError when there is no such VM."""
        folder = self._vm_dir(name)
        manifest_path = folder / MANIFEST
        try:
            raw = manifest_path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            raise VmNotFoundError(f"VM {name!r} not found on host {self.name!r} (no {manifest_path})") from None
        return self._parse_manifest(name, folder, raw)

    def list_vms(self) -> list[VirtualMachine]:
        """Every VM on the host, by name (folders being created or deleted are not VMs yet or any more)."""
        if not self.vms_dir.is_dir():
            return []
        names = sorted(
            entry.name
            for entry in self.vms_dir.iterdir()
            if _NAME.fullmatch(entry.name) and (entry / MANIFEST).is_file()
        )
        return [self.get_vm(name) for name in names]

    def delete_vm(self, name: str) -> None:
        """Delete a VM that is off, with its disks and replication logs."""
        with self._vm_lock(name) as vm:
            if vm.state == STATE_RUNNING or self._running_workload(vm) is not None:
                raise VmRunningError(f"VM {name!r} on host {self.name!r} is running: shut it down before deleting it")
            # Renamed away first, so the VM vanishes at once even if removing its files is interrupted.
            trash = Path(tempfile.mkdtemp(prefix=f".deleting-{name}-", dir=self.vms_dir))
            os.rename(vm.path, trash / name)
        fsync_directory(self.vms_dir)
        shutil.rmtree(trash)

    # ---- replication tracking ---------------------------------------------------------------------
    def enable_tracking(self, vm: VirtualMachine | str) -> list[VirtualDisk]:
        """Put every disk of the VM under the replication tracker; disks already tracked are left as
        they are. Returns the disks that were newly enabled."""
        with self._vm_lock(_vm_name(vm)) as current:
            newly_enabled = []
            for disk in current.disks:
                if not _is_tracked(disk.path):
                    ReplicationTracker.enable(disk.path, disk_id=uuid.UUID(disk.id).bytes).close()
                    newly_enabled.append(disk)
            return newly_enabled

    def is_tracked(self, vm: VirtualMachine | str, disk: VirtualDisk | str) -> bool:
        return _is_tracked(self._disk_of(vm, disk).path)

    def tracker(self, vm: VirtualMachine | str, disk: VirtualDisk | str) -> ReplicationTracker:
        """The tracker of one disk, opened for the caller (who closes it)."""
        current = self.get_vm(_vm_name(vm))
        virtual_disk = self._disk_of(current, disk)
        try:
            return ReplicationTracker(virtual_disk.path)
        except NotTrackedError:
            raise NotTrackedError(
                f"disk {virtual_disk.name!r} of VM {current.name!r} on host {self.name!r} is not tracked: "
                f"enable tracking first"
            ) from None

    # ---- initial content ----------------------------------------------------------------------------
    def write_initial_data(self, vm: VirtualMachine | str, seed: int, fraction: float = 0.5) -> dict[str, int]:
        """Fill about `fraction` of each disk with random data in random 1 MiB-aligned extents, leaving
        the rest as holes; return the bytes written per disk. Reproducible from `seed`.

        The writes go straight to the images, not through the tracker, so this is refused once a disk
        is tracked: it is meant for a VM's content before protection."""
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be between 0 and 1, got {fraction!r}")
        with self._vm_lock(_vm_name(vm)) as current:
            if self._running_workload(current) is not None:
                raise VmRunningError(f"VM {current.name!r} on host {self.name!r} has a workload running")
            tracked = [d.name for d in current.disks if _is_tracked(d.path)]
            if tracked:
                raise DiskProtectedError(
                    f"VM {current.name!r} on host {self.name!r}: disks {', '.join(tracked)} are tracked; writing "
                    f"initial data past the tracker would break their replication"
                )
            return {disk.name: _fill_disk(disk, seed, fraction) for disk in current.disks}

    # ---- workload -----------------------------------------------------------------------------------
    def start_workload(
        self,
        vm: VirtualMachine | str,
        *,
        rate_mb_s: float = 2.0,
        write_sizes: tuple[int, int] = (4096, 65536),
        seed: int | None = None,
    ) -> int:
        """Start the VM's guest workload (writing through the trackers) and mark the VM running; return
        its pid. When it already runs, its pid is returned and it is left as it is.

        Returns once the workload has opened every disk; NotTrackedError when a disk is not
        tracked, WorkloadError when the process fails to start."""
        min_size, max_size = write_sizes
        if rate_mb_s < 0 or min_size <= 0 or min_size % 512 or max_size % 512 or max_size < min_size:
            raise ValueError(
                f"workload needs rate_mb_s >= 0 and write sizes (min, max) that are positive multiples of 512 "
                f"with min <= max, got rate {rate_mb_s!r} and sizes {write_sizes!r}"
            )
        with self._vm_lock(_vm_name(vm)) as current:
            running = self._running_workload(current)
            if running is not None:
                return running.pid
            untracked = [d.name for d in current.disks if not _is_tracked(d.path)]
            if untracked:
                raise NotTrackedError(
                    f"VM {current.name!r} on host {self.name!r}: disks {', '.join(untracked)} are not tracked; "
                    f"the workload writes only through the tracker (enable tracking first)"
                )
            for leftover in (WORKLOAD_STATS, WORKLOAD_READY):
                (current.path / leftover).unlink(missing_ok=True)
            self._clear_abandoned_freeze(current)
            command = [sys.executable, "-m", "sites.workload", "--rate", repr(float(rate_mb_s)),
                       "--min-size", str(min_size), "--max-size", str(max_size),
                       "--stats", str(current.path / WORKLOAD_STATS),
                       "--ready-file", str(current.path / WORKLOAD_READY),
                       "--freeze-file", str(current.path / WORKLOAD_FREEZE),
                       "--frozen-file", str(current.path / WORKLOAD_FROZEN),
                       "--quiesce-lock", str(current.path / QUIESCE_LOCK)]
            for disk in current.disks:
                command += ["--disk", str(disk.path)]
            if seed is not None:
                command += ["--seed", str(seed)]
            process = self._spawn_workload(current, command)
            current.state = STATE_RUNNING
            self._write_manifest(current)
            return process.pid

    def workload_running(self, vm: VirtualMachine | str) -> bool:
        return self._running_workload(self.get_vm(_vm_name(vm))) is not None

    def workload_stats(self, vm: VirtualMachine | str) -> dict | None:
        """The statistics the last workload wrote on exit, or None when it has not written any."""
        current = self.get_vm(_vm_name(vm))
        try:
            return json.loads((current.path / WORKLOAD_STATS).read_text())
        except FileNotFoundError:
            return None

    def stop_workload(self, vm: VirtualMachine | str, timeout: float = 10.0) -> WorkloadStop:
        """Stop the workload: SIGTERM (it finishes its current write and exits), SIGKILL if it is still
        running after `timeout` seconds. Idempotent. The VM stays in its state (see `shut_down`)."""
        with self._vm_lock(_vm_name(vm)) as current:
            return self._stop_workload(current, timeout)

    def shut_down(self, vm: VirtualMachine | str, timeout: float = 10.0) -> WorkloadStop:
        """Stop the workload and mark the VM off, as a guest shutdown before a planned failover."""
        with self._vm_lock(_vm_name(vm)) as current:
            outcome = self._stop_workload(current, timeout)
            if current.state != STATE_OFF:
                current.state = STATE_OFF
                self._write_manifest(current)
            return outcome

    def start_vm(self, vm: VirtualMachine | str) -> VirtualMachine:
        """Mark the VM running, without a workload: a failed-over or failed-back VM powered on.
        Idempotent."""
        with self._vm_lock(_vm_name(vm)) as current:
            if current.state != STATE_RUNNING:
                current.state = STATE_RUNNING
                self._write_manifest(current)
            return current

    # ---- networking ---------------------------------------------------------------------------------
    def connect_adapter(
        self, vm: VirtualMachine | str, adapter_name: str, network: str, subnet: str | None = None
    ) -> NetworkAdapter:
        """Connect a network adapter to `network` and, when given, `subnet` (CIDR, e.g. "10.1.0.0/24");
        a subnet of None detaches it from any subnet. Its public IP, if any, stays. Idempotent."""
        validate_segment(network, "network")
        subnet = _canonical_subnet(subnet, f"adapter {adapter_name!r} of VM {_vm_name(vm)!r}")
        with self._vm_lock(_vm_name(vm)) as current:
            adapter = current.adapter(adapter_name)
            connected = NetworkAdapter(adapter.name, network, subnet, adapter.public_ip)
            return self._replace_adapter(current, adapter, connected)

    def assign_public_ip(self, vm: VirtualMachine | str, adapter_name: str, ip: str) -> NetworkAdapter:
        """Give a network adapter a public IP address (IPv4 or IPv6, stored in its canonical form).
        Idempotent."""
        where = f"VM {_vm_name(vm)!r} on host {self.name!r}, adapter {adapter_name!r}"
        try:
            address = ipaddress.ip_address(ip)
        except (TypeError, ValueError):
            raise NetworkConfigError(f"{where}: {ip!r} is not an IPv4 or IPv6 address") from None
        if address.is_unspecified or address.is_loopback or address.is_multicast or address.is_link_local:
            raise NetworkConfigError(
                f"{where}: {ip!r} cannot be a VM's address (unspecified, loopback, multicast or link-local)"
            )
        with self._vm_lock(_vm_name(vm)) as current:
            adapter = current.adapter(adapter_name)
            addressed = NetworkAdapter(adapter.name, adapter.vm_network, adapter.subnet, str(address))
            return self._replace_adapter(current, adapter, addressed)

    # ---- failback staging ----------------------------------------------------------------------------
    def staging_path(self, vm: VirtualMachine | str, disk: VirtualDisk | str) -> Path:
        """Where a failback assembles the disk's incoming image: a hidden file beside the disk, on the
        same filesystem, so `replace_disk` can swap it in with one rename."""
        virtual_disk = self._disk_of(vm, disk)
        return self._inside_root(virtual_disk.path.parent / f".{virtual_disk.file}{STAGING_SUFFIX}")

    def replace_disk(self, vm: VirtualMachine | str, disk: VirtualDisk | str, staging: Path) -> bool:
        """Swap the staging image in as the disk, atomically: the disk holds its old content or the
        whole new one, even across a crash. True when swapped; False when there is no staging image
        any more, as after a swap that completed (a rerun).

        Refused while the VM runs (VmRunningError) or the disk is tracked (DiskProtectedError: its
        logs would describe the old content; disable tracking first), and when the staging image is
        not inside the VM's folder or differs from the disk in format or size; nothing changes then."""
        with self._vm_lock(_vm_name(vm)) as current:
            virtual_disk = self._disk_of(current, disk)
            where = f"disk {virtual_disk.name!r} of VM {current.name!r} on host {self.name!r}"
            if current.state == STATE_RUNNING or self._running_workload(current) is not None:
                raise VmRunningError(f"{where}: the VM is running; shut it down before replacing its disk")
            if _is_tracked(virtual_disk.path):
                raise DiskProtectedError(
                    f"{where} is tracked: its replication logs would describe the old content; disable "
                    f"tracking before replacing the disk"
                )
            staging = self._staging_inside(current, Path(staging), where)
            try:
                image = open_disk(staging, writable=True)
            except DiskNotFoundError:
                return False
            with image:
                if image.format != virtual_disk.format:
                    raise DiskFormatError(
                        f"{where}: staging image {staging} is {image.format}, the disk is {virtual_disk.format}"
                    )
                if image.size != virtual_disk.size:
                    raise SizeMismatchError(
                        f"{where}: staging image {staging} is {image.size} bytes, the disk is {virtual_disk.size}"
                    )
                image.flush()  # its content must be durable before the rename makes it the disk
            os.replace(staging, virtual_disk.path)
            fsync_directory(current.path)
            return True

    def discard_staging(self, vm: VirtualMachine | str, disk: VirtualDisk | str) -> None:
        """Delete the disk's staging image, if any; the disk is untouched. Idempotent."""
        with self._vm_lock(_vm_name(vm)) as current:
            staging = self.staging_path(current, disk)
            try:
                staging.unlink()
            except FileNotFoundError:
                return
            fsync_directory(current.path)

    # ---- quiesce (application-consistent points) ------------------------------------------------------
    def set_quiesce_commands(
        self, vm: VirtualMachine | str, pre: Sequence[str] | None, post: Sequence[str] | None
    ) -> VirtualMachine:
        """Set the commands (argv lists) a quiesce runs before and after the consistent point; None
        removes one. They run in the VM's folder with ASR_VM, ASR_HOST and ASR_VM_DIR set."""
        where = f"VM {_vm_name(vm)!r} on host {self.name!r}"
        pre_argv = _checked_command(pre, f"{where}: quiesce pre command", VmSpecError)
        post_argv = _checked_command(post, f"{where}: quiesce post command", VmSpecError)
        with self._vm_lock(_vm_name(vm)) as current:
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
        current = self.get_vm(_vm_name(vm))
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
        current = self.get_vm(_vm_name(vm))
        request = _read_token(current.path / WORKLOAD_FREEZE)
        return request is not None and _read_token(current.path / WORKLOAD_FROZEN) == request \
            and self._running_workload(current) is not None

    # ---- internals ----------------------------------------------------------------------------------
    def _vm_dir(self, name: str) -> Path:
        folder = self.vms_dir / validate_segment(name, "VM")
        return self._inside_root(folder)

    def _inside_root(self, path: Path) -> Path:
        resolved = path.resolve()
        if not resolved.is_relative_to(self.root):
            raise PathOutsideRootError(f"{path} resolves to {resolved}, outside host {self.name!r} root {self.root}")
        return resolved

    def _disk_of(self, vm: VirtualMachine | str, disk: VirtualDisk | str) -> VirtualDisk:
        current = vm if isinstance(vm, VirtualMachine) else self.get_vm(vm)
        return current.disk(disk.name if isinstance(disk, VirtualDisk) else disk)

    def _check_disk_specs(
        self, vm_name: str, disks: Sequence[tuple[str, int | str, str]]
    ) -> list[tuple[str, int, str]]:
        if not disks:
            raise VmSpecError(f"VM {vm_name!r}: a VM needs at least one disk")
        specs = []
        for disk_name, size, fmt in disks:
            validate_segment(disk_name, "disk")
            if any(disk_name == seen for seen, _, _ in specs):
                raise VmSpecError(f"VM {vm_name!r}: disk name {disk_name!r} is used twice")
            if fmt not in FORMATS:
                raise VmSpecError(f"VM {vm_name!r} disk {disk_name!r}: format must be raw or vhd, got {fmt!r}")
            try:
                size_bytes = parse_size(size) if isinstance(size, str) else size
            except ValueError as exc:
                raise VmSpecError(f"VM {vm_name!r} disk {disk_name!r}: {exc}") from None
            # The replica is a fixed VHD in Azure, whose virtual size must be a whole number of MiB.
            if not isinstance(size_bytes, int) or isinstance(size_bytes, bool) or size_bytes <= 0 or size_bytes % MIB:
                raise VmSpecError(
                    f"VM {vm_name!r} disk {disk_name!r}: size must be a positive whole number of MiB "
                    f"(the replica is a fixed VHD), got {size!r}"
                )
            specs.append((disk_name, size_bytes, fmt))
        return specs

    def _parse_manifest(self, name: str, folder: Path, raw: bytes) -> VirtualMachine:
        where = f"manifest {folder / MANIFEST} of VM {name!r} on host {self.name!r}"
        try:
            data = json.loads(raw)
            if data["name"] != name:
                raise VmManifestError(f"{where} names the VM {data['name']!r}")
            if data["state"] not in STATES or data["generation"] not in VM_GENERATIONS:
                raise VmManifestError(f"{where}: bad state {data['state']!r} or generation {data['generation']!r}")
            disks = []
            for entry in data["disks"]:
                file = validate_segment(entry["file"], "disk file")
                if entry["format"] not in FORMATS or not isinstance(entry["size"], int) or entry["size"] <= 0:
                    raise VmManifestError(f"{where}: bad format or size for disk {entry['name']!r}")
                disks.append(VirtualDisk(
                    str(uuid.UUID(entry["id"])), validate_segment(entry["name"], "disk"), file,
                    entry["size"], entry["format"], self._inside_root(folder / file),
                ))
            adapters = [
                NetworkAdapter(
                    validate_segment(a["name"], "network adapter"), validate_segment(a["vm_network"], "network"),
                    _canonical_subnet(a.get("subnet"), f"{where}, adapter {a['name']!r}"),
                    _canonical_public_ip(a.get("public_ip")),
                )
                for a in data["network_adapters"]
            ]
            quiesce = data.get("quiesce") or {}
            return VirtualMachine(
                name, str(uuid.UUID(data["id"])), data["generation"], data["state"], disks, adapters, folder, self.name,
                _checked_command(quiesce.get("pre"), f"{where}: quiesce pre command", VmManifestError),
                _checked_command(quiesce.get("post"), f"{where}: quiesce post command", VmManifestError),
            )
        except VmManifestError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError, PathOutsideRootError, NetworkConfigError) as exc:
            raise VmManifestError(f"{where} is invalid: {exc}") from exc

    def _write_manifest(self, vm: VirtualMachine) -> None:
        _write_json_atomically(vm.path / MANIFEST, vm.to_manifest())

    def _replace_adapter(self, vm: VirtualMachine, old: NetworkAdapter, new: NetworkAdapter) -> NetworkAdapter:
        if new != old:
            vm.network_adapters = [new if a.name == old.name else a for a in vm.network_adapters]
            self._write_manifest(vm)
        return new

    def _staging_inside(self, vm: VirtualMachine, staging: Path, where: str) -> Path:
        """The staging image's path, refused unless it is a hidden `.failback` file of the VM's folder:
        a rename from elsewhere could cross filesystems, or swap another disk or a log in."""
        resolved = self._inside_root(vm.path / staging)  # an absolute `staging` replaces vm.path
        name = resolved.name
        if resolved.parent != vm.path or not (name.startswith(".") and name.endswith(STAGING_SUFFIX)):
            raise PathOutsideRootError(
                f"{where}: staging image {staging} must be a staging file in the VM's folder {vm.path} "
                f"(see Host.staging_path), not another file"
            )
        return resolved

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
                    time.sleep(_POLL_S)
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
            time.sleep(_POLL_S)

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
        env = dict(os.environ, ASR_VM=vm.name, ASR_HOST=self.name, ASR_VM_DIR=str(vm.path))
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

    @contextlib.contextmanager
    def _vm_lock(self, name: str) -> Iterator[VirtualMachine]:
        """Serialize changes to one VM (several host-agent tasks may act on it at once); yields the VM
        as read under the lock."""
        self.get_vm(name)
        folder = self._vm_dir(name)
        with open(folder / LOCK_FILE, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield self.get_vm(name)  # again: it may have changed, or gone, while we waited

    def _spawn_workload(self, vm: VirtualMachine, command: list[str]) -> _WorkloadProcess:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_PROJECT_ROOT), env.get("PYTHONPATH")]))
        with open(vm.path / WORKLOAD_LOG, "ab") as log:
            child = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, cwd=vm.path,
                start_new_session=True,  # its own process group: signals reach it and only it
            )
        process = _WorkloadProcess(child.pid, _process_start_ticks(child.pid) or 0, child)
        self._children[vm.path.name] = child
        _write_json_atomically(vm.path / WORKLOAD_PID, {"pid": process.pid, "start_ticks": process.start_ticks})
        deadline = time.monotonic() + WORKLOAD_START_TIMEOUT_S
        while not (vm.path / WORKLOAD_READY).exists():
            if child.poll() is not None:
                (vm.path / WORKLOAD_PID).unlink(missing_ok=True)
                raise WorkloadError(
                    f"workload of VM {vm.name!r} on host {self.name!r} exited with code {child.returncode} "
                    f"while starting: {_log_tail(vm.path / WORKLOAD_LOG)}"
                )
            if time.monotonic() > deadline:
                self._stop_workload(vm, timeout=1.0)
                raise WorkloadError(
                    f"workload of VM {vm.name!r} on host {self.name!r} did not open its disks within "
                    f"{WORKLOAD_START_TIMEOUT_S:.0f} s: {_log_tail(vm.path / WORKLOAD_LOG)}"
                )
            time.sleep(_POLL_S)
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
        return _process_start_ticks(process.pid) == process.start_ticks

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
        deadline = time.monotonic() + timeout
        while self._alive(process):
            if time.monotonic() > deadline:
                return False
            time.sleep(_POLL_S)
        return True


def _vm_name(vm: VirtualMachine | str) -> str:
    return vm.name if isinstance(vm, VirtualMachine) else vm


def _is_tracked(disk_path: Path) -> bool:
    try:
        ReplicationTracker(disk_path).close()
    except NotTrackedError:
        return False
    return True


def _process_start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None when no live process has `pid`
    (zombies count as gone: they write nothing any more)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may contain spaces and ')'
    state, start_ticks = fields[0], int(fields[19])
    return None if state in ("Z", "X") else start_ticks


def _fill_disk(disk: VirtualDisk, seed: int, fraction: float) -> int:
    """Write random data over a random `fraction` of the disk's whole MiB, as runs of adjacent MiB."""
    blocks = disk.size // MIB
    chosen = sorted(random.Random(f"{seed}/{disk.name}").sample(range(blocks), round(blocks * fraction)))
    key = hashlib.sha256(f"initial data {seed}/{disk.name}".encode()).digest()
    keystream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    zeros = bytes(MIB)
    with open_disk(disk.path, writable=True) as image:
        for block in chosen:
            image.write(block * MIB, keystream.update(zeros))
        image.flush()
    return len(chosen) * MIB


def _write_json_atomically(path: Path, data: dict) -> None:
    replace_file(path, json.dumps(data, indent=2, sort_keys=True).encode())


def _log_tail(path: Path) -> str:
    try:
        with open(path, "rb") as log:
            log.seek(max(0, log.seek(0, os.SEEK_END) - _LOG_TAIL_BYTES))
            return log.read().decode(errors="replace").strip() or "(no output)"
    except FileNotFoundError:
        return "(no log)"


def _canonical_subnet(subnet: str | None, where: str) -> str | None:
    if subnet is None:
        return None
    try:
        return str(ipaddress.ip_network(subnet, strict=True))
    except (TypeError, ValueError) as exc:
        raise NetworkConfigError(f"{where}: subnet {subnet!r} is not a network in CIDR form ({exc})") from None


def _canonical_public_ip(ip: str | None) -> str | None:
    return None if ip is None else str(ipaddress.ip_address(ip))


def _checked_command(
    argv: Sequence[str] | None, what: str, error: type[NonRecoverableError]
) -> tuple[str, ...] | None:
    """`argv` as a tuple, or None; `error` unless it is a non-empty list of strings naming a program."""
    if argv is None:
        return None
    if isinstance(argv, (str, bytes)) or not isinstance(argv, Sequence) or not argv \
            or not all(isinstance(arg, str) and "\x00" not in arg for arg in argv) or not argv[0]:
        raise error(f"{what} must be a non-empty list of strings (program, arguments), got {argv!r}")
    return tuple(argv)


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
    return data[-_LOG_TAIL_BYTES:].decode(errors="replace").strip() or "(no output)"
