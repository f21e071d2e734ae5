"""The operator's web console, served by `asr api` under /console: server-rendered pages (Jinja2) over the same
`api.service` functions the REST API serves, with a little JavaScript for the job page's live progress. Every
asset is a file of this package (templates/, static/): no CDN, it works on an offline recovery site.

- Log in with an API key (a form): it opens a server-side session (api/console/sessions.py) held by an
  HttpOnly, SameSite=Strict cookie; logout ends it. The key's role now decides what each page shows and which
  buttons it offers: readers read, operators also start drills and act on jobs (api/console/auth.py).
- Forms post a per-session CSRF token; pages are not cached, not framed, and load scripts and styles from this
  server only (views.SECURITY_HEADERS).
- The routes are not in the OpenAPI document: they are pages, not the API.

`install(app)` adds the routes, the static files and the console's answers to errors (a page, not JSON).
"""
from __future__ import annotations

from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.routing import APIRouter
from fastapi.staticfiles import StaticFiles

from .auth import PREFIX, LoginRequired, check_console_routes, current_user
from .views import HERE, render

__all__ = ["PREFIX", "install", "is_console", "error_page"]


def is_console(request: Request) -> bool:
    path = request.url.path
    return path == PREFIX or path.startswith(PREFIX + "/")


async def error_page(request: Request, status: int, message: str) -> Response:
    """The console's answer to a refusal: the page of its message (an event stream's script gets JSON)."""
    if request.headers.get("accept", "").startswith("text/event-stream"):
        return JSONResponse({"error": message}, status_code=status)
    try:
        user = await current_user(request)
    except Exception:  # noqa: BLE001 - the session store itself may be what failed
        user = None
    return render(request, "error.html", user, status, status=status, message=message)


async def _login_required(request: Request, _exc: LoginRequired) -> Response:
    if request.method == "GET" and not request.headers.get("accept", "").startswith("text/event-stream"):
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"{PREFIX}/login?next={quote(target, safe='')}", status_code=303)
    return await error_page(request, 401, "your console session has ended: log in again")


def install(app: FastAPI) -> None:
    # Imported here: the pages and actions use the API's key check and job stream (api.rest), whose app
    # installs the console.
    from . import actions, pages

    router = APIRouter(prefix=PREFIX, include_in_schema=False)
    router.include_router(actions.router)
    router.include_router(pages.router)
    app.include_router(router)
    app.mount(f"{PREFIX}/static", StaticFiles(directory=HERE / "static"), name="console-static")
    app.add_exception_handler(LoginRequired, _login_required)

    @app.get(PREFIX, include_in_schema=False)
    def _console_root() -> RedirectResponse:
        return RedirectResponse(f"{PREFIX}/", status_code=307)

    check_console_routes(app)
