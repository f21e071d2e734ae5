"""Failover, failback, reverse replication and recovery plans end to end: real Redis, real Celery workers
and beat, SQLite, host trees for the primary and the recovery site, workloads writing through the
trackers, and the local or Azure (Azurite) recovery storage.

Disks are checked byte for byte: the recovery VM's disks against a copy of the primary's disks taken at the
recovery point (the writer stopped, a cycle run, the images copied), the failed-back primary against the
recovery VM's disks as they were when it shut down, the replica against the primary after reverse
replication.
"""
from __future__ import annotations

import shutil
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from recovery_site import RecoverySite
from sqlmodel import select

from datapath.digest import disk_digest
from datapath.points import PointUnavailableError, open_point
from models.db import session_scope
from models.failover import FailoverKind, FailoverRecord, FailoverStatus
from models.plans import create_plan
from models.protection import ProtectedItem, RecoveryPoint, RecoveryPointKind, recovery_points
from sites.localservices import wait_until
from sites.planscripts import shared_folder, write_registry
from tasks.recovery_storage import open_recovery_storage
from tasks.replication import replica_of
from workflows import failover_request, kinds, reports
from workflows.engine import get_job
from workflows.engine import resume as resume_plan
from workflows.items import load_item
from workflows.kinds.recovery_plan import start_plan

# Whole deployments (workers, beat, Redis) or real guests per test: out of the quick loop (-m "not slow").
pytestmark = pytest.mark.slow

MIB = 1024 * 1024
TWO_DISKS = [("disk0", "24M", "vhd"), ("disk1", "16M", "raw")]
JOB_TIMEOUT = 90


# ---- helpers ------------------------------------------------------------------------------------------
def vm_digests(site: RecoverySite, host: str, vm: str) -> dict[str, str]:
    return {disk.name: disk_digest(disk.path) for disk in site.host(host).get_vm(vm).disks}


def record(failover_id: str) -> FailoverRecord:
    with session_scope() as session:
        return session.get(FailoverRecord, failover_id)


def latest_record(item_id: str, kind: FailoverKind) -> FailoverRecord:
    with session_scope() as session:
        return session.exec(select(FailoverRecord).where(
            FailoverRecord.item_id == item_id, FailoverRecord.kind == kind,
        ).order_by(FailoverRecord.started_at.desc())).first()


def points(item_id: str) -> list[RecoveryPoint]:
    with session_scope() as session:
        return recovery_points(session, session.get(ProtectedItem, item_id))


def state(site: RecoverySite, vm_id: str) -> str:
    return site.item(vm_id)["state"]


def run(site: RecoverySite, job_id: str, timeout: float = JOB_TIMEOUT) -> dict[str, Any]:
    return site.wait_job(job_id, timeout)


def protected_vm(site: RecoverySite, name: str = "app01", *, seed: int = 1, host: str = "host1",
                 disks=TWO_DISKS) -> str:
    vm_id = site.create_vm(host, name, disks, seed=seed)
    run(site, site.protect(vm_id))
    return vm_id


def quiet_point(site: RecoverySite, vm_id: str) -> tuple[RecoveryPoint, dict[str, str]]:
    """Stop the writer, run a cycle: the latest point then holds exactly the primary's disks (returned as
    digests)."""
    site.final_cycle(vm_id)
    host = site.vm_hosts[vm_id]
    return points(site.item_id(vm_id))[-1], vm_digests(site, host, site.vm_name(vm_id))


def start_writer(site: RecoverySite, vm_id: str, *, seed: int, rate_mb_s: float = 3.0) -> None:
    site.host(site.vm_hosts[vm_id]).start_workload(site.vm_name(vm_id), rate_mb_s=rate_mb_s, seed=seed)


@pytest.fixture(params=["local", "azure"])
def backend(request) -> str:
    return request.param


def make_site(tmp_path: Path, backend: str, request, **options: Any) -> RecoverySite:
    azurite = request.getfixturevalue("azurite") if backend == "azure" else None
    return RecoverySite(tmp_path, backend=backend, azurite=azurite, recovery_host_names=("dr1",), **options)


