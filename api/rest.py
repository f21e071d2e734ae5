"""The REST API: every operator operation of `api.service` over HTTP (FastAPI), served by
`uvicorn api.rest:app`.

- Reads are GET, actions POST, all under /api/v1. An action that starts a job answers 202 at once with
  {"job_id", "kind", "vm"} and a Location header to /api/v1/jobs/{id}; the job is followed by polling that,
  or as server-sent events from /api/v1/jobs/{id}/events until it ends.
- Every request under /api/ needs an API key, in `X-API-Key: <key>` or `Authorization: Bearer <key>`. It is
  checked before the request is read, so without a valid key the answer is 401 and nothing happens. /healthz
  and the OpenAPI document and its viewers (/openapi.json, /docs, /redoc) are open: they hold no data.
- Errors are {"error": "<message>"}: 401 no or bad key, 404 unknown id or name, 409 busy or wrong state or
  exists already, 422 bad input (names with '/', '\\' or '..', values out of range, unknown fields), 503 a
  passing outage.

`python -m api.rest --write-openapi docs/openapi.json` regenerates the OpenAPI document kept in docs/.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Annotated, Any, NamedTuple

import anyio
from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader, HTTPBearer
from fastapi.sse import EventSourceResponse, ServerSentEvent
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from api import service
from models.apikeys import API_KEY_HASHES_ENV, env_key_matches, verify_api_key
from models.db import session_scope, validate_name

__all__ = ["app", "API_PREFIX", "OPEN_PATHS", "openapi_text"]

logger = logging.getLogger(__name__)

API_PREFIX = "/api/v1"
OPEN_PATHS = frozenset({"/healthz", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
KEY_CACHE_ENV = "ASR_API_KEY_CACHE_S"
# A verified key is remembered this long (as a SHA-256 of it, in memory): each check is a deliberately slow
# scrypt. A revoked key therefore stops working within this time.
DEFAULT_KEY_CACHE_S = 30.0
_KEY_CACHE_MAX = 1024


def _version() -> str:
    try:
        return version("site-recovery-engine")
    except PackageNotFoundError:
        return "0.0.0"


# ---- API keys ----------------------------------------------------------------------------------------------
class _KeyCache:
    def __init__(self) -> None:
        self._until: dict[str, float] = {}
        self._lock = threading.Lock()

    def ttl(self) -> float:
        try:
            return max(0.0, float(os.environ.get(KEY_CACHE_ENV, DEFAULT_KEY_CACHE_S)))
        except ValueError:
            return DEFAULT_KEY_CACHE_S

    def fresh(self, digest: str) -> bool:
        with self._lock:
            until = self._until.get(digest)
            return until is not None and until > time.monotonic()

    def remember(self, digest: str) -> None:
        ttl = self.ttl()
        if ttl <= 0:
            return
        with self._lock:
            if len(self._until) >= _KEY_CACHE_MAX:
                self._until.clear()
            self._until[digest] = time.monotonic() + ttl


_key_cache = _KeyCache()


def _key_is_valid(key: str) -> bool:
    """Whether `key` is a live key of the database or one listed by hash in ASR_API_KEY_HASHES."""
    digest = hashlib.sha256(key.encode()).hexdigest()
    if _key_cache.fresh(digest):
        return True
    valid = bool(os.environ.get(API_KEY_HASHES_ENV)) and env_key_matches(key)
    if not valid:
        service._ensure_database()
        with session_scope() as session:
            valid = verify_api_key(session, key) is not None
    if valid:
        _key_cache.remember(digest)
    return valid


def _presented_key(scope: Scope) -> str | None:
    headers = {name.lower(): value for name, value in scope.get("headers", [])}
    key = headers.get(b"x-api-key")
    if key is None:
        authorization = headers.get(b"authorization", b"")
        scheme, _, credentials = authorization.partition(b" ")
        if scheme.lower() == b"bearer" and credentials.strip():
            key = credentials.strip()
    try:
        return key.decode("ascii") if key else None
    except UnicodeDecodeError:
        return None


class ApiKeyMiddleware:
    """Refuses any request outside OPEN_PATHS without a valid API key, before the request body is read or any
    route runs (a plain ASGI middleware, so streamed responses pass through untouched)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        key = _presented_key(scope)
        if not key:
            await _refuse(scope, receive, send, 401,
                          "an API key is required: send it as 'X-API-Key: <key>' or 'Authorization: Bearer <key>'")
            return
        try:
            valid = await anyio.to_thread.run_sync(_key_is_valid, key)
        except Exception:  # noqa: BLE001 - a database outage must not look like a bad key
            logger.exception("could not check an API key")
            await _refuse(scope, receive, send, 503, "the API key could not be checked (database unavailable); retry")
            return
        if not valid:
            await _refuse(scope, receive, send, 401, "the API key is not valid (unknown or revoked)")
            return
        await self.app(scope, receive, send)


