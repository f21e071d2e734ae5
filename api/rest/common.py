"""What the route modules share: the name rule of request bodies, the job reference an action answers with
(202 and a Location), the error body and the error answers every route documents, and a VM named in a path."""
from __future__ import annotations

from typing import Annotated, Any

from fastapi import Path, Query, Response
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from models.db import validate_name

API_PREFIX = "/api/v1"


# ---- request bodies ----------------------------------------------------------------------------------------
def _check_name(value: str) -> str:
    if ".." in value or "/" in value or "\\" in value:
        raise ValueError(f"invalid name {value!r}: names cannot contain '/', '\\' or '..'")
    try:
        return validate_name(value, "")  # the same rule every table applies
    except ValueError:
        raise ValueError(f"invalid name {value!r}: use 1 to 64 letters, digits, '.', '_' or '-', starting with a "
                         f"letter or digit") from None


NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
"""What the OpenAPI schema declares of a name; `_check_name` enforces it, and refuses '..' too."""
Name = Annotated[str, Field(max_length=64, json_schema_extra={"pattern": NAME_PATTERN}), AfterValidator(_check_name)]


QUALIFIED_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}(/[A-Za-z0-9][A-Za-z0-9._-]{0,63})?$"
"""A name, or two joined by '/' ('server/cloud', 'host/vm'): what the schema declares; each part is a Name."""
QUALIFIED_NAME_CHARS = 129


def _check_qualified_name(value: str) -> str:
    for part in value.split("/", 1):
        _check_name(part)
    return value


QualifiedName = Annotated[str, Field(max_length=QUALIFIED_NAME_CHARS, json_schema_extra={
    "pattern": QUALIFIED_NAME_PATTERN}), AfterValidator(_check_qualified_name)]
"""A name, or 'server/cloud' (a VMM cloud) or 'host/vm' (a VM): in a request body."""


def Text(max_length: int) -> Any:  # noqa: N802 - a type, as Name is
    """Text of at most `max_length` characters (every string of a request body declares its bound)."""
    return Annotated[str, Field(max_length=max_length)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- answers -----------------------------------------------------------------------------------------------
class JobRef(BaseModel):
    job_id: str
    kind: str
    vm: str | None = None
    plan: str | None = None
    restarted_from: str | None = None
    recovery: str | None = None
    """For a restart: "resumed" (the same job, from the step where it stopped) or "restarted" (a new job)."""


class ErrorBody(BaseModel):
    error: str


_ERROR_ANSWERS = (
    (400, "Refused: e.g. disabling protection without its confirmation"),
    (401, "No API key, or not a valid one"), (403, "The key's role is below the route's"),
    (404, "Unknown id or name"), (409, "Busy, in the wrong state, or exists already"),
    (413, "The request body is larger than ASR_API_MAX_BODY_BYTES"), (422, "Invalid input"),
    (429, "Too many failed API keys from this client: retry after Retry-After seconds"),
    (503, "A passing outage (database, Redis, storage): retry"),
)
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description} for status, description in _ERROR_ANSWERS}
"""The error answers every route under /api/v1 documents (its router's `responses`)."""
JSON_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"description": description,
             "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}}
    for status, description in _ERROR_ANSWERS}
"""The same answers for a route whose own answer is not JSON (a job's server-sent events): FastAPI documents an
answer's model in the media type of the route, but an error is JSON whatever the route would have streamed."""


ACCEPTED = {"status_code": 202, "response_model": JobRef,
            "response_description": "The job was started; follow it at the Location"}


def _started(response: Response, job: dict[str, Any]) -> dict[str, Any]:
    response.headers["Location"] = f"{API_PREFIX}/jobs/{job['job_id']}"
    return job


# ---- parameters in a path or a query -------------------------------------------------------------------------
# Every path and query parameter declares its bound in the OpenAPI document, as the bodies do (the 1 MiB body
# cap does not cover a URL): one annotated type per kind of identifier, shared by every route that takes it.
# As in the bodies, the pattern is declared and `_check_name` enforces it, with its clear message.
NamePath = Annotated[str, Path(max_length=64, json_schema_extra={"pattern": NAME_PATTERN},
                               description="A name (or an id)"), AfterValidator(_check_name)]
"""A site, host, policy, plan or network in a path: its name, or its id (a UUID fits the name rule too)."""
VmPath = Annotated[str, Path(max_length=QUALIFIED_NAME_CHARS, json_schema_extra={"pattern": QUALIFIED_NAME_PATTERN},
                             description="The VM's name, id or 'host/name'"), AfterValidator(_check_qualified_name)]
"""A VM in a path (the `{vm:path}` of its routes, so that 'host/name' reaches them)."""
JobIdPath = Annotated[str, Path(max_length=64, pattern=NAME_PATTERN, description="The job's id")]


# ---- a VM in a path ----------------------------------------------------------------------------------------
def _vm_ref(vm: str, host: str | None) -> str:
    """A VM in a path is its name, its id or "host/name"; `?host=` may name the host instead."""
    return f"{host}/{vm}" if host else vm


HostQuery = Annotated[Name | None, Query(description="The VM's host, when several hosts have a VM of that name")]
