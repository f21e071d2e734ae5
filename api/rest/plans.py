"""Routes of recovery plans: create, list, show and run them."""
from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Response
from pydantic import Field

from api import service

from .common import ACCEPTED, Name, NamePath, Text, _Body, _started
from .roles import ADMIN, OPERATOR, READER

router = APIRouter()


# ---- request bodies ----------------------------------------------------------------------------------------
PlanGroups = list[Annotated[dict[Text(16), Any], Field(max_length=4)]]
PLAN_DESCRIPTION_CHARS = 1024


class PlanIn(_Body):
    name: Name
    groups: PlanGroups = Field(max_length=20, description=(
        "In failover order: {name, vms: [VM name, 'host/name' or id], before: [action], after: [action]}; an "
        "action is {kind: script, name, script: a registered script (GET /plan-scripts), args: {argument: value}, "
        "timeout_s} or {kind: manual, name, instructions}. A command line (command: [argv]) is refused"))
    description: str = Field("", max_length=PLAN_DESCRIPTION_CHARS)


class PlanRunIn(_Body):
    operation: str = Field(max_length=32, description="test_failover, planned_failover, unplanned_failover or failback")
    point: str | None = Field(None, max_length=64)
    recovery_host: Name | None = None
    test_network: Name | None = None
    mode: str | None = Field(None, max_length=32)
    create_vm: bool | None = None


# ---- routes ------------------------------------------------------------------------------------------------
@router.get("/plan-scripts", dependencies=[READER], tags=["plans"], summary="The scripts plans may run")
def plan_scripts() -> list[dict[str, Any]]:
    return service.plan_scripts()


@router.get("/plans", dependencies=[READER], tags=["plans"], summary="List recovery plans")
def list_plans() -> list[dict[str, Any]]:
    return service.list_plans()


@router.post("/plans", dependencies=[ADMIN], tags=["plans"], status_code=201, summary="Create a recovery plan")
def create_plan(body: PlanIn) -> dict[str, Any]:
    return service.create_plan(body.name, body.groups, body.description)


@router.post("/plans/{name:path}/validate", dependencies=[READER], tags=["plans"],
             summary="Dry run of a plan run: every check it makes, nothing started",
             description=("The body of POST /plans/{name}/run. Answers the groups the run would take when it could "
                          "start now, or the error the run would give. A reader may ask: it changes nothing."))
def validate_plan(name: NamePath, body: PlanRunIn) -> dict[str, Any]:
    options = body.model_dump(exclude={"operation"}, exclude_none=True)
    return service.validate_plan(name, body.operation, **options)


@router.get("/plans/{name:path}", dependencies=[READER], tags=["plans"], summary="A recovery plan")
def show_plan(name: NamePath) -> dict[str, Any]:
    return service.show_plan(name)


@router.post("/plans/{name:path}/run", dependencies=[OPERATOR],
             tags=["plans"], summary="Run a recovery plan", **ACCEPTED)
def run_plan(name: NamePath, body: PlanRunIn, response: Response) -> dict[str, Any]:
    options = body.model_dump(exclude={"operation"}, exclude_none=True)
    return _started(response, service.run_plan(name, body.operation, **options))
