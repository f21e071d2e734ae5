"""Recovery-site storage: where replica disks, shipped replication logs and replica state live."""
from .base import ObjectNotFoundError, RecoveryStorage, validate_name

__all__ = ["ObjectNotFoundError", "RecoveryStorage", "validate_name", "open_storage"]


def open_storage(url: str, **options) -> RecoveryStorage:
    """Open a backend from a URL: `file:///abs/dir` (or a plain path) for a local directory,
    `azure://<container>?connection_string=...` style options are passed as keyword arguments
    (`connection_string`, `container`, `parallelism`)."""
    if url.startswith("azure:"):
        from .azure import AzureBlobStorage

        container = url.split(":", 1)[1].lstrip("/") or options.pop("container")
        return AzureBlobStorage(container=container, **options)
    from .local import LocalDirectoryStorage

    path = url[len("file://"):] if url.startswith("file://") else url
    return LocalDirectoryStorage(path, **options)
