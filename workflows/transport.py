"""Transport security: every connection of the engine is TLS, or refused unless the operator said otherwise.

A `redis://` broker, result backend or progress Redis, an `http://` storage endpoint, or a PostgreSQL URL
without `sslmode=verify-full` is refused with `InsecureTransportError` (a ValueError naming the setting),
unless ASR_INSECURE_TRANSPORT=1 allows plain text; then each kind of plain connection is logged once per
process as a WARNING, so an insecure deployment cannot go unnoticed in any log. With TLS, servers are
verified against ASR_TLS_CA_FILE (the deployment's private CA from `asr certs create`; unset: the system's
CAs) and the client certificate ASR_TLS_CLIENT_CERT_FILE is presented to Redis when set (mutual TLS).
docs/operations.md, "Security: TLS".
"""
from __future__ import annotations

import logging
import ssl
import threading
from typing import Any
from urllib.parse import parse_qs, urlparse

from workflows import settings

log = logging.getLogger("asr.security")

INSECURE_ENV = "ASR_INSECURE_TRANSPORT"

_warned: set[str] = set()
_warned_lock = threading.Lock()


class InsecureTransportError(ValueError):
    """A plain-text connection was configured and ASR_INSECURE_TRANSPORT does not allow it."""


def _plain(what: str, setting: str, shown: str, how: str) -> None:
    """Refuse, or (when allowed) warn once per process for `what`."""
    _plain_text(what, f"{setting}={shown} is a plain-text connection ({what})", how)


def _plain_text(what: str, description: str, how: str) -> None:
    if not settings.insecure_transport():
        raise InsecureTransportError(
            f"{description}: {how}, or set {INSECURE_ENV}=1 to allow plain text (a development machine only: "
            f"anyone on the network path reads and changes what it carries)"
        )
    with _warned_lock:
        if what in _warned:
            return
        _warned.add(what)
    log.warning("INSECURE TRANSPORT: %s, allowed by %s=1: anyone on the network path reads and changes it "
                "(docs/operations.md, 'Security: TLS')", description, INSECURE_ENV)


def _redacted(url: str) -> str:
    parsed = urlparse(url)
    if parsed.password:
        return url.replace(f":{parsed.password}@", ":***@", 1)
    return url


# ---- Redis ----------------------------------------------------------------------------------------------
def check_redis_url(setting: str, url: str) -> str:
    """`url` when it is `rediss://`; a `redis://` or `unix://` URL only when plain text is allowed."""
    scheme = urlparse(url).scheme.lower()
    if scheme == "rediss":
        return url
    if scheme not in ("redis", "unix"):
        raise ValueError(f"{setting}={_redacted(url)} is not a Redis URL (rediss://host:port/db)")
    _plain("Redis", setting, _redacted(url), "use rediss://host:port/db with ASR_TLS_CA_FILE "
                                            "(`asr certs create` makes a CA and the certificates)")
    return url


def is_tls_url(url: str) -> bool:
    return urlparse(url).scheme.lower() == "rediss"


def redis_ssl_options() -> dict[str, Any]:
    """The TLS options of a Redis connection (Celery's broker_use_ssl and redis_backend_use_ssl, and
    redis-py's keyword arguments): the server verified (certificate and host name) against
    ASR_TLS_CA_FILE, and our client certificate presented when ASR_TLS_CLIENT_CERT_FILE is set."""
    options: dict[str, Any] = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_check_hostname": True}
    ca_file = settings.tls_ca_file()
    if ca_file is not None:
        options["ssl_ca_certs"] = str(ca_file)
    client = settings.tls_client_certificate()
    if client is not None:
        options["ssl_certfile"], options["ssl_keyfile"] = (str(path) for path in client)
    return options


def redis_client_options(url: str) -> dict[str, Any]:
    """redis-py keyword arguments for `url`: the TLS options for rediss://, none otherwise."""
    return redis_ssl_options() if is_tls_url(url) else {}


