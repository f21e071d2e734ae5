"""Keys of the encrypted recovery storage: the deployment's key-encryption key (KEK) and the data keys it wraps.

The KEK (32 random bytes) comes from the environment of each engine process (ASR_STORAGE_KEK_FILE, or
ASR_STORAGE_KEK) and never reaches the database or the storage. Each folder of the storage has its own data
key (32 random bytes), stored beside its data as the small object `<folder>/asr-data-key.json`, wrapped
with AES-256-GCM under the KEK; the folder's name is authenticated with it, so a key object copied into
another folder does not open. The disk and object keys are derived from the folder's data key and the
name of the disk or object (HKDF-SHA256), so every disk and object has a key of its own.

Rotating the KEK re-wraps the data key objects only: the data they protect is not rewritten.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from datapath.errors import ObjectAuthenticationError, StorageKeyError
from datapath.private import write_new_private_file

KEY_BYTES = 32
KEY_OBJECT = "asr-data-key.json"
"""The last segment of a data key object's name: `<folder>/asr-data-key.json` (or at the root)."""
KEY_FORMAT = "asr-data-key"
KEY_FORMAT_VERSION = 1
KEY_ID_BYTES = 16
_WRAP_AAD = b"asr-data-key-v1\0"
_KEK_ID_LABEL = b"asr-kek-id-v1"
_KEK_FILE_MAGIC = "asr-kek-v1"


@dataclass(frozen=True)
class KeyEncryptionKey:
    """The deployment's KEK and where it came from (for messages: the setting, never the key)."""

    key: bytes
    source: str

    @property
    def key_id(self) -> str:
        """A public fingerprint (HMAC of a fixed label, 16 hex digits): tells keys apart without revealing them."""
        return hmac.new(self.key, _KEK_ID_LABEL, hashlib.sha256).hexdigest()[:16]

    def __repr__(self) -> str:  # never print the key itself
        return f"KeyEncryptionKey(id={self.key_id}, from {self.source})"


def new_kek_text() -> str:
    """The text of a new KEK file: a marker and 32 random bytes in base64, one line."""
    return f"{_KEK_FILE_MAGIC} {base64.b64encode(os.urandom(KEY_BYTES)).decode()}\n"


def write_kek_file(path: Path, *, overwrite: bool = False) -> KeyEncryptionKey:
    """Create a new KEK file at `path`, mode 0600 from its first byte; refuses to replace one unless
    `overwrite` (a replaced KEK makes everything it wrapped unreadable)."""
    path = Path(path).expanduser()
    text = new_kek_text()
    write_new_private_file(path, text, overwrite=overwrite)
    return parse_kek(text, f"{path}")


def parse_kek(text: str, source: str) -> KeyEncryptionKey:
    """The KEK in `text` ("asr-kek-v1 <base64>", or the bare base64); StorageKeyError naming `source`."""
    words = text.split()
    if len(words) == 2 and words[0] == _KEK_FILE_MAGIC:
        words = words[1:]
    if len(words) != 1:
        raise StorageKeyError(
            f"the key-encryption key in {source} is malformed: expected one line '{_KEK_FILE_MAGIC} <base64 of "
            f"{KEY_BYTES} bytes>' as `asr keys create` writes it"
        )
    try:
        key = base64.b64decode(words[0], validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != KEY_BYTES:
        raise StorageKeyError(
            f"the key-encryption key in {source} is malformed: not the base64 of {KEY_BYTES} bytes"
        )
    return KeyEncryptionKey(key, source)


def load_kek() -> KeyEncryptionKey:
    """This process's KEK from ASR_STORAGE_KEK_FILE or ASR_STORAGE_KEK; StorageKeyError naming the setting
    when it is missing, unreadable or malformed."""
    from workflows import settings

    path, text = settings.storage_kek_file(), settings.storage_kek()
    if path is not None and text is not None:
        raise StorageKeyError(
            "both ASR_STORAGE_KEK_FILE and ASR_STORAGE_KEK are set: set only one, so it is clear which "
            "key-encryption key opens the recovery storage"
        )
    if text is not None:
        return parse_kek(text, "ASR_STORAGE_KEK")
    if path is None:
        raise StorageKeyError(
            f"the recovery storage is encrypted but this process ({os.uname().nodename}, pid {os.getpid()}) has "
            f"no key-encryption key: set ASR_STORAGE_KEK_FILE to the deployment's key file (`asr keys create` "
            f"makes one) or ASR_STORAGE_KEK; ASR_STORAGE_ENCRYPTION=off stores everything in clear (insecure)"
        )
    return read_kek_file(path, f"ASR_STORAGE_KEK_FILE={path}")


def read_kek_file(path: Path, source: str | None = None) -> KeyEncryptionKey:
    source = source or str(path)
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise StorageKeyError(f"cannot read the key-encryption key {source}: {error}") from None
    return parse_kek(text, source)


# ---- data keys -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataKey:
    """A folder's data key, unwrapped."""

    folder: str
    key_id: str
    key: bytes

    def __repr__(self) -> str:
        return f"DataKey({self.folder!r}, id={self.key_id})"

    def derive(self, purpose: bytes, name: str, length: int, salt: bytes | None = None) -> bytes:
        """A key for one disk or object: HKDF-SHA256 over the data key, bound to `purpose` and `name`."""
        return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt,
                    info=purpose + b"\0" + name.encode()).derive(self.key)


