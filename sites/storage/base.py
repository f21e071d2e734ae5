"""The interface both recovery-site backends implement (local directory, Azure page blobs)."""
from __future__ import annotations

import re
from abc import ABC, abstractmethod
from typing import BinaryIO

from datapath.endpoint import DiskEndpoint
from datapath.errors import DataPathError, PathOutsideRootError

_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ObjectNotFoundError(DataPathError, KeyError):
    """An object (shipped log, state, manifest) that was asked for does not exist."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else "object not found"


def validate_name(name: str) -> str:
    """Return `name` if it is a safe object name: '/'-separated segments of letters, digits, '.', '_'
    and '-', no segment '.' or '..', nothing absolute, no backslash, at most 1024 characters.

    Names come from outside (API calls, VM manifests), so this is the only gate between them and the
    backend's root directory or container."""
    if not isinstance(name, str) or not name or len(name) > 1024:
        raise PathOutsideRootError(f"invalid object name {name!r}: empty or longer than 1024 characters")
    if name.startswith("/") or "\\" in name or "\x00" in name:
        raise PathOutsideRootError(f"invalid object name {name!r}: absolute, or contains '\\' or NUL")
    for segment in name.split("/"):
        if segment in (".", "..") or not _SEGMENT.fullmatch(segment):
            raise PathOutsideRootError(
                f"invalid object name {name!r}: segment {segment!r} must be letters, digits, '.', '_' "
                f"or '-', not start with '.' and not be '..'"
            )
    return name


class RecoveryStorage(ABC):
    """Replica disks are stored as fixed VHD (data then a 512-byte footer), the format Azure takes.

    Disk and object names share one namespace of '/'-separated names, validated by `validate_name`.
    Convention used by the replication code (`ReplicaDisk`): `<host>/<vm>/<disk>.vhd` for a replica disk,
    `<host>/<vm>/<disk>.vhd.<generation>.hrl` for a shipped log, `<host>/<vm>/<disk>.vhd.state.json` for its
    state, `<host>/<vm>/<disk>.vhd.v<version>.undo` and `.v<version>.manifest` for its recovery points
    (`datapath.points`); `failback/<host>/<vm>/<disk>.<what>` for what a failback moves
    (`datapath.failback`).
    """

    description: str = ""

    # ---- replica disks -------------------------------------------------------------------------
    @abstractmethod
    def create_disk(self, name: str, size: int) -> None:
        """Create an all-zero disk of virtual `size` bytes (a whole number of MiB) with its VHD footer.
        Idempotent when a disk of that size exists; SizeMismatchError when one of another size does."""

    @abstractmethod
    def open_disk(self, name: str) -> DiskEndpoint:
        """The replica disk as an endpoint. DiskNotFoundError when it does not exist."""

    @abstractmethod
    def disk_exists(self, name: str) -> bool: ...

    @abstractmethod
    def delete_disk(self, name: str) -> None:
        """Delete the disk; no error when it does not exist."""

    # ---- objects (shipped logs, state, manifests) ---------------------------------------------
    @abstractmethod
    def put_object(self, name: str, src: BinaryIO | bytes) -> int:
        """Store an object atomically (readers see the old one or the whole new one); return its size."""

    @abstractmethod
    def put_new_object(self, name: str, data: bytes) -> bool:
        """Store a small object only if none of that name exists, atomically (of two processes racing, one
        stores and the other finds its object); True if this call stored it."""

    @abstractmethod
    def get_object(self, name: str, dst: BinaryIO) -> int:
        """Stream an object into `dst`; return bytes written. ObjectNotFoundError when missing."""

    @abstractmethod
    def read_object(self, name: str) -> bytes:
        """A small object whole (state, manifests). ObjectNotFoundError when missing."""

    @abstractmethod
    def object_exists(self, name: str) -> bool: ...

    @abstractmethod
    def delete_object(self, name: str) -> None:
        """No error when it does not exist."""

    @abstractmethod
    def list_objects(self, prefix: str = "") -> list[str]:
        """Names of objects and disks starting with `prefix`, sorted."""

    def close(self) -> None:
        """Release what the backend holds open (clients, connections). Deliberately a no-op by default:
        a backend that holds nothing open (the local directory) need not override it."""
        return None
