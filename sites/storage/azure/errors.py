"""Azure SDK errors as the engine's classes, so the retry policy can act on them.

Refused credentials are non-recoverable (StorageAuthError), an unreachable or failing service is
recoverable (StorageUnavailableError), and a request the service rejects for good is a
StorageRequestError. Every message names the account, container and blob: operators need them.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)

from datapath.errors import (
    DataPathError,
    DiskNotFoundError,
    NonRecoverableError,
    StorageAuthError,
    StorageUnavailableError,
)

from ..base import ObjectNotFoundError

_AUTH_STATUSES = frozenset({401, 403})
_PASSING_STATUSES = frozenset({408, 429})
CONTAINER_NOT_FOUND = "ContainerNotFound"


class StorageRequestError(NonRecoverableError):
    """The storage service rejected a request for a reason retrying cannot fix (a missing container,
    an invalid request)."""


def error_code(error: HttpResponseError) -> str | None:
    code = getattr(error, "error_code", None)
    if code is None and error.response is not None:
        code = error.response.headers.get("x-ms-error-code")
    return getattr(code, "value", code)


@dataclass(frozen=True)
class Account:
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
        code = error_code(error)
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
        if code == CONTAINER_NOT_FOUND:
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


def disk_not_found(target: str) -> DataPathError:
    return DiskNotFoundError(f"replica disk does not exist ({target})")


def object_not_found(target: str) -> DataPathError:
    return ObjectNotFoundError(f"object does not exist ({target})")
