"""The VM verbs of `asr` that act on the VM itself: create it on a host, start it, stop it, read its console.
(`asr vm add|list|show` are in api/cli_fabric.py.)"""
from __future__ import annotations

from pathlib import Path

import click

from api.cli_fabric import vm
from api.cli_output import _emit_json, json_option, print_fields
from api.cli_service import _command, _service


def _disk_option(text: str) -> dict:
    """NAME=SIZE[:FORMAT] or NAME=@IMAGE[:FORMAT]."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise click.BadParameter(f"{text!r}: use NAME=SIZE[:FORMAT] (data=64M:raw) or NAME=@IMAGE (os=@images/os.raw)")
    value, _, fmt = rest.partition(":")
    disk: dict = {"name": name, "format": fmt or "raw"}
    if value.startswith("@"):
        disk["image"] = str(Path(value[1:]).resolve())
    else:
        disk["size"] = value
    return disk


@_command(vm, "create")
@click.argument("host_name", metavar="HOST")
@click.argument("name")
@click.option("--disk", "disks", multiple=True, required=True, metavar="NAME=SIZE[:FORMAT] | NAME=@IMAGE",
              help="A disk: its size (64M, 1G) and format (raw or vhd), or an image inside the host's root to "
                   "import (raw or fixed VHD). Repeat for more disks; the first is the OS disk.")
@click.option("--network", "networks", multiple=True, metavar="NETWORK", help="A VM network per adapter.")
@click.option("--generation", type=click.IntRange(1, 2), default=1, show_default=True)
@click.option("--kernel", type=click.Path(dir_okay=False), help="Makes the VM a QEMU guest booting this kernel "
              "(a file inside the host's root).")
@click.option("--boot-disk", metavar="DISK", help="Makes the VM a QEMU guest booting from its disk DISK (one of "
              "--disk's names, e.g. an imported bootable image: os=@images/os.raw --boot-disk os): the BIOS runs "
              "the disk's boot loader, which loads the kernel and its command line. Instead of --kernel.")
@click.option("--initrd", type=click.Path(dir_okay=False), help="Its initrd (inside the host's root).")
@click.option("--cmdline", help="The kernel command line with --kernel (default: console=ttyS0; keep a serial "
              "console: the engine reads the heartbeat there). A boot disk's is on the disk.")
@click.option("--heartbeat", help="Regex: the guest is up once a line of its serial console matches it.")
@click.option("--check-pass", help="Regex on the console: the guest's own application check passed.")
@click.option("--check-fail", help="Regex on the console: the guest's own application check failed.")
@click.option("--memory", "memory_mb", type=int, default=256, show_default=True, help="Guest memory (MiB).")
@click.option("--guest-agent/--no-guest-agent", default=True, show_default=True,
              help="Whether the guest answers the QEMU guest agent (freeze/thaw for app-consistent points).")
@click.option("--boot-timeout", "boot_timeout_s", type=float, default=120.0, show_default=True,
              help="Seconds a boot may take to reach the heartbeat.")
@json_option
def vm_create(host_name: str, name: str, disks: tuple[str, ...], networks: tuple[str, ...], generation: int,
              kernel: str | None, boot_disk: str | None, initrd: str | None, cmdline: str | None,
              heartbeat: str | None, check_pass: str | None, check_fail: str | None, memory_mb: int,
              guest_agent: bool, boot_timeout_s: float, as_json: bool):
    """Create VM NAME on HOST, off, and register it. With --kernel (direct-kernel boot) or --boot-disk (boots
    from one of its disks) it is a QEMU guest (docs/runtime.md)."""
    guest = boot_files = None
    if kernel and boot_disk:
        raise click.UsageError("give --kernel (QEMU loads the kernel) or --boot-disk (the disk's boot loader "
                               "does), not both")
    if boot_disk and (initrd or cmdline is not None):
        raise click.UsageError("--initrd and --cmdline go with --kernel: a boot disk's boot loader has its own")
    if kernel or boot_disk:
        if not heartbeat:
            raise click.UsageError("a QEMU guest needs --heartbeat: how the engine knows it came up")
        guest = {"heartbeat": heartbeat, "check_pass": check_pass, "check_fail": check_fail,
                 "memory_mb": memory_mb, "guest_agent": guest_agent, "boot_timeout_s": boot_timeout_s}
        if boot_disk:
            guest["boot_disk"] = boot_disk
        else:
            boot_files = {Path(kernel).name: str(Path(kernel).resolve())}
            if initrd:
                boot_files[Path(initrd).name] = str(Path(initrd).resolve())
            guest.update({"kernel": Path(kernel).name, "initrd": Path(initrd).name if initrd else None,
                          "cmdline": "console=ttyS0" if cmdline is None else cmdline})
    elif initrd or cmdline is not None or heartbeat or check_pass or check_fail:
        raise click.UsageError("--initrd, --cmdline, --heartbeat and the checks describe a QEMU guest: give "
                               "--kernel or --boot-disk too")
    result = _service().create_vm(host_name, name, disks=[_disk_option(d) for d in disks],
                                  networks=list(networks) or None, generation=generation, guest=guest,
                                  boot_files=boot_files)
    if as_json:
        return _emit_json(result)
    click.echo(f"VM {result.get('name', name)} created on {host_name} ({result.get('runtime')}), off: "
               f"{len(result.get('disks') or [])} disk(s) (id {result.get('id')}). Start it with `asr vm start "
               f"{host_name}/{name}`")


@_command(vm, "start")
@click.argument("vm_name", metavar="VM")
@json_option
def vm_start(vm_name: str, as_json: bool):
    """Power VM on: a QEMU guest boots, its disks served through its tracker service."""
    result = _service().start_vm(vm_name)
    if as_json:
        return _emit_json(result)
    print_fields(result, [("name", "name"), ("host", "host"), ("runtime", "runtime"), ("power", "power_state")])


@_command(vm, "stop")
@click.argument("vm_name", metavar="VM")
@click.option("--timeout", type=click.FloatRange(1, 600), default=30.0, show_default=True,
              help="Seconds the guest may take to power off through ACPI before QEMU is stopped.")
@json_option
def vm_stop(vm_name: str, timeout: float, as_json: bool):
    """Shut VM down: a guest through ACPI, then QEMU quit, then kill; a synthetic VM's workload stopped."""
    result = _service().stop_vm(vm_name, timeout=timeout)
    if as_json:
        return _emit_json(result)
    print_fields(result, [("name", "name"), ("host", "host"), ("power", "power_state"), ("stopped", "stopped")])


@_command(vm, "console")
@click.argument("vm_name", metavar="VM")
@click.option("--bytes", "max_bytes", type=click.IntRange(1, 65536), default=16000, show_default=True)
@json_option
def vm_console(vm_name: str, max_bytes: int, as_json: bool):
    """The end of a QEMU guest's serial console log."""
    result = _service().vm_console(vm_name, max_bytes=max_bytes)
    if as_json:
        return _emit_json(result)
    click.echo(result.get("console", ""), nl=False)
