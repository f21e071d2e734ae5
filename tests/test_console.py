"""The web console's trust boundary, in process: the app through Starlette's TestClient, on a SQLite database of
the test's own, keys created as an operator creates them, sessions in the machine's Redis (as the deployment's).

Covered: pages send a browser without a session to the login page, an event stream or a form gets 401; a bad
key is refused (and counts toward the client's failures, as an API request's), a good one opens a session whose
cookie is HttpOnly, SameSite=Strict, limited to /console (Secure over HTTPS) and holds no key; the role decides
the buttons a page shows, and a reader posting an operator's form gets 403 with nothing started; a form without
the session's CSRF token or from another origin gets 403; logout and a revoked key end the session at once;
without Redis the console says so (503); the login never redirects to another site; every console route
declares a role or the app does not start; pages carry their security headers, and no template or asset names
another server; the console is not in the OpenAPI document.
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import APIRouter, FastAPI
from sqlmodel import select
from starlette.testclient import TestClient

from api import service
from api.console import PREFIX
from api.console.auth import OPERATOR, check_console_routes
from api.console.sessions import COOKIE
from api.rest import app
from api.rest import auth as rest_auth
from models.db import dispose_engines, session_scope
from models.jobs import Job
from sites.localservices import free_port

CONSOLE_DIR = Path(__file__).resolve().parents[1] / "api" / "console"


class Keys(dict):
    """role -> a key of the test's database."""


@pytest.fixture
def keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Keys]:
    monkeypatch.setenv("ASR_DATABASE_URL", f"sqlite:///{tmp_path / 'asr.db'}")
    monkeypatch.setenv("ASR_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ASR_API_KEY_HASHES", raising=False)
    for cache in (rest_auth._key_cache, rest_auth._bad_keys, rest_auth._limiter):
        cache.clear()
    yield Keys({role: service.create_api_key(f"console-{role}", role)["key"]
                for role in ("reader", "operator", "admin")})
    for cache in (rest_auth._key_cache, rest_auth._bad_keys, rest_auth._limiter):
        cache.clear()
    dispose_engines()


def browser(base_url: str = "http://testserver") -> TestClient:
    return TestClient(app, base_url=base_url, follow_redirects=False, raise_server_exceptions=False)


def log_in(client: TestClient, key: str, next_page: str = f"{PREFIX}/") -> str:
    """Logs in; returns the page the console sends the browser to."""
    response = client.post(f"{PREFIX}/login", data={"api_key": key, "next": next_page})
    assert response.status_code == 303, response.text
    return response.headers["location"]


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found, "the page has no form with the session's CSRF token"
    return found.group(1)


def jobs_count() -> int:
    with session_scope() as session:
        return len(session.exec(select(Job)).all())


def test_without_a_session_pages_go_to_the_login_and_the_rest_gets_401(keys: Keys) -> None:
    with browser() as client:
        for page in ("/", "/jobs?state=failed", "/vms/host1/web01", "/plans/p1"):
            response = client.get(PREFIX + page)
            assert response.status_code == 303 and response.headers["location"].startswith(f"{PREFIX}/login?next="), \
                (page, response.status_code)
        assert client.get(PREFIX).headers["location"] == f"{PREFIX}/"
        login = client.get(f"{PREFIX}/login")
        assert login.status_code == 200 and 'name="api_key"' in login.text
        response = client.get(f"{PREFIX}/jobs/x1/events", headers={"Accept": "text/event-stream"})
        assert response.status_code == 401 and "log in" in response.json()["error"]
        response = client.post(f"{PREFIX}/jobs/x1/cancel", data={"csrf": "guess"})
        assert response.status_code == 401 and "log in again" in response.text
        # The API is not opened by the console's prefix: it still needs its key.
        assert client.get("/api/v1/jobs").status_code == 401


def test_login_with_a_key_opens_a_session_held_by_a_strict_cookie(keys: Keys) -> None:
    with browser() as client:
        refused = client.post(f"{PREFIX}/login", data={"api_key": "asr_0123456789_not-a-key"})
        assert refused.status_code == 401 and "not valid" in refused.text and COOKIE not in refused.cookies
        assert client.post(f"{PREFIX}/login", data={"api_key": ""}).status_code == 401
        assert log_in(client, keys["reader"], f"{PREFIX}/jobs?state=failed") == f"{PREFIX}/jobs?state=failed"
        dashboard = client.get(f"{PREFIX}/")
        assert dashboard.status_code == 200 and ">reader<" in dashboard.text
        assert "Replicated items" in dashboard.text and "No VM is protected yet." in dashboard.text
        for header, value in (("content-security-policy", "default-src 'self'"), ("x-frame-options", "DENY"),
                              ("cache-control", "no-store")):
            assert value in dashboard.headers[header]
    with browser() as client:
        response = client.post(f"{PREFIX}/login", data={"api_key": keys["operator"]})
        cookie = response.headers["set-cookie"]
        token = response.cookies[COOKIE]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and f"Path={PREFIX}" in cookie
        assert "Secure" not in cookie  # plain HTTP here: a Secure cookie would never come back
        # The key's secret: what follows "asr_<id>_" (token_urlsafe, which may itself hold "_" or start with it).
        assert keys["operator"] not in cookie and keys["operator"].split("_", 2)[2] not in token
    with browser() as client:  # logging in again replaces the session: the old token opens nothing
        log_in(client, keys["reader"])
        old = client.cookies[COOKIE]
        log_in(client, keys["reader"])
        assert client.cookies[COOKIE] != old and client.get(f"{PREFIX}/").status_code == 200
        client.cookies.set(COOKIE, old, path=PREFIX)
        assert client.get(f"{PREFIX}/").status_code == 303
    with browser("https://testserver") as client:
        assert "Secure" in client.post(f"{PREFIX}/login", data={"api_key": keys["reader"]}).headers["set-cookie"]