# ---- the whole cycle -------------------------------------------------------------------------------------
def test_planned_failover_failback_and_reverse_replication(tmp_path, backend, request):
    """Planned failover loses nothing; failback (minimize downtime) brings back what the recovery VM wrote;
    reverse replication sends only what differs; every disk byte for byte at every stage."""
    with make_site(tmp_path, backend, request) as site:
        vm_id = protected_vm(site)
        item_id = site.item_id(vm_id)
        start_writer(site, vm_id, seed=3)
        site.delta_cycle(vm_id)
        time.sleep(0.5)

        # Planned failover while the writer runs: the shutdown stops it, the last changes are shipped.
        job = run(site, site.when_free(kinds.planned_failover.start, item_id, public_ips={"nic0": "20.30.40.50"}))
        assert [s["name"] for s in job["steps"]][:2] == ["Begin failover", "Shut down VM"]
        primary = vm_digests(site, "host1", "app01")
        assert not site.host("host1").workload_running("app01")
        assert vm_digests(site, "dr1", "app01") == primary, "the recovery VM must hold the primary's last bytes"
        failover = latest_record(item_id, FailoverKind.PLANNED)
        assert failover.status is FailoverStatus.SUCCEEDED and failover.verified
        assert failover.produced_roots == failover.expected_roots and None not in failover.produced_roots.values()
        recovery_vm = site.host("dr1").get_vm("app01")
        assert recovery_vm.state == "running"
        assert [(a.vm_network, a.subnet, a.public_ip) for a in recovery_vm.network_adapters] == [
            ("recovery-default", "10.10.0.0/24", "20.30.40.50")]
        assert state(site, vm_id) == "failed_over"

        run(site, kinds.commit_failover.start(item_id))
        assert state(site, vm_id) == "failover_committed"

        # The recovery VM runs and writes; the primary diverges too (it would after an unplanned event).
        site.host("dr1").start_workload("app01", rate_mb_s=0.2, seed=9)  # a few writes: a few chunks differ
        time.sleep(1.0)
        job = run(site, kinds.failback.start(item_id))
        assert state(site, vm_id) == "failback_ready"
        assert site.host("dr1").workload_running("app01"), "minimize downtime keeps the recovery VM running"
        assert vm_digests(site, "host1", "app01") == primary, "nothing touches the primary before the swap"
        sent = {s["name"]: s["result"] for s in job["steps"] if s["name"].startswith("Send differences")}
        assert sum(r["chunks_sent"] for r in sent.values()) < sum(r["chunks_compared"] for r in sent.values()) / 2, sent

        time.sleep(0.5)
        job = run(site, kinds.failback_completion.start(item_id))
        recovery_final = vm_digests(site, "dr1", "app01")
        assert not site.host("dr1").workload_running("app01")
        assert vm_digests(site, "host1", "app01") == recovery_final
        assert recovery_final != primary, "the recovery VM's writes must have come back"
        failback = latest_record(item_id, FailoverKind.FAILBACK)
        assert failback.verified and failback.produced_roots == failback.expected_roots
        assert site.host("host1").get_vm("app01").state == "running"
        assert state(site, vm_id) == "failed_back"

        run(site, kinds.commit_failback.start(item_id))
        assert "app01" not in [vm.name for vm in site.host("dr1").list_vms()]
        # A gentle writer: at 3 MB/s a loaded machine let unsent logs pass half of a 16 MiB disk between two
        # cycles, and the item rightly asked for a resync instead of ending protected.
        start_writer(site, vm_id, seed=21, rate_mb_s=0.5)
        job = run(site, kinds.reverse_replication.start(item_id))
        resynced = [s["result"] for s in job["steps"] if s["name"].startswith("Resynchronize disk")]
        assert all(r["bytes_sent"] < 16 * MIB for r in resynced), resynced
        assert state(site, vm_id) == "protected"
        site.final_cycle(vm_id)
        site.verify_replica(vm_id)


