"""Builds the test guest from Debian packages: `python -m sites.guest.build --out DIR`.

Into DIR go the kernel (`vmlinux-<version>`: Debian's kernel, uncompressed, since QEMU boots an ELF
kernel through PVH and the guest then skips ~3 s of decompression under TCG), `initrd.img` (busybox-static,
the modules in MODULES, init.sh), `bootdisk.raw` (the same kernel, compressed, initramfs and command line on
a FAT disk that boots through syslinux: sites/guest/bootdisk.py) and `guest.json` (see image.GuestImage).
The kernel package is downloaded with `apt-get download` into DIR/debs and unpacked with `dpkg-deb -x`:
nothing is installed system-wide.
A build whose inputs (builder version, package versions, init script) match DIR's guest.json does nothing.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path

from . import initramfs
from .bootdisk import BOOT_DISK_NAME, BOOT_DISK_SIZE, boot_disk_tool_versions, write_boot_disk
from .commands import run_build_command
from .errors import GuestBuildError
from .image import CHECK_FAIL, CHECK_PASS, DEFAULT_CMDLINE, GUEST_JSON, HEARTBEAT, INITRD_NAME, GuestImage

BUILDER_VERSION = "2"
"""Change it whenever the builder makes a different image from the same packages."""
KERNEL_META_PACKAGE = "linux-image-amd64"
BUSYBOX = Path("/bin/busybox")
BUSYBOX_PACKAGE = "busybox-static"
INIT_SCRIPT = Path(__file__).with_name("init.sh")
# Load order (modprobe resolves the rest, but ext4's metadata checksums need crc32c_generic, which no
# module depends on). virtio_console: the guest agent's port; button + evdev: the ACPI power button
# as an input device the init script can wait on.
MODULES = ("virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci", "virtio_blk",
           "virtio_console", "crc32c_generic", "crc16", "mbcache", "jbd2", "ext4", "button", "evdev")
COMMAND_TIMEOUT_S = 600
_XZ_MAGIC = b"\xfd7zXZ\x00"
_ELF_MAGIC = b"\x7fELF"
_PT_INTERP = 3


def build_guest(out: Path, log=print) -> GuestImage:
    """Build the guest into `out` (created if needed) unless it holds one built from the same inputs."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    kernel_package, kernel_version = _kernel_package()
    inputs = {
        "builder_version": BUILDER_VERSION,
        "kernel_package": kernel_package,
        "kernel_package_version": kernel_version,
        "busybox_version": _installed_version(BUSYBOX_PACKAGE),
        "init_sha256": hashlib.sha256(INIT_SCRIPT.read_bytes()).hexdigest(),
        "boot_disk_tools": boot_disk_tool_versions(),
    }
    current = _current_guest(out)
    if current is not None and current.inputs == inputs:
        log(f"guest in {out} is up to date ({kernel_package} {kernel_version}, builder {BUILDER_VERSION}): "
            f"nothing to do")
        return current

    deb = _download(kernel_package, kernel_version, out / "debs")
    with tempfile.TemporaryDirectory(prefix=".build-", dir=out) as work:
        unpacked = Path(work) / "package"
        _run(["dpkg-deb", "-x", str(deb), str(unpacked)], f"unpacking {deb.name}")
        release = _kernel_release(unpacked, kernel_package)
        vmlinuz = unpacked / "boot" / f"vmlinuz-{release}"
        kernel_name = f"vmlinux-{release}"
        (Path(work) / kernel_name).write_bytes(extract_vmlinux(vmlinuz.read_bytes()))
        root = Path(work) / "root"
        _stage_modules(unpacked, root, release)
        (Path(work) / INITRD_NAME).unlink(missing_ok=True)
        initramfs.write_initramfs(Path(work) / INITRD_NAME, _initramfs_entries(root))
        write_boot_disk(Path(work) / BOOT_DISK_NAME, vmlinuz, Path(work) / INITRD_NAME, DEFAULT_CMDLINE)
        for name in (kernel_name, INITRD_NAME, BOOT_DISK_NAME):
            os.replace(Path(work) / name, out / name)
    if current is not None and current.kernel != kernel_name:
        (out / current.kernel).unlink(missing_ok=True)
    image = GuestImage(
        folder=out, kernel=kernel_name, initrd=INITRD_NAME, cmdline=DEFAULT_CMDLINE, heartbeat=HEARTBEAT,
        check_pass=CHECK_PASS, check_fail=CHECK_FAIL, builder_version=BUILDER_VERSION, inputs=inputs,
        kernel_sha256=_sha256(out / kernel_name), initrd_sha256=_sha256(out / INITRD_NAME),
        boot_disk=BOOT_DISK_NAME, boot_disk_sha256=_sha256(out / BOOT_DISK_NAME),
    )
    temporary = out / f".{GUEST_JSON}.tmp"
    temporary.write_text(json.dumps(image.to_json(), indent=2) + "\n")
    os.replace(temporary, out / GUEST_JSON)  # written last: a build cut short is redone
    log(f"built guest in {out}: {kernel_name} ({(out / kernel_name).stat().st_size >> 20} MiB), "
        f"{INITRD_NAME} ({(out / INITRD_NAME).stat().st_size >> 10} KiB), {BOOT_DISK_NAME} "
        f"({BOOT_DISK_SIZE >> 20} MiB)")
    return image


