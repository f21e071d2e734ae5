"""How a real guest boots and how the engine knows it came up: the `guest` section of a VM's manifest.

A VM without it is a synthetic VM (its "guest" is the workload writer of sites/workload.py, kept for scale
tests and benchmarks). A VM with it is a QEMU guest (sites/host/qemu.py), its disks served through the
replication tracker while they are tracked. It boots one of two ways:
- "direct kernel": the kernel and initrd kept in the VM's `boot/` folder, with its command line;
- from one of its disks (`boot_disk`, the disk's name): the BIOS runs that disk's boot loader, which loads
  the kernel and its command line from the disk itself. The realistic disaster-recovery case: the OS disk
  is replicated like any other, and the recovery VM boots from its replica. No boot files then.

The engine judges a boot by the guest's serial console: the heartbeat line says the guest is up; the check
lines say whether its own application check passed. These patterns come from the VM's definition, never
from the guest's output, so a guest cannot make a drill pass by printing something else.

The boot files travel with the VM's protection: their SHA-256 is recorded in the database when the VM is
registered, they are uploaded to the recovery storage, and a recovery VM boots only files whose hash
matches the record.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .errors import VmSpecError
from .vm import validate_segment

BOOT_DIR = "boot"
"""The folder of a VM's boot files (kernel, initrd), beside its manifest."""
RUNTIME_QEMU = "qemu"
MEMORY_MB = (64, 16384)
BOOT_TIMEOUT_S = (5.0, 3600.0)
CMDLINE_MAX = 1024
PATTERN_MAX = 200
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class GuestDefinition:
    kernel: str | None
    """The kernel's file name in the VM's boot folder; None for a guest booting from its `boot_disk`."""
    initrd: str | None
    cmdline: str
    heartbeat: str
    """A regular expression: the guest is up once a line of its serial console matches it."""
    check_pass: str | None = None
    """A regular expression on this boot's console (before or after the heartbeat): the guest's own check passed."""
    check_fail: str | None = None
    """A regular expression: the guest's application check failed (the line is kept as the reason)."""
    memory_mb: int = 256
    guest_agent: bool = True
    """Whether the guest answers the QEMU guest agent protocol (freeze and thaw for consistent points)."""
    boot_timeout_s: float = 120.0
    """How long a boot may take to reach the heartbeat (and the check's verdict) before it counts as failed."""
    hashes: dict[str, str] = field(default_factory=dict)
    """SHA-256 of each boot file, by file name."""
    runtime: str = RUNTIME_QEMU
    boot_disk: str | None = None
    """The name of the VM's disk the guest boots from (its boot loader, kernel and command line are on it);
    None for a direct-kernel boot."""

    @property
    def boot_files(self) -> list[str]:
        if self.kernel is None:
            return []
        return [self.kernel] + ([self.initrd] if self.initrd else [])

    def to_manifest(self) -> dict[str, Any]:
        manifest = {
            "runtime": self.runtime, "kernel": self.kernel, "initrd": self.initrd, "cmdline": self.cmdline,
            "heartbeat": self.heartbeat, "check_pass": self.check_pass, "check_fail": self.check_fail,
            "memory_mb": self.memory_mb, "guest_agent": self.guest_agent, "boot_timeout_s": self.boot_timeout_s,
            "hashes": dict(self.hashes),
        }
        if self.boot_disk is not None:  # left out otherwise: direct-kernel manifests stay as they were
            manifest["boot_disk"] = self.boot_disk
        return manifest

    def check_boot_disk(self, disks: Iterable[str], where: str) -> None:
        """VmSpecError unless the disk the guest boots from is one of `disks` (the VM's disk names)."""
        names = list(disks)
        if self.boot_disk is not None and self.boot_disk not in names:
            raise VmSpecError(f"{where}: the guest boots from disk {self.boot_disk!r}, which the VM does not have "
                              f"(its disks: {', '.join(names) or 'none'})")

    @classmethod
    def from_manifest(cls, data: Any, where: str) -> GuestDefinition:
        """The definition `data` describes, every field checked; VmSpecError naming `where` otherwise."""
        if not isinstance(data, dict):
            raise VmSpecError(f"{where}: the guest definition must be an object, got {data!r}")
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise VmSpecError(f"{where}: unknown guest definition field(s) {', '.join(sorted(unknown))}")
        if data.get("runtime", RUNTIME_QEMU) != RUNTIME_QEMU:
            raise VmSpecError(f"{where}: guest runtime must be {RUNTIME_QEMU!r}, got {data.get('runtime')!r}")
        boot_disk = data.get("boot_disk")
        if boot_disk is not None:
            boot_disk = _segment(boot_disk, "boot disk", where)
            given = [name for name in ("kernel", "initrd", "cmdline") if data.get(name)]
            if given:
                raise VmSpecError(f"{where}: a guest booting from its disk {boot_disk!r} takes no "
                                  f"{', '.join(given)}: the disk's boot loader loads the kernel with its own "
                                  f"command line; give a kernel or a boot disk, not both")
        elif data.get("kernel") is None:
            raise VmSpecError(f"{where}: say how the guest boots: a kernel (with initrd and cmdline), or a "
                              f"boot_disk naming one of the VM's disks")
        kernel = None if boot_disk is not None else _segment(data.get("kernel"), "kernel file", where)
        initrd = None if data.get("initrd") is None else _segment(data["initrd"], "initrd file", where)
        cmdline = data.get("cmdline") or ""
        if not isinstance(cmdline, str) or len(cmdline) > CMDLINE_MAX or any(c in cmdline for c in "\x00\n\r"):
            raise VmSpecError(f"{where}: cmdline must be one line of at most {CMDLINE_MAX} characters")
        memory = data.get("memory_mb", 256)
        if not isinstance(memory, int) or isinstance(memory, bool) or not MEMORY_MB[0] <= memory <= MEMORY_MB[1]:
            raise VmSpecError(f"{where}: memory_mb must be a whole number from {MEMORY_MB[0]} to {MEMORY_MB[1]}, "
                              f"got {memory!r}")
        timeout = data.get("boot_timeout_s", 120.0)
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) \
                or not BOOT_TIMEOUT_S[0] <= timeout <= BOOT_TIMEOUT_S[1]:
            raise VmSpecError(f"{where}: boot_timeout_s must be from {BOOT_TIMEOUT_S[0]:g} to "
                              f"{BOOT_TIMEOUT_S[1]:g} seconds, got {timeout!r}")
        agent = data.get("guest_agent", True)
        if not isinstance(agent, bool):
            raise VmSpecError(f"{where}: guest_agent must be true or false, got {agent!r}")
        hashes = data.get("hashes") or {}
        if not isinstance(hashes, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and _SHA256.fullmatch(v) for k, v in hashes.items()
        ):
            raise VmSpecError(f"{where}: hashes must map boot file names to SHA-256 hex digests")
        definition = cls(
            kernel=kernel, initrd=initrd, cmdline=cmdline,
            heartbeat=_pattern(data.get("heartbeat"), "heartbeat", where, required=True),
            check_pass=_pattern(data.get("check_pass"), "check_pass", where),
            check_fail=_pattern(data.get("check_fail"), "check_fail", where),
            memory_mb=memory, guest_agent=agent, boot_timeout_s=float(timeout), hashes=dict(hashes),
            boot_disk=boot_disk,
        )
        if initrd is not None and initrd == kernel:
            raise VmSpecError(f"{where}: the kernel and the initrd need different file names (both {kernel!r})")
        if (definition.check_pass is None) != (definition.check_fail is None):
            raise VmSpecError(f"{where}: give both check_pass and check_fail, or neither")
        if hashes and set(hashes) != set(definition.boot_files):
            raise VmSpecError(f"{where}: hashes name {sorted(hashes)}, the boot files are {definition.boot_files}")
        return definition


def _segment(value: Any, what: str, where: str) -> str:
    """`value` if it is a valid name for a path segment (a boot file's or a disk's); VmSpecError otherwise."""
    try:
        return validate_segment(value, what)
    except Exception as exc:  # InvalidNameError: reported as a spec error of this definition
        raise VmSpecError(f"{where}: {exc}") from None


def _pattern(value: Any, what: str, where: str, *, required: bool = False) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value or len(value) > PATTERN_MAX:
        raise VmSpecError(f"{where}: {what} must be a regular expression of 1 to {PATTERN_MAX} characters, "
                          f"got {value!r}")
    try:
        re.compile(value)
    except re.error as exc:
        raise VmSpecError(f"{where}: {what} {value!r} is not a valid regular expression: {exc}") from None
    return value
