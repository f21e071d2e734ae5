"""The test guest: a tiny real Linux VM that QEMU boots as a protected VM.

It is built only from Debian packages (sites/guest/build.py): Debian's own kernel (the versioned package
that `linux-image-amd64` depends on, unpacked with `dpkg-deb`, never installed), and an initramfs of
busybox-static, the few kernel modules a virtio disk, ext4, the guest agent's virtio-serial port and the
ACPI power button need, and `init.sh`, its PID 1.

What the guest does (init.sh): it mounts its data disk (/dev/vda, ext4) at /data, checks every file named
in /data/MANIFEST.sha256 against its checksum and prints the verdict on its serial console, then a
heartbeat line; optionally it writes new files at a given rate (the workload), each made durable before
its manifest line, so any crash-consistent copy of the disk passes the next boot's check. It answers the
QEMU guest agent's freeze/thaw/shutdown on a virtio-serial port and shuts down cleanly (unmounting /data)
on an ACPI power button press. The console lines and their patterns are in `guest.json` beside the kernel
(see `GuestImage`); docs/runtime.md describes the protocol.

A VM's data disk is an ext4 image made on the host without mounting it: `make_data_disk`. The guest also
boots from a disk of its own, as a real VM's OS disk: `make_boot_disk` copies the built FAT boot disk
(syslinux, the compressed kernel, the initramfs: sites/guest/bootdisk.py) with the guest's options on its
kernel command line; the guest's data disk is then the first virtio disk that mounts as ext4.
"""
from .bootdisk import make_boot_disk
from .disk import make_data_disk
from .errors import DataDiskError, GuestBuildError
from .image import GuestImage, files_written, load_guest

__all__ = ["BUILDER_VERSION", "DataDiskError", "GuestBuildError", "GuestImage", "build_guest", "files_written",
           "load_guest", "make_boot_disk", "make_data_disk"]


def __getattr__(name: str):
    # The builder is imported on first use, not here: `python -m sites.guest.build` would otherwise find
    # the module imported already by its package and warn.
    if name in ("BUILDER_VERSION", "build_guest"):
        from . import build

        return getattr(build, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
