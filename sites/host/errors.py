"""The host driver's errors: every one is non-recoverable but a failed quiesce, which a retry may get past."""
from __future__ import annotations

from datapath.errors import NonRecoverableError, PathOutsideRootError, RecoverableError


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


class GuestBootError(RecoverableError):
    """A QEMU guest did not start or did not reach its heartbeat in time; trying again may succeed."""


class GuestError(NonRecoverableError):
    """A QEMU guest could not be started, did not answer, or did not say what was expected on its console
    in time: a bad kernel, initrd or drive, QEMU exiting, a guest that crashed or hangs."""


class GuestTimeoutError(GuestError, TimeoutError):
    """The guest did not print the expected console line, or its agent did not answer, in time."""


class GuestAgentError(GuestError):
    """The guest agent answered a command with an error."""
