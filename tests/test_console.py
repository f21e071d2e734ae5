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

The job buttons an operator presses (cancel, retry now, resume, restart) change the job as the engine records
it: the jobs are the engine's (its start, its steps run by `execute_step`, what a worker calls), sent through a
recording dispatcher instead of Celery (as tests/test_engine_core.py does); tests/test_console_browser.py
presses cancel, restart and resume on a real deployment's plan job.
"""
from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
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
from datapath.errors import NonRecoverableError, StorageUnavailableError
from models.db import dispose_engines, session_scope
from models.jobs import Job
from sites.localservices import free_port
from workflows import actions
from workflows.engine import AwaitingOperator, StepSpec, action, execute_step, get_job, start_job, use_dispatcher
from workflows.jobkind import JobKind, declare

CONSOLE_DIR = Path(__file__).resolve().parents[1] / "api" / "console"

# The steps of the jobs the console's buttons act on (run in this process, by `execute_step`).
UNAVAILABLE_ONCE = actions.declare("test.console.unavailable_once")
ASKS_THE_OPERATOR = actions.declare("test.console.asks_the_operator")
BROKEN_ONCE = actions.declare("test.console.broken_once")
DONE = actions.declare("test.console.done")


@action(UNAVAILABLE_ONCE)
def _unavailable_once(ctx, **params):
    if ctx.attempt == 1:
        raise StorageUnavailableError("the recovery storage is away")
    return {"attempt": ctx.attempt}


@action(ASKS_THE_OPERATOR)
def _asks_the_operator(ctx, **params):
    raise AwaitingOperator("Switch the DNS over")


@action(BROKEN_ONCE)
def _broken_once(ctx, **params):
    if ctx.attempt == 1:
        raise NonRecoverableError("the VM is gone")
    return {"attempt": ctx.attempt}


@action(DONE)
def _done(ctx, **params):
    return {}


# "resume": restarting a failed job resumes it from its failed step (the replication kinds' way out).
CONSOLE_KIND = declare(JobKind(
    name="test.console", summary="the console's job buttons", recovery="resume",
    actions=frozenset({UNAVAILABLE_ONCE, ASKS_THE_OPERATOR, BROKEN_ONCE, DONE}),
    build=lambda request: request, locks=lambda request: [], target=lambda request: None,
    params=lambda request: {},
))


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


@dataclass
class RecordingDispatcher:
    """Stands in for Celery's transport: the step ids of each stage the engine sends."""
    sent: list[list[str]] = field(default_factory=list)

    def send_stage(self, steps: Sequence) -> None:
        self.sent.append([step.id for step in steps])

    def dispatch_hooks(self, job_id: str) -> None:
        pass

    def report_lost_run(self, task_id: str, *, failed: bool, reason: str) -> None:
        pass


@pytest.fixture
def dispatcher(keys: Keys, monkeypatch: pytest.MonkeyPatch) -> Iterator[RecordingDispatcher]:
    # The engine's clock 10 times faster: a step's in-call retries take 0.15 s, its first retry is 6 s away.
    monkeypatch.setenv("ASR_TIME_SCALE", "10")
    recording = RecordingDispatcher()
    previous = use_dispatcher(recording)
    yield recording
    use_dispatcher(previous)


def run_step(step_id: str) -> str:
    """Runs the step as a worker would; returns the state it ended in."""
    return execute_step(step_id, task_id=f"task-{step_id}", worker="test-worker",
                        emit_event=lambda **_: None).state.value


def job_with(*stages: str) -> tuple[str, list[str]]:
    """A job of one step per stage, started (its first stage sent); its id and its steps' ids."""
    job_id = start_job(CONSOLE_KIND.name, lock_key=None,
                       stages=[[StepSpec(f"Step {index}", name, "orchestration")] for index, name in enumerate(stages)])
    return job_id, [step["id"] for step in get_job(job_id)["steps"]]


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


def test_an_operators_job_buttons_change_the_job(keys: Keys, dispatcher: RecordingDispatcher) -> None:
    with browser() as client:
        log_in(client, keys["operator"])
        csrf = csrf_of(client.get(f"{PREFIX}/").text)

        def press(job_id: str, button: str, state: str, **form: str) -> str:
            """Presses the job page's button (which the page shows, in the job's state); returns the page the
            console goes to."""
            page = client.get(f"{PREFIX}/jobs/{job_id}").text
            assert f'id="job-state">{state}<' in page and f'id="{button}-job"' in page, (button, page)
            response = client.post(f"{PREFIX}/jobs/{job_id}/{button}", data={"csrf": csrf, **form})
            assert response.status_code == 303, (button, response.status_code, response.text)
            return response.headers["location"]

        def shown(job_id: str) -> tuple[str, list[str]]:
            """The job's state and its steps' states, as its page shows them."""
            page = client.get(f"{PREFIX}/jobs/{job_id}")
            assert page.status_code == 200
            job_state = re.search(r'id="job-state">([a-z_]+)<', page.text)
            assert job_state, page.text
            return job_state.group(1), re.findall(r'step-state">([a-z_]+)<', page.text)

        # Cancel: a queued job ends cancelled, its step never to run.
        job_id, [step] = job_with(DONE)
        assert press(job_id, "cancel", "queued") == f"{PREFIX}/jobs/{job_id}"
        assert shown(job_id) == ("cancelled", ["cancelled"])
        assert run_step(step) == "cancelled", "a cancelled job's step should not run"

        # Retry now: a step waiting for its retry (6 s away) is sent at once, and its next attempt succeeds.
        job_id, [step] = job_with(UNAVAILABLE_ONCE)
        assert run_step(step) == "waiting_retry" and dispatcher.sent[-1] == [step]
        sent_before = len(dispatcher.sent)
        press(job_id, "retry", "waiting_retry")
        assert dispatcher.sent[sent_before:] == [[step]], "retry now should have sent the step"
        # (The job itself says waiting_retry until a worker claims the step.)
        assert shown(job_id)[1] == ["queued"]
        assert run_step(step) == "succeeded" and shown(job_id) == ("succeeded", ["succeeded"])

        # Resume: the step waiting for the operator succeeds with the note, and the next stage is sent.
        job_id, [manual, after] = job_with(ASKS_THE_OPERATOR, DONE)
        assert run_step(manual) == "waiting_action" and "Switch the DNS over" in client.get(
            f"{PREFIX}/jobs/{job_id}").text
        press(job_id, "resume", "waiting_action", note="DNS switched by alice")
        resumed = get_job(job_id)["steps"][0]
        assert resumed["state"] == "succeeded" and resumed["result"]["note"] == "DNS switched by alice"
        assert dispatcher.sent[-1] == [after] and shown(job_id)[1] == ["succeeded", "queued"]
        assert run_step(after) == "succeeded" and shown(job_id) == ("succeeded", ["succeeded", "succeeded"])

        # Restart: a failed job of a kind that resumes goes on from its failed step, as the same job.
        job_id, [step] = job_with(BROKEN_ONCE)
        assert run_step(step) == "failed" and shown(job_id) == ("failed", ["failed"])
        sent_before = len(dispatcher.sent)
        assert press(job_id, "restart", "failed") == f"{PREFIX}/jobs/{job_id}"
        assert dispatcher.sent[sent_before:] == [[step]] and shown(job_id) == ("queued", ["queued"])
        assert run_step(step) == "succeeded" and shown(job_id) == ("succeeded", ["succeeded"])


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
