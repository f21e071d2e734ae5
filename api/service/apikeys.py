"""API keys of the REST API: created (the key shown once), listed, revoked, or hashed for a deployment that
keeps them out of the database."""
from __future__ import annotations

from sqlmodel import select

from models import apikeys
from models.db import session_scope

from .errors import Conflict, Invalid, _operation
from .lookups import _name


def _role(role: str) -> str:
    try:
        return apikeys.check_role(role)
    except ValueError as exc:
        raise Invalid(str(exc)) from None


@_operation
def create_api_key(name: str, role: str = "reader") -> dict:
    """A new API key for the REST API with `role` (reader, operator or admin); the key is in the answer this
    once (only its hash is kept)."""
    _name(name, "API key")
    _role(role)
    with session_scope() as session:
        if session.exec(select(apikeys.ApiKey).where(apikeys.ApiKey.name == name)).first() is not None:
            raise Conflict(f"an API key named {name!r} already exists")
        row, key = apikeys.create_api_key(session, name, role)
        return {**apikeys.describe(row), "key": key}


@_operation
def list_api_keys() -> list[dict]:
    with session_scope() as session:
        return [apikeys.describe(row) for row in apikeys.list_api_keys(session)]


@_operation
def revoke_api_key(name: str) -> dict:
    with session_scope() as session:
        return apikeys.describe(apikeys.revoke_api_key(session, _name(name, "API key")))


@_operation
def hash_api_key(key: str, role: str = "reader") -> str:
    """The ASR_API_KEY_HASHES entry of `key` with `role` (`ROLE:asr_<prefix>:HASH`, or `ROLE:HASH` for a key
    without an id), for a deployment that keeps keys out of the database."""
    return apikeys.env_entry(key, _role(role))


@_operation
def create_env_api_key(role: str = "reader") -> dict:
    """A new key with an id and its ASR_API_KEY_HASHES entry; nothing is stored."""
    key, _prefix = apikeys.new_key()
    return {"key": key, "role": _role(role), "entry": apikeys.env_entry(key, role)}
