"""What an item's recovery storage may be: the administrator's allow-list, checked where a protection is
requested (the API, the CLI) and again where a worker opens the storage, since the stored options come from
a database more processes than the API can write.

- `file:///dir` only inside a root listed in ASR_STORAGE_ROOTS (none listed: no local storage at all);
- `azure:<container>` with known options only: `connection_string_env` naming a variable of the workers
  that matches CONNECTION_ENV, a name ending in _CONNECTION_STRING (never ASR_DATABASE_URL, the
  key-encryption key or another setting of theirs), `account_url` only
  `https://` and listed in ASR_STORAGE_ACCOUNT_URLS (workers send signed requests there), `parallelism`;
- never a credential itself: a connection string, key, SAS token or credential is not an option.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import urlsplit

FILE_OPTIONS = frozenset({"parallelism"})
AZURE_OPTIONS = frozenset({"connection_string_env", "account_url", "parallelism"})
CONNECTION_ENV = re.compile(r"ASR_(AZURE|STORAGE)_([A-Z0-9]{1,32}_){0,4}CONNECTION_STRING")
"""The variables `connection_string_env` may name: those meant to hold a storage connection string
(ASR_AZURE_CONNECTION_STRING, ASR_STORAGE_DR2_CONNECTION_STRING), never another setting of the workers: not
the key-encryption key (ASR_STORAGE_KEK), nor the allow-lists (ASR_STORAGE_ROOTS, ASR_STORAGE_ACCOUNT_URLS)."""


class StoragePolicyError(ValueError):
    """A recovery storage or option the administrator's allow-list does not allow."""


def check_storage(url: str, options: Mapping[str, Any], *, roots: Sequence[str], account_urls: Sequence[str],
                  resolve: bool = False) -> None:
    """StoragePolicyError naming what `url` with `options` may not be. `resolve`: follow links in a local
    path (where it exists: on the worker that opens it) before comparing it with the roots."""
    if url.startswith("file://"):
        _check_keys(options, FILE_OPTIONS, "file://")
        _check_root(url[len("file://"):], roots, resolve)
    elif url.startswith("azure:"):
        _check_keys(options, AZURE_OPTIONS, "azure:")
        variable = options.get("connection_string_env")
        if variable is not None and not (isinstance(variable, str) and CONNECTION_ENV.fullmatch(variable)):
            raise StoragePolicyError(
                f"connection_string_env must name a storage variable of the workers ({CONNECTION_ENV.pattern}), "
                f"got {variable!r}")
        account_url = options.get("account_url")
        if account_url is not None:
            _check_account_url(account_url, account_urls)
        if (variable is None) == (account_url is None):
            raise StoragePolicyError("an azure: storage needs exactly one of connection_string_env or account_url")
    else:
        raise StoragePolicyError(f"recovery storage must be 'file:///absolute/dir' or 'azure:<container>', "
                                 f"got {url!r}")
    parallelism = options.get("parallelism")
    if parallelism is not None and (not isinstance(parallelism, int) or isinstance(parallelism, bool)
                                    or not 1 <= parallelism <= 32):
        raise StoragePolicyError(f"parallelism must be a whole number from 1 to 32, got {parallelism!r}")


def _check_keys(options: Mapping[str, Any], allowed: frozenset[str], kind: str) -> None:
    unknown = sorted(map(str, options.keys() - allowed))
    if unknown:
        raise StoragePolicyError(
            f"unknown storage option(s) {', '.join(unknown)} for {kind} storage (allowed: {', '.join(sorted(allowed))}"
            f"); credentials are never options: name the workers' variable holding them with connection_string_env")


def _check_root(path: str, roots: Sequence[str], resolve: bool) -> None:
    where = PurePosixPath(path)
    if not where.is_absolute() or "\x00" in path or ".." in where.parts:
        raise StoragePolicyError(f"a file:// recovery storage needs an absolute path without '..', got {path!r}")
    if not roots:
        raise StoragePolicyError("no local recovery storage is allowed here: an administrator lists the folders "
                                 "it may use in ASR_STORAGE_ROOTS")
    candidate = os.path.realpath(path) if resolve else os.path.normpath(path)
    for root in roots:
        base = os.path.realpath(root) if resolve else os.path.normpath(root)
        if candidate == base or candidate.startswith(base.rstrip("/") + "/"):
            return
    raise StoragePolicyError(f"{path} is not inside a recovery storage root allowed here "
                             f"(ASR_STORAGE_ROOTS: {', '.join(roots)})")


def _check_account_url(account_url: Any, allowed: Sequence[str]) -> None:
    if not isinstance(account_url, str) or urlsplit(account_url).scheme != "https" or urlsplit(account_url).query:
        raise StoragePolicyError(f"account_url must be an https:// address without a query, got {account_url!r}")
    if account_url.rstrip("/") not in {url.rstrip("/") for url in allowed}:
        raise StoragePolicyError(f"account_url {account_url} is not a storage account allowed here "
                                 f"(ASR_STORAGE_ACCOUNT_URLS)")
