"""API keys and roles: every request under /api/ needs a key, checked by `ApiKeyMiddleware` before the request
is read or any route runs, and a key whose role is below the route's (api/rest/roles.py) gets 403, also before
the body is read; OPEN_PATHS (liveness, the OpenAPI document, /docs and its assets) need none, and the web
console (/console) checks its own sessions (api/console/auth.py).

What a key check may cost is bounded:
- a key is found by its id (`asr_<prefix>`), in the database and in ASR_API_KEY_HASHES: one scrypt per check,
  not one per key (entries of ASR_API_KEY_HASHES without an id are still tried one by one: give keys an id);
- a key found valid is remembered (ASR_API_KEY_CACHE_S), one found invalid too (ASR_API_KEY_NEGATIVE_CACHE_S),
  both as SHA-256 digests, in memory;
- a client (IP address) whose keys failed ASR_API_AUTH_FAILURES times within ASR_API_AUTH_WINDOW_S gets 429
  without any check, except for keys already known valid; checks under way count too, so a burst of bad keys
  sent at once starts no more checks than that; every failure is logged (client, key id, never the key).
Only HTTP and lifespan scopes pass; a websocket is closed (there are none), any other scope type refused.
"""
from __future__ import annotations

import collections
import hashlib
import logging
import math
import threading
import time
from typing import NamedTuple

import anyio
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader, HTTPBearer
from starlette.types import ASGIApp, Receive, Scope, Send

from api import service
from models.apikeys import env_key_entry, key_id, role_allows, verify_api_key
from models.db import session_scope
from workflows import settings

from .roles import ROLE_STATE, refusal, required_role

logger = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/healthz", "/openapi.json", "/docs", "/docs/oauth2-redirect"})
OPEN_PREFIXES = ("/docs/assets/",)
CONSOLE_PREFIX = "/console"
# A verified key is remembered this long (as a SHA-256 of it, in memory): each check is a deliberately slow
# scrypt. A revoked key therefore stops working within this time.
DEFAULT_KEY_CACHE_S = 30.0
_KEY_CACHE_MAX = 1024
_CLIENTS_MAX = 4096


def _setting(read, default):
    try:
        return read()
    except ValueError:
        return default


class _KeyCache:
    """Digest of a key -> (what is known of it, until when)."""

    def __init__(self, ttl) -> None:
        self._ttl = ttl
        self._until: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def ttl(self) -> float:
        return self._ttl()

    def get(self, digest: str) -> str | None:
        with self._lock:
            entry = self._until.get(digest)
            return entry[0] if entry is not None and entry[1] > time.monotonic() else None

    def fresh(self, digest: str) -> bool:
        return self.get(digest) is not None

    def remember(self, digest: str, value: str = "valid") -> None:
        ttl = self.ttl()
        if ttl <= 0:
            return
        with self._lock:
            if len(self._until) >= _KEY_CACHE_MAX:
                self._until.clear()
            self._until[digest] = (value, time.monotonic() + ttl)

    def clear(self) -> None:
        with self._lock:
            self._until.clear()


_key_cache = _KeyCache(lambda: _setting(settings.api_key_cache_s, DEFAULT_KEY_CACHE_S))
_bad_keys = _KeyCache(lambda: _setting(settings.api_key_negative_cache_s, 5.0))


