"""Client-side encryption of a recovery storage: `EncryptedStorage` wraps any backend (local directory, Azure
page and block blobs) so that what the backend holds is ciphertext and the keys stay with the engine.

- Replica disks: AES-256-XTS per 4 KiB sector (`encrypted_disk.EncryptedDisk`); the VHD footer (which
  holds no guest data) and the page-blob layout are the backend's, unchanged.
- Objects (shipped and undo logs, manifests, state, failback and boot files): AES-256-GCM in 1 MiB
  segments (`sealed`), authenticated with their name.
- Keys (`keys`): each folder's data key, wrapped by the deployment's key-encryption key, is the object
  `<folder>/asr-data-key.json`; it is made with the folder's first disk or object, never replaced, hidden
  from `list_objects` and refused as a name to callers.

`open_encrypted(storage)` is what the engine opens (tasks.recovery_storage.open_recovery_storage), unless
ASR_STORAGE_ENCRYPTION=off, which is logged as insecure.
"""
from __future__ import annotations

import logging
import threading
from typing import BinaryIO

from datapath.endpoint import DiskEndpoint
from datapath.errors import ObjectAuthenticationError, PathOutsideRootError, StorageKeyError

from .base import ObjectNotFoundError, RecoveryStorage, validate_name
from .encrypted_disk import XTS_KEY_BYTES, EncryptedDisk, disk_key_purpose
from .keys import (
    DataKey,
    KeyEncryptionKey,
    folder_of,
    is_key_object,
    key_object_name,
    load_kek,
    new_data_key,
    unwrap_data_key,
    wrap_data_key,
)
from .sealed import OpeningWriter, SealingReader, open_bytes, seal_bytes

log = logging.getLogger(__name__)


