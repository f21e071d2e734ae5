"""Errors of building the test guest and its data disks."""
from __future__ import annotations

from datapath.errors import NonRecoverableError


class GuestBuildError(NonRecoverableError):
    """The guest cannot be built here: a Debian package cannot be downloaded or unpacked, a tool is
    missing, or the kernel package is not what the builder expects."""


class DataDiskError(NonRecoverableError):
    """A data disk cannot be made: bad size, the file exists already, missing seed folder, mkfs failed."""
