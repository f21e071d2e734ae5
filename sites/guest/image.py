"""What a built guest is: its boot files and the console lines that tell how it is doing (`guest.json`)."""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import GuestBuildError

GUEST_JSON = "guest.json"
INITRD_NAME = "initrd.img"
# Quiet kernel: only the guest's own lines (and real errors) reach the console log. panic=-1 with
# QEMU's -no-reboot turns a guest that dies into a QEMU that exits.
DEFAULT_CMDLINE = "console=ttyS0 quiet loglevel=3 panic=-1"
HEARTBEAT = r"ASR-GUEST-READY (\S+)"
CHECK_PASS = r"ASR-CHECK: PASS (\d+) files"
CHECK_FAIL = r"ASR-CHECK: FAIL (.*)"
WORKLOAD_PROGRESS = re.compile(r"ASR-WORKLOAD: (\d+) files")


@dataclass(frozen=True)
class GuestImage:
    folder: Path
    kernel: str
    """The kernel's file name in `folder` (the uncompressed vmlinux, booted through PVH)."""
    initrd: str
    cmdline: str
    """The default kernel command line; add `asr.workload=`, `asr.write_files=`, `asr.agent=0` to it."""
    heartbeat: str
    """Regular expression of the line the guest prints once it is up; group 1 is its boot id."""
    check_pass: str
    check_fail: str
    builder_version: str
    inputs: dict
    """What the image was built from (builder version, package names and versions, init script hash):
    the same inputs give the same image, so a build with them is skipped."""
    kernel_sha256: str
    initrd_sha256: str
    boot_disk: str | None = None
    """The bootable disk image's file name in `folder` (sites/guest/bootdisk.py): the same kernel (compressed),
    initramfs and command line behind syslinux on a FAT disk, for a VM that boots from its disk."""
    boot_disk_sha256: str | None = None

    @property
    def kernel_path(self) -> Path:
        return self.folder / self.kernel

    @property
    def initrd_path(self) -> Path:
        return self.folder / self.initrd

    @property
    def boot_disk_path(self) -> Path:
        if self.boot_disk is None:
            raise GuestBuildError(f"the guest in {self.folder} was built without a boot disk: run `make guest`")
        return self.folder / self.boot_disk

    @property
    def hashes(self) -> dict[str, str]:
        """SHA-256 of each boot file, by file name (the form a VM's guest definition records)."""
        return {self.kernel: self.kernel_sha256, self.initrd: self.initrd_sha256}

    def to_json(self) -> dict:
        record = asdict(self)
        del record["folder"]
        return record


def load_guest(folder: Path) -> GuestImage:
    """The guest built in `folder` (by `build_guest`)."""
    folder = Path(folder).resolve()
    try:
        record = json.loads((folder / GUEST_JSON).read_text())
        return GuestImage(folder=folder, **record)
    except FileNotFoundError:
        raise GuestBuildError(f"no guest built in {folder} ({GUEST_JSON} missing): run "
                              f"`python -m sites.guest.build --out {folder}` or `make guest`") from None
    except (ValueError, TypeError) as error:
        raise GuestBuildError(f"{folder / GUEST_JSON} is not a guest description: {error}") from None


def files_written(console: str) -> int:
    """How many files the guest's workload says it wrote in this boot (its `ASR-WORKLOAD: n files` lines)."""
    return max((int(count) for count in WORKLOAD_PROGRESS.findall(console)), default=0)
