"""The host driver: `Host` composes the manifest store, tracking, workload supervision, quiesce, failback
staging and networking, and holds the operations that span several of them."""
from __future__ import annotations

import hashlib
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from datapath.disk import open_disk
from datapath.durable import fsync_directory
from datapath.tracker import NotTrackedError

from .errors import DiskProtectedError, VmRunningError, VmSpecError
from .guests import POWER_DOWN_TIMEOUT_S, Guests
from .manifest import MIB
from .networking import Networking
from .quiesce import QUIESCE_LOCK, WORKLOAD_FREEZE, WORKLOAD_FROZEN
from .staging import Staging
from .supervisor import WORKLOAD_READY, WORKLOAD_STATS, WorkloadStop
from .tracking import Tracking, disk_is_tracked
from .vm import STATE_OFF, STATE_RUNNING, VirtualDisk, VirtualMachine, vm_name


class Host(Tracking, Guests, Staging, Networking):
    """A protected host rooted at `root`; `name` is its identity in messages and in the recovery site."""

    def __repr__(self) -> str:
        return f"Host({str(self.root)!r}, {self.name!r})"

    # ---- VMs ------------------------------------------------------------------------------------
    def delete_vm(self, name: str) -> None:
        """Delete a VM that is off, with its disks and replication logs."""
        with self._vm_lock(name) as vm:
            if vm.state == STATE_RUNNING or self._running_workload(vm) is not None \
                    or (vm.guest is not None and self.guest_running(vm)):
                raise VmRunningError(f"VM {name!r} on host {self.name!r} is running: shut it down before deleting it")
            # Renamed away first, so the VM vanishes at once even if removing its files is interrupted.
            trash = Path(tempfile.mkdtemp(prefix=f".deleting-{name}-", dir=self.vms_dir))
            os.rename(vm.path, trash / name)
        fsync_directory(self.vms_dir)
        shutil.rmtree(trash)

    # ---- initial content ----------------------------------------------------------------------------
    def write_initial_data(self, vm: VirtualMachine | str, seed: int, fraction: float = 0.5) -> dict[str, int]:
        """Fill about `fraction` of each disk with random data in random 1 MiB-aligned extents, leaving
        the rest as holes; return the bytes written per disk. Reproducible from `seed`.

        The writes go straight to the images, not through the tracker, so this is refused once a disk
        is tracked: it is meant for a VM's content before protection."""
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be between 0 and 1, got {fraction!r}")
        with self._vm_lock(vm_name(vm)) as current:
            if self._running_workload(current) is not None:
                raise VmRunningError(f"VM {current.name!r} on host {self.name!r} has a workload running")
            self._require_guest_off(current, "writing initial data")
            tracked = [d.name for d in current.disks if disk_is_tracked(d.path)]
            if tracked:
                raise DiskProtectedError(
                    f"VM {current.name!r} on host {self.name!r}: disks {', '.join(tracked)} are tracked; writing "
                    f"initial data past the tracker would break their replication"
                )
            return {disk.name: _fill_disk(disk, seed, fraction) for disk in current.disks}

    # ---- workload and power state ---------------------------------------------------------------------
    def start_workload(
        self,
        vm: VirtualMachine | str,
        *,
        rate_mb_s: float = 2.0,
        write_sizes: tuple[int, int] = (4096, 65536),
        seed: int | None = None,
    ) -> int:
        """Start a synthetic VM's synthetic workload (writing through the trackers) and mark the VM running;
        return its pid. When it already runs, its pid is returned and it is left as it is.

        Returns once the workload has opened every disk; NotTrackedError when a disk is not
        tracked, WorkloadError when the process fails to start."""
        min_size, max_size = write_sizes
        if rate_mb_s < 0 or min_size <= 0 or min_size % 512 or max_size % 512 or max_size < min_size:
            raise ValueError(
                f"workload needs rate_mb_s >= 0 and write sizes (min, max) that are positive multiples of 512 "
                f"with min <= max, got rate {rate_mb_s!r} and sizes {write_sizes!r}"
            )
        with self._vm_lock(vm_name(vm)) as current:
            if current.guest is not None:
                raise VmSpecError(f"VM {current.name!r} on host {self.name!r} is a QEMU guest: its own workload "
                                  f"runs inside it (start the VM); the synthetic workload is for synthetic VMs")
            running = self._running_workload(current)
            if running is not None:
                return running.pid
            untracked = [d.name for d in current.disks if not disk_is_tracked(d.path)]
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

    def enable_tracking(self, vm: VirtualMachine | str) -> list[VirtualDisk]:
        """Put every disk under the replication tracker (see Tracking). A running QEMU guest's disks are
        served as they were when it started, so its writes would bypass a tracker enabled now: refused."""
        current = self.get_vm(vm_name(vm))
        if any(not disk_is_tracked(disk.path) for disk in current.disks):
            self._require_guest_off(current, "enabling replication (its next start serves its disks through the "
                                             "replication tracker)")
        return super().enable_tracking(current)

    def shut_down(self, vm: VirtualMachine | str, timeout: float = 10.0) -> WorkloadStop:
        """Stop the VM and mark it off, as a guest shutdown before a planned failover: a QEMU guest is powered
        down through ACPI (QEMU quits after `timeout`, at least POWER_DOWN_TIMEOUT_S for a guest) and its
        tracker service stopped; a synthetic VM's workload is stopped."""
        with self._vm_lock(vm_name(vm)) as current:
            if current.guest is not None:
                ended = self._stop_guest(current, max(timeout, POWER_DOWN_TIMEOUT_S))
                outcome = {"not-running": WorkloadStop.NOT_RUNNING, "acpi": WorkloadStop.STOPPED}.get(
                    ended, WorkloadStop.KILLED)
            else:
                outcome = self._stop_workload(current, timeout)
            if current.state != STATE_OFF:
                current.state = STATE_OFF
                self._write_manifest(current)
            return outcome

    def start_vm(self, vm: VirtualMachine | str, *, network: str = "none") -> VirtualMachine:
        """Power the VM on: a QEMU guest boots (its disks served by its tracker service; `network` "isolated"
        for a drill); a synthetic VM is marked running, without a workload (a failed-over or failed-back VM).
        Idempotent."""
        with self._vm_lock(vm_name(vm)) as current:
            if current.guest is not None:
                self._start_guest(current, network=network)
            if current.state != STATE_RUNNING:
                current.state = STATE_RUNNING
                self._write_manifest(current)
            return current

    def power_state(self, vm: VirtualMachine | str) -> str:
        """The VM's real power state: QEMU's for a guest ("running", "paused", "shutdown", ... or "off"),
        the manifest's for a synthetic VM."""
        current = self.get_vm(vm_name(vm))
        return self.guest_power_state(current) if current.guest is not None else current.state

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
