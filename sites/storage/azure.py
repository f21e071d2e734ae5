"""Recovery-site storage in an Azure Blob container: replica disks as page blobs, objects as block blobs.

A replica disk is a page blob holding a fixed VHD: the disk's bytes, then the 512-byte VHD footer in the
last page, so the blob can be attached to an Azure VM as it is. The engine enforces the page-blob limits
itself (512-byte pages, at most 4 MiB per Put Page, at most 8 TiB per blob), because Azurite, which
stands in for Azure here, does not.

Errors are mapped to the engine's classes so the retry policy can act on them: refused credentials are
non-recoverable (StorageAuthError), an unreachable or failing service is recoverable
(StorageUnavailableError). The SDK's own retries are kept short so that an unreachable account is
reported within seconds; the long waits belong to the engine's retry policy.
"""
from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for_futures
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, BinaryIO

import requests
from azure.core import MatchConditions
from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.core.pipeline.transport import RequestsTransport
from azure.storage.blob import BlobClient, BlobServiceClient, BlobType, LinearRetry
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from datapath.endpoint import SECTOR
from datapath.errors import (
    AlignmentError,
    DataPathError,
    DiskFormatError,
    DiskNotFoundError,
    NonRecoverableError,
    SizeMismatchError,
    StorageAuthError,
    StorageUnavailableError,
)
from datapath.vhd import FOOTER_SIZE, build_footer, check_fixed_vhd_size, parse_footer

from .base import ObjectNotFoundError, RecoveryStorage, validate_name

PAGE_SIZE = SECTOR
MAX_PUT_PAGE = 4 * 1024 * 1024
"""Azure takes at most 4 MiB in one Put Page (update); Clear Pages may span the whole blob."""
MAX_READ_REQUEST = 4 * 1024 * 1024
"""Reads larger than this are split into ranges fetched in parallel."""
DEFAULT_PARALLELISM = 4
MAX_PARALLELISM = 32
"""As the reference product: 4 upload threads per disk by default, at most 32."""

CONNECT_TIMEOUT_S = 5
READ_TIMEOUT_S = 20
SDK_RETRIES = 2
SDK_RETRY_BACKOFF_S = 0.5
_OBJECT_COPY_CHUNK = 1024 * 1024

# Azure's own rules for container names: 3 to 63 lowercase letters, digits and single hyphens, starting
# and ending with a letter or digit.
_CONTAINER_NAME = re.compile(r"^(?=.{3,63}$)[a-z0-9]+(-[a-z0-9]+)*$")
_AUTH_STATUSES = frozenset({401, 403})
_PASSING_STATUSES = frozenset({408, 429})
_CONTAINER_NOT_FOUND = "ContainerNotFound"


class StorageRequestError(NonRecoverableError):
    """The storage service rejected a request for a reason retrying cannot fix (a missing container,
    an invalid request)."""


def check_parallelism(parallelism: int) -> int:
    """Return `parallelism` if it is an allowed number of requests in flight per disk (1..32)."""
    if (not isinstance(parallelism, int) or isinstance(parallelism, bool)
            or not 1 <= parallelism <= MAX_PARALLELISM):
        raise ValueError(
            f"parallelism must be a whole number of requests per disk from 1 to {MAX_PARALLELISM} "
            f"(default {DEFAULT_PARALLELISM}), got {parallelism!r}"
        )
    return parallelism


def check_container_name(container: str) -> str:
    if not isinstance(container, str) or not _CONTAINER_NAME.match(container):
        raise ValueError(
            f"invalid Azure container name {container!r}: 3 to 63 characters, lowercase letters, "
            f"digits and single hyphens, starting and ending with a letter or digit"
        )
    return container


def _error_code(error: HttpResponseError) -> str | None:
    code = getattr(error, "error_code", None)
    if code is None and error.response is not None:
        code = error.response.headers.get("x-ms-error-code")
    return getattr(code, "value", code)


