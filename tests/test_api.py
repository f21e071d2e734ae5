"""The REST API as it is deployed: `uvicorn api.rest:app` as a real subprocess on a free port, pointed at a
real deployment (tests/recovery_site.py: private redis-server, SQLite, Celery workers and beat), used
through the typed client (api/client.py) and, where the wire itself is the point, through plain httpx.

Covered: 401 without a valid key and nothing written; 202 with the job id and a Location; a job followed to
its end as server-sent events; 404/409/422 with readable messages; protection and a drill through the API;
the OpenAPI document in docs/ matching the app.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from api_server import ApiDeployment as Deployment
from api_server import api_deployment
from recovery_site import RecoverySite
from sqlmodel import select

from api import service
from api.client import ApiError, SiteRecoveryClient
from api.rest import openapi_text
from models.db import session_scope
from models.fabric import Site, VirtualMachine
from models.jobs import Job
from models.protection import ProtectedItem

REPO_ROOT = Path(__file__).resolve().parents[1]
OPENAPI_DOC = REPO_ROOT / "docs" / "openapi.json"
DISKS = [("disk0", "8M", "vhd"), ("disk1", "4M", "raw")]
JOB_TIMEOUT = 90


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    with api_deployment(tmp_path_factory.mktemp("api")) as deployment:
        yield deployment


def rows() -> dict[str, int]:
    with session_scope() as session:
        return {model.__name__: session.exec(select(sa.func.count()).select_from(model)).one()
                for model in (Site, VirtualMachine, ProtectedItem, Job)}


def api_error(call, status: int, *fragments: str) -> str:
    """`call` fails with `status` and a message holding every fragment, writing nothing; returns the message."""
    before = rows()
    with pytest.raises(ApiError) as caught:
        call()
    assert caught.value.status == status, f"expected {status}, got {caught.value}"
    for fragment in fragments:
        assert fragment in caught.value.message, f"{caught.value.message!r} should mention {fragment!r}"
    assert rows() == before, f"a refused request ({caught.value}) wrote to the database"
    return caught.value.message


# ---- the document ----------------------------------------------------------------------------------------
def test_openapi_document_is_current() -> None:
    current = openapi_text()
    assert OPENAPI_DOC.is_file() and OPENAPI_DOC.read_text() == current, (
        "docs/openapi.json is stale: regenerate it with `python -m api.rest --write-openapi docs/openapi.json`")


# ---- keys ----------------------------------------------------------------------------------------------------
def test_requests_without_a_valid_key_do_nothing(deployment: Deployment) -> None:
    url = deployment.url + "/api/v1"
    make_vm(deployment.site, "keyless")
    service.add_vm("host1", "keyless")
    before = rows()
    attempts = [
        ("POST", "/sites", {"name": "intruder"}, {}),
        ("POST", "/sites", {"name": "intruder"}, {"X-API-Key": "asr_0123456789_guessed"}),
        ("POST", "/sites", {"name": "intruder"}, {"Authorization": "Bearer not-a-key"}),
        ("POST", "/sites", {"name": "intruder"}, {"Authorization": f"Basic {deployment.key}"}),
        ("POST", "/vms/keyless/protect", {"policy": "default", "recovery_storage": deployment.site.recovery_storage},
         {}),
        ("POST", "/sites", "{not json", {}),  # refused for the key before the body is even read
        ("GET", "/sites", None, {}),
        ("GET", "/no/such/route", None, {}),
    ]
    for method, path, body, headers in attempts:
        kwargs = {"content": body} if isinstance(body, str) else {"json": body}
        response = httpx.request(method, url + path, headers=headers, timeout=10, **kwargs)
        assert response.status_code == 401, f"{method} {path} with {headers}: {response.status_code} {response.text}"
        assert "API key" in response.json()["error"]
        assert response.headers["www-authenticate"].startswith("Bearer")
    assert rows() == before, "a request without a valid key changed the database"
    assert service.list_jobs(vm="host1/keyless") == []

    # Open without a key: liveness and the API's own description.
    assert httpx.get(deployment.url + "/healthz").json()["status"] == "ok"
    assert httpx.get(deployment.url + "/openapi.json").json()["info"]["title"] == "Site Recovery Engine API"

    # The database key as a header or a bearer token, the key listed by hash in the environment.
    assert httpx.get(url + "/sites", headers={"X-API-Key": deployment.key}).status_code == 200
    assert httpx.get(url + "/sites", headers={"Authorization": f"Bearer {deployment.key}"}).status_code == 200
    with deployment.client(deployment.env_key) as by_env:
        assert "primary" in {s["name"] for s in by_env.list_sites()}

    # A revoked key stops working.
    temporary = service.create_api_key("temporary")["key"]
    with deployment.client(temporary) as client:
        assert client.list_vms()
        service.revoke_api_key("temporary")
        api_error(client.list_vms, 401, "not valid")


# ---- errors ----------------------------------------------------------------------------------------------------
def test_errors_are_clear_and_change_nothing(deployment: Deployment) -> None:
    url = deployment.url + "/api/v1"
    headers = {"X-API-Key": deployment.key}
    with deployment.client() as client:
        for bad in ("a/b", "..", "up..", "back\\slash"):
            api_error(lambda bad=bad: client.add_site(bad), 422, "name", "cannot contain")
        api_error(lambda: client.add_site("x" * 65), 422, "name")
        api_error(lambda: client.add_site("primary"), 409, "site 'primary' already exists")
        api_error(lambda: client.show_vm("ghost"), 404, "VM 'ghost' not found")
        api_error(lambda: client.show_site("ghost"), 404, "site 'ghost' not found")
        api_error(lambda: client.show_job("no-such-job"), 404, "no job no-such-job")
        api_error(lambda: list(client.events("no-such-job")), 404, "no job")
        api_error(lambda: client.add_policy("bad", copy_frequency_s=17), 422, "copy frequency", "30, 300, 900")
        api_error(lambda: client.add_vm("host1", "ghost"), 404, "VM 'ghost' not found on host 'host1'")
        api_error(lambda: client.list_jobs(limit=0), 422, "limit")
        api_error(lambda: client.protect("ghost", policy="default", recovery_storage="file:///x"), 404, "ghost")
        api_error(lambda: client.run_plan("nope", "test_failover"), 404, "recovery plan 'nope' not found")
        # A plan runs only scripts registered on the workers, never a command line it carries.
        leak = [{"name": "g", "vms": ["host1/ghost"],
                 "after": [{"kind": "script", "name": "s", "command": ["sh", "-c", "id; env"]}]}]
        api_error(lambda: client.create_plan("leak", leak), 422, "a command line (command) is not accepted",
                  "registered")
        leak[0]["after"] = [{"kind": "script", "name": "s", "script": "sh"}]
        api_error(lambda: client.create_plan("leak", leak), 422, "no plan scripts are registered here")
        assert client.plan_scripts() == []

    # What the typed client cannot send: names with separators in the path, unknown fields, wrong types,
    # malformed JSON. Each a 422 naming the problem.
    for path in ("/sites/..%2Fetc", "/sites/a%5Cb", "/hosts/%2E%2E", "/policies/x%2F..%2Fy"):
        response = httpx.get(url + path, headers=headers)
        assert response.status_code == 422 and "cannot contain" in response.json()["error"], (path, response.text)
    cases = [
        ({"name": "ok1", "colour": "blue"}, "colour: unknown field"),
        ({"description": "no name"}, "name: required"),
        ({"name": ["a"]}, "name:"),
        ("{not json", "not valid JSON"),
    ]
    before = rows()
    for body, expected in cases:
        kwargs = {"content": body, "headers": {**headers, "content-type": "application/json"}} \
            if isinstance(body, str) else {"json": body, "headers": headers}
        response = httpx.post(url + "/sites", **kwargs)
        assert response.status_code == 422 and expected in response.json()["error"], (body, response.text)
    assert rows() == before
    response = httpx.get(url + "/no/such/route", headers=headers)
    assert response.status_code == 404 and "no such route" in response.json()["error"]


# ---- operations ----------------------------------------------------------------------------------------------
def make_vm(site: RecoverySite, name: str) -> None:
    driver = site.host("host1")
    driver.create_vm(name, DISKS)
    driver.write_initial_data(name, 7, 0.5)


def follow(client: SiteRecoveryClient, job_id: str) -> list[dict[str, Any]]:
    """The job's server-sent events to its end; fails naming the job unless it succeeded."""
    snapshots = list(client.events(job_id, interval=0.2, timeout=JOB_TIMEOUT))
    last = snapshots[-1]
    assert last["finished"], f"job {job_id} did not finish in {JOB_TIMEOUT} s: {last}"
    assert last["state"] == "succeeded", f"job {job_id} ({last['kind']}) {last['state']}: {last['error']}"
    return snapshots


