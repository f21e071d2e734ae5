"""The SDK clients: shared credentials, short timeouts and few retries, a connection pool per disk.

The SDK's own retries are kept short so that an unreachable account is reported within seconds; the
long waits belong to the engine's retry policy.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import requests
from azure.core.pipeline.transport import RequestsTransport
from azure.storage.blob import BlobClient, BlobServiceClient, LinearRetry
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

CONNECT_TIMEOUT_S = 5
READ_TIMEOUT_S = 20
SDK_RETRIES = 2
SDK_RETRY_BACKOFF_S = 0.5

HTTP_LOGGER = "azure.core.pipeline.policies.http_logging_policy"
# The SDK logs every request's and answer's headers at INFO through this logger, some 20 lines a request:
# a worker's log at INFO was mostly that. Its failures still reach the log as WARNING; an operator who
# wants every request sets this logger's level (to INFO or DEBUG) in the logging configuration.
if logging.getLogger(HTTP_LOGGER).level == logging.NOTSET:
    logging.getLogger(HTTP_LOGGER).setLevel(logging.WARNING)


class ClientFactory:
    """Builds SDK clients that share the credentials and the short timeouts and retries."""

    def __init__(self, connection_string: str | None, account_url: str | None, credential: Any,
                 ca_file: str | None = None):
        """`ca_file`: the CA (PEM) an https endpoint's certificate is verified with (a private CA's, as
        Azurite's with --cert); default the system's CAs."""
        if (connection_string is None) == (account_url is None):
            raise ValueError("pass exactly one of connection_string or account_url (with credential)")
        if connection_string is not None and credential is not None:
            raise ValueError("a connection string carries its own credential: do not pass credential too")
        self._connection_string = connection_string
        self._account_url = account_url
        self._credential = credential
        # azure-core's connection_verify: True (system CAs) or the path of a CA bundle; never False.
        self._verify: bool | str = str(ca_file) if ca_file is not None else True

    def _options(self, **extra: Any) -> dict[str, Any]:
        return {
            "connection_verify": self._verify,
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
        options = self._options(transport=RequestsTransport(session=session, session_owner=True,
                                                            connection_verify=self._verify))
        if self._connection_string is not None:
            return BlobClient.from_connection_string(
                self._connection_string, container_name=container, blob_name=blob, **options
            )
        return BlobClient(
            self._account_url, container_name=container, blob_name=blob, credential=self._credential,
            **options,
        )


def get_range(blob: BlobClient, offset: int, length: int) -> Iterator[bytes]:
    """The bytes of [offset, offset+length) of a page blob, as the response streams in.

    The SDK's download_blob is not used for disks: on a page blob it also fetches the page list of the
    whole blob on every call, one more request and, on a fragmented disk, a long answer. This calls
    the SDK's generated Get Blob operation (a private attribute of the pinned azure-storage-blob), which
    goes through the same pipeline: authentication, retries, timeouts."""
    return blob._client.blob.download(range=f"bytes={offset}-{offset + length - 1}")