async def _refuse(scope: Scope, receive: Receive, send: Send, status: int, message: str) -> None:
    headers = {"WWW-Authenticate": 'Bearer realm="asr", ApiKey header="X-API-Key"'} if status == 401 else None
    await JSONResponse({"error": message}, status_code=status, headers=headers)(scope, receive, send)


# For the OpenAPI document only: ApiKeyMiddleware does the checking.
_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="An API key of this deployment")
_bearer = HTTPBearer(auto_error=False, description="The same API key, as a bearer token")


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


class SiteIn(_Body):
    name: Name
    description: str = Field("", max_length=1024)


class CloudIn(_Body):
    server: Name
    name: Name


class HostIn(_Body):
    name: Name
    root: str = Field(description="Absolute path of the host's tree on the host")
    site: Name | None = None
    cloud: str | None = Field(None, description="'server/cloud', or a cloud name only one VMM server has")


class VmIn(_Body):
    host: Name
    name: Name


class NetworkMappingIn(_Body):
    source_network: Name
    recovery_network: Name
    recovery_subnet: str = Field(description="CIDR, e.g. 10.1.0.0/24")
    site: Name | None = None
    cloud: str | None = None


class PolicyIn(_Body):
    name: Name
    copy_frequency_s: int | None = Field(None, description="30, 300 or 900")
    recovery_point_retention_h: int | None = Field(None, description="0 to 24")
    app_consistent_frequency_h: int | None = Field(None, description="0 (off) to 12, at most the retention")
    initial_replication_at: datetime | None = Field(None, description="At most 24 h ahead; omitted: at once")
    office_hours: list[str] | str | None = Field(None, description="'08:00-18:00' or ['08:00', '18:00']")
    office_days: list[int | str] | str | None = Field(None, description="Weekday names or numbers (0 = Monday)")
    office_timezone: str | None = Field(None, description="IANA zone, e.g. Europe/Berlin")


class ProtectIn(_Body):
    policy: str = Field(description="Name or id of the replication policy")
    recovery_storage: str = Field(description="'file:///absolute/dir' or 'azure:<container>'")
    storage_options: dict[str, Any] | None = Field(
        None, description="e.g. {'connection_string_env': 'NAME'}: credentials only by reference")
    recovery_host: Name | None = None


class TestFailoverIn(_Body):
    point: str = Field("latest_processed", description="latest_processed, latest_app_consistent, latest or a point id")
    recovery_host: Name | None = None
    test_network: Name | None = None


class PlannedFailoverIn(_Body):
    recovery_host: Name | None = None
    public_ips: dict[str, str] | None = Field(None, description="{adapter name: public IP address}")


class UnplannedFailoverIn(_Body):
    point: str = Field("latest_processed", description="latest_processed, latest_app_consistent or a point id")
    recovery_host: Name | None = None
    public_ips: dict[str, str] | None = None


class FailbackIn(_Body):
    mode: str = Field("minimize_downtime", description="minimize_downtime or full_download")
    create_vm: bool = False
    host: Name | None = Field(None, description="Fail back to this host instead of the VM's own")


class VerifyIn(_Body):
    point: str | None = Field(None, description="A point id or choice; omitted: the latest point")


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


class ResumeIn(_Body):
    note: str = Field("", max_length=4096)


class JobRef(BaseModel):
    job_id: str
    kind: str
    vm: str | None = None
    plan: str | None = None
    restarted_from: str | None = None


class ErrorBody(BaseModel):
    error: str