# ---- our own servers (the REST API, Flower) -----------------------------------------------------------
def check_server_transport(server: str) -> None:
    """A server of ours without a certificate (ASR_TLS_CERT_FILE/ASR_TLS_KEY_FILE) serves plain HTTP only
    when plain text is allowed."""
    _plain_text(f"{server} over HTTP", f"{server} would serve plain HTTP (ASR_TLS_CERT_FILE is not set)",
                "set ASR_TLS_CERT_FILE and ASR_TLS_KEY_FILE (`asr certs create` makes them) to serve HTTPS")


def check_http_url(setting: str, url: str) -> str:
    """A client's server URL: https, or http only when plain text is allowed."""
    scheme = urlparse(url).scheme.lower()
    if scheme == "https":
        return url
    if scheme != "http":
        raise ValueError(f"{setting}: {url!r} is not an http(s) URL")
    _plain("HTTP", setting, url.split("?", 1)[0], "use the server's https:// URL")
    return url


def client_ssl_context() -> ssl.SSLContext:
    """What an HTTPS client of ours verifies servers with: ASR_TLS_CA_FILE, else the system's CAs."""
    ca_file = settings.tls_ca_file()
    return ssl.create_default_context(cafile=None if ca_file is None else str(ca_file))


# ---- HTTP endpoints (recovery storage) ----------------------------------------------------------------
def check_storage_endpoint(setting: str, endpoint: str) -> str:
    """`endpoint` when it is https; an http endpoint only when plain text is allowed."""
    scheme = urlparse(endpoint).scheme.lower()
    if scheme == "https":
        return endpoint
    if scheme != "http":
        raise ValueError(f"{setting}: {endpoint!r} is not an http(s) endpoint")
    _plain("storage endpoint", setting, endpoint.split("?", 1)[0],
           "use an https endpoint (Azurite: --cert/--key; ASR_TLS_CA_FILE verifies a private CA's)")
    return endpoint


def azure_connection_string_endpoints(connection_string: str) -> list[str]:
    """The endpoints an Azure Storage connection string points at: its BlobEndpoint, or the one its
    DefaultEndpointsProtocol and AccountName make (the SDK's own defaulting)."""
    fields = {}
    for part in connection_string.split(";"):
        key, sep, value = part.partition("=")
        if sep:
            fields[key.strip().lower()] = value.strip()
    if "blobendpoint" in fields:
        return [fields["blobendpoint"]]
    protocol = fields.get("defaultendpointsprotocol", "https")
    suffix = fields.get("endpointsuffix", "core.windows.net")
    return [f"{protocol}://{fields.get('accountname', '?')}.blob.{suffix}"]


# ---- PostgreSQL ---------------------------------------------------------------------------------------
VERIFYING_SSLMODE = "verify-full"


def check_database_url(setting: str, url: str) -> str:
    """A PostgreSQL URL over the network must ask for `sslmode=verify-full` (server certificate and host
    name checked); SQLite and a PostgreSQL Unix socket (no network) need nothing."""
    parsed = urlparse(url)
    if not parsed.scheme.startswith("postgres"):
        return url
    query = parse_qs(parsed.query)
    host = parsed.hostname or (query.get("host") or [""])[0]
    if not host or host.startswith("/"):
        return url  # a Unix socket: nothing crosses a network
    if (query.get("sslmode") or [""])[0] == VERIFYING_SSLMODE:
        return url
    _plain("PostgreSQL", setting, _redacted(url),
           f"add ?sslmode={VERIFYING_SSLMODE} (and sslrootcert=<CA file>, default ASR_TLS_CA_FILE) to the URL")
    return url


def database_connect_args(url: str) -> dict[str, Any]:
    """libpq options added to a PostgreSQL connection: the deployment's CA (ASR_TLS_CA_FILE) as sslrootcert
    when the URL asks for verification and names no root certificate of its own."""
    parsed = urlparse(url)
    query = parse_qs(parsed.query)
    ca_file = settings.tls_ca_file()
    if (parsed.scheme.startswith("postgres") and (query.get("sslmode") or [""])[0].startswith("verify")
            and "sslrootcert" not in query and ca_file is not None):
        return {"sslrootcert": str(ca_file)}
    return {}