def extract_vmlinux(vmlinuz: bytes) -> bytes:
    """The uncompressed ELF kernel inside a bzImage (what the kernel's scripts/extract-vmlinux does):
    the xz stream that decompresses to an ELF image. Debian's 6.1 kernels are xz-compressed."""
    start = vmlinuz.find(_XZ_MAGIC)
    while start != -1:
        try:
            payload = lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(vmlinuz[start:])
        except lzma.LZMAError:
            payload = b""
        if payload.startswith(_ELF_MAGIC):
            return payload
        start = vmlinuz.find(_XZ_MAGIC, start + 1)
    raise GuestBuildError("no xz-compressed ELF kernel found in the vmlinuz (a kernel not compressed with xz?)")


def _kernel_package() -> tuple[str, str]:
    """The versioned kernel package linux-image-amd64 depends on, and its candidate version."""
    depends = _run(["apt-cache", "depends", KERNEL_META_PACKAGE], f"resolving {KERNEL_META_PACKAGE}")
    names = [line.split(":", 1)[1].strip() for line in depends.splitlines()
             if line.strip().startswith("Depends:") and "linux-image-" in line]
    if not names:
        raise GuestBuildError(f"{KERNEL_META_PACKAGE} depends on no linux-image package here:\n{depends}")
    show = _run(["apt-cache", "show", "--no-all-versions", names[0]], f"looking up {names[0]}")
    versions = [line.split(":", 1)[1].strip() for line in show.splitlines() if line.startswith("Version:")]
    if not versions:
        raise GuestBuildError(f"apt-cache knows no version of {names[0]}")
    return names[0], versions[0]


def _installed_version(package: str) -> str:
    if not BUSYBOX.exists():
        raise GuestBuildError(f"{BUSYBOX} is missing: install {BUSYBOX_PACKAGE} (scripts/ensure-tools.sh busybox)")
    if _has_interpreter(BUSYBOX.read_bytes()):
        raise GuestBuildError(f"{BUSYBOX} is dynamically linked (Debian's busybox package?): the guest has no C "
                              f"library, install {BUSYBOX_PACKAGE}")
    return _run(["dpkg-query", "-W", "-f", "${Version}", package], f"looking up the installed {package}").strip()


def _download(package: str, version: str, cache: Path) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    matches = sorted(cache.glob(f"{package}_*.deb"))
    wanted = [deb for deb in matches if deb.name.startswith(f"{package}_{version.replace(':', '%3a')}_")]
    if wanted:
        return wanted[0]
    _run(["apt-get", "download", "-q", f"{package}={version}"],
         f"downloading {package} {version} (needs the network and Debian's package lists: apt-get update)",
         cwd=cache)
    for stale in matches:  # an older kernel package of an earlier build
        stale.unlink()
    downloaded = sorted(cache.glob(f"{package}_*.deb"))
    if not downloaded:
        raise GuestBuildError(f"apt-get download {package}={version} left no .deb in {cache}")
    return downloaded[0]


