"""API keys of the REST API: created (the key shown once), listed, revoked, or hashed for a deployment that
keeps them out of the database."""
from __future__ import annotations

from sqlmodel import select

from models import apikeys
from models.db import session_scope

from .errors import Conflict, _operation
from .lookups import _name


@_operation
def create_api_key(name: str) -> dict:
    """A new API key for the REST API; the key is in the answer this once (only its hash is kept)."""
    _name(name, "API key")
    with session_scope() as session:
        if session.exec(select(apikeys.ApiKey).where(apikeys.ApiKey.name == name)).first() is not None:
            raise Conflict(f"an API key named {name!r} already exists")
        row, key = apikeys.create_api_key(session, name)
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
def hash_api_key(key: str) -> str:
    """The salted hash of `key`, for the ASR_API_KEY_HASHES setting of a deployment that keeps keys out of the
    database."""
    return apikeys.hash_key(key)
