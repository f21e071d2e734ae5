"""The Azure Blob container as recovery storage: replica disks as page blobs, objects as block blobs."""
from __future__ import annotations

import re
from typing import Any, BinaryIO

from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError
from azure.storage.blob import BlobClient, BlobType

from datapath.errors import DiskFormatError, SizeMismatchError
from datapath.vhd import FOOTER_SIZE, build_footer, check_fixed_vhd_size, parse_footer

from ..base import RecoveryStorage, validate_name
from .clients import ClientFactory, get_range
from .errors import CONTAINER_NOT_FOUND, Account, disk_not_found, error_code, object_not_found
from .pageblob import DEFAULT_PARALLELISM, PAGE_SIZE, PageBlobDisk, check_parallelism

# Azure's own rules for container names: 3 to 63 lowercase letters, digits and single hyphens, starting
# and ending with a letter or digit.
_CONTAINER_NAME = re.compile(r"^(?=.{3,63}$)[a-z0-9]+(-[a-z0-9]+)*$")


def check_container_name(container: str) -> str:
    if not isinstance(container, str) or not _CONTAINER_NAME.match(container):
        raise ValueError(
            f"invalid Azure container name {container!r}: 3 to 63 characters, lowercase letters, "
            f"digits and single hyphens, starting and ending with a letter or digit"
        )
    return container


