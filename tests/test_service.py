"""The operations layer (api/service.py) against a real deployment: a private redis-server, SQLite, real
Celery workers and beat (tests/recovery_site.py), host trees on disk.

Registration goes through the service; refusals are checked for their error class, their message, and for
having written nothing; protection, recovery points, verification and a drill run on the workers, and the
disks the service names (primary, replica, test VM) are compared byte for byte.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from recovery_site import RecoverySite
from sqlmodel import select

from api import service
from datapath.compare import first_difference
from datapath.disk import open_disk
from models.apikeys import ApiKey
from models.db import session_scope
from models.fabric import Host, NetworkMapping, Site, VirtualMachine
from models.jobs import Job
from models.plans import RecoveryPlan
from models.policy import ReplicationPolicy
from models.protection import ProtectedItem

DISKS = [("disk0", "8M", "vhd"), ("disk1", "4M", "raw")]
JOB_TIMEOUT = 90
# 900 s at time scale 1: no delta cycle starts behind the test's back and takes the VM's lock mid-test.
QUIET_POLICY = {"copy_frequency_s": 900, "office_hours": "00:00-23:59", "office_days": "mon,tue,wed,thu,fri,sat,sun"}


def counts() -> dict[str, int]:
    """Rows of every table a refused request could have written to."""
    with session_scope() as session:
        return {model.__name__: session.exec(select(sa.func.count()).select_from(model)).one()
                for model in (Site, Host, VirtualMachine, NetworkMapping, ReplicationPolicy, ProtectedItem, Job,
                              RecoveryPlan, ApiKey)}


def refused(error: type[service.ServiceError], call: Callable[[], Any], *fragments: str) -> str:
    """`call` raises `error` whose message holds every fragment, and writes nothing; returns the message."""
    before = counts()
    with pytest.raises(service.ServiceError) as caught:
        call()
    message = str(caught.value)
    assert type(caught.value) is error, f"expected {error.__name__}, got {type(caught.value).__name__}: {message}"
    assert caught.value.status == error.status
    for fragment in fragments:
        assert fragment in message, f"{message!r} should mention {fragment!r}"
    assert counts() == before, f"a refused request ({message}) wrote to the database"
    return message


def make_vm(site: RecoverySite, host: str, name: str, *, seed: int = 1) -> None:
    """A VM on the host's disk (half filled with data), not registered yet."""
    driver = site.host(host)
    driver.create_vm(name, DISKS)
    driver.write_initial_data(name, seed, 0.5)


def follow(job_id: str, timeout: float = JOB_TIMEOUT) -> list[dict]:
    """Every snapshot job_events gives until the job ends; fails naming the job when it does not succeed."""
    snapshots = list(service.job_events(job_id, interval=0.1, timeout=timeout))
    last = snapshots[-1]
    assert last["finished"], f"job {job_id} did not end within {timeout} s: {last}"
    assert last["state"] == "succeeded", f"job {job_id} ({last['kind']}) {last['state']}: {last['error']}"
    return snapshots


def same_bytes(a: str, b: str) -> None:
    with open_disk(a) as left, open_disk(b) as right:
        assert left.size == right.size, f"{a} is {left.size} bytes, {b} {right.size}"
        offset = first_difference(left, right)
    assert offset is None, f"{a} and {b} differ first at offset {offset}"


