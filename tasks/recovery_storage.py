"""Opening an item's recovery storage as a worker may: checked against this worker's allow-list, with the
credentials of this worker's environment, encrypted under its key, and on a host agent within the host's
upload limit."""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from datapath.errors import NonRecoverableError
from sites.storage import open_storage
from sites.storage.base import RecoveryStorage
from sites.storage.encrypted import open_encrypted
from sites.storage.policy import StoragePolicyError, check_storage
from sites.storage.throttled import ThrottledStorage, UploadLimit
from workflows import settings, transport
from workflows.items import ItemView


def open_recovery_storage(url: str, options: Mapping[str, Any], upload_limit: UploadLimit | None = None
                          ) -> RecoveryStorage:
    """Open an item's recovery storage, encrypted under this worker's key-encryption key
    (sites/storage/encrypted.py; ASR_STORAGE_KEK_FILE). Credentials never sit in the database: the option
    `connection_string_env` names the environment variable of this worker that holds them. With
    `upload_limit`, what is sent (encrypted, as it crosses the network) waits for the host's uplink."""
    backend = open_backend(url, options)
    return open_encrypted(backend if upload_limit is None else ThrottledStorage(backend, upload_limit))


def host_upload_limit(view: ItemView) -> UploadLimit | None:
    """The uplink budget of the item's host when this process is that host's agent and ASR_HOST_UPLOAD_LIMIT
    is set; shared by the agent's processes through a file in the host's folder."""
    limit = settings.host_upload_limit()
    if limit is None or settings.host_agent_name() != view.host.name:
        return None
    return UploadLimit(limit, Path(view.host.root) / ".upload-limit")


def open_backend(url: str, options: Mapping[str, Any]) -> RecoveryStorage:
    """The recovery storage's backend itself, unencrypted (`asr keys rotate` re-wraps its data keys). The
    storage is checked against this worker's allow-list first (sites/storage/policy.py), whatever the
    database says."""
    try:
        check_storage(url, options, roots=settings.storage_roots(), account_urls=settings.storage_account_urls(),
                      resolve=True)
    except StoragePolicyError as exc:
        raise NonRecoverableError(f"recovery storage {url}: {exc}") from None
    resolved = dict(options)
    variable = resolved.pop("connection_string_env", None)
    if variable is not None:
        value = os.environ.get(variable)
        if not value:
            raise NonRecoverableError(
                f"recovery storage {url}: the environment variable {variable} (its connection string) is not "
                f"set on this worker ({os.uname().nodename}, pid {os.getpid()})"
            )
        resolved["connection_string"] = value
    if url.startswith("azure:"):
        # https only (unless ASR_INSECURE_TRANSPORT allows http), verified with the deployment's CA.
        endpoints = ([resolved["account_url"]] if resolved.get("account_url")
                     else transport.azure_connection_string_endpoints(resolved.get("connection_string") or ""))
        try:
            for endpoint in endpoints:
                transport.check_storage_endpoint(f"recovery storage {url}", endpoint)
            ca_file = settings.tls_ca_file()
        except ValueError as exc:
            raise NonRecoverableError(str(exc)) from None
        if ca_file is not None:
            resolved.setdefault("ca_file", str(ca_file))
    return open_storage(url, **resolved)