# ---- drills and points ------------------------------------------------------------------------------------
def test_drill_to_an_older_point_while_replication_continues(tmp_path, request):
    with make_site(tmp_path, "local", request) as site:
        vm_id = protected_vm(site)
        item_id = site.item_id(vm_id)
        start_writer(site, vm_id, seed=4)
        site.delta_cycle(vm_id)
        older, older_digests = quiet_point(site, vm_id)
        start_writer(site, vm_id, seed=5)
        for _ in range(2):
            time.sleep(0.4)
            site.delta_cycle(vm_id)
        assert points(item_id)[-1].id != older.id

        job = run(site, site.when_free(kinds.test_failover.start, item_id, point=older.id))
        drill = latest_record(item_id, FailoverKind.TEST)
        assert drill.point_id == older.id and drill.verified
        assert drill.produced_roots == {name: root for name, root in drill.expected_roots.items()}
        assert vm_digests(site, "dr1", "app01-test") == older_digests
        assert drill.rto_s is not None and drill.rto_s > 0 and drill.rpo_s is not None and drill.rpo_s >= 0
        test_vm = site.host("dr1").get_vm("app01-test")
        assert {a.vm_network for a in test_vm.network_adapters} == {failover_request.DEFAULT_TEST_NETWORK}
        report = reports.failover_report(drill.id)
        assert report["point_id"] == older.id and report["verified"] is True
        assert state(site, vm_id) == "protected" and job["state"] == "succeeded"

        # Replication goes on untouched while the test VM exists.
        before = points(item_id)
        site.delta_cycle(vm_id)
        # At least this cycle's point (beat's own cycle may add one beside it on a slow machine: seen 7 for 6).
        after = points(item_id)
        assert len(after) > len(before) and after[-1].created_at > before[-1].created_at
        assert state(site, vm_id) == "protected"
        with pytest.raises(Exception, match="clean it up first"):
            site.when_free(kinds.test_failover.start, item_id)

        run(site, kinds.test_failover_cleanup.start(item_id))
        assert "app01-test" not in [vm.name for vm in site.host("dr1").list_vms()]
        assert latest_record(item_id, FailoverKind.TEST).status is FailoverStatus.CLEANED_UP
        site.final_cycle(vm_id)
        site.verify_replica(vm_id)

        # "Latest" processes the pending logs first: the drill then holds the disks as they are now.
        site.host("host1").stop_workload("app01")
        job = run(site, site.when_free(kinds.test_failover.start, item_id, point=failover_request.PointChoice.LATEST))
        assert [s["name"] for s in job["steps"]][1:4] == ["Ship logs", "Apply logs", "Acknowledge logs"]
        assert vm_digests(site, "dr1", "app01-test") == vm_digests(site, "host1", "app01")
        run(site, kinds.test_failover_cleanup.start(item_id))


def test_pruned_point_cannot_be_restored(tmp_path, request):
    """A point past the retention window is pruned with the replica versions only it needed: failing over to
    it is refused with a clear message, and nothing is created."""
    with make_site(tmp_path, "local", request) as site:
        vm_id = protected_vm(site)
        item_id = site.item_id(vm_id)
        old, _ = quiet_point(site, vm_id)
        # The points up to it are made older than the 24 h retention, as if the clock had moved on.
        with session_scope() as session:
            for point in points(item_id):
                row = session.get(RecoveryPoint, point.id)
                row.created_at = row.created_at - timedelta(hours=25)
                session.add(row)
        start_writer(site, vm_id, seed=6)
        time.sleep(0.3)
        site.delta_cycle(vm_id)
        remaining = points(item_id)
        assert old.id not in [p.id for p in remaining] and len(remaining) == 1, "only the new point is kept"
        with pytest.raises(Exception, match="does not exist"):
            site.when_free(kinds.test_failover.start, item_id, point=old.id)
        assert latest_record(item_id, FailoverKind.TEST) is None
        with session_scope() as session:
            view = load_item(session, item_id)
        storage = open_recovery_storage(view.item.recovery_storage, view.item.storage_options)
        try:
            for disk in view.disks:
                with pytest.raises(PointUnavailableError):
                    open_point(replica_of(view, storage, disk.name), old.versions[disk.disk_uuid])
        finally:
            storage.close()