# ---- registration and refusals (no workers: a started job stays queued, holding its VM) -----------------------
def test_registration_lookups_and_refusals(tmp_path: Path) -> None:
    with RecoverySite(tmp_path, host_names=("host1", "host2"), start_workers=False) as site:
        created = service.add_site("dr", "the recovery site")
        assert created["name"] == "dr" and created["hosts"] == []
        host = service.add_host("dr9", str(tmp_path / "hosts" / "dr9"), site="dr")
        assert host["site"] == "dr" and host["queue"] == "host.dr9" and len(host["registration_key"]) >= 32
        assert "registration_key" not in service.show_host("dr9")
        assert service.show_site("dr")["hosts"] == ["dr9"]
        assert service.add_vmm_cloud("vmm1", "gold")["server"] == "vmm1"
        in_cloud = service.add_host("vmmhost", str(tmp_path / "hosts" / "vmmhost"), cloud="vmm1/gold")
        assert in_cloud["cloud"] == "vmm1/gold" and in_cloud["site"] is None
        assert {h["name"] for h in service.list_hosts()} == {"host1", "host2", "dr9", "vmmhost"}

        # A VM is registered as its host describes it; registering it again changes nothing.
        make_vm(site, "host1", "app01")
        vm = service.add_vm("host1", "app01")
        driver_vm = site.host("host1").get_vm("app01")
        assert [(d["name"], d["uuid"], d["size"], d["format"]) for d in vm["disks"]] == [
            (d.name, d.id, d.size, d.format) for d in driver_vm.disks]
        assert [d["primary_path"] for d in vm["disks"]] == [str(d.path) for d in driver_vm.disks]
        assert all(d["replica"] is None and d["recovery_path"] is None for d in vm["disks"])
        assert vm["adapters"] == [{"name": "nic0", "vm_network": "default", "public_ip": None}]
        assert vm["protection"] is None and vm["state"] is None
        assert service.add_vm("host1", "app01")["id"] == vm["id"]
        assert service.show_vm(vm["id"])["name"] == "app01" and service.show_vm("host1/app01")["id"] == vm["id"]

        mapping = service.add_network_mapping("frontend", "recovery-frontend", "10.30.0.0/24", site="primary")
        assert mapping["site"] == "primary" and mapping["recovery_subnet"] == "10.30.0.0/24"
        assert "frontend" in {m["source_network"] for m in service.list_network_mappings()}
        policy = service.add_policy("gold", copy_frequency_s="30", recovery_point_retention_h=4,
                                    office_hours="09:00-17:00", office_days="mon,fri")
        assert (policy["copy_frequency_s"], policy["office_hours"], policy["office_days"]) == (
            30, ["09:00", "17:00"], ["monday", "friday"])
        assert service.show_policy("gold")["protected_vms"] == []

        # Every refusal: the right class and status, a message naming the problem, nothing written.
        for bad in ("a/b", "..", "x..y", "a\\b", "", "-lead"):
            refused(service.Invalid, lambda bad=bad: service.add_site(bad), "site name")
        refused(service.Conflict, lambda: service.add_site("dr"), "already exists")
        refused(service.Invalid, lambda: service.add_host("h9", "relative/root", site="dr"), "absolute path")
        refused(service.Invalid, lambda: service.add_host("h9", "/x/../etc", site="dr"), "'..'")
        refused(service.Invalid, lambda: service.add_host("h9", "/x", site="dr", cloud="vmm1/gold"), "exactly one")
        refused(service.NotFound, lambda: service.add_host("h9", "/x", site="nowhere"), "site 'nowhere' not found")
        refused(service.Conflict, lambda: service.add_host("host1", "/x", site="dr"), "already registered")
        refused(service.NotFound, lambda: service.add_vm("host1", "ghost"), "VM 'ghost' not found on host 'host1'")
        refused(service.NotFound, lambda: service.add_vm("nohost", "app01"), "'nohost' not found")
        refused(service.Invalid, lambda: service.add_vm("host1", "../app01"), "VM name")
        refused(service.NotFound, lambda: service.show_vm("ghost"), "VM 'ghost' not found")
        refused(service.Invalid, lambda: service.show_vm("a/b/c"), "invalid VM reference")
        refused(service.Invalid, lambda: service.add_policy("bad", copy_frequency_s=17), "copy frequency", "17")
        refused(service.Invalid, lambda: service.add_policy("bad", recovery_point_retention_h=99), "retention")
        refused(service.Invalid, lambda: service.add_policy("bad", colour="blue"), "unknown option", "colour")
        refused(service.Invalid, lambda: service.add_policy("bad", office_hours="9 to 5"), "office_hours")
        refused(service.Conflict, lambda: service.add_policy("gold"), "already exists")
        refused(service.Invalid, lambda: service.add_network_mapping("web", "rweb", "10.0.0.0/33", site="primary"),
                "CIDR")
        refused(service.Conflict, lambda: service.add_network_mapping("default", "x", "10.9.0.0/24", site="primary"),
                "already mapped")

        # The same VM name on two hosts: the bare name is ambiguous, "host/name" is not.
        make_vm(site, "host2", "app01", seed=2)
        other = service.add_vm("host2", "app01")
        refused(service.Invalid, lambda: service.show_vm("app01"), "host1, host2", "name the host")
        assert service.show_vm("host2/app01")["id"] == other["id"] != vm["id"]

        # Protection refusals write no protected item and start no job.
        storage = site.recovery_storage
        refused(service.NotFound, lambda: service.protect("host1/app01", policy="nope", recovery_storage=storage),
                "policy 'nope' not found")
        refused(service.Invalid, lambda: service.protect("host1/app01", policy="gold", recovery_storage="relative"),
                "recovery storage")
        refused(service.NotFound, lambda: service.protect("host1/app01", policy="gold", recovery_storage=storage,
                                                          recovery_host="nohost"), "'nohost' not found")
        refused(service.Invalid, lambda: service.protect("host1/app01", policy="gold", recovery_storage=storage,
                                                         recovery_host="host1"), "own host")
        refused(service.Conflict, lambda: service.resync("host1/app01"), "not protected")
        refused(service.Conflict, lambda: service.test_failover("host1/app01"), "not protected")
        refused(service.NotFound, lambda: service.show_job("no-such-job"), "no job")
        refused(service.NotFound, lambda: service.job_events("no-such-job"), "no job")
        refused(service.Invalid, lambda: service.list_jobs(limit=0), "limit")
        refused(service.Invalid, lambda: service.list_jobs(state="sleeping"), "job state")

        # With no worker the enable job stays queued, holding the VM: everything else on it is refused.
        started = service.protect("host1/app01", policy="gold", recovery_storage=storage)
        assert started["kind"] == "enable_protection" and started["vm"] == "app01"
        job_id = started["job_id"]
        message = refused(service.Conflict, lambda: service.protect("host1/app01", policy="gold",
                                                                    recovery_storage=storage), "busy", job_id)
        assert "enable_protection" in message
        refused(service.Conflict, lambda: service.disable_protection("host1/app01"), "busy")
        refused(service.Conflict, lambda: service.test_failover("host1/app01"), "enabling_protection")
        refused(service.Conflict, lambda: service.commit_failover("host1/app01"), "nothing to commit")
        refused(service.Conflict, lambda: service.cancel_failover("host1/app01"), "nothing to cancel")
        refused(service.Invalid, lambda: service.failback("host1/app01", mode="sideways"), "failback mode")
        refused(service.Conflict, lambda: service.restart_job(job_id), "queued", "only a failed or cancelled")
        refused(service.Conflict, lambda: service.resume_job(job_id), "waiting for an operator")

        job = service.show_job(job_id)
        assert job["state"] == "queued" and job["vm"] == "app01" and not job["finished"]
        assert job["steps"][0]["name"] == "Prerequisites check" and job["steps"][0]["state"] == "queued"
        assert all(step["progress"]["percent"] == 0.0 for step in job["steps"])
        assert [j["id"] for j in service.list_jobs(vm="host1/app01")] == [job_id]
        assert service.list_jobs(vm="host2/app01") == []
        assert service.show_vm("host1/app01")["protection"]["active_job"]["id"] == job_id
        assert [entry["vm"] for entry in service.health()] == ["app01"]

        watched = list(service.job_events(job_id, interval=0.1, timeout=0.5))  # ends at the timeout
        assert watched and not watched[-1]["finished"] and watched[-1]["state"] == "queued"
        refused(service.Invalid, lambda: service.job_events(job_id, interval=0), "interval")

        # Cancel it; its events end at once; restart resumes the same job where it stopped (its kind's way out).
        assert service.cancel_job(job_id)["state"] == "cancelled"
        events = list(service.job_events(job_id, timeout=5))
        assert len(events) == 1 and events[0]["finished"] and events[0]["state"] == "cancelled"
        assert service.cancel_job(job_id)["state"] == "cancelled"  # cancelling again changes nothing
        refused(service.Conflict, lambda: service.retry_job(job_id), "cancelled", "nothing to retry")
        again = service.restart_job(job_id)
        assert (again["kind"], again["job_id"], again["recovery"]) == ("enable_protection", job_id, "resumed"), again
        assert service.show_job(job_id)["state"] == "queued"
        assert [j["id"] for j in service.list_jobs(vm="host1/app01")] == [job_id]
        assert service.list_jobs(vm="host1/app01", state="cancelled") == []
        service.cancel_job(job_id)

        # Recovery plans: every problem at once, nothing written; a plan of VMs not yet protected cannot run.
        message = refused(service.Invalid, lambda: service.create_plan("p1", [{"name": "g/1", "vms": ["ghost"]}]),
                          "group name", "VM 'ghost' not found")
        assert "2 problems" in message
        plan = service.create_plan("p1", [{"name": "web", "vms": ["host1/app01", other["id"]]}], "two VMs")
        assert [v["host"] for v in plan["groups"][0]["vms"]] == ["host1", "host2"]
        assert service.show_plan("p1")["id"] == plan["id"] and [p["name"] for p in service.list_plans()] == ["p1"]
        refused(service.Conflict, lambda: service.create_plan("p1", [{"name": "g", "vms": ["host1/app01"]}]),
                "already exists")
        refused(service.Invalid, lambda: service.run_plan("p1", "sideways"), "operation")
        refused(service.Invalid, lambda: service.run_plan("p1", "test", colour="blue"), "unknown plan option")
        refused(service.Invalid, lambda: service.run_plan("p1", "test"), "not protected")
        refused(service.NotFound, lambda: service.run_plan("nope", "test"), "not found")

        # API keys: shown once, names unique, revocation recorded.
        key = service.create_api_key("ops")
        assert key["key"].startswith("asr_") and "key_hash" not in key
        assert [k["name"] for k in service.list_api_keys()] == ["ops"] and "key" not in service.list_api_keys()[0]
        refused(service.Conflict, lambda: service.create_api_key("ops"), "already exists")
        assert service.revoke_api_key("ops")["revoked_at"] is not None
        refused(service.NotFound, lambda: service.revoke_api_key("nobody"), "not found")