# ---- the application ---------------------------------------------------------------------------------------
app = FastAPI(
    title="Site Recovery Engine API",
    version=_version(),
    description=(
        "Protect VMs, fail them over and back, run recovery plans, and follow the jobs. Every route under "
        "/api/v1 needs an API key (X-API-Key header, or Authorization: Bearer). Actions answer 202 with the "
        "job id; follow the job at /api/v1/jobs/{id} or as server-sent events at /api/v1/jobs/{id}/events."
    ),
    # Operation ids are the function names (list_sites, protect, ...): what the typed client's methods are called.
    generate_unique_id_function=lambda route: route.name,
)
app.add_middleware(ApiKeyMiddleware)

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description} for status, description in (
        (401, "No API key, or not a valid one"), (404, "Unknown id or name"),
        (409, "Busy, in the wrong state, or exists already"), (422, "Invalid input"),
    )
}
router = APIRouter(prefix=API_PREFIX, responses=_ERRORS,
                   dependencies=[Depends(_api_key_header), Depends(_bearer)])
ACCEPTED = {"status_code": 202, "response_model": JobRef,
            "response_description": "The job was started; follow it at the Location"}


@app.exception_handler(service.ServiceError)
async def _service_error(_request: Request, exc: service.ServiceError) -> JSONResponse:
    return JSONResponse({"error": exc.message}, status_code=exc.status)


def _readable(error: dict[str, Any]) -> str:
    where = ".".join(str(part) for part in error.get("loc", ()) if part != "body") or "request"
    message = str(error.get("msg", "invalid"))
    message = message.removeprefix("Value error, ")
    if error.get("type") == "json_invalid":
        return f"the request body is not valid JSON ({error.get('ctx', {}).get('error', message)})"
    if error.get("type") == "extra_forbidden":
        message = "unknown field"
    elif error.get("type") == "missing":
        message = "required"
    return f"{where}: {message}"


@app.exception_handler(RequestValidationError)
async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    return JSONResponse({"error": "; ".join(_readable(error) for error in errors) or "invalid request"},
                        status_code=422)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = str(exc.detail)
    if exc.status_code == 404 and message == "Not Found":
        message = f"no such route: {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    return JSONResponse({"error": message}, status_code=exc.status_code, headers=getattr(exc, "headers", None))


def _started(response: Response, job: dict[str, Any]) -> dict[str, Any]:
    response.headers["Location"] = f"{API_PREFIX}/jobs/{job['job_id']}"
    return job


def _vm_ref(vm: str, host: str | None) -> str:
    """A VM in a path is its name, its id or "host/name"; `?host=` may name the host instead."""
    return f"{host}/{vm}" if host else vm


HostQuery = Annotated[Name | None, Query(description="The VM's host, when several hosts have a VM of that name")]


@app.get("/healthz", tags=["service"], summary="Liveness (no key needed)")
def healthz() -> dict[str, str]:
    return {"status": "ok", "version": app.version}


# ---- fabric ------------------------------------------------------------------------------------------------
@router.get("/sites", tags=["fabric"], summary="List sites")
def list_sites() -> list[dict[str, Any]]:
    return service.list_sites()


@router.post("/sites", tags=["fabric"], status_code=201, summary="Register a Hyper-V site")
def add_site(body: SiteIn) -> dict[str, Any]:
    return service.add_site(body.name, body.description)


@router.get("/sites/{name:path}", tags=["fabric"], summary="A site with its hosts and network mappings")
def show_site(name: str) -> dict[str, Any]:
    return service.show_site(name)


@router.post("/clouds", tags=["fabric"], status_code=201, summary="Register a VMM cloud (and its server)")
def add_cloud(body: CloudIn) -> dict[str, Any]:
    return service.add_vmm_cloud(body.server, body.name)


@router.get("/hosts", tags=["fabric"], summary="List hosts")
def list_hosts() -> list[dict[str, Any]]:
    return service.list_hosts()


@router.post("/hosts", tags=["fabric"], status_code=201,
             summary="Register a host (the answer holds its agent's registration key, shown once)")
def add_host(body: HostIn) -> dict[str, Any]:
    return service.add_host(body.name, body.root, site=body.site, cloud=body.cloud)