def key_object_name(folder: str) -> str:
    return f"{folder}/{KEY_OBJECT}" if folder else KEY_OBJECT


def folder_of(name: str) -> str:
    """The folder whose data key protects `name`: everything before its last '/' ("" at the root)."""
    return name.rpartition("/")[0]


def is_key_object(name: str) -> bool:
    return name == KEY_OBJECT or name.endswith("/" + KEY_OBJECT)


def new_data_key(folder: str) -> DataKey:
    return DataKey(folder, os.urandom(KEY_ID_BYTES).hex(), os.urandom(KEY_BYTES))


def _aad(folder: str, key_id: str) -> bytes:
    return _WRAP_AAD + folder.encode() + b"\0" + key_id.encode()


def wrap_data_key(data_key: DataKey, kek: KeyEncryptionKey) -> bytes:
    """The data key object's bytes: JSON with the data key sealed by AES-256-GCM under the KEK."""
    nonce = os.urandom(12)
    wrapped = AESGCM(kek.key).encrypt(nonce, data_key.key, _aad(data_key.folder, data_key.key_id))
    return json.dumps({
        "format": KEY_FORMAT, "version": KEY_FORMAT_VERSION, "folder": data_key.folder,
        "key_id": data_key.key_id, "kek_id": kek.key_id, "algorithm": "AES-256-GCM",
        "nonce": base64.b64encode(nonce).decode(), "wrapped": base64.b64encode(wrapped).decode(),
        "created_at": int(time.time()),
    }, sort_keys=True, indent=1).encode()


def unwrap_data_key(raw: bytes, folder: str, kek: KeyEncryptionKey, *, where: str) -> DataKey:
    """The data key of `folder` from its object's bytes `raw` (stored as `where`). ObjectAuthenticationError
    when the object is malformed or fails authentication, StorageKeyError when another KEK wrapped it."""
    name = key_object_name(folder)
    try:
        record = json.loads(raw)
        if record.get("format") != KEY_FORMAT or record.get("version") != KEY_FORMAT_VERSION:
            raise ValueError("not a data key object of format version 1")
        key_id, kek_id = str(record["key_id"]), str(record["kek_id"])
        nonce = base64.b64decode(record["nonce"], validate=True)
        wrapped = base64.b64decode(record["wrapped"], validate=True)
    except (ValueError, KeyError, TypeError, binascii.Error, AttributeError) as error:
        raise ObjectAuthenticationError(
            f"data key object {name} in {where} is malformed ({error}): it was altered; the data of folder "
            f"{folder or '(root)'} cannot be read", object_name=name) from None
    if kek_id != kek.key_id:
        raise StorageKeyError(
            f"the data key of folder {folder or '(root)'} in {where} was wrapped by key-encryption key id "
            f"{kek_id}, but {kek.source} holds key id {kek.key_id}: wrong key-encryption key (after `asr keys "
            f"rotate`, point the setting at the new key file)"
        )
    try:
        key = AESGCM(kek.key).decrypt(nonce, wrapped, _aad(folder, key_id))
    except (InvalidTag, ValueError):
        raise ObjectAuthenticationError(
            f"data key object {name} in {where} fails authentication under the key-encryption key of "
            f"{kek.source} (id {kek.key_id}): it was altered or copied from another folder; the data of "
            f"folder {folder or '(root)'} cannot be read", object_name=name) from None
    if len(key) != KEY_BYTES:
        raise ObjectAuthenticationError(f"data key object {name} in {where} holds a key of the wrong size",
                                        object_name=name)
    return DataKey(folder, key_id, key)
