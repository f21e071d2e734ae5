"""API keys of the REST API: who may call it, and with which role. Only a salted scrypt hash of each key is kept.

A key reads `asr_<prefix>_<secret>`. The prefix is stored in clear and finds the key's row, so a request costs
one scrypt check, not one per key; the whole key is what is hashed. Keys are shown once, when created.

Each key has one role (`ROLES`): `reader` reads, `operator` also acts on protected VMs (replication, drills,
failovers, plan runs, jobs), `admin` also changes the fabric, keys, policies and plan definitions, and
disables protection. A higher role includes the lower ones.

Deployments that cannot write to the database list keys in `ASR_API_KEY_HASHES` instead, comma-separated
entries `[ROLE:][asr_<prefix>:]HASH` (`env_entry` makes one): ROLE is reader, operator or admin; the
`asr_<prefix>` id lets a request find its entry without trying the others. A plain HASH (the format before
roles) means admin, as such a key could do everything before; a key without an id may have any form, but every
request whose key matches no id costs one scrypt per such entry, so give new keys an id.

Functions flush but never commit: the caller's `session_scope` does.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from sqlmodel import Field, Session, SQLModel, select

from datapath.errors import NonRecoverableError
from models.db import UtcDateTime, clock_now, new_id, validate_name
from models.fabric import _hash_key  # the same salted scrypt the hosts' registration keys use
from workflows import settings

__all__ = [
    "ApiKey", "ApiKeyNotFoundError", "API_KEY_HASHES_ENV", "create_api_key", "verify_api_key", "revoke_api_key",
    "list_api_keys", "hash_key", "key_matches", "env_key_matches", "describe", "ROLES", "role_allows",
    "check_role", "EnvKey", "env_keys", "env_key_entry", "env_key_role", "env_entry", "key_id", "live_key_role",
]

ROLES = ("reader", "operator", "admin")
"""From least to most: each role may do what the ones before it may."""


def role_allows(role: str | None, needed: str) -> bool:
    """Whether a key of `role` may call a route that needs `needed`."""
    return role in ROLES and ROLES.index(role) >= ROLES.index(needed)


def check_role(role: str) -> str:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}: use one of {', '.join(ROLES)}")
    return role

API_KEY_HASHES_ENV = "ASR_API_KEY_HASHES"
_PREFIX_CHARS = 10
_KEY_START = "asr_"
# Recording every use would make each request a database write; once a minute says enough.
_LAST_USED_RESOLUTION = timedelta(minutes=1)


class ApiKeyNotFoundError(NonRecoverableError):
    """No API key has this name."""


class ApiKey(SQLModel, table=True):
    __tablename__ = "api_key"

    id: str = Field(default_factory=new_id, primary_key=True, max_length=36)
    name: str = Field(unique=True, max_length=64)
    prefix: str = Field(unique=True, max_length=16)
    key_hash: str = Field(max_length=256)
    role: str = Field(default="reader", max_length=16)
    created_at: datetime = Field(default_factory=clock_now, sa_type=UtcDateTime)
    last_used_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    revoked_at: datetime | None = Field(default=None, sa_type=UtcDateTime)


def hash_key(key: str) -> str:
    """`scrypt$N$r$p$salt$digest` of the key, a new salt each time."""
    if not isinstance(key, str) or not key:
        raise ValueError("an API key is non-empty text")
    return _hash_key(key)


def key_matches(key: str, stored: str) -> bool:
    """Whether `key` hashes to `stored` (compared in constant time); False for a malformed hash."""
    if not isinstance(key, str) or not key or not isinstance(stored, str):
        return False
    try:
        scheme, n, r, p, salt, expected = stored.strip().split("$")
        if scheme != "scrypt":
            return False
        expected_bytes = base64.b64decode(expected, validate=True)
        actual = hashlib.scrypt(key.encode(), salt=base64.b64decode(salt, validate=True), n=int(n), r=int(r),
                                p=int(p), dklen=len(expected_bytes))
    except ValueError:
        return False
    return hmac.compare_digest(actual, expected_bytes)


class EnvKey(NamedTuple):
    """An entry of ASR_API_KEY_HASHES: the key's role, its id prefix (None: a key of any form) and hash."""
    role: str
    prefix: str | None
    key_hash: str


def env_keys(hashes: str | None = None) -> list[EnvKey]:
    """The well-formed entries of ASR_API_KEY_HASHES (`[ROLE:][asr_<prefix>:]HASH`, comma-separated); a
    malformed one is left out (it could never match)."""
    listed = settings.api_key_hashes() if hashes is None else hashes
    entries = []
    for entry in listed.split(","):
        *fields, key_hash = entry.strip().split(":")
        role, prefix = "admin", None  # a plain hash: a key of before roles, which could do everything
        ok = key_hash.startswith("scrypt$") and len(fields) <= 2
        for field in fields:
            if field in ROLES:
                role = field
            elif field.startswith(_KEY_START) and _prefix_of(field + "_x") is not None:
                prefix = _prefix_of(field + "_x")
            else:
                ok = False
        if ok:
            entries.append(EnvKey(role, prefix, key_hash))
    return entries


