"""API keys: every request under /api/ needs one, checked by `ApiKeyMiddleware` before the request is read or
any route runs; OPEN_PATHS (liveness, the OpenAPI document and its viewers) need none."""
from __future__ import annotations

import hashlib
import logging
import threading
import time

import anyio
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader, HTTPBearer
from starlette.types import ASGIApp, Receive, Scope, Send

from api import service
from models.apikeys import env_key_matches, verify_api_key
from models.db import session_scope
from workflows import settings

logger = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/healthz", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
# A verified key is remembered this long (as a SHA-256 of it, in memory): each check is a deliberately slow
# scrypt. A revoked key therefore stops working within this time.
DEFAULT_KEY_CACHE_S = 30.0
_KEY_CACHE_MAX = 1024


class _KeyCache:
    def __init__(self) -> None:
        self._until: dict[str, float] = {}
        self._lock = threading.Lock()

    def ttl(self) -> float:
        try:
            return settings.api_key_cache_s()
        except ValueError:
            return DEFAULT_KEY_CACHE_S

    def fresh(self, digest: str) -> bool:
        with self._lock:
            until = self._until.get(digest)
            return until is not None and until > time.monotonic()

    def remember(self, digest: str) -> None:
        ttl = self.ttl()
        if ttl <= 0:
            return
        with self._lock:
            if len(self._until) >= _KEY_CACHE_MAX:
                self._until.clear()
            self._until[digest] = time.monotonic() + ttl


_key_cache = _KeyCache()


def _key_is_valid(key: str) -> bool:
    """Whether `key` is a live key of the database or one listed by hash in ASR_API_KEY_HASHES."""
    digest = hashlib.sha256(key.encode()).hexdigest()
    if _key_cache.fresh(digest):
        return True
    valid = bool(settings.api_key_hashes()) and env_key_matches(key)
    if not valid:
        service._ensure_database()
        with session_scope() as session:
            valid = verify_api_key(session, key) is not None
    if valid:
        _key_cache.remember(digest)
    return valid


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


class ApiKeyMiddleware:
    """Refuses any request outside OPEN_PATHS without a valid API key, before the request body is read or any
    route runs (a plain ASGI middleware, so streamed responses pass through untouched)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        key = _presented_key(scope)
        if not key:
            await _refuse(scope, receive, send, 401,
                          "an API key is required: send it as 'X-API-Key: <key>' or 'Authorization: Bearer <key>'")
            return
        try:
            valid = await anyio.to_thread.run_sync(_key_is_valid, key)
        except Exception:  # noqa: BLE001 - a database outage must not look like a bad key
            logger.exception("could not check an API key")
            await _refuse(scope, receive, send, 503, "the API key could not be checked (database unavailable); retry")
            return
        if not valid:
            await _refuse(scope, receive, send, 401, "the API key is not valid (unknown or revoked)")
            return
        await self.app(scope, receive, send)


async def _refuse(scope: Scope, receive: Receive, send: Send, status: int, message: str) -> None:
    headers = {"WWW-Authenticate": 'Bearer realm="asr", ApiKey header="X-API-Key"'} if status == 401 else None
    await JSONResponse({"error": message}, status_code=status, headers=headers)(scope, receive, send)


# For the OpenAPI document only: ApiKeyMiddleware does the checking.
_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="An API key of this deployment")
_bearer = HTTPBearer(auto_error=False, description="The same API key, as a bearer token")
