"""Recovery-site storage in an Azure Blob container: replica disks as page blobs, objects as block blobs.

A replica disk is a page blob holding a fixed VHD: the disk's bytes, then the 512-byte VHD footer in the
last page, so the blob can be attached to an Azure VM as it is. The engine enforces the page-blob limits
itself (512-byte pages, at most 4 MiB per Put Page, at most 8 TiB per blob), because Azurite, which
stands in for Azure here, does not.

Errors are mapped to the engine's classes so the retry policy can act on them: refused credentials are
non-recoverable (StorageAuthError), an unreachable or failing service is recoverable
(StorageUnavailableError). The SDK's own retries are kept short so that an unreachable account is
reported within seconds; the long waits belong to the engine's retry policy.

One concept per module: `storage` (the container as RecoveryStorage, its objects), `pageblob` (a replica
disk's I/O and its parallelism), `errors` (the SDK's errors as the engine's), `clients` (SDK clients,
timeouts and retries).
"""
from .clients import CONNECT_TIMEOUT_S, READ_TIMEOUT_S, SDK_RETRIES, SDK_RETRY_BACKOFF_S
from .errors import StorageRequestError
from .pageblob import (
    DEFAULT_PARALLELISM,
    MAX_PARALLELISM,
    MAX_PUT_PAGE,
    MAX_READ_REQUEST,
    PAGE_SIZE,
    PageBlobDisk,
    check_parallelism,
)
from .storage import AzureBlobStorage, check_container_name

__all__ = [
    "CONNECT_TIMEOUT_S", "DEFAULT_PARALLELISM", "MAX_PARALLELISM", "MAX_PUT_PAGE", "MAX_READ_REQUEST", "PAGE_SIZE",
    "READ_TIMEOUT_S", "SDK_RETRIES", "SDK_RETRY_BACKOFF_S",
    "AzureBlobStorage", "PageBlobDisk", "StorageRequestError", "check_container_name", "check_parallelism",
]