@router.get("/hosts/{name:path}", tags=["fabric"], summary="A host with its VMs")
def show_host(name: str) -> dict[str, Any]:
    return service.show_host(name)


@router.get("/vms", tags=["fabric"], summary="List VMs with their protection state")
def list_vms() -> list[dict[str, Any]]:
    return service.list_vms()


@router.post("/vms", tags=["fabric"], status_code=201, summary="Register a VM as its host describes it")
def add_vm(body: VmIn) -> dict[str, Any]:
    return service.add_vm(body.host, body.name)


@router.get("/network-mappings", tags=["fabric"], summary="List network mappings")
def list_network_mappings() -> list[dict[str, Any]]:
    return service.list_network_mappings()


@router.post("/network-mappings", tags=["fabric"], status_code=201,
             summary="Map a VM network of a site or cloud to a recovery network")
def add_network_mapping(body: NetworkMappingIn) -> dict[str, Any]:
    return service.add_network_mapping(body.source_network, body.recovery_network, body.recovery_subnet,
                                       site=body.site, cloud=body.cloud)


@router.get("/policies", tags=["fabric"], summary="List replication policies")
def list_policies() -> list[dict[str, Any]]:
    return service.list_policies()


@router.post("/policies", tags=["fabric"], status_code=201, summary="Create a replication policy")
def add_policy(body: PolicyIn) -> dict[str, Any]:
    options = body.model_dump(exclude={"name"}, exclude_none=True)
    return service.add_policy(body.name, **options)


@router.get("/policies/{name:path}", tags=["fabric"], summary="A replication policy and the VMs it protects")
def show_policy(name: str) -> dict[str, Any]:
    return service.show_policy(name)


# ---- protection and failover -------------------------------------------------------------------------------
@router.post("/vms/{vm:path}/protect", tags=["protection"], summary="Enable protection", **ACCEPTED)
def protect(vm: str, body: ProtectIn, response: Response, host: HostQuery = None) -> dict[str, Any]:
    return _started(response, service.protect(_vm_ref(vm, host), policy=body.policy,
                                              recovery_storage=body.recovery_storage,
                                              storage_options=body.storage_options, recovery_host=body.recovery_host))


@router.post("/vms/{vm:path}/disable-protection", tags=["protection"], summary="Disable protection", **ACCEPTED)
def disable_protection(vm: str, response: Response, host: HostQuery = None) -> dict[str, Any]:
    return _started(response, service.disable_protection(_vm_ref(vm, host)))


@router.post("/vms/{vm:path}/resync", tags=["protection"], summary="Resynchronize now", **ACCEPTED)
def resync(vm: str, response: Response, host: HostQuery = None) -> dict[str, Any]:
    return _started(response, service.resync(_vm_ref(vm, host)))


@router.get("/vms/{vm:path}/recovery-points", tags=["protection"], summary="Recovery points, oldest first")
def recovery_points(vm: str, host: HostQuery = None) -> list[dict[str, Any]]:
    return service.recovery_points(_vm_ref(vm, host))


@router.get("/vms/{vm:path}", tags=["fabric"],
            summary="A VM: disks (primary path, replica, recovery path), protection, latest failover")
def show_vm(vm: str, host: HostQuery = None) -> dict[str, Any]:
    return service.show_vm(_vm_ref(vm, host))


@router.post("/vms/{vm:path}/verify", tags=["protection"],
             summary="Verify the replica against a recovery point, from the recovery storage", **ACCEPTED)
def verify(vm: str, response: Response, body: VerifyIn | None = None, host: HostQuery = None) -> dict[str, Any]:
    return _started(response, service.verify(_vm_ref(vm, host), point=body.point if body else None))


@router.post("/vms/{vm:path}/failover/test", tags=["failover"], summary="Test failover (drill)", **ACCEPTED)
def test_failover(vm: str, response: Response, body: TestFailoverIn | None = None,
                  host: HostQuery = None) -> dict[str, Any]:
    body = body or TestFailoverIn()
    return _started(response, service.test_failover(_vm_ref(vm, host), point=body.point,
                                                    recovery_host=body.recovery_host, test_network=body.test_network))


