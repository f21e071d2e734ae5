"""What an operator does with a VM itself: create it on a host (disks by size or imported from an image, a
QEMU guest's boot definition), start it, stop it, read its console. A created VM is registered at once, as
`add_vm` registers one the host already has.

These act on the host's tree directly, as `add_vm` reads it: the API runs where the hosts' roots are
reachable (one machine here). The guest and its tracker service are detached processes, so they outlive
the request.
"""
from __future__ import annotations

from typing import Any

from models.db import session_scope
from models.fabric import Host
from sites.host import Host as HostDriver
from sites.host import VmSpecError
from sites.host.guestdef import GuestDefinition

from .errors import Invalid, _operation
from .fabric import add_vm, show_vm
from .lookups import _host, _name, _vm

MAX_DISKS = 16
CONSOLE_MAX_BYTES = 64 * 1024


@_operation
def create_vm(host: str, name: str, *, disks: list[dict[str, Any]], networks: list[str] | None = None,
              generation: int = 1, guest: dict[str, Any] | None = None,
              boot_files: dict[str, str] | None = None) -> dict:
    """Create VM NAME on HOST, off, and register it. `disks`: [{"name", "size" (bytes or "64M"; omitted with
    an image), "format" ("raw" or "vhd"), "image" (optional: a raw or fixed-VHD file inside the host's root
    whose content the disk starts with)}]. `guest` (optional) makes it a QEMU guest (see docs/runtime.md):
    {"kernel", "initrd", "cmdline", "heartbeat", "check_pass", "check_fail", "memory_mb", "guest_agent",
    "boot_timeout_s"}, with `boot_files` naming, for each of its kernel and initrd file names, a file inside
    the host's root; or, for a guest booting from one of its disks (an imported bootable image, say),
    {"boot_disk": that disk's name, "heartbeat", ...} without kernel, initrd, cmdline and boot files."""
    _name(name, "VM")
    if not isinstance(disks, list) or not 1 <= len(disks) <= MAX_DISKS:
        raise Invalid(f"a VM needs 1 to {MAX_DISKS} disks, got {disks!r}")
    specs, images = [], {}
    for disk in disks:
        if not isinstance(disk, dict) or set(disk) - {"name", "size", "format", "image"}:
            raise Invalid(f"each disk is {{name, size, format, image}}, got {disk!r}")
        disk_name = _name(disk.get("name"), "disk")
        if disk.get("image") is not None:
            images[disk_name] = str(disk["image"])
        elif disk.get("size") is None:
            raise Invalid(f"disk {disk_name!r}: give its size, or an image to import")
        specs.append((disk_name, disk.get("size"), disk.get("format", "raw")))
    definition = None
    if guest is not None:
        try:
            definition = GuestDefinition.from_manifest({**guest, "hashes": {}}, f"VM {name!r}")
        except VmSpecError as exc:
            raise Invalid(str(exc)) from None
    elif boot_files:
        raise Invalid("boot files are given with a guest definition only")
    with session_scope() as session:
        row = _host(session, host)
        root, host_name = row.root, row.name
    driver = HostDriver(root, host_name)
    driver.create_vm(name, specs, networks=networks or ["default"], generation=generation, guest=definition,
                     boot_files=boot_files, images=images)
    try:
        return add_vm(host_name, name)
    except BaseException:
        # Refused by the database (a stale registration of that name, say): a refused request leaves nothing,
        # so the VM just made goes too; it is off and nobody else knows of it yet.
        driver.delete_vm(name)
        raise


def _driver_and_name(vm: str) -> tuple[HostDriver, str]:
    with session_scope() as session:
        row = _vm(session, vm)
        host = session.get(Host, row.host_id)
        return HostDriver(host.root, host.name), row.name


@_operation
def start_vm(vm: str) -> dict:
    """Power the VM on: a QEMU guest boots with its disks served through its tracker service."""
    driver, name = _driver_and_name(vm)
    driver.start_vm(name)
    return show_vm(vm)


@_operation
def stop_vm(vm: str, *, timeout: float = 30.0) -> dict:
    """Shut the VM down: a guest through ACPI (QEMU quits after `timeout` seconds), a synthetic VM's workload
    stopped. Returns the VM with how it stopped."""
    if not 1 <= timeout <= 600:
        raise Invalid(f"timeout must be 1 to 600 seconds, got {timeout!r}")
    driver, name = _driver_and_name(vm)
    outcome = driver.shut_down(name, timeout=timeout)
    return {**show_vm(vm), "stopped": outcome.value}


@_operation
def vm_console(vm: str, *, max_bytes: int = 16000) -> dict:
    """The end of a QEMU guest's serial console log."""
    if not 1 <= max_bytes <= CONSOLE_MAX_BYTES:
        raise Invalid(f"max_bytes must be 1 to {CONSOLE_MAX_BYTES}, got {max_bytes!r}")
    driver, name = _driver_and_name(vm)
    current = driver.get_vm(name)
    if current.guest is None:
        raise Invalid(f"VM {name!r} is a synthetic VM: it has no console")
    return {"vm": name, "host": driver.name, "power_state": driver.power_state(name),
            "console": driver.console_log(current, max_bytes)}
