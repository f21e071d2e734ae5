"""The service's refusals: `ServiceError` and its kinds, the mapping of domain exceptions to them (`_translate`),
and `_operation`, the decorator every operation runs under."""
from __future__ import annotations

import errno
import functools
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import redis
import sqlalchemy as sa

from datapath.errors import DiskNotFoundError, NonRecoverableError, PathOutsideRootError, RecoverableError
from models import apikeys
from models.db import database_url, init_db
from models.fabric import AmbiguousVmError, VmNotFoundError
from models.plans import PlanError, PlanNotFoundError
from models.protection import InvalidStateError
from models.schema import SchemaOutOfDateError
from sites.host import VmExistsError, VmSpecError
from workflows import engine

_F = TypeVar("_F", bound=Callable[..., Any])


class ServiceError(Exception):
    """A request the service refuses; the message is the user-facing text, `status` the HTTP status."""

    status = 400

    @property
    def message(self) -> str:
        return str(self)


class NotFound(ServiceError):
    status = 404


class Conflict(ServiceError):
    """The request is valid but the state of things does not allow it now (busy, wrong state, exists)."""

    status = 409


class Invalid(ServiceError):
    """Bad input: a malformed name, a value out of range, an unknown option."""

    status = 422


class Unavailable(ServiceError):
    """A passing condition (storage or broker unreachable): try again later."""

    status = 503


def _translate(exc: BaseException) -> ServiceError | None:
    """The ServiceError for a domain exception, or None for a bug (left to surface as a 500)."""
    if isinstance(exc, ServiceError):
        return exc
    message = str(exc) or type(exc).__name__
    if isinstance(exc, (VmNotFoundError, PlanNotFoundError, engine.JobNotFoundError, DiskNotFoundError,
                        apikeys.ApiKeyNotFoundError)):
        return NotFound(message)
    if isinstance(exc, (AmbiguousVmError, PlanError, PathOutsideRootError, VmSpecError)):
        # VmSpecError: a VM definition that cannot be created (a file outside the host's root, an image
        # of the wrong format or size, a missing kernel): bad input, whatever the state of things.
        return Invalid(message)
    if isinstance(exc, (engine.ItemBusyError, InvalidStateError, engine.JobStateError, VmExistsError)):
        return Conflict(message)
    if isinstance(exc, sa.exc.IntegrityError):
        # A concurrent request created the same thing between our check and our insert.
        return Conflict("it was created or changed by another request meanwhile: look again and retry")
    if isinstance(exc, sa.exc.DataError):
        # A value the database cannot hold (PostgreSQL: a NUL character in text; a number out of its column's
        # range): bad input. Its transaction is rolled back, so nothing was written. The driver's message only:
        # SQLAlchemy's would quote the statement and its parameters.
        return Invalid(f"invalid value: {exc.orig}")
    if isinstance(exc, OSError) and exc.errno == errno.ENAMETOOLONG:
        # A path the file system cannot hold (a host registered with a root of over-long names): bad input.
        where = str(exc.filename or "")
        return Invalid(f"a path is too long for the file system: {where[:200]}{'...' if len(where) > 200 else ''}")
    if isinstance(exc, NonRecoverableError):
        # The rest of the domain's refusals say why a request cannot run now (no recovery point yet, no
        # network mapping, no recovery host): the request is well formed, the state of things is not.
        return Conflict(message)
    if isinstance(exc, (RecoverableError, redis.RedisError, SchemaOutOfDateError)):
        # An old schema: nothing works until the operator upgrades it; the message names the step.
        return Unavailable(message)
    if isinstance(exc, ValueError):
        return Invalid(message)
    return None


_ready_lock = threading.Lock()
_ready_urls: set[str] = set()


def _ensure_database() -> None:
    """Create missing tables once per database and process (a fresh deployment's first request works)."""
    url = database_url()
    if url in _ready_urls:
        return
    with _ready_lock:
        if url not in _ready_urls:
            init_db()
            _ready_urls.add(url)


def _operation(fn: _F) -> _F:
    """Run one service operation: tables ready, domain errors turned into ServiceErrors."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            _ensure_database()
            return fn(*args, **kwargs)
        except Exception as exc:
            mapped = _translate(exc)
            if mapped is None or mapped is exc:
                raise
            raise mapped from exc

    return run  # type: ignore[return-value]