@dataclass(frozen=True)
class _Account:
    """Where the storage is, for error messages: operators need the account, container and blob."""

    name: str
    container: str
    endpoint: str

    def target(self, blob: str | None = None) -> str:
        where = f"account {self.name}, container {self.container}"
        return f"{where}, blob {blob}" if blob else where

    def translate(
        self, error: Exception, action: str, blob: str | None = None,
        not_found: Callable[[str], DataPathError] | None = None,
    ) -> Exception:
        """The engine's error for an SDK error raised while doing `action`."""
        target = self.target(blob)
        if isinstance(error, DataPathError) or not isinstance(error, AzureError):
            return error
        if isinstance(error, (ServiceRequestError, ServiceResponseError)):
            return StorageUnavailableError(
                f"Azure storage unreachable while {action} ({target}) at {self.endpoint}: {error}. "
                f"Check the network path to the account and that the service is up; the engine "
                f"retries later"
            )
        if not isinstance(error, HttpResponseError):
            return StorageUnavailableError(f"Azure storage failed while {action} ({target}): {error}")
        status = error.status_code
        code = _error_code(error)
        first_line = (str(error.message or error).splitlines() or ["(no message)"])[0].rstrip(".")
        if isinstance(error, ClientAuthenticationError) or status in _AUTH_STATUSES:
            return StorageAuthError(
                f"Azure storage refused {action} ({target}): HTTP {status} {code}: {first_line}. "
                f"Check the account key, SAS token or role assignment configured for account "
                f"{self.name}; retrying will not help"
            )
        if status is None or status >= 500 or status in _PASSING_STATUSES or status < 300:
            # No status or a success status means the response broke off mid-body.
            return StorageUnavailableError(
                f"Azure storage unavailable while {action} ({target}): HTTP {status} {code}: "
                f"{first_line}. The engine retries later"
            )
        if code == _CONTAINER_NOT_FOUND:
            return StorageRequestError(
                f"container {self.container} does not exist in account {self.name} ({self.endpoint}): "
                f"create it, or open the storage with create_container=True"
            )
        if isinstance(error, ResourceNotFoundError) and not_found is not None:
            return not_found(target)
        return StorageRequestError(
            f"Azure storage rejected {action} ({target}): HTTP {status} {code}: {first_line}"
        )

    @contextmanager
    def calling(
        self, action: str, blob: str | None = None,
        not_found: Callable[[str], DataPathError] | None = None,
    ) -> Iterator[None]:
        try:
            yield
        except AzureError as error:
            raise self.translate(error, action, blob, not_found) from error


def _get_range(blob: BlobClient, offset: int, length: int) -> Iterator[bytes]:
    """The bytes of [offset, offset+length) of a page blob, as the response streams in.

    The SDK's download_blob is not used for disks: on a page blob it also fetches the page list of the
    whole blob on every call, one more request and, on a fragmented disk, a long answer. This calls
    the SDK's generated Get Blob operation (a private attribute of the pinned azure-storage-blob), which
    goes through the same pipeline: authentication, retries, timeouts."""
    return blob._client.blob.download(range=f"bytes={offset}-{offset + length - 1}")


def _disk_not_found(target: str) -> DataPathError:
    return DiskNotFoundError(f"replica disk does not exist ({target})")


def _object_not_found(target: str) -> DataPathError:
    return ObjectNotFoundError(f"object does not exist ({target})")


