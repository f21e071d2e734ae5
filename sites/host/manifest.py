"""The manifest store: each VM as `<root>/vms/<vm>/vm.json` beside its disk images.

Every path built from a name is checked to resolve inside the host's root; a manifest is checked as a
whole when read, and written whole or not at all. Changes to one VM are serialized by a lock file in
its folder.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from datapath.disk import FORMATS, create_disk, parse_size
from datapath.durable import fsync_directory, replace_file
from datapath.errors import PathOutsideRootError
from datapath.vhd import MAX_VIRTUAL_SIZE

from .errors import InvalidNameError, NetworkConfigError, VmExistsError, VmManifestError, VmNotFoundError, VmSpecError
from .guestdef import BOOT_DIR, GuestDefinition
from .images import checked_source, copy_boot_file, copy_image, image_format
from .vm import (
    DISK_SUFFIX,
    NAME,
    STATE_OFF,
    STATES,
    VM_GENERATIONS,
    NetworkAdapter,
    VirtualDisk,
    VirtualMachine,
    canonical_public_ip,
    canonical_subnet,
    checked_command,
    validate_segment,
)

MIB = 1024 * 1024
MANIFEST = "vm.json"
LOCK_FILE = "vm.lock"
FIXED_GUEST_FIELDS = frozenset({"runtime", "kernel", "initrd", "boot_disk", "hashes"})
"""The fields of a guest definition that `redefined` leaves as they are: how the guest boots."""


class VmStore:
    """The VMs of a host rooted at `root`, as manifests and disk images in one folder per VM."""

    def __init__(self, root: str | os.PathLike[str], name: str):
        self.name = validate_segment(name, "host")
        self.root = Path(root).resolve()

    @property
    def vms_dir(self) -> Path:
        return self.root / "vms"

    def create_vm(
        self,
        name: str,
        disks: Sequence[tuple[str, int | str | None, str]],
        *,
        networks: Sequence[str] = ("default",),
        generation: int = 1,
        guest: GuestDefinition | None = None,
        boot_files: Mapping[str, str | os.PathLike[str]] | None = None,
        images: Mapping[str, str | os.PathLike[str]] | None = None,
    ) -> VirtualMachine:
        """Create a VM, off, with disks of (name, size, format "raw"|"vhd"): sparse and all zero, or with the
        content of the image `images` names for that disk (a raw or fixed-VHD file inside the host root; its
        size is the image's when the spec gives None). A QEMU guest (`guest`) also gets its boot files,
        `boot_files` mapping each file name of the definition to a file inside the host root; their SHA-256
        must match the definition's `hashes` when it has them (a recovery VM's files, fetched from storage).

        Everything is checked before anything is written, and the VM folder appears whole or not at
        all (it is assembled in a hidden staging folder and renamed into place)."""
        folder = self._vm_dir(name)
        sources = {disk: checked_source(self.root, path, f"image for disk {disk!r}")
                   for disk, path in (images or {}).items()}
        imported = {disk: image_format(path) for disk, path in sources.items()}
        for disk, (_, image_size) in imported.items():
            if image_size % MIB:  # say why and what to do, not just that the size is wrong
                raise VmSpecError(
                    f"VM {name!r} disk {disk!r}: image {sources[disk]} holds {image_size} bytes, not a whole "
                    f"number of MiB (the replica is a fixed VHD, whose size must be whole MiB): grow a raw copy "
                    f"(qemu-img resize -f raw DISK.raw SIZE), or make the fixed VHD with its exact size "
                    f"(qemu-img convert -O vpc -o subformat=fixed,force_size=on ...)")
        disk_specs = self._check_disk_specs(name, [
            (disk, imported[disk][1] if size is None and disk in imported else size, fmt) for disk, size, fmt in disks
        ])
        unknown = set(sources) - {disk for disk, _, _ in disk_specs}
        if unknown:
            raise VmSpecError(f"VM {name!r}: images given for disks it does not have: {', '.join(sorted(unknown))}")
        for disk, size, _ in disk_specs:
            if disk in imported and imported[disk][1] != size:
                raise VmSpecError(f"VM {name!r} disk {disk!r}: the image holds {imported[disk][1]} bytes, the "
                                  f"disk is to be {size}")
        if guest is not None:
            guest.check_boot_disk([disk for disk, _, _ in disk_specs], f"VM {name!r}")
        boot_sources = self._check_boot_files(name, guest, boot_files)
        adapters = [
            NetworkAdapter(f"nic{i}", validate_segment(network, "network")) for i, network in enumerate(networks)
        ]
        if generation not in VM_GENERATIONS:
            raise VmSpecError(f"VM {name!r}: generation must be 1 or 2, got {generation!r}")
        if guest is not None and guest.boot_disk is not None and generation != 1:
            # QEMU guests boot with SeaBIOS (a BIOS, generation 1): a generation 2 disk expects UEFI firmware.
            raise VmSpecError(f"VM {name!r}: a guest booting from its disk boots through a BIOS (generation 1); "
                              f"UEFI firmware for generation {generation} is not supported")
        if folder.exists():
            raise VmExistsError(f"VM {name!r} already exists on host {self.name!r} ({folder})")

        self.vms_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".creating-{name}-", dir=self.vms_dir))
        staging.chmod(0o755)  # mkdtemp's 0700 would keep other local readers (image tools) out
        try:
            vm_disks = []
            for disk_name, size, fmt in disk_specs:
                file = disk_name + DISK_SUFFIX[fmt]
                create_disk(staging / file, size, fmt)
                if disk_name in sources:
                    copy_image(sources[disk_name], staging / file)
                vm_disks.append(VirtualDisk(str(uuid.uuid4()), disk_name, file, size, fmt, folder / file))
            if guest is not None and guest.boot_files:  # a guest booting from its disk has none
                (staging / BOOT_DIR).mkdir()
                hashes = {file: copy_boot_file(path, staging / BOOT_DIR / file) for file, path in boot_sources.items()}
                wrong = [file for file, digest in hashes.items() if guest.hashes.get(file, digest) != digest]
                if wrong:
                    raise VmSpecError(f"VM {name!r}: boot file(s) {', '.join(wrong)} do not match the SHA-256 the "
                                      f"VM's definition records: refusing to boot files that were changed")
                guest = dataclasses.replace(guest, hashes=hashes)
            vm = VirtualMachine(name, str(uuid.uuid4()), generation, STATE_OFF, vm_disks, adapters, folder, self.name,
                                guest=guest)
            write_json_atomically(staging / MANIFEST, vm.to_manifest())
            try:
                os.rename(staging, folder)
            except OSError as exc:  # created meanwhile by someone else
                raise VmExistsError(f"VM {name!r} already exists on host {self.name!r} ({folder})") from exc
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        fsync_directory(self.vms_dir)
        return vm

    def _check_boot_files(self, name: str, guest: GuestDefinition | None,
                          boot_files: Mapping[str, str | os.PathLike[str]] | None) -> dict[str, Path]:
        if guest is None:
            if boot_files:
                raise VmSpecError(f"VM {name!r}: boot files given for a VM without a guest definition")
            return {}
        given = dict(boot_files or {})
        if guest.boot_disk is not None and given:
            raise VmSpecError(f"VM {name!r}: its guest boots from its disk {guest.boot_disk!r}, whose boot loader "
                              f"loads the kernel: it takes no boot files (got {sorted(given)})")
        if set(given) != set(guest.boot_files):
            raise VmSpecError(f"VM {name!r}: its guest definition boots {guest.boot_files}; give a file for each "
                              f"(got {sorted(given)})")
        return {file: checked_source(self.root, path, f"boot file {file!r}") for file, path in given.items()}

    def get_vm(self, name: str) -> VirtualMachine:
        """The VM as its manifest describes it; VmNotFoundError when there is no such VM."""
        folder = self._vm_dir(name)
        manifest_path = folder / MANIFEST
        try:
            raw = manifest_path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            raise VmNotFoundError(f"VM {name!r} not found on host {self.name!r} (no {manifest_path})") from None
        return self._parse_manifest(name, folder, raw)

    def list_vms(self) -> list[VirtualMachine]:
        """Every VM on the host, by name (folders being created or deleted are not VMs yet or any more)."""
        if not self.vms_dir.is_dir():
            return []
        names = sorted(
            entry.name
            for entry in self.vms_dir.iterdir()
            if NAME.fullmatch(entry.name) and (entry / MANIFEST).is_file()
        )
        return [self.get_vm(name) for name in names]

    def redefined(self, vm: VirtualMachine, *, networks: Mapping[str, str] | None = None,
                  guest: Mapping[str, Any] | None = None) -> VirtualMachine:
        """`vm` with other VM networks for some adapters (adapter name -> network) and other values for some
        fields of its guest definition, checked as a new VM's are; nothing is written. What a VM is made of
        and identified by stays: its name, id, generation, disks, and how its guest boots (kernel, initrd,
        boot disk and their hashes, which travel with its protection)."""
        where = f"VM {vm.name!r} on host {self.name!r}"
        adapters = list(vm.network_adapters)
        for adapter_name, network in (networks or {}).items():
            try:
                vm.adapter(adapter_name)
            except NetworkConfigError as exc:  # no such adapter: a bad definition, as creating one with it
                raise VmSpecError(str(exc)) from None
            validate_segment(network, "network")
            adapters = [dataclasses.replace(a, vm_network=network) if a.name == adapter_name else a for a in adapters]
        definition = vm.guest
        if guest:
            if vm.guest is None:
                raise VmSpecError(f"{where} is a synthetic VM: it has no guest definition to change")
            fixed = sorted(set(guest) & FIXED_GUEST_FIELDS)
            if fixed:
                raise VmSpecError(f"{where}: {', '.join(fixed)} cannot be changed (how the guest boots, and its "
                                  f"boot files' hashes, travel with its protection): create another VM")
            definition = GuestDefinition.from_manifest({**vm.guest.to_manifest(), **guest}, where)
        return dataclasses.replace(vm, network_adapters=adapters, guest=definition)

    def redefine_vm(self, name: str, *, networks: Mapping[str, str] | None = None,
                    guest: Mapping[str, Any] | None = None) -> VirtualMachine:
        """Write what `redefined` makes of the VM as it is now (read under its lock) into its manifest."""
        with self._vm_lock(name) as current:
            changed = self.redefined(current, networks=networks, guest=guest)
            if changed != current:
                self._write_manifest(changed)
            return changed

    def _vm_dir(self, name: str) -> Path:
        folder = self.vms_dir / validate_segment(name, "VM")
        return self._inside_root(folder)

    def _inside_root(self, path: Path) -> Path:
        resolved = path.resolve()
        if not resolved.is_relative_to(self.root):
            raise PathOutsideRootError(f"{path} resolves to {resolved}, outside host {self.name!r} root {self.root}")
        return resolved

    def _disk_of(self, vm: VirtualMachine | str, disk: VirtualDisk | str) -> VirtualDisk:
        current = vm if isinstance(vm, VirtualMachine) else self.get_vm(vm)
        return current.disk(disk.name if isinstance(disk, VirtualDisk) else disk)

    def _check_disk_specs(
        self, vm_name: str, disks: Sequence[tuple[str, int | str, str]]
    ) -> list[tuple[str, int, str]]:
        if not disks:
            raise VmSpecError(f"VM {vm_name!r}: a VM needs at least one disk")
        specs = []
        for disk_name, size, fmt in disks:
            validate_segment(disk_name, "disk")
            if any(disk_name == seen for seen, _, _ in specs):
                raise VmSpecError(f"VM {vm_name!r}: disk name {disk_name!r} is used twice")
            if fmt not in FORMATS:
                raise VmSpecError(f"VM {vm_name!r} disk {disk_name!r}: format must be raw or vhd, got {fmt!r}")
            try:
                # Its file's name is read back by the same rule (a manifest's files are checked as they are read):
                # a 61- to 64-character disk name would make a VM nobody could read, register or delete.
                validate_segment(disk_name + DISK_SUFFIX[fmt], "disk file")
            except InvalidNameError:
                raise VmSpecError(f"VM {vm_name!r} disk {disk_name!r}: a disk name is at most 60 characters (its "
                                  f"file, with {DISK_SUFFIX[fmt]!r}, at most 64)") from None
            try:
                size_bytes = parse_size(size) if isinstance(size, str) else size
            except ValueError as exc:
                raise VmSpecError(f"VM {vm_name!r} disk {disk_name!r}: {exc}") from None
            # The replica is a fixed VHD in Azure, whose virtual size must be a whole number of MiB.
            if not isinstance(size_bytes, int) or isinstance(size_bytes, bool) or size_bytes <= 0 or size_bytes % MIB:
                raise VmSpecError(
                    f"VM {vm_name!r} disk {disk_name!r}: size must be a positive whole number of MiB "
                    f"(the replica is a fixed VHD), got {size!r}"
                )
            # And at most what a fixed VHD holds, whatever the disk's own format: a larger raw disk could never
            # be replicated (and one past what the file system or the OS allows could not even be created).
            if size_bytes > MAX_VIRTUAL_SIZE:
                raise VmSpecError(
                    f"VM {vm_name!r} disk {disk_name!r}: size is at most {MAX_VIRTUAL_SIZE // MIB} MiB "
                    f"(the replica is a fixed VHD, at most 8 TiB with its footer), got {size!r}"
                )
            specs.append((disk_name, size_bytes, fmt))
        return specs

    def _parse_manifest(self, name: str, folder: Path, raw: bytes) -> VirtualMachine:
        where = f"manifest {folder / MANIFEST} of VM {name!r} on host {self.name!r}"
        try:
            data = json.loads(raw)
            if data["name"] != name:
                raise VmManifestError(f"{where} names the VM {data['name']!r}")
            if data["state"] not in STATES or data["generation"] not in VM_GENERATIONS:
                raise VmManifestError(f"{where}: bad state {data['state']!r} or generation {data['generation']!r}")
            disks = []
            for entry in data["disks"]:
                file = validate_segment(entry["file"], "disk file")
                if entry["format"] not in FORMATS or not isinstance(entry["size"], int) or entry["size"] <= 0:
                    raise VmManifestError(f"{where}: bad format or size for disk {entry['name']!r}")
                disks.append(VirtualDisk(
                    str(uuid.UUID(entry["id"])), validate_segment(entry["name"], "disk"), file,
                    entry["size"], entry["format"], self._inside_root(folder / file),
                ))
            adapters = [
                NetworkAdapter(
                    validate_segment(a["name"], "network adapter"), validate_segment(a["vm_network"], "network"),
                    canonical_subnet(a.get("subnet"), f"{where}, adapter {a['name']!r}"),
                    canonical_public_ip(a.get("public_ip")),
                )
                for a in data["network_adapters"]
            ]
            quiesce = data.get("quiesce") or {}
            guest = None if data.get("guest") is None else GuestDefinition.from_manifest(data["guest"], where)
            if guest is not None:
                guest.check_boot_disk([disk.name for disk in disks], where)
            return VirtualMachine(
                name, str(uuid.UUID(data["id"])), data["generation"], data["state"], disks, adapters, folder, self.name,
                checked_command(quiesce.get("pre"), f"{where}: quiesce pre command", VmManifestError),
                checked_command(quiesce.get("post"), f"{where}: quiesce post command", VmManifestError),
                guest,
            )
        except VmManifestError:
            raise
        except VmSpecError as exc:
            raise VmManifestError(str(exc)) from None
        except (ValueError, KeyError, TypeError, AttributeError, PathOutsideRootError, NetworkConfigError) as exc:
            raise VmManifestError(f"{where} is invalid: {exc}") from exc

    def _write_manifest(self, vm: VirtualMachine) -> None:
        write_json_atomically(vm.path / MANIFEST, vm.to_manifest())

    @contextlib.contextmanager
    def _vm_lock(self, name: str) -> Iterator[VirtualMachine]:
        """Serialize changes to one VM (several host-agent tasks may act on it at once); yields the VM
        as read under the lock."""
        self.get_vm(name)
        folder = self._vm_dir(name)
        with open(folder / LOCK_FILE, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield self.get_vm(name)  # again: it may have changed, or gone, while we waited


def write_json_atomically(path: Path, data: dict) -> None:
    replace_file(path, json.dumps(data, indent=2, sort_keys=True).encode())
