"""What the console's buttons do (POST forms, each checked for its role and the session's CSRF token by
api/console/auth.py): log in and out; as an operator, start a drill (test failover) of a VM and clean it up, run
a plan's drill, cancel, retry, restart or resume a job. Each calls the `api.service` function the API's route
calls, then sends the browser to the job it started (303, so a reload does not post again); a refusal is the
page of its message, with the service's status."""
from __future__ import annotations

from urllib.parse import quote

import anyio
import redis
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from api import service
from api.rest.auth import KeyRefused, _client, _key_identity, check_key

from . import sessions
from .auth import OPERATOR, PREFIX, READER, ConsoleUser, current_user, read_form, same_origin
from .views import SECURITY_HEADERS, render

router = APIRouter()
MAX_KEY_CHARS = 512


def _job_page(job_id: str) -> RedirectResponse:
    return RedirectResponse(f"{PREFIX}/jobs/{quote(job_id)}", status_code=303)


def _safe_next(target: str | None) -> str:
    """Where to go after the login: a console page of this server, never another site."""
    if not target or not target.startswith(PREFIX + "/") or target.startswith("//") or "\\" in target:
        return PREFIX + "/"
    return target


# ---- login and logout --------------------------------------------------------------------------------------
@router.get("/login", response_class=HTMLResponse)
async def login_page(request: Request, next: str | None = None) -> Response:  # noqa: A002 - the query's name
    if await current_user(request) is not None:
        return RedirectResponse(_safe_next(next), status_code=303)
    return render(request, "login.html", None, next=_safe_next(next))


@router.post("/login", response_class=HTMLResponse)
async def login(request: Request) -> Response:
    """A key posted in the form opens a session, checked and rate-limited exactly as an API request's key."""
    form = await read_form(request)
    target = _safe_next(form.get("next"))
    if not same_origin(request):
        return render(request, "login.html", None, 403, next=target, error="refused: the form was sent from "
                                                                           "another site")
    key = form.get("api_key", "").strip()
    if not key or len(key) > MAX_KEY_CHARS:
        return render(request, "login.html", None, 401, next=target, error="enter an API key")
    try:
        identity = await check_key(_client(request.scope), key, identify=_key_identity)
    except KeyRefused as refused:
        response = render(request, "login.html", None, refused.status, next=target, error=refused.message)
        response.headers.update(refused.headers or {})
        return response
    try:
        # A new session each login (a token given before it is worth nothing after), the browser's old one ended.
        await anyio.to_thread.run_sync(sessions.close_session, request.cookies.get(sessions.COOKIE))
        token, _session = await anyio.to_thread.run_sync(sessions.open_session, identity.key_id,
                                                         identity.key_hash, identity.role)
    except redis.RedisError as error:
        return render(request, "login.html", None, 503, next=target,
                      error=f"the session could not be opened (Redis: {error}); retry")
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(sessions.COOKIE, token, path=PREFIX, httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")
    response.headers.update(SECURITY_HEADERS)
    return response


@router.post("/logout")
async def logout(request: Request, user: ConsoleUser = READER) -> Response:
    await anyio.to_thread.run_sync(sessions.close_session, user.token)
    response = RedirectResponse(f"{PREFIX}/login", status_code=303)
    response.delete_cookie(sessions.COOKIE, path=PREFIX, httponly=True, samesite="strict",
                           secure=request.url.scheme == "https")
    return response


# ---- drills ------------------------------------------------------------------------------------------------
@router.post("/vms/{vm:path}/drill")
async def drill(request: Request, vm: str, user: ConsoleUser = OPERATOR) -> Response:
    """A test failover of the VM from the point the form names (latest processed by default)."""
    form = await read_form(request)
    point = form.get("point") or "latest_processed"
    started = await anyio.to_thread.run_sync(lambda: service.test_failover(vm, point=point))
    return _job_page(started["job_id"])


@router.post("/vms/{vm:path}/drill-cleanup")
async def drill_cleanup(vm: str, user: ConsoleUser = OPERATOR) -> Response:
    started = await anyio.to_thread.run_sync(service.test_failover_cleanup, vm)
    return _job_page(started["job_id"])


@router.post("/plans/{name}/drill")
async def plan_drill(name: str, user: ConsoleUser = OPERATOR) -> Response:
    started = await anyio.to_thread.run_sync(service.run_plan, name, "test_failover")
    return _job_page(started["job_id"])


# ---- jobs --------------------------------------------------------------------------------------------------
@router.post("/jobs/{job_id}/cancel")
async def cancel_job(job_id: str, user: ConsoleUser = OPERATOR) -> Response:
    await anyio.to_thread.run_sync(service.cancel_job, job_id)
    return _job_page(job_id)


@router.post("/jobs/{job_id}/retry")
async def retry_job(job_id: str, user: ConsoleUser = OPERATOR) -> Response:
    await anyio.to_thread.run_sync(service.retry_job, job_id)
    return _job_page(job_id)


@router.post("/jobs/{job_id}/restart")
async def restart_job(job_id: str, user: ConsoleUser = OPERATOR) -> Response:
    started = await anyio.to_thread.run_sync(service.restart_job, job_id)
    return _job_page(started["job_id"])


@router.post("/jobs/{job_id}/resume")
async def resume_job(request: Request, job_id: str, user: ConsoleUser = OPERATOR) -> Response:
    note = (await read_form(request)).get("note", "")
    await anyio.to_thread.run_sync(lambda: service.resume_job(job_id, note=note))
    return _job_page(job_id)