def test_protect_and_drill_through_the_api(deployment: Deployment) -> None:
    site = deployment.site
    make_vm(site, "web01")
    with deployment.client() as client:
        vm = client.add_vm("host1", "web01")
        assert [d["name"] for d in vm["disks"]] == ["disk0", "disk1"] and vm["state"] is None
        # Quiet: no delta cycle takes the VM's lock while the test drives it.
        policy = client.add_policy("quiet", copy_frequency_s=900, office_hours=["00:00", "23:59"],
                                   office_days=["mon", "tue", "wed", "thu", "fri", "sat", "sun"])
        assert policy["copy_frequency_s"] == 900
        assert policy["consistency_check_interval_h"] == 24 and policy["consistency_check_off_hours"] is True

        # Submitting answers 202 at once, with the job id and where to follow it.
        response = httpx.post(f"{deployment.url}/api/v1/vms/web01/protect", headers={"X-API-Key": deployment.key},
                              json={"policy": "quiet", "recovery_storage": site.recovery_storage,
                                    "recovery_host": "dr1"})
        assert response.status_code == 202, response.text
        started = response.json()
        assert started["kind"] == "enable_protection" and started["vm"] == "web01"
        assert response.headers["location"] == f"/api/v1/jobs/{started['job_id']}"
        api_error(lambda: client.protect("web01", policy="quiet", recovery_storage=site.recovery_storage), 409,
                  "web01")

        snapshots = follow(client, started["job_id"])
        assert len(snapshots) >= 2 and not snapshots[0]["finished"], "the stream should show the job running"
        assert snapshots[-1]["percent"] == 100.0
        assert {step["name"] for step in snapshots[-1]["steps"]} >= {"Copy disk disk0", "Copy disk disk1"}

        job = client.show_job(started["job_id"])
        assert job["state"] == "succeeded" and all(step["progress"]["percent"] == 100.0 for step in job["steps"])
        points = client.recovery_points("web01")
        assert points, "protection should leave a recovery point"
        shown = client.show_vm("host1/web01")
        assert shown["state"] == "protected"
        assert [d["replica"] for d in shown["disks"]] == ["host1/web01/disk0.vhd", "host1/web01/disk1.vhd"]

        # The end-to-end consistency check: every chunk of both disks compared, none drifted, nothing sent.
        check = client.consistency_check("web01")
        assert check["kind"] == "consistency_check"
        follow(client, check["job_id"])
        checked = [step["result"] for step in client.show_job(check["job_id"])["steps"]
                   if step["name"].startswith("Check disk")]
        assert [(r["disk"], r["chunks_compared"], r["drifted_chunks"], r["bytes_sent"]) for r in checked] == [
            ("disk0", 8, [], 0), ("disk1", 4, [], 0)]

        # A drill through the API, followed as events; the report says the disks were verified.
        drill = client.test_failover("web01")
        assert drill["kind"] == "test_failover"
        follow(client, drill["job_id"])
        shown = client.show_vm("web01")
        assert shown["failover"]["kind"] == "test" and shown["failover"]["verified"] is True
        assert all(Path(d["test_path"]).is_file() for d in shown["disks"])
        api_error(lambda: client.test_failover("web01"), 409, "clean it up first")
        cleanup = client.test_failover_cleanup("web01")
        assert client.wait_job(cleanup["job_id"], timeout=JOB_TIMEOUT)["state"] == "succeeded"
        assert all(d["test_path"] is None for d in client.show_vm("web01")["disks"])

        assert [j["kind"] for j in client.list_jobs(vm="web01")] == ["test_failover_cleanup", "test_failover",
                                                                      "consistency_check", "enable_protection"]
        api_error(lambda: client.cancel_job(drill["job_id"]), 409, "already ended")
        api_error(lambda: client.restart_job(drill["job_id"]), 409, "only a failed or cancelled job")
        api_error(lambda: client.commit_failover("web01"), 409, "nothing to commit")
        api_error(lambda: client.failback("web01", mode="sideways"), 422, "failback mode")
        health = {entry["vm"]: entry for entry in client.health()}
        assert health["web01"]["state"] == "protected" and health["web01"]["health"] == "Healthy"
        # The drill's record, newest first; it passed (cleaning it up does not undo that).
        history = client.failover_history("web01")
        assert [(r["kind"], r["status"], r["verified"], r["job_id"]) for r in history] == [
            ("test", "cleaned_up", True, drill["job_id"])]
        assert history[0]["rto_s"] is not None and history[0]["vm_up_at"] is not None
        assert health["web01"]["last_passed_drill"]["id"] == history[0]["id"]

        # A recovery plan whose manual action pauses the job: the stream ends at its timeout showing what the
        # operator is asked to do; resuming lets the drill run to its end.
        plan = client.create_plan("web-drill", [{
            "name": "web", "vms": ["web01"],
            "before": [{"kind": "manual", "name": "dns", "instructions": "Point www at the test network"}],
        }])
        assert plan["groups"][0]["vms"][0]["name"] == "web01"
        # Its dry run: every check of a run, nothing started; a reader may ask.
        dry = client.validate_plan("web-drill", "test_failover")
        assert dry == {"plan": "web-drill", "operation": "test_failover",
                       "groups": [{"name": "web", "vms": ["web01"], "before": ["dns"], "after": []}]}
        with deployment.client(deployment.role_keys["reader"]) as reader:
            assert reader.validate_plan("web-drill", "test_failover") == dry
        api_error(lambda: client.validate_plan("web-drill", "failback"), 422, "VM 'web01'",
                  "failback needs failover_committed")
        api_error(lambda: client.validate_plan("no-such-plan", "test_failover"), 404, "no-such-plan")
        run = client.run_plan("web-drill", "test_failover")
        assert run["kind"] == "plan_test_failover" and run["plan"] == "web-drill"
        paused = list(client.events(run["job_id"], interval=0.2, timeout=3))
        assert not paused[-1]["finished"] and paused[-1]["state"] == "waiting_action", paused[-1]
        assert paused[-1]["waiting_for"] == [{"step": "Group web: before action dns",
                                              "instructions": "Point www at the test network"}]
        assert client.resume_job(run["job_id"], note="done")["resumed_steps"]
        follow(client, run["job_id"])
        assert [job["id"] for job in client.list_jobs(plan="web-drill")] == [run["job_id"]]
        api_error(lambda: client.list_jobs(plan="no-such-plan"), 404, "no-such-plan")
        assert client.show_vm("web01")["failover"]["kind"] == "test"
        assert client.wait_job(client.test_failover_cleanup("web01")["job_id"], JOB_TIMEOUT)["state"] == "succeeded"

        # Deleting old recovery points: admin only, confirmed by the VM's name, never the latest point.
        points = client.recovery_points("web01")
        assert len(points) >= 2 and all(point["locked_until"] is None for point in points), points
        delete = {"before": points[-1]["created_at"], "confirm": "web01"}
        for role in ("reader", "operator"):
            with deployment.client(deployment.role_keys[role]) as weaker:
                api_error(lambda weaker=weaker: weaker.delete_recovery_points("web01", **delete), 403,
                          "the admin role", f"this key is {role}")
        api_error(lambda: client.delete_recovery_points("web01", before=delete["before"], confirm="web02"), 400,
                  '{"confirm": "web01"}', "'web02'")
        deleted = client.delete_recovery_points("web01", **delete)
        assert deleted["kind"] == "delete_recovery_points"
        assert client.wait_job(deleted["job_id"], timeout=JOB_TIMEOUT)["state"] == "succeeded"
        assert [point["id"] for point in client.recovery_points("web01")] == [points[-1]["id"]]

        # Disabling protection deletes every replica and point: admin only, and confirmed by the VM's name.
        for role in ("reader", "operator"):
            with deployment.client(deployment.role_keys[role]) as weaker:
                api_error(lambda weaker=weaker: weaker.disable_protection("web01", confirm="web01"), 403,
                          "the admin role", f"this key is {role}")
        response = httpx.post(f"{deployment.url}/api/v1/vms/web01/disable-protection",
                              headers={"X-API-Key": deployment.key})
        assert response.status_code == 400 and '{"confirm": "web01"}' in response.json()["error"], response.text
        api_error(lambda: client.disable_protection("web01", confirm="web02"), 400, "confirm", "'web02'")
        assert client.show_vm("web01")["state"] == "protected"
        disabled = client.disable_protection("web01", confirm="web01")
        assert client.wait_job(disabled["job_id"], timeout=JOB_TIMEOUT)["state"] == "succeeded"
        assert client.show_vm("web01")["state"] == "disabled"


