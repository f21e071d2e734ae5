"""What a VM is: its name rules, disks, network adapters and quiesce commands, as its manifest holds them.

Names of hosts, VMs, disks and networks come from outside (API calls, manifests) and become path
segments, so each is checked against one rule (`validate_segment`) before anything is built from it.
"""
from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from datapath.errors import DiskNotFoundError, NonRecoverableError

from .errors import InvalidNameError, NetworkConfigError

if TYPE_CHECKING:
    from .guestdef import GuestDefinition

DISK_SUFFIX = {"raw": ".raw", "vhd": ".vhd"}

VM_GENERATIONS = (1, 2)
STATE_RUNNING = "running"
STATE_OFF = "off"
STATES = (STATE_RUNNING, STATE_OFF)

# A first character of letter or digit keeps every name valid as a recovery-storage object name too
# (sites.storage.base.validate_name), so a VM that can be created can also be protected.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def validate_segment(name: str, kind: str) -> str:
    """Return `name` if it is a valid host/VM/disk/network name; InvalidNameError otherwise."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
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
    guest: GuestDefinition | None = None
    """How the VM boots as a QEMU guest (sites/host/guestdef.py); None for a synthetic VM."""

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
        if self.guest is not None:
            manifest["guest"] = self.guest.to_manifest()
        if self.quiesce_pre is not None or self.quiesce_post is not None:
            manifest["quiesce"] = {
                "pre": list(self.quiesce_pre) if self.quiesce_pre is not None else None,
                "post": list(self.quiesce_post) if self.quiesce_post is not None else None,
            }
        return manifest


def vm_name(vm: VirtualMachine | str) -> str:
    return vm.name if isinstance(vm, VirtualMachine) else vm


def canonical_subnet(subnet: str | None, where: str) -> str | None:
    if subnet is None:
        return None
    try:
        return str(ipaddress.ip_network(subnet, strict=True))
    except (TypeError, ValueError) as exc:
        raise NetworkConfigError(f"{where}: subnet {subnet!r} is not a network in CIDR form ({exc})") from None


def canonical_public_ip(ip: str | None) -> str | None:
    return None if ip is None else str(ipaddress.ip_address(ip))


def checked_command(
    argv: Sequence[str] | None, what: str, error: type[NonRecoverableError]
) -> tuple[str, ...] | None:
    """`argv` as a tuple, or None; `error` unless it is a non-empty list of strings naming a program."""
    if argv is None:
        return None
    if isinstance(argv, (str, bytes)) or not isinstance(argv, Sequence) or not argv \
            or not all(isinstance(arg, str) and "\x00" not in arg for arg in argv) or not argv[0]:
        raise error(f"{what} must be a non-empty list of strings (program, arguments), got {argv!r}")
    return tuple(argv)