class _ClientFactory:
    """Builds SDK clients that share the credentials and the short timeouts and retries."""

    def __init__(self, connection_string: str | None, account_url: str | None, credential: Any):
        if (connection_string is None) == (account_url is None):
            raise ValueError("pass exactly one of connection_string or account_url (with credential)")
        if connection_string is not None and credential is not None:
            raise ValueError("a connection string carries its own credential: do not pass credential too")
        self._connection_string = connection_string
        self._account_url = account_url
        self._credential = credential

    @staticmethod
    def _options(**extra: Any) -> dict[str, Any]:
        return {
            "retry_policy": LinearRetry(
                backoff=SDK_RETRY_BACKOFF_S, random_jitter_range=SDK_RETRY_BACKOFF_S,
                retry_total=SDK_RETRIES,
            ),
            "connection_timeout": CONNECT_TIMEOUT_S,
            "read_timeout": READ_TIMEOUT_S,
            **extra,
        }

    def service(self) -> BlobServiceClient:
        if self._connection_string is not None:
            return BlobServiceClient.from_connection_string(self._connection_string, **self._options())
        return BlobServiceClient(self._account_url, credential=self._credential, **self._options())

    def blob(self, container: str, blob: str, *, connections: int) -> BlobClient:
        """A client of its own for one disk, with a connection pool as large as its parallelism (the
        SDK's default pool keeps 10 connections and discards the rest after each request)."""
        session = requests.Session()
        adapter = HTTPAdapter(
            pool_connections=1, pool_maxsize=connections,
            max_retries=Retry(total=False, redirect=False, raise_on_status=False),
        )
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        options = self._options(transport=RequestsTransport(session=session, session_owner=True))
        if self._connection_string is not None:
            return BlobClient.from_connection_string(
                self._connection_string, container_name=container, blob_name=blob, **options
            )
        return BlobClient(
            self._account_url, container_name=container, blob_name=blob, credential=self._credential,
            **options,
        )


class AzureBlobStorage(RecoveryStorage):
    """Replica disks as page blobs holding fixed VHDs; shipped logs, state and manifests as block blobs,
    all in one container.

    `parallelism` is the number of requests each open disk keeps in flight (1..32, default 4)."""

    def __init__(
        self,
        container: str,
        *,
        connection_string: str | None = None,
        account_url: str | None = None,
        credential: Any = None,
        parallelism: int = DEFAULT_PARALLELISM,
        create_container: bool = True,
    ):
        self.container = check_container_name(container)
        self.parallelism = check_parallelism(parallelism)
        self._clients = _ClientFactory(connection_string, account_url, credential)
        self._service = self._clients.service()
        self._container = self._service.get_container_client(container)
        # Without the query string: it would carry a SAS token into error messages and logs.
        endpoint = self._service.url.split("?", 1)[0]
        self._account = _Account(self._service.account_name or "?", container, endpoint)
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
        raw = b"".join(_get_range(blob, blob_size - FOOTER_SIZE, FOOTER_SIZE))
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
            with self._account.calling("opening a replica disk", name, _disk_not_found):
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
                if _error_code(error) == _CONTAINER_NOT_FOUND:
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

    def get_object(self, name: str, dst: BinaryIO) -> int:
        validate_name(name)
        blob = self._container.get_blob_client(name)
        with self._account.calling("reading an object", name, _object_not_found):
            return blob.download_blob().readinto(dst)

    def read_object(self, name: str) -> bytes:
        validate_name(name)
        blob = self._container.get_blob_client(name)
        with self._account.calling("reading an object", name, _object_not_found):
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
                if _error_code(error) == _CONTAINER_NOT_FOUND:
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


@dataclass(frozen=True)
class _Request:
    start: int
    end: int
    future: Future[None]

    def overlaps(self, start: int, end: int) -> bool:
        return self.start < end and start < self.end


