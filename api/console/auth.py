"""Who is using the console, and what they may do: the session behind the request's cookie (api/console/sessions.py),
the role its key has now, and for a form posted, the session's CSRF token.

Every console route declares its role (`dependencies=[READER]`, `[OPERATOR]`; roles as the API's:
api/rest/roles.py), or is one of PUBLIC_PATHS (the login page, the static assets), and the application does
not start otherwise (`check_console_routes`). A request without a live session is sent to the login page (a
page) or answered 401 (an event stream, a form); a role too small gets 403. A POST is refused with 403 unless
its form carries the session's CSRF token and, when the browser names one, its Origin is this server's: with
the SameSite=Strict cookie, another site can neither send the cookie nor forge the form.
"""
from __future__ import annotations

import hmac
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

import anyio
import redis
from fastapi import Depends, HTTPException, Request
from fastapi.routing import iter_route_contexts

from api import service
from models.apikeys import ROLES, live_key_role, role_allows
from models.db import session_scope

from . import sessions

PREFIX = "/console"
PUBLIC_PATHS = frozenset({PREFIX, f"{PREFIX}/login"})  # /console only redirects to /console/
PUBLIC_PREFIXES = (f"{PREFIX}/static",)
_MAX_FORM_FIELDS = 32


@dataclass(frozen=True)
class ConsoleUser:
    """The person behind a request: their session's token and CSRF token, their key's id and role now."""
    token: str
    key_id: str | None
    role: str
    csrf: str

    def may(self, role: str) -> bool:
        return role_allows(self.role, role)


class LoginRequired(Exception):
    """No live session: a page sends the browser to the login page, anything else answers 401."""


def _current_user_sync(token: str | None) -> ConsoleUser | None:
    found = sessions.load_session(token)
    if found is None:
        return None
    service._ensure_database()
    with session_scope() as session:
        role = live_key_role(session, found.key_hash)
    if role is None:  # the key was revoked since the login: its sessions end with it
        sessions.close_session(token)
        return None
    return ConsoleUser(token, found.key_id, role, found.csrf)


async def current_user(request: Request) -> ConsoleUser | None:
    """The user of the request's session (cached on the request), or None."""
    if not hasattr(request.state, "console_user"):
        token = request.cookies.get(sessions.COOKIE)
        try:
            request.state.console_user = await anyio.to_thread.run_sync(_current_user_sync, token) if token else None
        except redis.RedisError as error:
            raise HTTPException(503, f"the console's sessions cannot be read (Redis: {error}); retry") from None
    return request.state.console_user


async def read_form(request: Request) -> dict[str, str]:
    """The request's url-encoded form (its last value per field), read once; the body is already bounded by
    BodyLimitMiddleware."""
    if not hasattr(request.state, "console_form"):
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        body = await request.body()
        if body and content_type != "application/x-www-form-urlencoded":
            raise HTTPException(415, "the console's forms are sent as application/x-www-form-urlencoded")
        try:
            pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False,
                              max_num_fields=_MAX_FORM_FIELDS)
        except (UnicodeDecodeError, ValueError):
            raise HTTPException(400, "the form could not be read") from None
        request.state.console_form = dict(pairs)
    return request.state.console_form


def same_origin(request: Request) -> bool:
    """False when the browser names an Origin (or, without it, a Referer) other than this server."""
    origin = request.headers.get("origin") or request.headers.get("referer")
    if not origin or origin == "null":
        return origin != "null"
    parts = urlsplit(origin)
    return (parts.scheme, parts.netloc) == (request.url.scheme, request.headers.get("host", request.url.netloc))


class ConsoleRole:
    """The dependency a console route declares its role with (its `role` is what check_console_routes reads)."""

    def __init__(self, role: str) -> None:
        assert role in ROLES, role
        self.role = role

    async def __call__(self, request: Request) -> ConsoleUser:
        user = await current_user(request)
        if user is None:
            raise LoginRequired()
        if not user.may(self.role):
            raise HTTPException(403, f"this needs an API key with the {self.role} role; yours is {user.role}")
        if request.method == "POST":
            if not same_origin(request):
                raise HTTPException(403, "refused: the form was sent from another site")
            form = await read_form(request)
            if not hmac.compare_digest(form.get("csrf", "").encode(), user.csrf.encode()):
                raise HTTPException(403, "refused: the form's CSRF token is missing or not this session's; "
                                         "reload the page and try again")
        return user

    def __repr__(self) -> str:
        return f"ConsoleRole({self.role!r})"


READER = Depends(ConsoleRole("reader"))
OPERATOR = Depends(ConsoleRole("operator"))


def route_role(route: object) -> str | None:
    dependant = getattr(route, "dependant", None)
    for dependency in getattr(dependant, "dependencies", ()):
        if isinstance(dependency.call, ConsoleRole):
            return dependency.call.role
    return None


def check_console_routes(app: object) -> None:
    """RuntimeError naming every console route that is not public and declares no role."""
    missing = []
    for context in iter_route_contexts(getattr(app, "routes", ())):
        path = context.path or ""
        if not (path == PREFIX or path.startswith(PREFIX + "/")) or path in PUBLIC_PATHS \
                or path.startswith(PUBLIC_PREFIXES):
            continue
        if route_role(context.original_route) is None:
            missing.append(f"{sorted(context.methods or ())} {path}")
    if missing:
        raise RuntimeError("these console routes declare no role (dependencies=[READER|OPERATOR]): "
                           + ", ".join(missing))