def test_changes_and_removals_through_the_api(deployment: Deployment) -> None:
    """After the drill test: web01's protection is disabled, policy `quiet` and plan `web-drill` name it."""
    site = deployment.site
    url = f"{deployment.url}/api/v1"
    headers = {"X-API-Key": deployment.key}
    root = site.workdir / "hosts" / "annex1"
    root.mkdir(parents=True)
    with deployment.client() as client:
        client.add_site("annex")
        first_key = client.add_host("annex1", str(root), site="annex")["registration_key"]
        # A new key: shown once, the old one no longer the host's.
        rekeyed = client.rekey_host("annex1")
        assert rekeyed["name"] == "annex1" and rekeyed["registration_key"] != first_key
        assert "registration_key" not in client.show_host("annex1")
        api_error(lambda: client.rekey_host("ghost"), 404, "host 'ghost' not found")
        assert client.update_site("annex", description="the annex")["description"] == "the annex"

        # A host's root and site, a VM's networks, a mapping's recovery network: checked as created, then read back.
        moved = root.with_name("annex1-moved")
        api_error(lambda: client.update_host("annex1", root="annex1"), 422, "must be an absolute path")
        api_error(lambda: client.update_host("annex1", site="nowhere"), 404, "site 'nowhere' not found")
        assert client.update_host("annex1", root=str(moved), site="primary")["root"] == str(moved)
        assert (client.show_host("annex1")["root"], client.show_host("annex1")["site"]) == (str(moved), "primary")
        assert client.update_host("annex1", site="annex")["site"] == "annex"
        api_error(lambda: client.update_vm("web01", networks={"nic0": "a/b"}), 422, "invalid name")
        api_error(lambda: client.update_vm("web01", networks={"nic3": "backend"}), 422, "no network adapter 'nic3'")
        api_error(lambda: client.update_vm("web01", guest={"memory_mb": 512}), 422, "synthetic VM")
        assert client.update_vm("host1/web01", networks={"nic0": "backend"})["adapters"][0]["vm_network"] == "backend"
        assert client.show_vm("web01")["adapters"][0]["vm_network"] == "backend"
        api_error(lambda: client.update_network_mapping("backend", site="primary", recovery_subnet="10.0.0.1/8"), 422,
                  "not a network in CIDR form")
        api_error(lambda: client.update_network_mapping("backend", recovery_network="x"), 422, "give site or cloud")
        changed = client.update_network_mapping("backend", site="primary", recovery_network="recovery-backend2")
        assert (changed["recovery_network"], changed["recovery_subnet"]) == ("recovery-backend2", "10.20.0.0/24")
        for role in ("reader", "operator"):  # changes take the admin role
            with deployment.client(deployment.role_keys[role]) as weaker:
                for call in (lambda w=weaker: w.update_host("annex1", root="/elsewhere"),
                             lambda w=weaker: w.update_vm("web01", networks={"nic0": "default"}),
                             lambda w=weaker: w.update_network_mapping("backend", site="primary",
                                                                       recovery_network="nope")):
                    api_error(call, 403, "the admin role")

        # A policy change is checked as a new policy is; 422 changes nothing.
        api_error(lambda: client.update_policy("quiet", copy_frequency_s=17), 422, "copy frequency", "30, 300, 900")
        api_error(lambda: client.update_policy("quiet", app_consistent_frequency_h=5), 422, "would not survive")
        changed = client.update_policy("quiet", recovery_point_retention_h=6, app_consistent_frequency_h=4)
        assert (changed["recovery_point_retention_h"], changed["app_consistent_frequency_h"]) == (6, 4)
        assert "next cycle" in changed["applies_from"]
        assert client.show_policy("quiet")["recovery_point_retention_h"] == 6
        # A retention lock can be raised, never lowered: 409, nothing changed.
        assert client.update_policy("quiet", retention_lock_h=2)["retention_lock_h"] == 2
        api_error(lambda: client.update_policy("quiet", retention_lock_h=1), 409, "cannot be lowered to 1 h")
        assert client.show_policy("quiet")["retention_lock_h"] == 2

        # Removals take the thing's name as confirmation (400 without it or with another), and are refused with
        # 409 while something depends on it; nothing changes then.
        for path in ("/vms/web01", "/sites/annex", "/hosts/annex1", "/policies/quiet", "/plans/web-drill"):
            response = httpx.delete(url + path, headers=headers)
            assert response.status_code == 400 and "confirm" in response.json()["error"], (path, response.text)
        api_error(lambda: client.remove_site("annex", confirm="elsewhere"), 400, "confirm=annex", "'elsewhere'")
        api_error(lambda: client.remove_site("annex", confirm="annex"), 409, "host(s): annex1")
        api_error(lambda: client.remove_vm("web01", confirm="web01"), 409, "recovery plan(s) web-drill")
        api_error(lambda: client.remove_policy("quiet", confirm="quiet"), 409, "disabled protection", "host1/web01")
        api_error(lambda: client.remove_network_mapping("default", site="primary", confirm="nope"), 400, "confirm")
        api_error(lambda: client.replicate("web01"), 409, "disabled")
        api_error(lambda: client.replicate("ghost"), 404, "ghost")
        for role in ("reader", "operator"):
            with deployment.client(deployment.role_keys[role]) as weaker:
                api_error(lambda weaker=weaker: weaker.remove_plan("web-drill", confirm="web-drill"), 403,
                          "the admin role")

        make_vm(site, "web02")
        client.add_vm("host1", "web02")
        updated = client.update_plan("web-drill", [{"name": "web", "vms": ["web02"]}])
        assert [vm["name"] for vm in updated["groups"][0]["vms"]] == ["web02"]
        api_error(lambda: client.update_plan("web-drill", [{"name": "web", "vms": ["ghost"]}]), 422, "ghost")
        removed = client.remove_vm("host1/web01", confirm="web01")
        assert removed["disks_kept"] and all(Path(path).is_file() for path in removed["disks_kept"])
        api_error(lambda: client.show_vm("web01"), 404, "web01")
        assert client.remove_policy("quiet", confirm="quiet")["removed"] is True
        assert client.remove_plan("web-drill", confirm="web-drill")["removed"] is True
        assert client.remove_vm("web02", confirm="web02")["removed"] is True
        assert client.remove_host("annex1", confirm="annex1")["removed"] is True
        assert client.remove_site("annex", confirm="annex")["network_mappings_removed"] == []
        assert "annex" not in {s["name"] for s in client.list_sites()}
        assert client.remove_network_mapping("backend", site="primary", confirm="backend")["recovery_network"] == (
            "recovery-backend2")
        api_error(lambda: client.remove_network_mapping("backend", site="primary", confirm="backend"), 404,
                  "not mapped")