def test_app_consistent_points_quiesce_the_vm(tmp_path, request):
    """The policy's app-consistent frequency makes the cycle quiesce the VM (its pre and post commands run
    around the seal) and mark the point app-consistent; failover to the latest app-consistent point."""
    with make_site(tmp_path, "local", request) as site:
        policy = site.create_policy("app", app_consistent_frequency_h=1)
        vm_id = site.create_vm("host1", "db01", TWO_DISKS, seed=2)
        marker = tmp_path / "vss.log"
        script = f"import sys; open({str(marker)!r}, 'a').write(sys.argv[1] + '\\n')"
        site.host("host1").set_quiesce_commands("db01", [sys.executable, "-c", script, "pre"],
                                                [sys.executable, "-c", script, "post"])
        run(site, site.protect(vm_id, policy_id=policy))
        item_id = site.item_id(vm_id)
        point_kinds = [p.kind for p in points(item_id)]
        assert point_kinds[0] is RecoveryPointKind.APP_CONSISTENT, point_kinds
        assert marker.read_text().split() == ["pre", "post"]
        start_writer(site, vm_id, seed=8)
        time.sleep(0.3)
        site.delta_cycle(vm_id)
        assert points(item_id)[-1].kind is RecoveryPointKind.CRASH_CONSISTENT, "the next is due in an hour"
        run(site, site.when_free(kinds.test_failover.start, item_id,
                                 point=failover_request.PointChoice.LATEST_APP_CONSISTENT))
        drill = latest_record(item_id, FailoverKind.TEST)
        assert drill.point_id == points(item_id)[0].id and drill.verified


# ---- unplanned failover ---------------------------------------------------------------------------------------
def test_unplanned_failover_with_the_primary_down_then_cancel(tmp_path, request):
    with make_site(tmp_path, "local", request) as site:
        vm_id = protected_vm(site)
        item_id = site.item_id(vm_id)
        _, at_point = quiet_point(site, vm_id)
        start_writer(site, vm_id, seed=12)  # changes after the last point: lost in an unplanned failover
        time.sleep(0.5)
        site.stop_process("host-host1", kill=True)  # the primary is unreachable

        job = run(site, site.when_free(kinds.unplanned_failover.start, item_id))
        assert not any(s["queue"] == "host.host1" for s in job["steps"])
        assert vm_digests(site, "dr1", "app01") == at_point
        failover = latest_record(item_id, FailoverKind.UNPLANNED)
        assert failover.verified and failover.rpo_s is not None

        # Cancelled before commit: the recovery VM goes, the primary (back again) replicates as before.
        site.start_host_worker("host1")
        run(site, kinds.cancel_failover.start(item_id))
        assert "app01" not in [vm.name for vm in site.host("dr1").list_vms()]
        assert state(site, vm_id) == "protected"
        assert latest_record(item_id, FailoverKind.UNPLANNED).status is FailoverStatus.CANCELLED
        site.final_cycle(vm_id)
        site.verify_replica(vm_id)


# ---- failback options ------------------------------------------------------------------------------------
def committed_failover(site: RecoverySite, vm_id: str) -> str:
    item_id = site.item_id(vm_id)
    run(site, site.when_free(kinds.planned_failover.start, item_id))
    run(site, kinds.commit_failover.start(item_id))
    return item_id


def test_cancelled_failback_leaves_the_primary_intact(tmp_path, request):
    with make_site(tmp_path, "azure", request) as site:
        vm_id = protected_vm(site, disks=[("disk0", "48M", "vhd")])
        item_id = committed_failover(site, vm_id)
        primary = vm_digests(site, "host1", "app01")
        site.host("dr1").start_workload("app01", rate_mb_s=3.0, seed=14)
        time.sleep(0.5)

        # Cancelled in the middle of the job...
        job_id = kinds.failback.start(item_id)
        wait_until(lambda: any(s["state"] in ("running", "succeeded") and s["name"].startswith("Prepare staging")
                               for s in get_job(job_id)["steps"]), timeout=30, what="the staging to start")
        run(site, kinds.cancel_failback.start(item_id))
        assert get_job(job_id)["state"] == "cancelled"
        assert vm_digests(site, "host1", "app01") == primary
        assert state(site, vm_id) == "failover_committed"
        assert site.host("dr1").get_vm("app01").state == "running"

        # ... and when staged, waiting for completion.
        run(site, kinds.failback.start(item_id))
        assert state(site, vm_id) == "failback_ready"
        run(site, kinds.cancel_failback.start(item_id))
        assert vm_digests(site, "host1", "app01") == primary
        assert not any(p.name.endswith(".failback") for p in site.host("host1").get_vm("app01").path.iterdir())
        assert latest_record(item_id, FailoverKind.FAILBACK).status is FailoverStatus.CANCELLED