def env_key_entry(key: str, hashes: str | None = None) -> EnvKey | None:
    """The entry of ASR_API_KEY_HASHES that lists `key`, else None. A key with an id is checked against the
    entry of that id only (one scrypt), and against entries without id, never against other ids'."""
    if not isinstance(key, str) or not key or len(key) > 512:
        return None
    prefix = _prefix_of(key)
    for entry in env_keys(hashes):
        if entry.prefix is not None and entry.prefix != prefix:
            continue
        if key_matches(key, entry.key_hash):
            return entry
    return None


def env_key_role(key: str, hashes: str | None = None) -> str | None:
    """The role of `key` if ASR_API_KEY_HASHES lists it, else None (`env_key_entry`)."""
    entry = env_key_entry(key, hashes)
    return None if entry is None else entry.role


def live_key_role(session: Session, key_hash: str) -> str | None:
    """The role of the key whose stored hash is `key_hash` while it is live (listed in ASR_API_KEY_HASHES, or a
    database key not revoked), else None: what a session opened with a key (the web console's) is checked
    against on each request, so revoking the key or changing its role acts on the session too, without the
    session keeping the key itself."""
    if not isinstance(key_hash, str) or not key_hash.startswith("scrypt$"):
        return None
    for entry in env_keys():
        if hmac.compare_digest(entry.key_hash, key_hash):
            return entry.role
    row = session.exec(select(ApiKey).where(ApiKey.key_hash == key_hash)).first()
    return row.role if row is not None and row.revoked_at is None else None


def env_key_matches(key: str, hashes: str | None = None) -> bool:
    """Whether `key` is one of the keys ASR_API_KEY_HASHES lists."""
    return env_key_role(key, hashes) is not None


def key_id(key: str) -> str | None:
    """`asr_<prefix>` of a key of that form: not secret, safe to log; None for other keys."""
    prefix = _prefix_of(key) if isinstance(key, str) else None
    return None if prefix is None else f"{_KEY_START}{prefix}"


def env_entry(key: str, role: str) -> str:
    """The ASR_API_KEY_HASHES entry of `key` with `role`: `ROLE:asr_<prefix>:HASH`, or `ROLE:HASH` for a key
    without an id."""
    check_role(role)
    ident = key_id(key)
    return ":".join(part for part in (role, ident, hash_key(key)) if part)


def new_key() -> tuple[str, str]:
    """A new key and its id prefix."""
    prefix = secrets.token_hex(_PREFIX_CHARS // 2)
    return f"{_KEY_START}{prefix}_{secrets.token_urlsafe(32)}", prefix


def create_api_key(session: Session, name: str, role: str = "reader") -> tuple[ApiKey, str]:
    """A new key named `name` with `role`; returns its row and the key itself, which is not kept anywhere."""
    validate_name(name, "API key")
    check_role(role)
    if session.exec(select(ApiKey).where(ApiKey.name == name)).first() is not None:
        raise ValueError(f"an API key named {name!r} already exists")
    key, prefix = new_key()
    row = ApiKey(name=name, prefix=prefix, key_hash=hash_key(key), role=role)
    session.add(row)
    session.flush()
    return row, key


def _prefix_of(key: str) -> str | None:
    if not key.startswith(_KEY_START) or len(key) <= len(_KEY_START) + _PREFIX_CHARS + 1:
        return None
    prefix = key[len(_KEY_START):len(_KEY_START) + _PREFIX_CHARS]
    return prefix if key[len(_KEY_START) + _PREFIX_CHARS] == "_" else None


def verify_api_key(session: Session, key: str) -> ApiKey | None:
    """The live (not revoked) key row `key` belongs to, or None."""
    if not isinstance(key, str) or len(key) > 512:
        return None
    prefix = _prefix_of(key)
    if prefix is None:
        return None
    row = session.exec(select(ApiKey).where(ApiKey.prefix == prefix)).first()
    if row is None or row.revoked_at is not None or not key_matches(key, row.key_hash):
        return None
    now = clock_now()
    if row.last_used_at is None or now - row.last_used_at >= _LAST_USED_RESOLUTION:
        row.last_used_at = now
        session.add(row)
        session.flush()
    return row


def revoke_api_key(session: Session, name: str) -> ApiKey:
    """Revoke the key named `name` (its row stays, for the record); ApiKeyNotFoundError if there is none."""
    row = session.exec(select(ApiKey).where(ApiKey.name == name)).first()
    if row is None:
        raise ApiKeyNotFoundError(f"API key {name!r} not found")
    if row.revoked_at is None:
        row.revoked_at = clock_now()
        session.add(row)
        session.flush()
    return row


def list_api_keys(session: Session) -> list[ApiKey]:
    return list(session.exec(select(ApiKey).order_by(ApiKey.name)))


def describe(row: ApiKey) -> dict[str, Any]:
    """The key's record, without its hash."""
    return {
        "id": row.id, "name": row.name, "prefix": row.prefix, "role": row.role,
        "created_at": row.created_at.isoformat(),
        "last_used_at": row.last_used_at.isoformat() if row.last_used_at else None,
        "revoked_at": row.revoked_at.isoformat() if row.revoked_at else None,
    }