def _has_interpreter(elf: bytes) -> bool:
    """Whether a 64-bit little-endian ELF executable names a program interpreter (PT_INTERP): it is
    dynamically linked."""
    if elf[:4] != _ELF_MAGIC or elf[4] != 2:
        raise GuestBuildError(f"{BUSYBOX} is not a 64-bit ELF executable")
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    return any(struct.unpack_from("<I", elf, phoff + index * phentsize)[0] == _PT_INTERP for index in range(phnum))


def _kernel_release(unpacked: Path, package: str) -> str:
    releases = [path.name for path in (unpacked / "lib" / "modules").iterdir() if path.is_dir()]
    if len(releases) != 1 or not (unpacked / "boot" / f"vmlinuz-{releases[0]}").exists():
        raise GuestBuildError(f"{package} does not hold one kernel and its modules (found {releases})")
    return releases[0]


def _stage_modules(unpacked: Path, root: Path, release: str) -> None:
    """Copy the guest's modules into `root`'s /lib/modules/<release>, with a modules.dep from busybox's
    depmod (the package ships none: Debian's postinst makes it)."""
    source = unpacked / "lib" / "modules" / release
    found = {path.name.split(".ko")[0].replace("-", "_"): path for path in (source / "kernel").rglob("*.ko*")}
    missing = [name for name in MODULES if name not in found]
    if missing:
        raise GuestBuildError(f"kernel {release} has no module {', '.join(missing)} (built in? then drop them "
                              f"from MODULES)")
    for name in MODULES:
        target = root / "lib" / "modules" / release / found[name].relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(found[name], target)
    _run([str(BUSYBOX), "depmod", "-b", str(root), release], "building modules.dep")


def _initramfs_entries(root: Path) -> list[initramfs.Entry]:
    applets = _run([str(BUSYBOX), "--list"], "listing busybox's applets").split()
    entries = [initramfs.directory(name) for name in ("bin", "dev", "etc", "proc", "sys", "run", "data", "tmp")]
    entries += [
        initramfs.symlink("sbin", "bin"),
        initramfs.char_device("dev/console", 5, 1),  # init's stdout before devtmpfs is mounted
        initramfs.file("bin/busybox", BUSYBOX.read_bytes(), executable=True),
        initramfs.file("init", INIT_SCRIPT.read_bytes(), executable=True),
        initramfs.file("etc/asr-modules", "".join(f"{name}\n" for name in MODULES).encode()),
    ]
    entries += [initramfs.symlink(f"bin/{applet}", "busybox") for applet in sorted(set(applets)) if applet != "busybox"]
    entries += [initramfs.directory("lib")] + initramfs.tree(root / "lib", "lib")
    return entries


def _run(command: list[str], what: str, cwd: Path | None = None) -> str:
    return run_build_command(command, what, timeout=COMMAND_TIMEOUT_S, cwd=cwd,
                             missing="the guest is built from Debian packages with apt-get and dpkg-deb: build it "
                                     "on Debian or Ubuntu")


def _current_guest(out: Path) -> GuestImage | None:
    from .image import load_guest

    try:
        image = load_guest(out)
    except GuestBuildError:
        return None
    if image.boot_disk is None:
        return None  # built by an earlier builder
    intact = all(path.exists() and _sha256(path) == digest for path, digest in (
        (image.kernel_path, image.kernel_sha256), (image.initrd_path, image.initrd_sha256),
        (image.boot_disk_path, image.boot_disk_sha256)))
    return image if intact else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        while chunk := source.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sites.guest.build", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the folder to build the guest into")
    arguments = parser.parse_args(argv)
    try:
        build_guest(arguments.out)
    except GuestBuildError as error:
        print(f"cannot build the guest: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
