"""Replica disks as page blobs: a disk endpoint whose writes go out as Put Page / Clear Pages requests.

A replica disk is a page blob holding a fixed VHD: the disk's bytes, then the 512-byte VHD footer in the
last page. The engine enforces the page-blob limits itself (512-byte pages, at most 4 MiB per Put Page),
because Azurite, which stands in for Azure here, does not. Each open disk keeps up to `parallelism`
requests in flight on a thread pool of its own.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for_futures
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from azure.storage.blob import BlobClient

from datapath.endpoint import SECTOR
from datapath.errors import AlignmentError, StorageUnavailableError
from datapath.vhd import FOOTER_SIZE

from .clients import SDK_RETRIES, get_range
from .errors import Account, disk_not_found

PAGE_SIZE = SECTOR
MAX_PUT_PAGE = 4 * 1024 * 1024
"""Azure takes at most 4 MiB in one Put Page (update); Clear Pages may span the whole blob."""
MAX_READ_REQUEST = 4 * 1024 * 1024
"""Reads larger than this are split into ranges fetched in parallel."""
DEFAULT_PARALLELISM = 4
MAX_PARALLELISM = 32
"""As the reference product: 4 upload threads per disk by default, at most 32."""


def check_parallelism(parallelism: int) -> int:
    """Return `parallelism` if it is an allowed number of requests in flight per disk (1..32)."""
    if (not isinstance(parallelism, int) or isinstance(parallelism, bool)
            or not 1 <= parallelism <= MAX_PARALLELISM):
        raise ValueError(
            f"parallelism must be a whole number of requests per disk from 1 to {MAX_PARALLELISM} "
            f"(default {DEFAULT_PARALLELISM}), got {parallelism!r}"
        )
    return parallelism


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

    def __init__(self, blob: BlobClient, account: Account, *, name: str, size: int, parallelism: int):
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
        with self._account.calling("listing written pages", self.blob_name, disk_not_found):
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
            failure = self._account.translate(error, action, self.blob_name, disk_not_found)
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
            with self._account.calling(action, self.blob_name, disk_not_found):
                stream = get_range(self._blob, offset, len(view))
            try:
                with self._account.calling(action, self.blob_name, disk_not_found):
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
