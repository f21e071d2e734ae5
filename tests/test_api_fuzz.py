"""The REST API fuzzed against its own served OpenAPI document (schemathesis): `uvicorn api.rest:app` as a real
subprocess (tests/api_server.py) before a deployment's private Redis and a PostgreSQL schema of its own, called
with a valid admin key so that every route is reached past the key and role checks.

For each operation, a bounded number of requests whose parameters and bodies fit the schema (positive) and of
requests that break it (negative), generated reproducibly (derandomized: the same requests on every run), about
half of them with path parameters naming what the deployment has (`existing`), the others random. Every answer
must be: no 5xx; a status code the operation documents, of its documented content type, with a body that fits
the documented schema of that status; and for a request that breaks the schema, a 4xx.

The deployment runs no workers: an action that starts a job only queues it, so nothing here starts real work;
a VM the fuzzer starts is a synthetic one (a small writer process, stopped with the deployment). FUZZ_EXAMPLES
(environment) raises the number of requests per operation and mode for a longer hunt; FUZZ_TIMES=1 (with
`pytest -s`) prints each operation's time and the status codes it answered.

The requests found answering 500 are kept as they were (`FOUND`): each a 422 now, changing nothing.
"""
from __future__ import annotations

import os
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import hypothesis
import pytest
import schemathesis
import sqlalchemy as sa
from api_server import ApiDeployment as Deployment
from api_server import api_deployment
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from api import service
from models.db import dispose_engines

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "5"))
"""Requests per operation and generation mode (positive, negative): ~65 operations x 2 x 5 requests."""
TIME_LIMIT_S = 120
"""The whole fuzz run's bound on a loaded machine (it takes ~20 s on an idle one); past it, the test fails."""
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


VM, BUSY_VM, PLAN = "vm1", "vm2", "plan1"


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, postgres_admin: sa.Engine) -> Iterator[Deployment]:
    """The deployment, on a PostgreSQL schema of its own (what a production site runs, and stricter than SQLite:
    no NUL in text, say), with things for the fuzzer to find besides its random names (`existing`): a VM, a VM
    being protected (its job queued: no worker runs it), a plan, and the site's fabric and default policy."""
    schema = f"asr_fuzz_{uuid.uuid4().hex[:12]}"
    with postgres_admin.connect() as connection:
        connection.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    database_url = postgres_admin.url.update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        # The key checked once and then trusted for a while, as deployed (the default): a check is a scrypt,
        # which the other API tests pay on every request so that a revocation shows at once.
        with api_deployment(tmp_path_factory.mktemp("fuzz"), start_workers=False,
                            database_url=database_url.render_as_string(hide_password=False),
                            server_env={"ASR_API_KEY_CACHE_S": "600"}) as deployment:
            site = deployment.site
            for name in (VM, BUSY_VM):
                site.create_vm("host1", name, [("disk0", "1M", "raw")], fill=0)
            deployment.job_id = service.protect(BUSY_VM, policy="default",
                                                recovery_storage=site.recovery_storage)["job_id"]
            service.create_plan(PLAN, groups=[{"name": "web", "vms": [VM]}])
            yield deployment
    finally:
        dispose_engines()
        with postgres_admin.connect() as connection:
            connection.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))


def existing(path: str, job_id: str) -> dict[str, str] | None:
    """Path parameters naming what the deployment has, for the operation at `path` (None: not one of those).
    Not the job's event stream: the job never ends (no worker runs it), so its stream would last until the
    fuzzer's `timeout`, and a stream that goes on is what that route is for."""
    if "{vm}" in path:
        return {"vm": VM}
    if "{job_id}" in path:
        return None if path.endswith("/events") else {"job_id": job_id}
    if "{host}" in path:
        return {"host": "host1"}
    if "{source_network}" in path:
        return {"source_network": "default"}
    for prefix, name in (("/sites/", "primary"), ("/hosts/", "host1"), ("/policies/", "default"), ("/plans/", PLAN)):
        if prefix in path and "{name}" in path:
            return {"name": name}
    return None


def _inside(workdir: Path, case: schemathesis.Case) -> None:
    """A host's root the fuzzer registers lands inside the test's folder: the admin key may register a host
    anywhere, and a VM created on it then writes its disks there (this process runs as root on CI). The root
    keeps what the fuzzer made of it after its leading '/' ('..' parts, NUL, length), so its checks are still
    exercised; a root without that '/' is left as it is, to be refused."""
    if case.method == "POST" and case.path.endswith("/hosts") and isinstance(case.body, dict):
        root = case.body.get("root")
        if isinstance(root, str) and root.startswith("/"):
            case.body["root"] = f"{workdir}/roots{root}"