def test_the_login_goes_back_to_a_console_page_only(keys: Keys) -> None:
    with browser() as client:
        for target in ("//evil.example/", "https://evil.example/console/", "/api/v1/sites", "/console\\..\\x"):
            assert log_in(client, keys["reader"], target) == f"{PREFIX}/", target


def test_failed_logins_count_toward_the_clients_limit(keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASR_API_AUTH_FAILURES", "3")
    with browser() as client:
        for attempt in range(3):
            assert client.post(f"{PREFIX}/login", data={"api_key": f"asr_0123456789_bad{attempt}"}).status_code == 401
        throttled = client.post(f"{PREFIX}/login", data={"api_key": keys["admin"]})
        assert throttled.status_code == 429 and "too many failed API keys" in throttled.text
        assert int(throttled.headers["retry-after"]) >= 1


def test_a_reader_sees_no_action_and_is_refused_one(keys: Keys) -> None:
    with browser() as client:
        log_in(client, keys["reader"])
        page = client.get(f"{PREFIX}/jobs").text
        csrf = csrf_of(page)  # the logout form's
        before = jobs_count()
        for action in ("/vms/host1/web01/drill", "/vms/host1/web01/drill-cleanup", "/plans/p1/drill",
                       "/jobs/x1/cancel", "/jobs/x1/retry", "/jobs/x1/restart", "/jobs/x1/resume"):
            response = client.post(PREFIX + action, data={"csrf": csrf})
            assert response.status_code == 403, (action, response.status_code, response.text)
            assert "operator role" in response.text and "yours is reader" in response.text
        assert jobs_count() == before


def test_a_form_needs_the_sessions_csrf_token_and_this_origin(keys: Keys) -> None:
    with browser() as client:
        log_in(client, keys["operator"])
        csrf = csrf_of(client.get(f"{PREFIX}/").text)
        for data, headers in (({}, {}), ({"csrf": "forged"}, {}),
                              ({"csrf": csrf}, {"Origin": "https://evil.example"})):
            response = client.post(f"{PREFIX}/jobs/x1/cancel", data=data, headers=headers)
            assert response.status_code == 403, (data, headers, response.text)
        # With the token, the action reaches the service: an unknown job is its 404, as a page.
        response = client.post(f"{PREFIX}/jobs/no-such-job/cancel", data={"csrf": csrf},
                               headers={"Origin": "http://testserver"})
        assert response.status_code == 404 and "text/html" in response.headers["content-type"]
        assert "no-such-job" in response.text
        response = client.post(f"{PREFIX}/jobs/x1/cancel", content=b'{"csrf": "' + csrf.encode() + b'"}',
                               headers={"Content-Type": "application/json"})
        assert response.status_code == 415


def test_logout_and_a_revoked_key_end_the_session(keys: Keys) -> None:
    with browser() as client:
        log_in(client, keys["operator"])
        token = client.cookies[COOKIE]
        csrf = csrf_of(client.get(f"{PREFIX}/").text)
        response = client.post(f"{PREFIX}/logout", data={"csrf": csrf})
        assert response.status_code == 303 and response.headers["location"] == f"{PREFIX}/login"
    with browser() as copied:  # the cookie, copied before the logout, opens nothing
        copied.cookies.set(COOKIE, token, path=PREFIX)
        assert copied.get(f"{PREFIX}/").status_code == 303

    with browser() as client:
        log_in(client, keys["admin"])
        assert client.get(f"{PREFIX}/").status_code == 200
        service.revoke_api_key("console-admin")
        assert client.get(f"{PREFIX}/").status_code == 303, "a revoked key's session should end with it"


def test_every_console_route_declares_its_role() -> None:
    check_console_routes(app)
    undeclared = FastAPI()
    router = APIRouter(prefix=PREFIX)

    @router.post("/fine", dependencies=[OPERATOR])
    def fine() -> dict:
        return {}

    @router.get("/forgotten")
    def forgotten() -> dict:
        return {}

    undeclared.include_router(router)
    with pytest.raises(RuntimeError, match="forgotten"):
        check_console_routes(undeclared)


def test_no_asset_comes_from_elsewhere_and_the_console_is_not_in_the_api_document() -> None:
    for path in [*CONSOLE_DIR.glob("templates/*.html"), *CONSOLE_DIR.glob("static/*")]:
        text = path.read_text()
        assert not re.search(r"(src|href)=\"(https?:)?//", text), f"{path.name} loads something from elsewhere"
        assert "<script>" not in text and " style=" not in text, f"{path.name}: inline script or style (CSP)"
    assert not [path for path in app.openapi()["paths"] if path.startswith(PREFIX)]
    with browser() as client:
        assert client.get(f"{PREFIX}/static/console.js").status_code == 200
        assert client.get(f"{PREFIX}/static/console.css").status_code == 200


def test_without_redis_the_console_says_so(keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    with browser() as client:
        log_in(client, keys["reader"])
        monkeypatch.setenv("ASR_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
        page = client.get(f"{PREFIX}/")
        assert page.status_code == 503 and "sessions cannot be read" in page.text
        login = client.post(f"{PREFIX}/login", data={"api_key": keys["reader"]})
        assert login.status_code == 503 and "could not be opened" in login.text and COOKIE not in login.cookies
