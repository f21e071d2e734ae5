"""The application: the FastAPI app with its API-key middleware, its error answers ({"error": "<message>"}),
liveness, and the routes of every area under /api/v1 in the order they are matched."""
from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from api import service

from . import fabric, jobs, plans, protection
from .auth import ApiKeyMiddleware, _api_key_header, _bearer
from .common import API_PREFIX, ErrorBody


def _version() -> str:
    try:
        return version("site-recovery-engine")
    except PackageNotFoundError:
        return "0.0.0"


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
# In this order: it is the order routes are matched in and listed in the OpenAPI document (docs/openapi.json).
router.include_router(fabric.router)
router.include_router(protection.router)
router.include_router(plans.router)
router.include_router(jobs.router)


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


@app.get("/healthz", tags=["service"], summary="Liveness (no key needed)")
def healthz() -> dict[str, str]:
    return {"status": "ok", "version": app.version}


app.include_router(router)


# ---- the OpenAPI document ----------------------------------------------------------------------------------
def openapi_text() -> str:
    """The OpenAPI document as kept in docs/openapi.json."""
    return json.dumps(app.openapi(), indent=2, ensure_ascii=False) + "\n"