@router.post("/vms/{vm:path}/failover/cleanup", tags=["failover"], summary="Clean up the drill's test VM", **ACCEPTED)
def test_failover_cleanup(vm: str, response: Response, host: HostQuery = None) -> dict[str, Any]:
    return _started(response, service.test_failover_cleanup(_vm_ref(vm, host)))


@router.post("/vms/{vm:path}/failover/planned", tags=["failover"], summary="Planned failover (no data loss)",
             **ACCEPTED)
def planned_failover(vm: str, response: Response, body: PlannedFailoverIn | None = None,
                     host: HostQuery = None) -> dict[str, Any]:
    body = body or PlannedFailoverIn()
    return _started(response, service.planned_failover(_vm_ref(vm, host), recovery_host=body.recovery_host,
                                                       public_ips=body.public_ips))


@router.post("/vms/{vm:path}/failover/unplanned", tags=["failover"], summary="Unplanned failover", **ACCEPTED)
def unplanned_failover(vm: str, response: Response, body: UnplannedFailoverIn | None = None,
                       host: HostQuery = None) -> dict[str, Any]:
    body = body or UnplannedFailoverIn()
    return _started(response, service.unplanned_failover(_vm_ref(vm, host), point=body.point,
                                                         recovery_host=body.recovery_host, public_ips=body.public_ips))


@router.post("/vms/{vm:path}/failover/complete", tags=["failover"],
             summary="Complete a minimize-downtime failback", **ACCEPTED)
def complete_failover(vm: str, response: Response, host: HostQuery = None) -> dict[str, Any]:
    return _started(response, service.complete_failover(_vm_ref(vm, host)))


@router.post("/vms/{vm:path}/failover/commit", tags=["failover"], summary="Commit the pending failover or failback",
             **ACCEPTED)
def commit_failover(vm: str, response: Response, host: HostQuery = None) -> dict[str, Any]:
    return _started(response, service.commit_failover(_vm_ref(vm, host)))


@router.post("/vms/{vm:path}/failover/cancel", tags=["failover"], summary="Cancel the pending failover or failback",
             **ACCEPTED)
def cancel_failover(vm: str, response: Response, host: HostQuery = None) -> dict[str, Any]:
    return _started(response, service.cancel_failover(_vm_ref(vm, host)))


@router.post("/vms/{vm:path}/failback", tags=["failover"], summary="Fail back a committed failover", **ACCEPTED)
def failback(vm: str, response: Response, body: FailbackIn | None = None, host: HostQuery = None) -> dict[str, Any]:
    body = body or FailbackIn()
    return _started(response, service.failback(_vm_ref(vm, host), mode=body.mode, create_vm=body.create_vm,
                                               host=body.host))


@router.post("/vms/{vm:path}/reverse-replication", tags=["failover"], summary="Reverse replication after failback",
             **ACCEPTED)
def reverse_replication(vm: str, response: Response, host: HostQuery = None) -> dict[str, Any]:
    return _started(response, service.reverse_replication(_vm_ref(vm, host)))


@router.get("/health", tags=["protection"], summary="Replication health of every protected VM")
def health() -> list[dict[str, Any]]:
    return service.health()


# ---- recovery plans ----------------------------------------------------------------------------------------
@router.get("/plans", tags=["plans"], summary="List recovery plans")
def list_plans() -> list[dict[str, Any]]:
    return service.list_plans()


@router.post("/plans", tags=["plans"], status_code=201, summary="Create a recovery plan")
def create_plan(body: PlanIn) -> dict[str, Any]:
    return service.create_plan(body.name, body.groups, body.description)


@router.get("/plans/{name:path}", tags=["plans"], summary="A recovery plan")
def show_plan(name: str) -> dict[str, Any]:
    return service.show_plan(name)


@router.post("/plans/{name:path}/run", tags=["plans"], summary="Run a recovery plan", **ACCEPTED)
def run_plan(name: str, body: PlanRunIn, response: Response) -> dict[str, Any]:
    options = body.model_dump(exclude={"operation"}, exclude_none=True)
    return _started(response, service.run_plan(name, body.operation, **options))


