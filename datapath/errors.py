"""Errors of the data path, classified for the retry policy.

Workflows decide whether to retry by class, not by message: a `NonRecoverableError` marks the protected
item Critical and is never retried; a `RecoverableError` is retried on the back-off schedule.
"""


class DataPathError(Exception):
    """Base of every error the data path raises on purpose."""


class NonRecoverableError(DataPathError):
    """Retrying cannot help: administrator intervention is required."""


class RecoverableError(DataPathError):
    """A passing condition (network, storage unavailable, low disk): retrying may succeed."""


class DiskFormatError(NonRecoverableError):
    """A disk image is not a valid raw or fixed VHD image (broken chain, bad footer, bad size)."""


class DiskNotFoundError(NonRecoverableError):
    """A disk that should exist does not."""


class SizeMismatchError(NonRecoverableError):
    """Two disks that must have the same virtual size do not."""


class AlignmentError(NonRecoverableError):
    """An offset or length is not aligned as the target requires (512-byte sectors, pages)."""


class LogCorruptError(NonRecoverableError):
    """A replication log fails validation: bad header, bad record checksum, truncated, or unsealed."""

    def __init__(self, message: str, *, disk: str | None = None, record: int | None = None):
        super().__init__(message)
        self.disk = disk
        self.record = record


class LogOutOfSequenceError(NonRecoverableError):
    """A replication log's generation does not follow the last one applied to the replica."""


class ResyncRequiredError(NonRecoverableError):
    """A tracker's logs may lack writes its disk has (datapath.tracker's `mark_resync_required`): shipping
    cannot bring the replica in line, only a resync can."""


class PathOutsideRootError(NonRecoverableError):
    """A path or object name coming from outside would escape its root or container."""


class StorageUnavailableError(RecoverableError):
    """The recovery-site storage could not be reached or answered with a passing failure."""


class StorageAuthError(NonRecoverableError):
    """The recovery-site storage refused the credentials (authentication or authorization)."""


class LowDiskSpaceError(RecoverableError):
    """The target ran out of space."""


class StorageKeyError(NonRecoverableError):
    """The key-encryption key is missing, malformed or not the one that wrapped the recovery storage's data
    keys: nothing encrypted can be read or written until the setting names the right key."""


class ObjectAuthenticationError(NonRecoverableError):
    """An encrypted object or data key of the recovery storage failed authentication: it was altered,
    truncated, swapped for another or renamed. Nothing of it has been used."""

    def __init__(self, message: str, *, object_name: str | None = None):
        super().__init__(message)
        self.object_name = object_name
