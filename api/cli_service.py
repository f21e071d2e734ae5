"""How the operator's verbs of `asr` reach the service layer, and what they do when it refuses.

Every verb is a thin shell over `api.service` (the same functions the REST API serves), imported inside the
commands so that `asr --help` and `asr disk ...` work without a database or broker. The service's refusals
(bad input, unknown name, wrong state, nothing changed) and an unreachable broker or database are one line
on stderr, `asr: error: ...`, and exit status 2: the verbs are built with `_OpGroup` and `_command`, whose
click classes do that around every command.
"""
from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click

from api.cli import _fail, _Group


def _service():
    """api.service, imported on first use (it pulls in the models, the engine and Celery)."""
    try:
        from api import service
    except ImportError as exc:  # a broken install, not an operator's mistake; still one readable line
        _fail(f"the service layer cannot be loaded: {exc}")
    return service


def _connection_problem(exc: Exception) -> str | None:
    """A readable line when `exc` says the broker or the database cannot be reached."""
    import kombu.exceptions
    import redis.exceptions
    import sqlalchemy.exc

    if isinstance(exc, (redis.exceptions.ConnectionError, kombu.exceptions.OperationalError)):
        from workflows import settings

        url = settings.broker_url()
        return f"cannot reach the broker at {_redact(url)}: {exc}"
    if isinstance(exc, sqlalchemy.exc.OperationalError):
        from models.db import database_url

        url = database_url()
        return f"cannot use the database {_redact(url)}: {exc.orig if exc.orig is not None else exc}"
    return None


def _redact(url: str) -> str:
    # A URL may carry a password (postgresql://user:secret@host/db); an error line must not print it.
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


@contextmanager
def _service_errors() -> Iterator[None]:
    """The service's refusals (ServiceError and its kinds) and unreachable services become one line on
    stderr and exit status 2, as the data path's errors do in `_Group`."""
    try:
        yield
    except click.exceptions.ClickException:
        raise
    except (click.exceptions.Exit, click.exceptions.Abort):
        raise
    except Exception as exc:
        service = sys.modules.get("api.service")
        if service is not None and isinstance(exc, service.ServiceError):
            _fail(str(exc))
        problem = _connection_problem(exc)
        if problem is not None:
            _fail(problem)
        raise


class _OpCommand(click.Command):
    def invoke(self, ctx: click.Context) -> Any:
        with _service_errors():
            return super().invoke(ctx)


class _OpGroup(_Group):
    command_class = _OpCommand

    def invoke(self, ctx: click.Context) -> Any:
        with _service_errors():
            return super().invoke(ctx)


_OpGroup.group_class = _OpGroup


def _command(group: click.Group, name: str, **kwargs: Any) -> Callable[[Callable[..., Any]], click.Command]:
    return group.command(name, cls=_OpCommand, **kwargs)