# ---- jobs --------------------------------------------------------------------------------------------------
@router.get("/jobs", tags=["jobs"], summary="List jobs, newest first")
def list_jobs(state: str | None = None, kind: str | None = None,
              vm: Annotated[str | None, Query(description="VM name, 'host/name' or id")] = None,
              limit: Annotated[int, Query(ge=1, le=service.MAX_JOB_LIMIT)] = 50) -> list[dict[str, Any]]:
    return service.list_jobs(state=state, kind=kind, vm=vm, limit=limit)


@router.get("/jobs/{job_id}", tags=["jobs"],
            summary="A job: steps, progress, errors, next attempt times, manual instructions")
def show_job(job_id: str) -> dict[str, Any]:
    return service.show_job(job_id)


class _Watch(NamedTuple):
    job_id: str
    first: dict[str, Any]
    interval: float
    timeout: float | None


async def _watch(
    job_id: str,
    interval: Annotated[float, Query(ge=0.05, le=60, description="Seconds between polls")] = 0.5,
    timeout: Annotated[float | None, Query(gt=0, description="Stop after this many seconds")] = None,
) -> _Watch:
    # A dependency, so an unknown job is a 404 before the stream starts.
    service.check_watch(interval, timeout)
    return _Watch(job_id, await anyio.to_thread.run_sync(service.job_snapshot, job_id), interval, timeout)


@router.get("/jobs/{job_id}/events", tags=["jobs"], response_class=EventSourceResponse,
            summary="Server-sent events of the job until it ends",
            description=("Each event's data is a snapshot of the job (state, percent, steps with progress), sent "
                         "when it changes. Event 'progress' while it runs, 'end' for the last snapshot once it has "
                         "finished, 'timeout' if the timeout passed first. Comments keep a quiet stream alive."))
async def job_events(watch: Annotated[_Watch, Depends(_watch)]) -> AsyncIterator[ServerSentEvent]:
    # Polled here, not through service.job_events: a watcher then holds a worker thread only while it reads
    # the job, not for the whole life of its stream.
    deadline = None if watch.timeout is None else time.monotonic() + watch.timeout
    current, number = watch.first, 0
    yield ServerSentEvent(data=current, id="0", event="end" if current["finished"] else "progress")
    while not current["finished"]:
        if deadline is not None and time.monotonic() >= deadline:
            yield ServerSentEvent(data=current, event="timeout")
            return
        await anyio.sleep(watch.interval)
        latest = await anyio.to_thread.run_sync(service.job_snapshot, watch.job_id)
        if latest != current:
            current, number = latest, number + 1
            yield ServerSentEvent(data=current, id=str(number), event="end" if current["finished"] else "progress")


@router.post("/jobs/{job_id}/cancel", tags=["jobs"], summary="Cancel a job")
def cancel_job(job_id: str) -> dict[str, Any]:
    return service.cancel_job(job_id)


@router.post("/jobs/{job_id}/retry", tags=["jobs"], status_code=202,
             summary="Run the steps waiting for a retry now")
def retry_job(job_id: str, response: Response) -> dict[str, Any]:
    return _started(response, service.retry_job(job_id))


@router.post("/jobs/{job_id}/restart", tags=["jobs"], summary="Start a failed or cancelled job's operation again",
             **ACCEPTED)
def restart_job(job_id: str, response: Response) -> dict[str, Any]:
    return _started(response, service.restart_job(job_id))


@router.post("/jobs/{job_id}/resume", tags=["jobs"], status_code=202,
             summary="Resume a job waiting on a manual action")
def resume_job(job_id: str, response: Response, body: ResumeIn | None = None) -> dict[str, Any]:
    return _started(response, service.resume_job(job_id, note=body.note if body else ""))


app.include_router(router)


# ---- the OpenAPI document ----------------------------------------------------------------------------------
def openapi_text() -> str:
    """The OpenAPI document as kept in docs/openapi.json."""
    return json.dumps(app.openapi(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m api.rest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--write-openapi", metavar="PATH", type=Path, required=True,
                        help="write the OpenAPI document to PATH (docs/openapi.json in the repository)")
    args = parser.parse_args(argv)
    args.write_openapi.write_text(openapi_text())
    print(f"wrote {args.write_openapi}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