class _FailureLimiter:
    """Failed key checks per client within a sliding window, counting the checks under way too: a client may
    have at most `limit` failures and checks under way together, so a burst of bad keys sent at once cannot
    start more checks than the limit either."""

    def __init__(self) -> None:
        self._failures: dict[str, collections.deque[float]] = {}
        self._checking: dict[str, int] = {}
        self._warned: dict[str, float] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _limits() -> tuple[int, float]:
        return _setting(settings.api_auth_failures, 10), _setting(settings.api_auth_window_s, 60.0)

    def _recent(self, client: str, now: float, window: float) -> collections.deque[float]:
        if client not in self._failures and len(self._failures) >= _CLIENTS_MAX:
            self._failures = {name: times for name, times in self._failures.items() if self._checking.get(name)}
        times = self._failures.setdefault(client, collections.deque())
        while times and times[0] <= now - window:
            times.popleft()
        return times

    def begin(self, client: str) -> float:
        """0 and a check of `client` may start (end it with `end`), or the seconds until one may."""
        limit, window = self._limits()
        now = time.monotonic()
        with self._lock:
            times = self._recent(client, now, window)
            checking = self._checking.get(client, 0)
            if len(times) + checking >= limit:
                return max(times[0] + window - now, 1.0) if times else 1.0
            self._checking[client] = checking + 1
            return 0.0

    def end(self, client: str, failed: bool) -> int:
        """Ends a check; returns the client's failures in the window."""
        _limit, window = self._limits()
        now = time.monotonic()
        with self._lock:
            left = self._checking.get(client, 1) - 1
            if left > 0:
                self._checking[client] = left
            else:
                self._checking.pop(client, None)
            times = self._recent(client, now, window)
            if failed:
                times.append(now)
            return len(times)

    def warn_once(self, client: str) -> bool:
        """True once per window for a client being refused."""
        _limit, window = self._limits()
        now = time.monotonic()
        with self._lock:
            if self._warned.get(client, -math.inf) > now - window:
                return False
            if len(self._warned) >= _CLIENTS_MAX:
                self._warned.clear()
            self._warned[client] = now
            return True

    def clear(self) -> None:
        with self._lock:
            self._failures.clear()
            self._checking.clear()
            self._warned.clear()


_limiter = _FailureLimiter()


class KeyIdentity(NamedTuple):
    """A valid key as a session opened with it remembers it: its role and stored hash (not secret), never the
    key itself (see models.apikeys.live_key_role)."""
    role: str
    key_hash: str
    key_id: str | None


def _key_identity(key: str) -> KeyIdentity | None:
    """The identity of `key` if it is a live key of the database or one ASR_API_KEY_HASHES lists, else None."""
    entry = env_key_entry(key) if settings.api_key_hashes() else None
    if entry is not None:
        return KeyIdentity(entry.role, entry.key_hash, key_id(key))
    if key_id(key) is not None:  # database keys all have an id
        service._ensure_database()
        with session_scope() as session:
            row = verify_api_key(session, key)
            if row is not None:
                return KeyIdentity(row.role, row.key_hash, key_id(key))
    return None


def _key_role(key: str) -> str | None:
    """The role of `key` if it is a live key of the database or one ASR_API_KEY_HASHES lists, else None."""
    identity = _key_identity(key)
    return None if identity is None else identity.role


def _key_is_valid(key: str) -> bool:
    return _key_role(key) is not None


