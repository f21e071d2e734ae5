"""Sessions of the web console, kept server-side in the deployment's Redis (the one holding live job progress,
ASR_REDIS_URL): a browser cannot send the API key header on a page load, so a login with the key opens a
session, and the browser holds only the session's random token, in an HttpOnly, SameSite=Strict cookie
(Secure over HTTPS).

What Redis keeps under the SHA-256 of the token (so a reader of Redis cannot use a session from it): the key's
id and stored hash (never the key), the role it had at login, the session's CSRF token, and when it began. Each
request checks the key is still live and takes its role now (`models.apikeys.live_key_role`): revoking the key
or changing its role acts on its open sessions at once. A session ends after ASR_CONSOLE_SESSION_S without a
request, ASR_CONSOLE_SESSION_MAX_S after its login, or at logout (its record is deleted: the cookie is then
worth nothing, even if copied).
"""
from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import asdict, dataclass

import redis

from workflows import settings, transport

COOKIE = "asr_console"
_PREFIX = "asr:console:session:"
_TOKEN_BYTES = 32


@dataclass(frozen=True)
class ConsoleSession:
    key_id: str | None
    key_hash: str
    role: str
    csrf: str
    started: float


def _client() -> redis.Redis:
    url = settings.progress_redis_url()
    return redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2, decode_responses=True,
                                **transport.redis_client_options(url))


def _record_key(token: str) -> str:
    return _PREFIX + hashlib.sha256(token.encode()).hexdigest()


def _idle_s() -> int:
    return max(1, int(settings.console_session_s()))


def open_session(key_id: str | None, key_hash: str, role: str) -> tuple[str, ConsoleSession]:
    """A new session of the key: (the token the browser keeps, the session)."""
    token = secrets.token_urlsafe(_TOKEN_BYTES)
    session = ConsoleSession(key_id, key_hash, role, secrets.token_urlsafe(_TOKEN_BYTES), time.time())
    _client().set(_record_key(token), json.dumps(asdict(session)), ex=_idle_s())
    return token, session


def load_session(token: str | None) -> ConsoleSession | None:
    """The live session of `token`, renewed for ASR_CONSOLE_SESSION_S; None for an unknown, ended or malformed one."""
    if not token or len(token) > 128:
        return None
    record_key = _record_key(token)
    client = _client()
    raw = client.get(record_key)
    if raw is None:
        return None
    try:
        session = ConsoleSession(**json.loads(raw))
    except (TypeError, ValueError):
        client.delete(record_key)
        return None
    left = session.started + settings.console_session_max_s() - time.time()
    if left <= 0:
        client.delete(record_key)
        return None
    client.expire(record_key, max(1, min(_idle_s(), int(left))))
    return session


def close_session(token: str | None) -> None:
    """Ends the session of `token` (logout): its record is deleted."""
    if token and len(token) <= 128:
        _client().delete(_record_key(token))