class EncryptedStorage(RecoveryStorage):
    """`inner` with every disk and object encrypted under data keys wrapped by `kek`."""

    def __init__(self, inner: RecoveryStorage, kek: KeyEncryptionKey):
        self.inner = inner
        self.kek = kek
        self.description = f"{inner.description} (encrypted, key-encryption key id {kek.key_id})"
        self._keys: dict[str, DataKey] = {}
        self._lock = threading.Lock()

    def __getattr__(self, attribute: str):  # backend details callers read (parallelism, root, container)
        if attribute.startswith("_") or attribute in ("inner", "kek"):
            raise AttributeError(attribute)
        return getattr(self.inner, attribute)

    # ---- data keys ------------------------------------------------------------------------------
    def data_key(self, name: str, *, create: bool) -> DataKey:
        """The data key of `name`'s folder; made and stored first when `create` and there is none."""
        folder = folder_of(name)
        with self._lock:
            cached = self._keys.get(folder)
        if cached is not None:
            return cached
        key_name = key_object_name(folder)
        try:
            raw = self.inner.read_object(key_name)
        except ObjectNotFoundError:
            if not create:
                raise ObjectNotFoundError(
                    f"{name} cannot be read from {self.inner.description}: its folder has no data key "
                    f"({key_name} is missing), so nothing encrypted there can be opened") from None
            fresh = new_data_key(folder)
            if not self.inner.put_new_object(key_name, wrap_data_key(fresh, self.kek)):
                raw = self.inner.read_object(key_name)  # another process made it first: use theirs
                key = unwrap_data_key(raw, folder, self.kek, where=self.inner.description)
            else:
                key = fresh
        else:
            key = unwrap_data_key(raw, folder, self.kek, where=self.inner.description)
        with self._lock:
            self._keys.setdefault(folder, key)
            return self._keys[folder]

    @staticmethod
    def _checked(name: str) -> str:
        validate_name(name)
        if is_key_object(name):
            raise PathOutsideRootError(f"{name!r} is reserved for the recovery storage's data keys")
        return name

    # ---- replica disks --------------------------------------------------------------------------
    def create_disk(self, name: str, size: int) -> None:
        self.data_key(self._checked(name), create=True)
        self.inner.create_disk(name, size)

    def open_disk(self, name: str) -> DiskEndpoint:
        key = self.data_key(self._checked(name), create=False)
        inner = self.inner.open_disk(name)
        return EncryptedDisk(inner, key.derive(disk_key_purpose(), name, XTS_KEY_BYTES))

    def disk_exists(self, name: str) -> bool:
        return self.inner.disk_exists(self._checked(name))

    def delete_disk(self, name: str) -> None:
        self.inner.delete_disk(self._checked(name))

    # ---- objects --------------------------------------------------------------------------------
    def put_object(self, name: str, src: BinaryIO | bytes) -> int:
        key = self.data_key(self._checked(name), create=True)
        if isinstance(src, (bytes, bytearray, memoryview)):
            self.inner.put_object(name, seal_bytes(bytes(src), key, name))
            return len(src)
        reader = SealingReader(src, key, name)
        self.inner.put_object(name, reader)
        return reader.plain_bytes

    def put_new_object(self, name: str, data: bytes) -> bool:
        key = self.data_key(self._checked(name), create=True)
        return self.inner.put_new_object(name, seal_bytes(bytes(data), key, name))

    def get_object(self, name: str, dst: BinaryIO) -> int:
        key = self._key_for_reading(name)
        writer = OpeningWriter(dst, key, name, self.inner.description)
        self.inner.get_object(name, writer)
        return writer.finish()

    def read_object(self, name: str) -> bytes:
        key = self._key_for_reading(name)
        return open_bytes(self.inner.read_object(name), key, name, self.inner.description)

    def _key_for_reading(self, name: str) -> DataKey:
        self._checked(name)
        try:
            return self.data_key(name, create=False)
        except ObjectNotFoundError:
            if not self.inner.object_exists(name):
                raise ObjectNotFoundError(f"object {name} does not exist in {self.inner.description}") from None
            raise ObjectAuthenticationError(
                f"object {name} in {self.inner.description} cannot be authenticated: its folder's data key "
                f"({key_object_name(folder_of(name))}) is missing", object_name=name) from None

    def object_exists(self, name: str) -> bool:
        return self.inner.object_exists(self._checked(name))

    def delete_object(self, name: str) -> None:
        self.inner.delete_object(self._checked(name))

    def list_objects(self, prefix: str = "") -> list[str]:
        return [name for name in self.inner.list_objects(prefix) if not is_key_object(name)]

    def close(self) -> None:
        self.inner.close()


def key_objects(storage: RecoveryStorage) -> list[str]:
    """Names of every data key object of a (plain, unwrapped) backend."""
    return [name for name in storage.list_objects("") if is_key_object(name)]


def rewrap_keys(storage: RecoveryStorage, old: KeyEncryptionKey, new: KeyEncryptionKey) -> dict[str, int]:
    """Re-wrap every data key of backend `storage` from `old` to `new` (the data is not touched). Keys that
    `new` wraps already are left alone, so an interrupted rotation runs again to completion."""
    done = skipped = 0
    for name in key_objects(storage):
        folder = folder_of(name)
        raw = storage.read_object(name)
        try:
            key = unwrap_data_key(raw, folder, new, where=storage.description)
        except StorageKeyError:
            key = unwrap_data_key(raw, folder, old, where=storage.description)
            storage.put_object(name, wrap_data_key(key, new))
            done += 1
        else:
            del key
            skipped += 1
    return {"rewrapped": done, "already": skipped}


def open_encrypted(storage: RecoveryStorage) -> RecoveryStorage:
    """`storage` as the engine uses it: encrypted under this process's KEK (StorageKeyError naming the
    setting when there is none), or as it is with ASR_STORAGE_ENCRYPTION=off, logged as insecure."""
    from workflows import settings

    if not settings.storage_encryption():
        log.warning("INSECURE: ASR_STORAGE_ENCRYPTION=off: %s is read and written in clear, and nothing it "
                    "holds is authenticated", storage.description)
        return storage
    try:
        kek = load_kek()
    except BaseException:
        storage.close()
        raise
    return EncryptedStorage(storage, kek)
