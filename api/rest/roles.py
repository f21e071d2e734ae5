"""Roles: every route under /api/v1 declares the role a key needs for it (`dependencies=[READER]`,
`[OPERATOR]` or `[ADMIN]`), and the application refuses to start when one does not (`check_routes`).

The check itself happens in `ApiKeyMiddleware` (api/rest/auth.py), which finds the route a request is for
(`required_role`) and answers 403 before the request body is read or validated: a reader gets 403, never a
422 about a body it may not send. The dependency checks again, in case a route is ever reached another way.

| role     | may                                                                                              |
|----------|--------------------------------------------------------------------------------------------------|
| reader   | lists, shows, recovery points, health, jobs and their event streams, Prometheus metrics, a      |
|          |   plan's dry run (POST /plans/{name}/validate: it changes nothing)                               |
| operator | + protect, replicate now, resync, consistency check, verify, drills, failovers, failback,         |
|          |   reverse replication, plan runs, job cancel/retry/restart/resume, VM start/stop/console         |
| admin    | + sites, clouds, hosts (and their new keys), VMs (create, register), network mappings, policies, |
|          |   plan definitions (each also changed or removed), disabling protection and deleting recovery    |
|          |   points (each with {"confirm": "<vm name>"}; both refused while a point is retention-locked)    |
"""
from __future__ import annotations

import re
from typing import Any, NamedTuple

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.routing import iter_route_contexts
from starlette.routing import compile_path
from starlette.types import Scope

from models.apikeys import ROLES, role_allows

from .common import API_PREFIX

ROLE_STATE = "api_role"
"""The key's role, in the request's scope["state"] (set by ApiKeyMiddleware)."""


class RoleCheck:
    """The dependency a route declares its role with; its `role` is what ApiKeyMiddleware reads."""

    def __init__(self, role: str) -> None:
        assert role in ROLES, role
        self.role = role

    def __call__(self, request: Request) -> None:
        have = request.scope.get("state", {}).get(ROLE_STATE)
        if not role_allows(have, self.role):
            raise HTTPException(403, refusal(have, self.role))

    def __repr__(self) -> str:
        return f"RoleCheck({self.role!r})"


READER = Depends(RoleCheck("reader"))
OPERATOR = Depends(RoleCheck("operator"))
ADMIN = Depends(RoleCheck("admin"))


def refusal(have: str | None, needed: str) -> str:
    return f"this needs an API key with the {needed} role; this key is {have or 'without a role'}"


def route_role(route: Any) -> str | None:
    """The role `route` declares, or None."""
    dependant = getattr(route, "dependant", None)
    for dependency in getattr(dependant, "dependencies", ()):
        if isinstance(dependency.call, RoleCheck):
            return dependency.call.role
    return None


class _Entry(NamedTuple):
    methods: frozenset[str]
    pattern: re.Pattern[str]
    path: str
    role: str | None
    route: Any


def _table(app: Any) -> list[_Entry]:
    """Every route of `app` with its full path, in the order the router matches them (routes of included
    routers are nested in this FastAPI: `iter_route_contexts` walks them)."""
    entries = []
    for context in iter_route_contexts(getattr(app, "routes", ())):
        path = context.path
        if not path:
            continue
        pattern, _format, _convertors = compile_path(path)
        entries.append(_Entry(frozenset(context.methods or ()), pattern, path, route_role(context.original_route),
                              context.original_route))
    return entries


_tables: dict[int, list[_Entry]] = {}


def table(app: Any) -> list[_Entry]:
    found = _tables.get(id(app))
    if found is None:
        found = _tables[id(app)] = _table(app)
    return found


def api_routes(app: FastAPI) -> list[_Entry]:
    """The routes under the API prefix, with their full paths and roles."""
    return [entry for entry in _table(app) if entry.path == API_PREFIX or entry.path.startswith(API_PREFIX + "/")]


def check_routes(app: FastAPI) -> None:
    """RuntimeError naming every route under the API prefix that declares no role: such an app must not start."""
    routes = api_routes(app)
    missing = [f"{sorted(entry.methods)} {entry.path}" for entry in routes if entry.role is None]
    if missing:
        raise RuntimeError("these routes declare no role (dependencies=[READER|OPERATOR|ADMIN]): " + ", ".join(missing))


def required_role(scope: Scope) -> str | None:
    """The role the route a request goes to needs (the first route whose path and method match, as the router
    picks), or None for a request no route takes (it gets 404 or 405)."""
    path, method = scope.get("path", ""), scope.get("method", "GET")
    for entry in table(scope.get("app")):
        if entry.pattern.match(path) and (method in entry.methods or (method == "HEAD" and "GET" in entry.methods)):
            return entry.role
    return None


def add_roles_to_openapi(app: FastAPI, document: dict[str, Any]) -> dict[str, Any]:
    """Each operation under the API prefix gets `x-required-role` and its role in its description."""
    for entry in api_routes(app):
        path = re.sub(r"\{(\w+):\w+\}", r"{\1}", entry.path)
        for method in entry.methods:
            operation = document.get("paths", {}).get(path, {}).get(method.lower())
            if operation is not None and entry.role is not None:
                operation["x-required-role"] = entry.role
                role_line = f"Needs an API key with the {entry.role} role (or higher)."
                operation["description"] = "\n\n".join(
                    part for part in (operation.get("description"), role_line) if part)
    return document