# ---- the operations on real workers --------------------------------------------------------------------------
def test_protect_points_verify_and_drill(tmp_path: Path) -> None:
    with RecoverySite(tmp_path, recovery_host_names=("dr1",), time_scale=1) as site:
        service.add_policy("quiet", **QUIET_POLICY)
        make_vm(site, "host1", "app01")
        vm_id = service.add_vm("host1", "app01")["id"]
        site.vm_hosts[vm_id] = "host1"

        started = service.protect("app01", policy="quiet", recovery_storage=site.recovery_storage,
                                  recovery_host="dr1")
        snapshots = follow(started["job_id"])
        assert snapshots[-1]["percent"] == 100.0
        assert all(step["state"] == "succeeded" and step["progress"]["percent"] == 100.0
                   for step in snapshots[-1]["steps"])
        assert {"Copy disk disk0", "Copy disk disk1"} <= {step["name"] for step in snapshots[-1]["steps"]}

        shown = service.show_vm("app01")
        assert shown["state"] == "protected" and shown["protection"]["health"] == "Healthy"
        for disk in shown["disks"]:
            assert disk["replica"] == f"host1/app01/{disk['name']}.vhd"
            assert disk["replica_path"] == str(site.recovery_dir / disk["replica"])
            # The file is encrypted (docs/operations.md, "Security: encryption at rest"): verify_replica compares
            # what it decrypts to with the source.
            assert os.path.isfile(disk["replica_path"])
        site.verify_replica(vm_id)

        points = service.recovery_points("app01")
        assert points and {"id", "created_at", "kind", "versions", "manifest_roots"} <= set(points[-1])
        assert set(points[-1]["manifest_roots"]) == {d["uuid"] for d in shown["disks"]}

        verified = service.verify("app01")
        assert verified["kind"] == "verify_recovery_point"
        follow(verified["job_id"])
        follow(service.verify("app01", point=points[0]["id"])["job_id"])
        refused(service.NotFound, lambda: service.verify("app01", point="3f0e1a52-0000-4000-8000-000000000000"),
                "not found")

        # A drill brings up app01-test on dr1 holding exactly the primary's bytes (nothing wrote since).
        drill = service.test_failover("app01")
        follow(drill["job_id"])
        shown = service.show_vm("app01")
        assert shown["failover"]["kind"] == "test" and shown["failover"]["verified"] is True
        assert shown["state"] == "protected"
        for disk in shown["disks"]:
            assert disk["test_path"] == str(tmp_path / "hosts" / "dr1" / "vms" / "app01-test" / f"{disk['name']}.vhd")
            same_bytes(disk["primary_path"], disk["test_path"])
            assert disk["recovery_path"] is None  # a drill is not a failover
        refused(service.Conflict, lambda: service.test_failover("app01"), "clean it up first")
        follow(service.test_failover_cleanup("app01")["job_id"])
        assert all(disk["test_path"] is None for disk in service.show_vm("app01")["disks"])
        assert not (tmp_path / "hosts" / "dr1" / "vms" / "app01-test").exists()

        kinds = [job["kind"] for job in service.list_jobs(vm="app01")]
        assert kinds == ["test_failover_cleanup", "test_failover", "verify_recovery_point", "verify_recovery_point",
                         "enable_protection"]
        assert all(job["state"] == "succeeded" and job["steps_done"] == job["steps_total"]
                   for job in service.list_jobs(vm="app01"))
        job = service.show_job(drill["job_id"])
        assert job["percent"] == 100.0 and job["finished"] and job["next_attempt_at"] is None
        assert any(step["name"] == "Restore disk disk0" for step in job["steps"])
        refused(service.Conflict, lambda: service.cancel_job(drill["job_id"]), "already ended")
        refused(service.Conflict, lambda: service.restart_job(drill["job_id"]), "succeeded")
        refused(service.Conflict, lambda: service.retry_job(drill["job_id"]), "nothing to retry")

        [entry] = service.health()
        assert (entry["vm"], entry["host"], entry["state"], entry["health"]) == ("app01", "host1", "protected",
                                                                                  "Healthy")
        assert entry["recovery_points"] == len(points) and entry["active_job"] is None
        assert service.show_policy("quiet")["protected_vms"] == ["host1/app01"]
