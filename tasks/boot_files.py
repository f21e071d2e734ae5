"""A QEMU guest's boot files (kernel, initrd) travel with its protection, as ASR replicates a VM's
configuration: uploaded to the recovery storage beside its replicas when protection is enabled, fetched
by the recovery host when a failover creates the recovery VM.

The storage is not trusted: the SHA-256 of every boot file is recorded in the database when the VM is
registered, the primary's files are checked against it before upload, and the recovery host creates the VM
only from files matching it (sites/host/manifest.py), so a changed kernel in the storage account does not
boot.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from datapath.errors import NonRecoverableError
from sites.host import Host as HostDriver
from sites.host.guestdef import BOOT_DIR, GuestDefinition
from sites.host.images import file_sha256
from sites.storage.base import RecoveryStorage, validate_name
from workflows.items import ItemView


def guest_of(view: ItemView) -> GuestDefinition | None:
    """The VM's guest definition as registered (with its boot files' hashes), or None for a synthetic VM."""
    if view.vm.guest is None:
        return None
    return GuestDefinition.from_manifest(view.vm.guest, f"VM {view.vm.name!r} as registered")


def boot_object(view: ItemView, file: str) -> str:
    folder = view.item.replica_folder or f"{view.host.name}/{view.vm.name}"
    return validate_name(f"{folder}/{BOOT_DIR}/{file}")


def upload_boot_files(view: ItemView, driver: HostDriver, storage: RecoveryStorage) -> list[str]:
    """Upload the guest's boot files from the primary, each checked against its registered hash first."""
    guest = guest_of(view)
    if guest is None:
        return []
    folder = driver.get_vm(view.vm.name).path / BOOT_DIR
    for file in guest.boot_files:
        path = folder / file
        if not path.is_file() or file_sha256(path) != guest.hashes.get(file):
            raise NonRecoverableError(
                f"VM {view.vm.name!r} on host {view.host.name!r}: boot file {file} is missing or differs from the "
                f"one registered (SHA-256 {guest.hashes.get(file)}); register the VM again if it was changed on "
                f"purpose")
        with open(path, "rb") as source:
            storage.put_object(boot_object(view, file), source)
    return guest.boot_files


def fetch_boot_files(view: ItemView, storage: RecoveryStorage, driver: HostDriver) -> tuple[Path, dict[str, Path]]:
    """Fetch the guest's boot files into a new folder inside the recovery host's root (the caller removes
    it); their hashes are checked when the VM is created from them."""
    guest = guest_of(view)
    assert guest is not None
    driver.root.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=".incoming-", dir=driver.root))
    files = {}
    for file in guest.boot_files:
        with open(folder / file, "wb") as target:
            storage.get_object(boot_object(view, file), target)
        files[file] = folder / file
    return folder, files


__all__ = ["boot_object", "fetch_boot_files", "guest_of", "upload_boot_files"]
