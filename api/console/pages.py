"""The console's pages (GET, reader): the dashboard of replicated items, jobs and a job, VMs and a VM, plans and a
plan with its dry run; and the job's live view, the server-sent events the job page follows. Each page is one
or more `api.service` calls rendered: the console reads nothing the API does not."""
from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent

from api import service
from api.rest import jobs as rest_jobs
from models.jobs import JobState
from models.plans import PlanOperation

from .auth import READER, ConsoleUser
from .views import render

router = APIRouter()
JOBS_SHOWN = 100
RECENT_JOBS = 10
ATTENTION_STATES = ("failed", "waiting_action", "waiting_retry", "running", "queued")


def _active(job_state: str) -> bool:
    return job_state not in ("succeeded", "failed", "cancelled")


@router.get("/", response_class=HTMLResponse)
def dashboard(request: Request, user: ConsoleUser = READER) -> HTMLResponse:
    """Replicated items (health, reasons, RPO against its thresholds, last point, last passed drill) and the jobs
    that need attention: failed, waiting for an operator or a retry, in progress."""
    items = service.health()
    attention = {state: service.list_jobs(state=state, limit=RECENT_JOBS) for state in ATTENTION_STATES}
    return render(request, "dashboard.html", user, items=items, attention=attention,
                  alerts=service.list_alerts(active=True, limit=RECENT_JOBS),
                  recent=service.list_jobs(limit=RECENT_JOBS))


@router.get("/jobs", response_class=HTMLResponse)
def jobs(request: Request, user: ConsoleUser = READER, state: Annotated[str | None, Query(max_length=32)] = None,
         kind: Annotated[str | None, Query(max_length=64)] = None,
         vm: Annotated[str | None, Query(max_length=130)] = None) -> HTMLResponse:
    filters = {"state": state or None, "kind": kind or None, "vm": vm or None}
    return render(request, "jobs.html", user, jobs=service.list_jobs(**filters, limit=JOBS_SHOWN), filters=filters,
                  states=[state.value for state in JobState], limit=JOBS_SHOWN)


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job(request: Request, job_id: str, user: ConsoleUser = READER) -> HTMLResponse:
    shown = service.show_job(job_id)
    return render(request, "job.html", user, job=shown, active=_active(shown["state"]))


@router.get("/jobs/{job_id}/events", response_class=EventSourceResponse)
async def job_events(user: ConsoleUser = READER,
                     watch: Annotated[rest_jobs._Watch, Depends(rest_jobs._watch)] = None,
                     ) -> AsyncIterator[ServerSentEvent]:
    """The API's event stream of the job (GET /api/v1/jobs/{id}/events), for the job page's script: a browser's
    EventSource sends the session cookie, not an API key. (The session is checked first: dependencies run in
    the order they are declared, and the watch already reads the job.)"""
    async for event in rest_jobs.job_events(watch):
        yield event


@router.get("/vms", response_class=HTMLResponse)
def vms(request: Request, user: ConsoleUser = READER) -> HTMLResponse:
    return render(request, "vms.html", user, vms=service.list_vms())


@router.get("/vms/{vm:path}", response_class=HTMLResponse)
def vm(request: Request, vm: str, user: ConsoleUser = READER) -> HTMLResponse:
    """The VM: its disks and protection, recovery points (app-consistent marked), drills and failovers with
    their reports, its jobs."""
    shown = service.show_vm(vm)
    ref = f"{shown['host']}/{shown['name']}"
    protected = shown["state"] not in (None, "disabled")
    points = list(reversed(service.recovery_points(ref))) if protected else []
    history = service.failover_history(ref) if shown["state"] is not None else []
    drill = next((record for record in history if record["kind"] == "test"), None)
    return render(request, "vm.html", user, vm=shown, ref=ref, protected=protected, points=points,
                  history=history, jobs=service.list_jobs(vm=ref, limit=RECENT_JOBS),
                  # A failed or cancelled drill is replaced by running another (its test VM with it).
                  may_drill=drill is None or drill["status"] in ("failed", "cancelled", "cleaned_up"),
                  may_clean_up=drill is not None and drill["status"] not in ("in_progress", "cleaned_up"))


@router.get("/plans", response_class=HTMLResponse)
def plans(request: Request, user: ConsoleUser = READER) -> HTMLResponse:
    return render(request, "plans.html", user, plans=service.list_plans())


def _plan_page(request: Request, user: ConsoleUser, name: str, **extra: Any) -> HTMLResponse:
    return render(request, "plan.html", user, plan=service.show_plan(name), operations=[op.value for op in
                                                                                       PlanOperation],
                  jobs=service.list_jobs(plan=name, limit=RECENT_JOBS),
                  **extra)


@router.get("/plans/{name}", response_class=HTMLResponse)
def plan(request: Request, name: str, user: ConsoleUser = READER) -> HTMLResponse:
    return _plan_page(request, user, name)


@router.get("/plans/{name}/validate", response_class=HTMLResponse)
def validate_plan(request: Request, name: str, user: ConsoleUser = READER,
                  operation: Annotated[str, Query(max_length=32)] = "test_failover") -> HTMLResponse:
    """The plan's dry run for `operation`: every check a run makes, nothing started (a GET: it changes nothing)."""
    try:
        outcome, refusal = service.validate_plan(name, operation), None
    except service.ServiceError as error:
        if error.status == 404:
            raise
        outcome, refusal = None, error.message
    return _plan_page(request, user, name, validation=outcome, refusal=refusal, validated_operation=operation)