class KeyRefused(Exception):
    """A key check refused: the HTTP status, the message to show and the headers to answer with."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


async def check_key(client: str, key: str, identify=_key_role):
    """What `identify` finds of `key` (its role by default), checked as every request's key is: refused (429)
    while `client` has too many recent failures, counted as a failure when it is not valid (401), 503 when
    it cannot be checked. Raises KeyRefused; each failure is logged (client, key id, never the key)."""
    digest = hashlib.sha256(key.encode()).hexdigest()
    wait = _limiter.begin(client)
    if wait > 0:
        if _limiter.warn_once(client):
            logger.warning("too many failed API keys from %s: refusing its keys for %.0f s", client, wait)
        raise KeyRefused(429, f"too many failed API keys from {client}: retry in {wait:.0f} s",
                         {"Retry-After": str(math.ceil(wait))})
    found = None
    try:
        if not _bad_keys.fresh(digest):
            found = await anyio.to_thread.run_sync(identify, key)
    except Exception:  # noqa: BLE001 - a database outage must not look like a bad key
        _limiter.end(client, failed=False)
        logger.exception("could not check an API key")
        raise KeyRefused(503, "the API key could not be checked (database unavailable); retry") from None
    except BaseException:  # cancelled: the check did not end in a failure
        _limiter.end(client, failed=False)
        raise
    failures = _limiter.end(client, failed=found is None)
    if found is None:
        _bad_keys.remember(digest)
        logger.warning("failed API key from %s (key id %s; %d failures in the window)", client,
                       key_id(key) or "none", failures)
        raise KeyRefused(401, "the API key is not valid (unknown or revoked)")
    return found


def _presented_key(scope: Scope) -> str | None:
    headers = {name.lower(): value for name, value in scope.get("headers", [])}
    key = headers.get(b"x-api-key")
    if key is None:
        authorization = headers.get(b"authorization", b"")
        scheme, _, credentials = authorization.partition(b" ")
        if scheme.lower() == b"bearer" and credentials.strip():
            key = credentials.strip()
    try:
        return key.decode("ascii") if key else None
    except UnicodeDecodeError:
        return None


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


class ApiKeyMiddleware:
    """Refuses any request outside OPEN_PATHS without a valid API key, or whose key's role is below its route's,
    before the request body is read or any route runs (a plain ASGI middleware, so streamed responses pass
    through untouched)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope.get("type")
        if kind == "lifespan":
            await self.app(scope, receive, send)
            return
        if kind == "websocket":
            logger.warning("refused a websocket connection to %s from %s", scope.get("path"), _client(scope))
            await send({"type": "websocket.close", "code": 1008, "reason": "no websocket here"})
            return
        if kind != "http":
            logger.warning("refused a request of unknown ASGI scope type %r", kind)
            raise RuntimeError(f"unsupported ASGI scope type {kind!r}")
        if scope["path"] in OPEN_PATHS or scope["path"].startswith(OPEN_PREFIXES):
            await self.app(scope, receive, send)
            return
        if scope["path"] == CONSOLE_PREFIX or scope["path"].startswith(CONSOLE_PREFIX + "/"):
            # The web console: a browser has its session cookie, not a key; every console route checks the
            # session and its role itself, and the console does not start with a route that does not
            # (api/console/auth.py).
            await self.app(scope, receive, send)
            return
        key = _presented_key(scope)
        if not key:
            await _refuse(scope, receive, send, 401,
                          "an API key is required: send it as 'X-API-Key: <key>' or 'Authorization: Bearer <key>'")
            return
        role = await self._authenticate(scope, receive, send, key)
        if role is None:
            return
        needed = required_role(scope)
        if needed is not None and not role_allows(role, needed):
            logger.info("refused %s %s to a %s key (%s) from %s: needs %s", scope.get("method"), scope["path"], role,
                        key_id(key) or "no id", _client(scope), needed)
            await _refuse(scope, receive, send, 403, refusal(role, needed))
            return
        scope.setdefault("state", {})[ROLE_STATE] = role
        await self.app(scope, receive, send)

    async def _authenticate(self, scope: Scope, receive: Receive, send: Send, key: str) -> str | None:
        """The key's role, or None once a refusal has been sent."""
        digest = hashlib.sha256(key.encode()).hexdigest()
        role = _key_cache.get(digest)
        if role is not None:
            return role
        try:
            role = await check_key(_client(scope), key)
        except KeyRefused as refused:
            await _refuse(scope, receive, send, refused.status, refused.message, refused.headers)
            return None
        _key_cache.remember(digest, role)
        return role


async def _refuse(scope: Scope, receive: Receive, send: Send, status: int, message: str,
                  headers: dict[str, str] | None = None) -> None:
    if status == 401:
        headers = {**(headers or {}), "WWW-Authenticate": 'Bearer realm="asr", ApiKey header="X-API-Key"'}
    await JSONResponse({"error": message}, status_code=status, headers=headers)(scope, receive, send)


# For the OpenAPI document only: ApiKeyMiddleware does the checking.
_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="An API key of this deployment")
_bearer = HTTPBearer(auto_error=False, description="The same API key, as a bearer token")
