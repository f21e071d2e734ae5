"""Files a VM is made from: disk images imported as its disks, and its boot files (kernel, initrd).

Their paths come from API callers, so each must resolve inside the host's root (a caller cannot make the
host read /etc/shadow as a "kernel"), be a regular file, and an image must be raw or a fixed VHD: QEMU's
and other hypervisors' container formats are recognized by their signatures and refused with the command
that converts them, since reading them as raw would replicate the container's metadata as disk data.
"""
from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from datapath.copy import copy_disk
from datapath.disk import detect_format, open_disk
from datapath.errors import DiskFormatError

from .errors import VmSpecError

BOOT_FILE_MAX = 512 * 1024 * 1024
_COPY_CHUNK = 4 * 1024 * 1024
# Signatures at offset 0 of image formats that are not a raw disk; a fixed VHD has its footer at the end only.
_CONTAINER_SIGNATURES = {
    b"QFI\xfb": "qcow2", b"KDMV": "vmdk", b"# Disk DescriptorFile": "vmdk descriptor", b"vhdxfile": "vhdx",
    b"conectix": "dynamic or differencing VHD", b"QED\x00": "qed", b"WithoutFreeSpace": "parallels",
    b"WithouFreSpacExt": "parallels", b"LUKS\xba\xbe": "luks",
}
# A VDI's text banner varies with its writer (VirtualBox, QEMU); its magic number at offset 64 does not.
_VDI_MAGIC_OFFSET, _VDI_MAGIC = 64, b"\x7f\x10\xda\xbe"


def checked_source(root: Path, path: str | os.PathLike[str], what: str) -> Path:
    """`path` resolved, if it is a regular file inside the host root; VmSpecError otherwise."""
    resolved = Path(path).resolve()
    if not resolved.is_relative_to(root):
        raise VmSpecError(f"{what} {path} resolves to {resolved}, outside the host's root {root}: put it under "
                          f"the root (for example {root / 'images'}) first")
    try:
        mode = os.stat(resolved).st_mode
    except FileNotFoundError:
        raise VmSpecError(f"{what} {path} does not exist") from None
    if not stat.S_ISREG(mode):
        raise VmSpecError(f"{what} {path} is not a regular file")
    return resolved


def image_format(path: Path) -> tuple[str, int]:
    """The format ("raw" or "vhd") and virtual size of an image to import; VmSpecError for anything else."""
    with open(path, "rb") as image:
        head = image.read(512)
    named = next((name for signature, name in _CONTAINER_SIGNATURES.items() if head.startswith(signature)), None)
    if named is None and head[_VDI_MAGIC_OFFSET:_VDI_MAGIC_OFFSET + len(_VDI_MAGIC)] == _VDI_MAGIC:
        named = "vdi"
    if named is not None:
        raise VmSpecError(f"image {path} is a {named} image, not a raw disk or a fixed VHD: convert it first "
                          f"(qemu-img convert -O raw {path} DISK.raw)")
    try:
        fmt = detect_format(path)
        with open_disk(path) as disk:
            size = disk.size
    except DiskFormatError as exc:
        raise VmSpecError(f"image {path}: {exc}") from None
    return fmt, size


def copy_image(source: Path, target: Path) -> None:
    """Copy the guest-visible content of `source` into the new, all-zero disk image `target` (same virtual
    size): the data path's disk copy, which leaves zero chunks as holes."""
    with open_disk(source) as src, open_disk(target, writable=True) as dst:
        copy_disk(src, dst, target_is_zero=True)


def copy_boot_file(source: Path, target: Path) -> str:
    """Copy one boot file, returning its SHA-256 (hex)."""
    if os.stat(source).st_size > BOOT_FILE_MAX:
        raise VmSpecError(f"boot file {source} is larger than {BOOT_FILE_MAX // (1024 * 1024)} MiB")
    digest = hashlib.sha256()
    with open(source, "rb") as src, open(target, "xb") as dst:
        while chunk := src.read(_COPY_CHUNK):
            digest.update(chunk)
            dst.write(chunk)
        dst.flush()
        os.fsync(dst.fileno())
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_COPY_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()

