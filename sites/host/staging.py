"""Failback staging: a disk's incoming image assembled beside it, then swapped in with one rename.

A staging image is the hidden file `.<file>.failback` in the VM's folder, so it is on the disk's
filesystem and the swap is atomic: the disk holds its old content or the whole new one.
"""
from __future__ import annotations

import os
from pathlib import Path

from datapath.disk import open_disk
from datapath.durable import fsync_directory
from datapath.errors import DiskFormatError, DiskNotFoundError, PathOutsideRootError, SizeMismatchError

from .errors import DiskProtectedError, VmRunningError
from .supervisor import WorkloadSupervisor
from .tracking import disk_is_tracked
from .vm import STATE_RUNNING, VirtualDisk, VirtualMachine, vm_name

STAGING_SUFFIX = ".failback"


class Staging(WorkloadSupervisor):
    """The staging images of a host's VM disks: where they go, swapping one in, discarding one."""

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
        with self._vm_lock(vm_name(vm)) as current:
            virtual_disk = self._disk_of(current, disk)
            where = f"disk {virtual_disk.name!r} of VM {current.name!r} on host {self.name!r}"
            if current.state == STATE_RUNNING or self._running_workload(current) is not None:
                raise VmRunningError(f"{where}: the VM is running; shut it down before replacing its disk")
            if disk_is_tracked(virtual_disk.path):
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
        with self._vm_lock(vm_name(vm)) as current:
            staging = self.staging_path(current, disk)
            try:
                staging.unlink()
            except FileNotFoundError:
                return
            fsync_directory(current.path)

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