def test_full_download_failback_creates_the_vm_on_an_alternate_host(tmp_path, request):
    with make_site(tmp_path, "local", request, host_names=("host1", "host2")) as site:
        vm_id = protected_vm(site)
        item_id = committed_failover(site, vm_id)
        site.host("dr1").start_workload("app01", rate_mb_s=3.0, seed=15)
        time.sleep(0.5)
        with pytest.raises(Exception, match="does not exist on host 'host2'"):
            run(site, kinds.failback.start(item_id, mode=failover_request.FailbackMode.FULL_DOWNLOAD, host="host2"))
        # The rollback is the failed job's hook, run by an orchestration worker once the job has settled.
        wait_until(lambda: state(site, vm_id) == "failover_committed", timeout=15,
                   what="the failed failback's hook to return the item to failover_committed")

        job = run(site, kinds.failback.start(item_id, mode=failover_request.FailbackMode.FULL_DOWNLOAD, host="host2",
                                          create_vm=True))
        assert "Failback ready to complete" not in [s["name"] for s in job["steps"]]
        assert vm_digests(site, "host2", "app01") == vm_digests(site, "dr1", "app01")
        assert state(site, vm_id) == "failed_back"
        run(site, kinds.commit_failback.start(item_id))
        with session_scope() as session:
            assert load_item(session, item_id).host.name == "host2"
        site.vm_hosts[vm_id] = "host2"
        run(site, kinds.reverse_replication.start(item_id))
        site.final_cycle(vm_id)
        site.verify_replica(vm_id)


# ---- recovery plans -----------------------------------------------------------------------------------------
def test_recovery_plan_of_three_groups_with_a_manual_action(tmp_path, request):
    scripts = shared_folder("asr-test-scripts-")
    request.addfinalizer(lambda: shutil.rmtree(scripts, ignore_errors=True))
    write_registry(scripts, {"report-plan": ('#!/bin/sh\necho "$ASR_PLAN_ID $ASR_ARG_TIER"\n',
                                             {"args": {"tier": "[a-z]+"}})})
    with make_site(tmp_path, "local", request, env={"ASR_PLAN_SCRIPTS_DIR": str(scripts)}) as site:
        vms = {name: protected_vm(site, name, seed=i + 1, disks=[("disk0", "8M", "vhd")])
               for i, name in enumerate(("db01", "app01", "web01"))}
        with session_scope() as session:
            plan = create_plan(session, "shop", [
                {"name": "data", "vms": [vms["db01"]],
                 "after": [{"kind": "script", "name": "check-db", "script": "report-plan", "args": {"tier": "data"}}]},
                {"name": "apps", "vms": [vms["app01"]],
                 "before": [{"kind": "manual", "name": "dns", "instructions": "Point DNS at the recovery site"}]},
                {"name": "web", "vms": [vms["web01"]]},
            ])
            plan_id = plan.id
        digests = {}
        for name, vm_id in vms.items():
            _, digests[name] = quiet_point(site, vm_id)

        job_id = site.when_free(start_plan, "shop", "test_failover")
        job = site.wait_job(job_id, JOB_TIMEOUT, states=("waiting_action",))
        waiting = [s for s in job["steps"] if s["state"] == "waiting_action"]
        assert [s["name"] for s in waiting] == ["Group apps: before action dns"]
        assert "db01-test" in [vm.name for vm in site.host("dr1").list_vms()]
        assert "app01-test" not in [vm.name for vm in site.host("dr1").list_vms()]
        script = [s for s in job["steps"] if s["name"] == "Group data: after action check-db"]
        assert script[0]["state"] == "succeeded" and script[0]["result"]["output"] == f"{plan_id} data\n"
        time.sleep(2.5)  # reconcile rounds pass; the job must stay paused
        assert get_job(job_id)["state"] == "waiting_action"

        resume_plan(job_id, note="DNS switched")
        run(site, job_id)
        for name in vms:
            assert vm_digests(site, "dr1", f"{name}-test") == digests[name], name
            drill = latest_record(site.item_id(vms[name]), FailoverKind.TEST)
            assert drill.verified and drill.status is FailoverStatus.SUCCEEDED
        # A plan is validated first: an item in the wrong state refuses the whole plan.
        run(site, site.when_free(kinds.planned_failover.start, site.item_id(vms["web01"])))
        with pytest.raises(Exception, match="web01"):
            site.when_free(start_plan, "shop", "planned_failover")
        assert state(site, vms["db01"]) == "protected"