class PageBlobDisk:
    """A replica page blob as a DiskEndpoint: writes go out as Put Page / Clear Pages requests, up to
    `parallelism` at a time on a thread pool.

    Requests on overlapping ranges run in the order they were issued, and reads wait for the writes
    they overlap. The first failed request is kept: `flush()` raises it, and so does every later call,
    because a write was lost and only the caller can decide what to redo."""

    alignment = PAGE_SIZE

    def __init__(self, blob: BlobClient, account: _Account, *, name: str, size: int, parallelism: int):
        self.blob_name = name
        self.name = f"{account.container}/{name}"
        self.size = size
        self.parallelism = check_parallelism(parallelism)
        self._blob = blob
        self._account = account
        self._executor = ThreadPoolExecutor(max_workers=parallelism, thread_name_prefix="page-blob")
        self._slots = threading.BoundedSemaphore(parallelism)
        self._lock = threading.Lock()
        self._in_flight: list[_Request] = []
        self._failure: Exception | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"PageBlobDisk({self.name!r}, {self.size} bytes, parallelism {self.parallelism})"

    def __enter__(self) -> PageBlobDisk:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ---- DiskEndpoint --------------------------------------------------------------------------
    def write(self, offset: int, data: bytes | memoryview) -> None:
        # Views are released on the way out, errors included, so the caller can close its buffer.
        with memoryview(data) as raw, raw.cast("B") as view:
            self._check_page_range(offset, len(view), "write")
            self._raise_failure()
            for piece_offset in range(0, len(view), MAX_PUT_PAGE):
                # A copy: the caller may reuse its buffer as soon as we return.
                page = bytes(view[piece_offset:piece_offset + MAX_PUT_PAGE])
                start = offset + piece_offset
                self._submit(
                    start, start + len(page), f"writing {len(page)} bytes at offset {start}",
                    self._blob.upload_page, page, offset=start, length=len(page),
                )

    def write_zeros(self, offset: int, length: int) -> None:
        self._check_page_range(offset, length, "write zeros")
        self._raise_failure()
        if length:
            self._submit(
                offset, offset + length, f"clearing {length} bytes at offset {offset}",
                self._blob.clear_page, offset=offset, length=length,
            )

    def read_into(self, offset: int, buf: memoryview) -> int:
        with memoryview(buf) as raw, raw.cast("B") as view:
            self._check_range(offset, len(view), "read")
            self._wait_for_overlapping(offset, offset + len(view))
            self._raise_failure()
            if len(view) <= MAX_READ_REQUEST:
                if view:
                    self._read_range(offset, view)
                return len(view)
            futures: list[Future[None]] = []
            try:
                for piece_offset in range(0, len(view), MAX_READ_REQUEST):
                    piece = view[piece_offset:piece_offset + MAX_READ_REQUEST]
                    self._slots.acquire()
                    try:
                        futures.append(self._executor.submit(self._read_piece, offset + piece_offset, piece))
                    except BaseException:
                        self._slots.release()
                        piece.release()
                        raise
            finally:
                wait_for_futures(futures)
            for future in futures:
                future.result()
            return len(view)

    def data_extents(self, offset: int = 0, length: int | None = None) -> Iterator[tuple[int, int]]:
        """Written ranges from the blob's page list, merged, clipped to [offset, offset+length) and to
        the virtual size (the footer page is never an extent)."""
        self._require_open()
        if not isinstance(offset, int) or isinstance(offset, bool) or not 0 <= offset <= self.size:
            raise ValueError(f"{self.name}: extent offset {offset!r} is outside [0, {self.size}]")
        if length is not None and (not isinstance(length, int) or length < 0):
            raise ValueError(f"{self.name}: extent length {length!r} must be a non-negative integer")
        end = self.size if length is None else min(offset + length, self.size)
        if end <= offset:
            return iter(())
        self._wait_for_overlapping(offset, end)
        self._raise_failure()
        query_start = offset - offset % PAGE_SIZE
        query_end = -(-end // PAGE_SIZE) * PAGE_SIZE
        extents: list[tuple[int, int]] = []
        with self._account.calling("listing written pages", self.blob_name, _disk_not_found):
            for page_range in self._blob.list_page_ranges(offset=query_start, length=query_end - query_start):
                start, stop = max(page_range.start, offset), min(page_range.end + 1, end)
                if start >= stop:
                    continue
                if extents and extents[-1][1] >= start:
                    extents[-1] = (extents[-1][0], max(extents[-1][1], stop))
                else:
                    extents.append((start, stop))
        return ((start, stop - start) for start, stop in extents)

    def flush(self) -> None:
        """Wait for every request in flight; raise the first failure. Acknowledged pages are durable."""
        self._require_open()
        self._wait_for_overlapping(0, self.size + FOOTER_SIZE)
        self._raise_failure()

    def close(self) -> None:
        """Wait for the requests in flight and release the connections. Failures are reported by
        `flush`, not here: call it first to learn whether every write landed."""
        if self._closed:
            return
        self._closed = True
        self._executor.shutdown(wait=True)
        self._blob.close()

    # ---- requests ------------------------------------------------------------------------------
    def _submit(self, start: int, end: int, action: str, request: Callable[..., Any], *args: Any,
                **kwargs: Any) -> None:
        self._wait_for_overlapping(start, end)
        self._slots.acquire()
        try:
            future = self._executor.submit(self._run, action, request, *args, **kwargs)
        except BaseException:
            self._slots.release()
            raise
        with self._lock:
            self._in_flight = [r for r in self._in_flight if not r.future.done()]
            self._in_flight.append(_Request(start, end, future))

    def _run(self, action: str, request: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        try:
            request(*args, **kwargs)
        except Exception as error:  # kept for flush(); the pool would otherwise swallow it
            failure = self._account.translate(error, action, self.blob_name, _disk_not_found)
            with self._lock:
                if self._failure is None:
                    self._failure = failure
        finally:
            self._slots.release()

    def _read_piece(self, offset: int, piece: memoryview) -> None:
        try:
            self._read_range(offset, piece)
        finally:
            piece.release()
            self._slots.release()

    def _read_range(self, offset: int, view: memoryview) -> None:
        """One ranged Get Blob into `view`."""
        action = f"reading {len(view)} bytes at offset {offset}"
        for attempt in range(SDK_RETRIES + 1):
            with self._account.calling(action, self.blob_name, _disk_not_found):
                stream = _get_range(self._blob, offset, len(view))
            try:
                with self._account.calling(action, self.blob_name, _disk_not_found):
                    filled = 0
                    for chunk in stream:
                        view[filled:filled + len(chunk)] = chunk
                        filled += len(chunk)
                if filled != len(view):
                    raise StorageUnavailableError(
                        f"Azure storage returned {filled} of {len(view)} bytes while {action} "
                        f"({self._account.target(self.blob_name)}): the response broke off"
                    )
                return
            except StorageUnavailableError:
                # The SDK retries requests that fail, not response bodies that break off midway.
                if attempt == SDK_RETRIES:
                    raise

    def _wait_for_overlapping(self, start: int, end: int) -> None:
        with self._lock:
            waiting = [r.future for r in self._in_flight if r.overlaps(start, end)]
        wait_for_futures(waiting)

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    # ---- checks --------------------------------------------------------------------------------
    def _require_open(self) -> None:
        if self._closed:
            raise ValueError(f"{self.name}: the disk is closed")

    def _check_range(self, offset: int, length: int, action: str) -> None:
        self._require_open()
        if (not isinstance(offset, int) or not isinstance(length, int)
                or isinstance(offset, bool) or isinstance(length, bool)):
            raise TypeError(f"{self.name}: {action} offset and length must be integers")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(
                f"{self.name}: cannot {action} {length} bytes at offset {offset}: outside the disk "
                f"[0, {self.size})"
            )

    def _check_page_range(self, offset: int, length: int, action: str) -> None:
        self._check_range(offset, length, action)
        if offset % PAGE_SIZE or length % PAGE_SIZE:
            raise AlignmentError(
                f"{self.name}: cannot {action} {length} bytes at offset {offset}: page blobs take "
                f"whole {PAGE_SIZE}-byte pages, so offset and length must be multiples of {PAGE_SIZE}"
            )