class AzureBlobStorage(RecoveryStorage):
    """Replica disks as page blobs holding fixed VHDs; shipped logs, state and manifests as block blobs,
    all in one container.

    `parallelism` is the number of requests each open disk keeps in flight (1..32, default 4); `ca_file`
    verifies an https endpoint's certificate (default: the system's CAs)."""

    def __init__(
        self,
        container: str,
        *,
        connection_string: str | None = None,
        account_url: str | None = None,
        credential: Any = None,
        parallelism: int = DEFAULT_PARALLELISM,
        create_container: bool = True,
        ca_file: str | None = None,
    ):
        self.container = check_container_name(container)
        self.parallelism = check_parallelism(parallelism)
        self._clients = ClientFactory(connection_string, account_url, credential, ca_file)
        self._service = self._clients.service()
        self._container = self._service.get_container_client(container)
        # Without the query string: it would carry a SAS token into error messages and logs.
        endpoint = self._service.url.split("?", 1)[0]
        self._account = Account(self._service.account_name or "?", container, endpoint)
        self.description = f"Azure Blob container {container} in account {self._account.name}"
        if create_container:
            with self._account.calling("creating the container"):
                try:
                    self._container.create_container()
                except ResourceExistsError:
                    pass
        else:
            with self._account.calling("checking the container"):
                self._container.get_container_properties()

    @property
    def account_name(self) -> str:
        return self._account.name

    # ---- replica disks -------------------------------------------------------------------------
    def create_disk(self, name: str, size: int) -> None:
        validate_name(name)
        try:
            check_fixed_vhd_size(size)
        except DiskFormatError as error:
            raise DiskFormatError(f"cannot create disk {self._account.target(name)}: {error}") from None
        blob = self._container.get_blob_client(name)
        with self._account.calling("creating a replica disk", name):
            try:
                # If-None-Match: * so that an existing disk is never reset to zeros.
                blob.create_page_blob(size + FOOTER_SIZE, match_condition=MatchConditions.IfMissing)
            except ResourceExistsError:
                self._adopt_existing_disk(blob, name, size)
                return
            blob.upload_page(build_footer(size), offset=size, length=FOOTER_SIZE)

    def _adopt_existing_disk(self, blob: BlobClient, name: str, size: int) -> None:
        """Accept an existing disk of the same size; finish one whose creation stopped before its
        footer was written (its last page still reads as zeros)."""
        existing_size = self._disk_size(blob, name, allow_missing_footer=True)
        if existing_size is None:
            blob.upload_page(build_footer(size), offset=size, length=FOOTER_SIZE)
        elif existing_size != size:
            raise SizeMismatchError(
                f"replica disk {self._account.target(name)} exists with virtual size {existing_size} "
                f"bytes, not the {size} bytes asked for: delete it or use its size"
            )

    def _disk_size(self, blob: BlobClient, name: str, *, allow_missing_footer: bool = False) -> int | None:
        """The virtual size of the fixed VHD in page blob `blob`, from its footer. None when the footer
        page is all zeros and `allow_missing_footer`."""
        target = self._account.target(name)
        properties = blob.get_blob_properties()
        if properties.blob_type != BlobType.PAGEBLOB:
            kind = getattr(properties.blob_type, "value", properties.blob_type)
            raise DiskFormatError(f"{target} is a {kind}, not a replica disk (a page blob)")
        blob_size = properties.size
        if blob_size < FOOTER_SIZE + PAGE_SIZE:
            raise DiskFormatError(f"{target} holds {blob_size} bytes: too small for a fixed VHD")
        raw = b"".join(get_range(blob, blob_size - FOOTER_SIZE, FOOTER_SIZE))
        if allow_missing_footer and raw == bytes(FOOTER_SIZE):
            return None
        footer = parse_footer(raw, source=target)
        if footer.current_size != blob_size - FOOTER_SIZE:
            raise DiskFormatError(
                f"{target}: VHD footer says {footer.current_size} bytes but the page blob holds "
                f"{blob_size - FOOTER_SIZE} bytes before the footer: it was resized or damaged"
            )
        return footer.current_size

    def open_disk(self, name: str) -> PageBlobDisk:
        validate_name(name)
        blob = self._clients.blob(self.container, name, connections=self.parallelism)
        try:
            with self._account.calling("opening a replica disk", name, disk_not_found):
                size = self._disk_size(blob, name)
        except BaseException:
            blob.close()
            raise
        assert size is not None
        return PageBlobDisk(blob, self._account, name=name, size=size, parallelism=self.parallelism)

    def disk_exists(self, name: str) -> bool:
        validate_name(name)
        with self._account.calling("checking a replica disk", name):
            try:
                properties = self._container.get_blob_client(name).get_blob_properties()
            except ResourceNotFoundError as error:
                if error_code(error) == CONTAINER_NOT_FOUND:
                    raise
                return False
        return properties.blob_type == BlobType.PAGEBLOB

    def delete_disk(self, name: str) -> None:
        self._delete(name, "deleting a replica disk")

    # ---- objects -------------------------------------------------------------------------------
    def put_object(self, name: str, src: BinaryIO | bytes) -> int:
        validate_name(name)
        blob = self._container.get_blob_client(name)
        with self._account.calling("storing an object", name):
            if isinstance(src, (bytes, bytearray, memoryview)):
                data = bytes(src)
                blob.upload_blob(data, blob_type=BlobType.BLOCKBLOB, overwrite=True)
                return len(data)
            # The SDK measures file objects from offset 0 (fstat), not from their position; a reader
            # without fileno/seek makes it stream whatever is left, and lets us count it.
            reader = _CountingReader(src)
            blob.upload_blob(reader, blob_type=BlobType.BLOCKBLOB, overwrite=True)
            return reader.count

    def put_new_object(self, name: str, data: bytes) -> bool:
        validate_name(name)
        blob = self._container.get_blob_client(name)
        with self._account.calling("storing a new object", name):
            try:
                # If-None-Match: * : an existing object is never replaced.
                blob.upload_blob(bytes(data), blob_type=BlobType.BLOCKBLOB, overwrite=False)
            except ResourceExistsError:
                return False
        return True

    def get_object(self, name: str, dst: BinaryIO) -> int:
        validate_name(name)
        blob = self._container.get_blob_client(name)
        with self._account.calling("reading an object", name, object_not_found):
            return blob.download_blob().readinto(dst)

    def read_object(self, name: str) -> bytes:
        validate_name(name)
        blob = self._container.get_blob_client(name)
        with self._account.calling("reading an object", name, object_not_found):
            return blob.download_blob().readall()

    def object_exists(self, name: str) -> bool:
        validate_name(name)
        with self._account.calling("checking an object", name):
            return self._container.get_blob_client(name).exists()

    def delete_object(self, name: str) -> None:
        self._delete(name, "deleting an object")

    def list_objects(self, prefix: str = "") -> list[str]:
        if not isinstance(prefix, str):
            raise TypeError(f"a name prefix is a string, got {prefix!r}")
        with self._account.calling(f"listing objects under {prefix!r}"):
            return sorted(self._container.list_blob_names(name_starts_with=prefix or None))

    def _delete(self, name: str, action: str) -> None:
        validate_name(name)
        with self._account.calling(action, name):
            try:
                self._container.get_blob_client(name).delete_blob(delete_snapshots="include")
            except ResourceNotFoundError as error:
                if error_code(error) == CONTAINER_NOT_FOUND:
                    raise

    def close(self) -> None:
        self._service.close()


class _CountingReader:
    """A plain reader over `src` that counts the bytes taken from it."""

    def __init__(self, src: BinaryIO):
        self._src = src
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        chunk = self._src.read(size)
        self.count += len(chunk)
        return chunk
