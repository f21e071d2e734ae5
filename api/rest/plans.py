"""Routes of recovery plans: create, list, show and run them."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from pydantic import Field

from api import service

from .common import ACCEPTED, Name, _Body, _started
from .roles import ADMIN, OPERATOR, READER

router = APIRouter()


# ---- request bodies ----------------------------------------------------------------------------------------
class PlanIn(_Body):
    name: Name
    groups: list[dict[str, Any]] = Field(description=(
        "In failover order: {name, vms: [VM name, 'host/name' or id], before: [action], after: [action]}; an "
        "action is {kind: script, name, command: [argv], timeout_s} or {kind: manual, name, instructions}"))
    description: str = ""


class PlanRunIn(_Body):
    operation: str = Field(description="test_failover, planned_failover, unplanned_failover or failback")
    point: str | None = None
    recovery_host: Name | None = None
    test_network: Name | None = None
    mode: str | None = None
    create_vm: bool | None = None


# ---- routes ------------------------------------------------------------------------------------------------
@router.get("/plans", dependencies=[READER], tags=["plans"], summary="List recovery plans")
def list_plans() -> list[dict[str, Any]]:
    return service.list_plans()


@router.post("/plans", dependencies=[ADMIN], tags=["plans"], status_code=201, summary="Create a recovery plan")
def create_plan(body: PlanIn) -> dict[str, Any]:
    return service.create_plan(body.name, body.groups, body.description)


@router.get("/plans/{name:path}", dependencies=[READER], tags=["plans"], summary="A recovery plan")
def show_plan(name: str) -> dict[str, Any]:
    return service.show_plan(name)


@router.post("/plans/{name:path}/run", dependencies=[OPERATOR],
             tags=["plans"], summary="Run a recovery plan", **ACCEPTED)
def run_plan(name: str, body: PlanRunIn, response: Response) -> dict[str, Any]:
    options = body.model_dump(exclude={"operation"}, exclude_none=True)
    return _started(response, service.run_plan(name, body.operation, **options))
