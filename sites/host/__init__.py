"""The protected (primary) host: its VMs, their disks, replication tracking, QEMU guests and synthetic workloads.

A VM is either a QEMU guest (its manifest has a `guest` definition: `guests`, `qemu`, `trackerservice`;
docs/runtime.md) or a synthetic VM whose writes come from the synthetic workload process
(sites/workload.py), kept for scale tests and benchmarks.

A host is a directory tree. Each VM lives in `<root>/vms/<vm>/`: its manifest `vm.json`, its disk
images (`<disk>.raw` or `<disk>.vhd`), the trackers' replication logs beside them, and while its
workload runs, `workload.pid`, `workload.log` and (on exit) `workload-stats.json`. A failback stages
each disk's incoming image as `.<file>.failback` beside it; a quiesce talks to the workload through
`workload.freeze` and `workload.frozen`, and `quiesce.lock` says a quiesce is in progress.

Names of hosts, VMs, disks and networks come from outside (API calls, manifests) and become path
segments, so each is checked against one rule before anything is built from it, and every path is
checked to resolve inside the root.

One concept per module: `vm` (what a VM is, the name rule), `guestdef` (a QEMU guest's definition),
`images` (imported images and boot files), `manifest` (the store of manifests and folders), `tracking`,
`supervisor` (the synthetic workload processes), `quiesce`, `guests` (QEMU guests: start, stop, boot check,
freeze through the agent), `qemu`, `qmp`, `guestagent`, `trackerservice` and `imagelock` (the NBD tracker
service and its hold on images), `staging` (failback disks), `networking`, and `driver`, whose `Host`
composes them.
"""
from .driver import Host
from .errors import (
    DiskProtectedError,
    InvalidNameError,
    NetworkConfigError,
    QuiesceError,
    VmExistsError,
    VmManifestError,
    VmNotFoundError,
    VmRunningError,
    VmSpecError,
    WorkloadError,
)
from .supervisor import WorkloadStop
from .vm import (
    DISK_SUFFIX,
    STATE_OFF,
    STATE_RUNNING,
    STATES,
    VM_GENERATIONS,
    NetworkAdapter,
    VirtualDisk,
    VirtualMachine,
    validate_segment,
)

__all__ = [
    "DISK_SUFFIX", "STATES", "STATE_OFF", "STATE_RUNNING", "VM_GENERATIONS",
    "DiskProtectedError", "Host", "InvalidNameError", "NetworkAdapter", "NetworkConfigError", "QuiesceError",
    "VirtualDisk", "VirtualMachine", "VmExistsError", "VmManifestError", "VmNotFoundError", "VmRunningError",
    "VmSpecError", "WorkloadError", "WorkloadStop", "validate_segment",
]
