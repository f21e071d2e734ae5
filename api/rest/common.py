"""What the route modules share: the name rule of request bodies, the job reference an action answers with
(202 and a Location), the error body, and a VM named in a path."""
from __future__ import annotations

from typing import Annotated, Any

from fastapi import Query, Response
from pydantic import AfterValidator, BaseModel, ConfigDict

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


Name = Annotated[str, AfterValidator(_check_name)]


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


ACCEPTED = {"status_code": 202, "response_model": JobRef,
            "response_description": "The job was started; follow it at the Location"}


def _started(response: Response, job: dict[str, Any]) -> dict[str, Any]:
    response.headers["Location"] = f"{API_PREFIX}/jobs/{job['job_id']}"
    return job


# ---- a VM in a path ----------------------------------------------------------------------------------------
def _vm_ref(vm: str, host: str | None) -> str:
    """A VM in a path is its name, its id or "host/name"; `?host=` may name the host instead."""
    return f"{host}/{vm}" if host else vm


HostQuery = Annotated[Name | None, Query(description="The VM's host, when several hosts have a VM of that name")]