def _fuzz(operation: Any, mode: GenerationMode, call: Any, known: dict[str, str] | None) -> str | None:
    """Run `call` on the operation's generated cases in `mode`, with random path parameters or, as often,
    the `known` ones; the first failure's description, or None."""
    failing: list[str] = []
    strategy = operation.as_strategy(generation_mode=mode)
    if known is not None:
        strategy = strategy | operation.as_strategy(generation_mode=mode, path_parameters=known)

    @hypothesis.settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
                         phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
                         suppress_health_check=list(hypothesis.HealthCheck), print_blob=False)
    @hypothesis.given(case=strategy)
    def run(case: schemathesis.Case) -> None:
        try:
            call(case, mode)
        except (Exception, BaseExceptionGroup) as exc:  # schemathesis raises its failures as a group
            request = "" if "Reproduce with" in str(exc) else f"\n  {case.as_curl_command()}"
            failing.append(f"{operation.label} ({mode.value}): {exc}{request}")
            raise

    started = time.monotonic()
    try:
        run()
    except hypothesis.errors.Unsatisfiable:
        if mode is not GenerationMode.NEGATIVE:
            raise
        # An operation without parameters or body (GET /healthz, the lists): nothing a request could break.
    except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - every operation is fuzzed; the failures are reported together
        return failing[0] if failing else f"{operation.label} ({mode.value}): {type(exc).__name__}: {exc}"
    finally:
        if os.environ.get("FUZZ_TIMES"):
            print(f"{time.monotonic() - started:6.2f} s  {operation.label} ({mode.value})")
    return None


def test_the_api_answers_every_generated_request_as_documented(deployment: Deployment, tmp_path: Path) -> None:
    schema = schemathesis.openapi.from_url(f"{deployment.url}/openapi.json")
    headers = {"X-API-Key": deployment.key}
    statuses: dict[str, Counter[int]] = {}

    def call(case: schemathesis.Case, mode: GenerationMode) -> None:
        _inside(tmp_path, case)
        response = case.call(base_url=deployment.url, headers=headers, timeout=30)
        checks = CHECKS + ([negative_data_rejection] if mode is GenerationMode.NEGATIVE else [])
        statuses.setdefault(case.operation.label, Counter())[response.status_code] += 1
        # Documented, but not what this run is for: the admin key must reach every route.
        assert response.status_code not in (401, 403), f"the admin key was refused: {response.text}"
        case.validate_response(response, checks=checks, headers=headers)

    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 60, "the document lists the API's operations"
    started = time.monotonic()
    failures = [failure for operation in operations for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
                if (failure := _fuzz(operation, mode, call, existing(operation.path, deployment.job_id))) is not None]
    elapsed = time.monotonic() - started
    if os.environ.get("FUZZ_TIMES"):
        for label, counts in statuses.items():
            print(f"{label}: {dict(sorted(counts.items()))}")
    assert failures == [], f"{len(failures)} operations answered against their document:\n\n" + "\n\n".join(failures)
    assert elapsed < TIME_LIMIT_S, f"the fuzz run took {elapsed:.0f} s"


# The requests the fuzzer found answered with a 5xx (or left a VM behind on its host), kept as they were: each is
# now a 422 that says what is wrong, and changes nothing.
FOUND = [
    ("PATCH", "/sites/primary", {"description": "a\u0000b"}, "NUL"),  # PostgreSQL holds no NUL in text
    ("POST", "/sites", {"name": "nul", "description": "\u0000"}, "NUL"),
    ("POST", "/plans", {"name": "nul", "description": "\u0000", "groups": [{"name": "web", "vms": [VM]}]}, "NUL"),
    # A VM or a job id in the URL is now refused by its declared pattern, before the database sees it.
    ("GET", "/jobs?vm=%00", None, "query.vm: String should match pattern"),
    ("GET", "/jobs?kind=%00", None, "NUL"),
    ("GET", "/jobs/%00", None, "path.job_id: String should match pattern"),
    ("GET", f"/vms/{VM}%00", None, "path.vm: invalid name"),
    ("POST", "/hosts/host1/vms", {"name": "huge", "disks": [{"name": "d", "size": 1 << 50}]}, "at most 8388607 MiB"),
    ("POST", "/hosts/host1/vms", {"name": "huge", "disks": [{"name": "d", "size": "99999999999999T"}]},
     "at most 8388607 MiB"),
    ("POST", "/hosts/host1/vms", {"name": "long", "disks": [{"name": "d" * 64, "size": "1M"}]},
     "at most 60 characters"),
]


def test_what_the_fuzzer_found_is_refused_and_changes_nothing(deployment: Deployment) -> None:
    url, headers = f"{deployment.url}/api/v1", {"X-API-Key": deployment.key}
    host_vms = deployment.site.workdir / "hosts" / "host1" / "vms"

    def state() -> tuple[Any, ...]:
        return service.list_sites(), service.list_vms(), service.list_plans(), sorted(os.listdir(host_vms))

    before = state()
    for method, path, body, fragment in FOUND:
        response = httpx.request(method, url + path, json=body, headers=headers, timeout=30)
        assert response.status_code == 422 and fragment in response.json()["error"], (
            f"{method} {path} {body}: {response.status_code} {response.text}")
    assert state() == before

    # A host whose root the file system cannot hold a VM under (a name of 300 characters in its path).
    root = deployment.site.workdir / ("r" * 300)
    added = httpx.post(f"{url}/hosts", json={"name": "deep", "root": str(root), "site": "primary"}, headers=headers)
    assert added.status_code == 201, added.text
    response = httpx.post(f"{url}/hosts/deep/vms", json={"name": "v", "disks": [{"name": "d", "size": "1M"}]},
                          headers=headers)
    assert response.status_code == 422 and "too long for the file system" in response.json()["error"], response.text
    assert [vm["name"] for vm in service.list_vms()] == [vm["name"] for vm in before[1]]