def test_verify_a_replica_against_its_points_and_catch_damage(tmp_path, request):
    """The replica is checked against a point from the recovery storage alone; damage to the replica fails
    the check, names the disk, and leaves the item Warning."""
    with make_site(tmp_path, "local", request) as site:
        vm_id = protected_vm(site)
        item_id = site.item_id(vm_id)
        first = points(item_id)[0]
        site.final_cycle(vm_id)
        job = run(site, site.when_free(kinds.verify_recovery_point.start, item_id))
        assert {s["result"]["disk"] for s in job["steps"]} == {"disk0", "disk1"}
        run(site, site.when_free(kinds.verify_recovery_point.start, item_id, first.id))

        replica = site.recovery_dir / "host1" / "app01" / "disk1.vhd"
        with open(replica, "r+b") as f:
            f.seek(3 * MIB + 100)
            f.write(b"\xff" * 16)
        job = site.wait_job(site.when_free(kinds.verify_recovery_point.start, item_id), JOB_TIMEOUT, states=("failed",))
        assert "disk1" in job["error"] and "first differing chunk 3" in job["error"]
        assert site.item(vm_id)["health"] == "Warning"


def test_recovery_plan_planned_failover_then_failback(tmp_path, request):
    """A plan fails two VMs over (planned: nothing lost) in two groups, then back (minimize downtime,
    completed in the same job): every disk byte for byte at both ends."""
    with make_site(tmp_path, "azure", request) as site:
        vms = {name: protected_vm(site, name, seed=i + 7, disks=[("disk0", "8M", "vhd"), ("disk1", "4M", "raw")])
               for i, name in enumerate(("db02", "web02"))}
        # Slow writers: the 4 MiB disks reach the resync threshold (unsent logs at half the disk) after about
        # 2 MiB, which 3 MB/s wrote before validation on a loaded CI machine.
        for vm_id in vms.values():
            start_writer(site, vm_id, seed=30, rate_mb_s=0.3)
        with session_scope() as session:
            create_plan(session, "dr", [{"name": "data", "vms": [vms["db02"]]},
                                        {"name": "web", "vms": [vms["web02"]]}])
        job = run(site, site.when_free(start_plan, "dr", "planned_failover"))
        stages = {}
        for step in job["steps"]:
            stages.setdefault(step["stage"], set()).add(step["name"].split(":")[0])
        assert any(names == {"db02"} for names in stages.values())
        first_web = min(stage for stage, names in stages.items() if "web02" in names)
        last_db = max(stage for stage, names in stages.items() if "db02" in names)
        assert last_db < first_web, "groups fail over one after another"
        for name, vm_id in vms.items():
            assert vm_digests(site, "dr1", name) == vm_digests(site, "host1", name), name
            assert state(site, vm_id) == "failed_over"
            run(site, kinds.commit_failover.start(site.item_id(vm_id)))
            site.host("dr1").start_workload(name, rate_mb_s=0.5, seed=31)
        time.sleep(0.5)

        job = run(site, start_plan("dr", "failback", mode=failover_request.FailbackMode.MINIMIZE_DOWNTIME))
        for name, vm_id in vms.items():
            assert not site.host("dr1").workload_running(name)
            assert vm_digests(site, "host1", name) == vm_digests(site, "dr1", name), name
            assert state(site, vm_id) == "failed_back"
