"""Replication tracking of a VM's disks: each disk under the tracker (datapath.tracker), or not."""
from __future__ import annotations

import uuid
from pathlib import Path

from datapath.tracker import NotTrackedError, ReplicationTracker

from .manifest import VmStore
from .vm import VirtualDisk, VirtualMachine, vm_name


class Tracking(VmStore):
    """Puts the disks of a host's VMs under the replication tracker and opens their trackers."""

    def enable_tracking(self, vm: VirtualMachine | str) -> list[VirtualDisk]:
        """Put every disk of the VM under the replication tracker; disks already tracked are left as
        they are. Returns the disks that were newly enabled."""
        with self._vm_lock(vm_name(vm)) as current:
            newly_enabled = []
            for disk in current.disks:
                if not disk_is_tracked(disk.path):
                    ReplicationTracker.enable(disk.path, disk_id=uuid.UUID(disk.id).bytes).close()
                    newly_enabled.append(disk)
            return newly_enabled

    def is_tracked(self, vm: VirtualMachine | str, disk: VirtualDisk | str) -> bool:
        return disk_is_tracked(self._disk_of(vm, disk).path)

    def tracker(self, vm: VirtualMachine | str, disk: VirtualDisk | str) -> ReplicationTracker:
        """The tracker of one disk, opened for the caller (who closes it); it keeps as much of an acknowledged
        log's storage as ASR_TRACKER_SPARE_MAX says."""
        from workflows import settings

        current = self.get_vm(vm_name(vm))
        virtual_disk = self._disk_of(current, disk)
        try:
            return ReplicationTracker(virtual_disk.path, spare_max_bytes=settings.tracker_spare_max())
        except NotTrackedError:
            raise NotTrackedError(
                f"disk {virtual_disk.name!r} of VM {current.name!r} on host {self.name!r} is not tracked: "
                f"enable tracking first"
            ) from None


def disk_is_tracked(disk_path: Path) -> bool:
    try:
        ReplicationTracker(disk_path).close()
    except NotTrackedError:
        return False
    return True
