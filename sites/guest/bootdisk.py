"""The test guest's bootable disk: the same kernel, initramfs and command line as its direct-kernel boot,
on a disk that a BIOS boots by itself, as a real VM's OS disk does.

The disk is one FAT file system over the whole image (a "superfloppy": no partition table), holding the
compressed kernel (`vmlinuz`, the bzImage of Debian's package: a boot loader loads a bzImage, not the
ELF vmlinux the direct-kernel boot uses), the initramfs and `syslinux.cfg`; `syslinux --install` writes its
boot sector and ldlinux.sys. SeaBIOS, QEMU's BIOS, runs that boot sector from the drive with bootindex 0.
All of it is written to the unmounted image with dosfstools and mtools: no loop device, no root.

A VM's boot disk is a copy of the built one (`make_boot_disk`) with the guest's options (asr.workload=,
asr.write_files=, ...) appended to its command line in its own syslinux.cfg: as on a real OS disk, how the
kernel is started is the disk's business, not the VM definition's.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .commands import run_build_command
from .errors import DataDiskError, GuestBuildError

BOOT_DISK_NAME = "bootdisk.raw"
BOOT_DISK_SIZE = 16 << 20
"""Room for the ~8 MiB kernel and ~2 MiB initramfs; whole MiB, as an imported disk must be."""
KERNEL_FILE = "vmlinuz"
INITRD_FILE = "initrd.img"
CONFIG_FILE = "syslinux.cfg"
VOLUME_LABEL = "ASRBOOT"
VOLUME_ID = "41535230"  # fixed rather than random: one input less that differs between two builds
TOOL_PACKAGES = {"mkfs.fat": "dosfstools", "mcopy": "mtools", "syslinux": "syslinux"}
COMMAND_TIMEOUT_S = 120
_MTOOLS_ENV = {"MTOOLS_SKIP_CHECK": "1"}  # an image file has no floppy geometry to check


def write_boot_disk(target: Path, vmlinuz: Path, initrd: Path, cmdline: str) -> None:
    """Write a bootable FAT disk image at `target` (replaced) that boots `vmlinuz` with `initrd` and
    `cmdline` through syslinux."""
    target = Path(target)
    _check_cmdline(cmdline)
    with tempfile.TemporaryDirectory(prefix=".bootdisk-", dir=target.parent) as work:
        image = Path(work) / target.name
        with open(image, "wb") as blank:
            blank.truncate(BOOT_DISK_SIZE)
        _tool(["mkfs.fat", "-n", VOLUME_LABEL, "-i", VOLUME_ID, str(image)], "making the FAT file system")
        _tool(["mcopy", "-i", str(image), str(vmlinuz), f"::{KERNEL_FILE}"], "copying the kernel in")
        _tool(["mcopy", "-i", str(image), str(initrd), f"::{INITRD_FILE}"], "copying the initramfs in")
        _put_config(image, cmdline)
        _tool(["syslinux", "--install", str(image)], "installing syslinux's boot sector and ldlinux.sys")
        os.replace(image, target)


def make_boot_disk(path: Path, guest, extra_cmdline: str = "") -> Path:
    """Create `path` as a VM's boot disk: a copy of `guest`'s built boot disk (a GuestImage) whose kernel
    command line is the guest's default with `extra_cmdline` appended (asr.workload=..., asr.agent=0).
    Refuses to overwrite an existing file."""
    path = Path(path)
    cmdline = f"{guest.cmdline} {extra_cmdline}".strip()
    try:
        _check_cmdline(cmdline)
    except GuestBuildError as error:
        raise DataDiskError(str(error)) from None
    if not guest.boot_disk_path.is_file():
        raise DataDiskError(f"the guest in {guest.folder} has no boot disk {guest.boot_disk}: run `make guest`")
    try:
        with open(path, "xb") as target, open(guest.boot_disk_path, "rb") as source:
            shutil.copyfileobj(source, target, 1 << 20)
    except FileExistsError:
        raise DataDiskError(f"boot disk {path} exists already: not overwriting it") from None
    try:
        _put_config(path, cmdline)
    except GuestBuildError as error:
        path.unlink(missing_ok=True)
        raise DataDiskError(f"boot disk {path}: {error}") from None
    return path


def boot_disk_tool_versions() -> dict[str, str]:
    """The installed versions of the packages that write the boot disk (they are inputs of the build)."""
    for command, package in TOOL_PACKAGES.items():
        if shutil.which(command) is None and shutil.which(command, path="/usr/sbin:/sbin") is None:
            raise GuestBuildError(f"{command} is not installed (Debian: {package}; scripts/ensure-tools.sh {command}): "
                                  f"the guest's boot disk is written with dosfstools, mtools and syslinux")
    return {package: _installed_version(package) for package in sorted(set(TOOL_PACKAGES.values()))}


def _put_config(image: Path, cmdline: str) -> None:
    config = (f"DEFAULT guest\nPROMPT 0\nTIMEOUT 0\nLABEL guest\n  KERNEL {KERNEL_FILE}\n  INITRD {INITRD_FILE}\n"
              f"  APPEND {cmdline}\n")
    with tempfile.NamedTemporaryFile("w", prefix=".syslinux-", suffix=".cfg", dir=image.parent) as file:
        file.write(config)
        file.flush()
        _tool(["mcopy", "-o", "-i", str(image), file.name, f"::{CONFIG_FILE}"], "writing syslinux.cfg")


def _check_cmdline(cmdline: str) -> None:
    # syslinux reads its APPEND line up to the end of the line; its command line is limited to 2047 bytes.
    if not cmdline.isprintable() or len(cmdline.encode()) > 1024:
        raise GuestBuildError(f"kernel command line {cmdline!r} must be one printable line of at most 1024 bytes")


def _installed_version(package: str) -> str:
    return _tool(["dpkg-query", "-W", "-f", "${Version}", package], f"looking up the installed {package}").strip()


def _tool(command: list[str], what: str) -> str:
    executable = shutil.which(command[0]) or shutil.which(command[0], path="/usr/sbin:/sbin") or command[0]
    return run_build_command([executable, *command[1:]], what, timeout=COMMAND_TIMEOUT_S,
                             env={**os.environ, **_MTOOLS_ENV},
                             missing=f"Debian: {TOOL_PACKAGES.get(command[0], command[0])}")
