"""The application: the FastAPI app with its API-key and role middleware and its request-body limit, its error
answers ({"error": "<message>"}; a page under /console), liveness, /docs (Swagger UI from the installed
swagger-ui-bundle package: no CDN, it works on an offline recovery site; ASR_API_DOCS=off turns it off), the
routes of every area under /api/v1 in the order they are matched, and the web console under /console
(api/console). It does not start when a route under /api/v1, or a console page, declares no role."""
from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from api import console, service
from workflows import settings

from . import alerts, fabric, jobs, manage, metrics, plans, protection
from .auth import ApiKeyMiddleware, _api_key_header, _bearer
from .common import API_PREFIX, ERRORS
from .limits import BodyLimitMiddleware
from .roles import add_roles_to_openapi, check_routes


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
    docs_url=None, redoc_url=None,  # FastAPI's own load their JavaScript from a CDN: /docs is served below
)
# Added last, runs first: the key and its role are checked before the body is read; then the body is bounded.
app.add_middleware(BodyLimitMiddleware)
app.add_middleware(ApiKeyMiddleware)

router = APIRouter(prefix=API_PREFIX, responses=ERRORS,
                   dependencies=[Depends(_api_key_header), Depends(_bearer)])
# In this order: it is the order routes are matched in and listed in the OpenAPI document (docs/openapi.json).
router.include_router(fabric.router)
router.include_router(protection.router)
router.include_router(plans.router)
router.include_router(jobs.router)
router.include_router(metrics.router)
router.include_router(alerts.router)
router.include_router(manage.router)  # changes and removals of what the routers above register


@app.exception_handler(service.ServiceError)
async def _service_error(request: Request, exc: service.ServiceError) -> Response:
    if console.is_console(request):
        return await console.error_page(request, exc.status, exc.message)
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
async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    message = "; ".join(_readable(error) for error in exc.errors()) or "invalid request"
    if console.is_console(request):
        return await console.error_page(request, 422, message)
    return JSONResponse({"error": message}, status_code=422)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = str(exc.detail)
    if exc.status_code == 404 and message == "Not Found":
        message = f"no such route: {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    if console.is_console(request) and not request.url.path.startswith(f"{console.PREFIX}/static/"):
        return await console.error_page(request, exc.status_code, message)
    return JSONResponse({"error": message}, status_code=exc.status_code, headers=getattr(exc, "headers", None))


@app.get("/healthz", tags=["service"], summary="Liveness (no key needed)")
def healthz() -> dict[str, str]:
    return {"status": "ok", "version": app.version}


app.include_router(router)
check_routes(app)  # every route under /api/v1 declares its role, or the app does not start
console.install(app)  # the web console under /console (api/console), with its own sessions; not in the document
_plain_openapi = app.openapi


def _openapi_with_roles() -> dict[str, Any]:
    if app.openapi_schema is None:
        app.openapi_schema = add_roles_to_openapi(app, _plain_openapi())
    return app.openapi_schema


app.openapi = _openapi_with_roles  # type: ignore[method-assign]


# ---- /docs, offline ----------------------------------------------------------------------------------------
def _swagger_ui_dir() -> str | None:
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        return None
    return str(swagger_ui_path)


_DOCS_ASSETS = "/docs/assets"
if settings.api_docs() and _swagger_ui_dir() is not None:
    app.mount(_DOCS_ASSETS, StaticFiles(directory=_swagger_ui_dir()), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url, title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{_DOCS_ASSETS}/swagger-ui-bundle.js", swagger_css_url=f"{_DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{_DOCS_ASSETS}/favicon-32x32.png", oauth2_redirect_url=None)


# ---- the OpenAPI document ----------------------------------------------------------------------------------
def openapi_text() -> str:
    """The OpenAPI document as kept in docs/openapi.json."""
    return json.dumps(app.openapi(), indent=2, ensure_ascii=False) + "\n"

