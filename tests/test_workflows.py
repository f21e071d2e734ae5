"""The ASR workflows end to end: real Redis, real Celery workers and beat, SQLite, real host trees with
workloads writing through the trackers, and the local or Azure (Azurite) recovery storage. Every replica
is checked byte for byte against its source; every wait is bounded.

Each test gets a deployment of its own (tests/recovery_site.py), with the clock scaled 10x: a 30 s copy
frequency is a 3 s cycle.
"""
from __future__ import annotations

import base64
import random
import threading
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import Any

import pytest
from recovery_site import RecoverySite
from sqlmodel import select

from datapath.replication import ReplicaDisk
from models.db import session_scope
from models.jobs import Job
from models.protection import ProtectedItem, recovery_points, require_resync
from sites.localservices import AzuriteProcess, wait_until
from workflows.engine import ItemBusyError
from workflows.items import load_item
from workflows.kinds.delta_replication import start as start_delta_replication
from workflows.kinds.disable_protection import start as disable_protection
from workflows.kinds.resynchronize import start as start_resync

# Whole deployments (workers, beat, Redis) or real guests per test: out of the quick loop (-m "not slow").
pytestmark = pytest.mark.slow

MIB = 1024 * 1024
ENABLE_STEPS = [
    "Prerequisites check", "Create replication relationship", "Start replication", "Take VM snapshot",
    "Copy disk disk0", "Copy disk disk1", "Delete VM snapshot", "Ship logs", "Apply logs", "Acknowledge logs",
    "Finalize protection",
]
DELTA_STEPS = ["Ship logs", "Apply logs", "Acknowledge logs", "Update replication health"]
RESYNC_STEPS = ["Take VM snapshot", "Resynchronize disk disk0", "Ship logs", "Apply logs", "Acknowledge logs",
                "Resume replication"]
TWO_DISKS = [("disk0", "32M", "vhd"), ("disk1", "16M", "raw")]


def step_names(job: dict[str, Any]) -> list[str]:
    return [step["name"] for step in job["steps"]]


def point_ids(item_id: str) -> list[str]:
    with session_scope() as session:
        return [point.id for point in recovery_points(session, session.get(ProtectedItem, item_id))]


def assert_replica_at_last_point(site: RecoverySite, vm_id: str) -> None:
    """The replica's applied generation of every disk is the one the latest recovery point names, and
    the replica equals the source byte for byte."""
    item_id = site.item_id(vm_id)
    with session_scope() as session:
        view = load_item(session, item_id)
        latest = recovery_points(session, view.item)[-1]
        disks = [(disk.name, disk.disk_uuid) for disk in view.disks]
        host, vm = view.host.name, view.vm.name
    storage = site.storage()
    try:
        for name, disk_uuid in disks:
            state = ReplicaDisk(storage, ReplicaDisk.name_for(host, vm, name)).load_state()
            assert state.applied_generation == latest.generations[disk_uuid], (name, state, latest.generations)
    finally:
        storage.close()
    site.verify_replica(vm_id)


def tracked_burst(site: RecoverySite, vm_id: str, disk: str, nbytes: int, *, seed: int) -> None:
    """Guest writes of `nbytes` through the disk's tracker (as the VM would), in 64 KiB pieces."""
    host = site.host(site.vm_hosts[vm_id])
    data = random.Random(seed).randbytes(nbytes)
    with host.tracker(site.vm_name(vm_id), disk) as tracker:
        for offset in range(0, nbytes, 64 * 1024):
            tracker.write(offset, data[offset:offset + 64 * 1024])


def office_hours_around(now: datetime) -> tuple[time, time]:
    """Office hours from an hour before `now` to an hour after it, within `now`'s day."""
    start = (now - timedelta(hours=1)).time() if now.hour >= 1 else time(0, 0)
    end = (now + timedelta(hours=1)).time() if now.hour < 23 else time(23, 59, 59, 999999)
    return start, end


# ---- enable protection, then the scheduler's delta cycles ---------------------------------------------------
@pytest.mark.parametrize("backend", [
    pytest.param("local", id="local"),
    pytest.param("azure", id="azure", marks=pytest.mark.azure),
])
def test_enable_protection_with_a_running_workload_then_scheduled_delta_cycles(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest,
) -> None:
    azurite = request.getfixturevalue("azurite") if backend == "azure" else None
    with RecoverySite(tmp_path, backend=backend, azurite=azurite) as site:
        vm_id = site.create_vm("host1", "app01", TWO_DISKS, fill=0.5, seed=3)
        host = site.host("host1")
        # The VM runs before it is protected: its writes go through the trackers while the copy runs.
        host.enable_tracking("app01")
        # Half a MB/s: on a machine loaded by the whole suite a cycle can take several of its 3 s periods, and the
        # writes it has to catch up with must stay well under the 50% that would require a resync.
        host.start_workload("app01", rate_mb_s=0.5, seed=5)

        job = site.wait_job(site.protect(vm_id), timeout=90)
        assert step_names(job) == ENABLE_STEPS
        for step in job["steps"]:
            assert step["state"] == "succeeded" and step["attempts"] == 1, step
            assert step["started_at"] and step["ended_at"] and step["started_at"] <= step["ended_at"], step
        copies = [step for step in job["steps"] if step["name"].startswith("Copy disk")]
        assert {step["stage"] for step in copies} == {4}  # one stage: in parallel
        assert sorted(step["progress_total"] for step in copies) == [16 * MIB, 32 * MIB]
        assert all(step["progress_done"] == step["progress_total"] for step in copies)
        item = site.item(vm_id)
        assert (item["state"], item["health"], item["recovery_points"]) == ("protected", "Healthy", 1)
        assert host.workload_running("app01")

        # The scheduler (beat, every second) runs a delta cycle every 3 s (30 s scaled by 10).
        item_id = item["item_id"]
        # A bound, not a speed: alone three cycles take about 10 s; the whole suite on two cores slows them a lot.
        wait_until(lambda: len(point_ids(item_id)) >= 4, timeout=180, interval=0.2,
                   what="three recovery points from scheduled delta cycles")
        deltas = site.jobs(vm_id, "delta_replication")
        assert len(deltas) >= 3
        finished = [site.wait_job(j.id, timeout=60) for j in deltas[:3]]
        assert all(step_names(j) == DELTA_STEPS for j in finished)
        # Healthy once a cycle ends within the (scaled) 6 s warning threshold of the last point.
        item = wait_until(lambda: (found := site.item(vm_id))["health"] == "Healthy" and found, timeout=60,
                          interval=0.2, what="the item Healthy while the scheduled cycles keep up")
        assert item["rpo_s"] is not None and 0 <= item["rpo_s"] < 30, item
        assert 0 <= item["unsent_ratio"] < 0.5, item

        site.final_cycle(vm_id)
        stats = host.workload_stats("app01")
        assert stats is not None and stats["writes"] > 0 and len(stats["disks"]) == 2
        # Beat may start another cycle after ours; with the workload stopped it changes nothing.
        site.wait_idle(vm_id, timeout=30)
        assert_replica_at_last_point(site, vm_id)


def test_two_enable_requests_at_once_one_runs_the_other_is_busy_and_creates_nothing(tmp_path: Path) -> None:
    with RecoverySite(tmp_path) as site:
        vm_id = site.create_vm("host1", "app01", TWO_DISKS, fill=0.5, seed=7)
        barrier = threading.Barrier(2)
        outcomes: list[Any] = []

        def request() -> None:
            barrier.wait(timeout=10)
            try:
                outcomes.append(site.protect(vm_id))
            except Exception as exc:  # noqa: BLE001 - the outcome is what the test checks
                outcomes.append(exc)

        threads = [threading.Thread(target=request) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert not any(thread.is_alive() for thread in threads)

        job_ids = [outcome for outcome in outcomes if isinstance(outcome, str)]
        refused = [outcome for outcome in outcomes if not isinstance(outcome, str)]
        assert len(job_ids) == 1 and len(refused) == 1, outcomes
        assert isinstance(refused[0], ItemBusyError), refused[0]
        assert "app01" in str(refused[0]) and "busy" in str(refused[0])
        with session_scope() as session:
            assert len(session.exec(select(ProtectedItem)).all()) == 1
            assert len(session.exec(select(Job)).all()) == 1
        site.wait_job(job_ids[0], timeout=60)
        site.verify_replica(vm_id)


@pytest.mark.azure
def test_a_wrong_azure_account_key_fails_at_once_and_the_item_is_critical(
    tmp_path: Path, azurite: AzuriteProcess,
) -> None:
    wrong_key = base64.b64encode(b"not the account key of devstoreaccount1").decode()
    with RecoverySite(tmp_path, backend="azure", azurite=azurite,
                      env={"ASR_STORAGE_WRONG_KEY_CONNECTION_STRING": azurite.connection_string(wrong_key)}) as site:
        vm_id = site.create_vm("host1", "app01", TWO_DISKS, fill=0.25, seed=9)
        job_id = site.protect(vm_id,
                              storage_options={"connection_string_env": "ASR_STORAGE_WRONG_KEY_CONNECTION_STRING"})
        job = site.wait_job(job_id, timeout=30, states=("failed",))
        failed = [step for step in job["steps"] if step["state"] == "failed"]
        assert [step["name"] for step in failed] == ["Prerequisites check"]
        assert failed[0]["attempts"] == 1 and failed[0]["error_class"].endswith("StorageAuthError")
        assert "403" in failed[0]["error"] and "account key" in failed[0]["error"]
        assert all(step["state"] == "cancelled" for step in job["steps"][1:])
        assert job["error"].startswith("Prerequisites check failed")
        item = wait_until(lambda: (status := site.item(vm_id))["health"] == "Critical" and status,
                          timeout=15, what="the item to turn Critical")
        assert item["state"] == "enabling_protection"
        assert [error["code"] for error in item["errors"]] == ["enable_protection_failed"]
        assert "StorageAuthError" not in item["errors"][0]["message"] and "403" in item["errors"][0]["message"]
        assert item["active_job"] is None

        # A worker without the variable the item names: the same, naming the variable.
        other_vm = site.create_vm("host1", "app02", [("disk0", "8M", "raw")], fill=0.25, seed=10)
        unset = "ASR_STORAGE_NOT_SET_CONNECTION_STRING"
        job = site.wait_job(site.protect(other_vm, storage_options={"connection_string_env": unset}),
                            timeout=30, states=("failed",))
        assert job["steps"][0]["attempts"] == 1 and unset in job["steps"][0]["error"]
        wait_until(lambda: site.item(other_vm)["health"] == "Critical", timeout=15,
                   what="the second item to turn Critical")


def test_a_corrupt_shipped_log_requires_a_resync_which_heals_the_replica_and_keeps_the_points(
    tmp_path: Path,
) -> None:
    with RecoverySite(tmp_path) as site:
        vm_id = site.create_vm("host1", "app01", [("disk0", "16M", "vhd")], fill=0.5, seed=11)
        site.wait_job(site.protect(vm_id), timeout=60)
        item_id = site.item_id(vm_id)
        wait_until(lambda: len(point_ids(item_id)) >= 2, timeout=30, interval=0.2,
                   what="a scheduled delta cycle")
        # No scheduler while the log is tampered with: the next cycle is ours.
        site.stop_process("beat")
        site.wait_idle(vm_id, timeout=30)
        points_before = point_ids(item_id)

        tracked_burst(site, vm_id, "disk0", 256 * 1024, seed=1)
        with site.host("host1").tracker("app01", "disk0") as tracker:
            sealed = tracker.seal()
        with open(sealed.path, "r+b") as log:  # flip one byte inside the records' data
            log.seek(sealed.size // 2)
            byte = log.read(1)
            log.seek(sealed.size // 2)
            log.write(bytes([byte[0] ^ 0xFF]))

        job = site.wait_job(start_delta_replication(item_id), timeout=30, states=("failed",))
        apply_step = job["steps"][1]
        assert (apply_step["name"], apply_step["state"], apply_step["attempts"]) == ("Apply logs", "failed", 1)
        assert apply_step["error_class"].endswith("LogCorruptError")
        item = wait_until(lambda: (status := site.item(vm_id))["active_job"] is None and status,
                          timeout=15, what="the failed job to settle")
        assert item["state"] == "resync_required" and item["health"] == "Warning", item
        assert "disk disk0" in item["resync_required_reason"]
        assert [error["code"] for error in item["errors"]] == ["resync_required"]

        resync = site.wait_job(start_resync(item_id), timeout=60)
        assert step_names(resync) == RESYNC_STEPS
        assert 0 < resync["steps"][1]["result"]["bytes_sent"] < 16 * MIB  # only what differs
        item = site.item(vm_id)
        assert (item["state"], item["health"], item["errors"]) == ("protected", "Healthy", [])
        assert_replica_at_last_point(site, vm_id)
        after_resync = point_ids(item_id)
        assert after_resync[:len(points_before)] == points_before

        site.start_beat()
        wait_until(lambda: len(point_ids(item_id)) > len(after_resync), timeout=30, interval=0.2,
                   what="delta replication to resume after the resync")
        assert point_ids(item_id)[:len(points_before)] == points_before


def test_a_tracker_requiring_a_resync_ships_nothing_and_the_resync_clears_it(tmp_path: Path) -> None:
    """A tracker marked resync-required (its NBD service stopped uncleanly) fails the Ship logs step before
    anything is sealed or sent; the resync's snapshot clears the mark and logging goes on after it."""
    with RecoverySite(tmp_path) as site:
        vm_id = site.create_vm("host1", "app01", [("disk0", "16M", "raw")], fill=0.5, seed=17)
        site.wait_job(site.protect(vm_id), timeout=60)
        item_id = site.item_id(vm_id)
        site.stop_process("beat")
        site.wait_idle(vm_id, timeout=30)
        points_before = point_ids(item_id)

        tracked_burst(site, vm_id, "disk0", 256 * 1024, seed=3)
        with site.host("host1").tracker("app01", "disk0") as tracker:
            tracker.mark_resync_required("tracker service stopped uncleanly (pid 4242)")
            generation = tracker.generation
        job = site.wait_job(start_delta_replication(item_id), timeout=30, states=("failed",))
        ship_step = job["steps"][0]
        assert (ship_step["name"], ship_step["state"]) == ("Ship logs", "failed")
        assert ship_step["error_class"].endswith("ResyncRequiredError")
        item = wait_until(lambda: (status := site.item(vm_id))["active_job"] is None and status,
                          timeout=15, what="the failed job to settle")
        assert item["state"] == "resync_required" and item["health"] == "Warning", item
        assert "disk disk0: tracker service stopped uncleanly (pid 4242)" in item["resync_required_reason"]
        with site.host("host1").tracker("app01", "disk0") as tracker:
            assert tracker.generation == generation  # nothing was sealed
        assert point_ids(item_id) == points_before

        resync = site.wait_job(start_resync(item_id), timeout=60)
        assert step_names(resync) == RESYNC_STEPS
        with site.host("host1").tracker("app01", "disk0") as tracker:
            assert tracker.resync_required() is None
        assert site.item(vm_id)["state"] == "protected"
        assert_replica_at_last_point(site, vm_id)

        tracked_burst(site, vm_id, "disk0", 128 * 1024, seed=4)  # after the resync: shipped as usual
        site.delta_cycle(vm_id, timeout=30)
        assert_replica_at_last_point(site, vm_id)


def test_unsent_logs_reaching_half_a_disk_require_a_resync(tmp_path: Path) -> None:
    with RecoverySite(tmp_path) as site:
        vm_id = site.create_vm("host1", "tiny", [("disk0", "8M", "raw")], fill=0.25, seed=13)
        site.wait_job(site.protect(vm_id), timeout=60)
        site.stop_process("beat")
        site.wait_idle(vm_id, timeout=30)

        tracked_burst(site, vm_id, "disk0", 5 * MIB, seed=2)  # between two cycles
        job = site.delta_cycle(vm_id, timeout=30)
        ship = job["steps"][0]["result"]["disks"]
        assert max(entry["unsent_ratio"] for entry in ship.values()) >= 0.5
        item = site.item(vm_id)
        assert item["state"] == "resync_required" and item["health"] == "Warning", item
        assert "unsent logs reached" in item["resync_required_reason"]
        assert item["unsent_ratio"] >= 0.5

        site.wait_job(start_resync(item["item_id"]), timeout=60)
        assert site.item(vm_id)["state"] == "protected"
        site.verify_replica(vm_id)


def test_automatic_resync_waits_for_the_end_of_office_hours_and_manual_resync_runs_at_once(
    tmp_path: Path,
) -> None:
    now = datetime.now(UTC)
    with RecoverySite(tmp_path) as site:
        in_office = site.create_policy("office-now", copy_frequency_s=900, office_days=list(range(7)),
                                       office_hours=office_hours_around(now))
        off_duty = site.create_policy(
            "office-other-days", copy_frequency_s=900, office_hours=(time(0, 0), time(23, 59, 59, 999999)),
            office_days=[day for day in range(7) if day != now.weekday()],
        )
        waiting_vm = site.create_vm("host1", "app01", [("disk0", "8M", "raw")], fill=0.5, seed=17)
        running_vm = site.create_vm("host1", "app02", [("disk0", "8M", "vhd")], fill=0.5, seed=19)
        for vm_id, policy_id in ((waiting_vm, in_office), (running_vm, off_duty)):
            site.wait_job(site.protect(vm_id, policy_id=policy_id), timeout=60)
        waiting, running = site.item_id(waiting_vm), site.item_id(running_vm)
        for item_id in (waiting, running):
            with session_scope() as session:
                view = load_item(session, item_id)
                require_resync(session, view.item, "test: replica declared out of sync", view.policy)

        # Beat ticks every second: the item outside office hours is resynchronized automatically.
        resync = wait_until(lambda: site.jobs(running_vm, "resynchronize"), timeout=30, interval=0.2,
                            what="the automatic resync outside office hours")[0]
        assert resync.params["manual"] is False
        site.wait_job(resync.id, timeout=60)
        assert site.item(running_vm)["state"] == "protected"
        site.verify_replica(running_vm)

        waiting_item = site.item(waiting_vm)
        assert waiting_item["state"] == "resync_required"
        assert datetime.fromisoformat(waiting_item["resync_scheduled_for"]) > datetime.now(UTC)
        assert site.jobs(waiting_vm, "resynchronize") == []
        with pytest.raises(Exception, match="office hours"):
            start_resync(waiting, manual=False)

        manual = site.wait_job(start_resync(waiting), timeout=60)
        assert manual["params"]["manual"] is True
        assert site.item(waiting_vm)["state"] == "protected"
        site.verify_replica(waiting_vm)


def test_a_scheduled_initial_replication_is_started_by_the_scheduler_when_due(tmp_path: Path) -> None:
    with RecoverySite(tmp_path) as site:
        start_at = datetime.now(UTC) + timedelta(seconds=4)
        policy_id = site.create_policy("tonight", initial_replication_at=start_at)
        vm_id = site.create_vm("host1", "app01", TWO_DISKS, fill=0.5, seed=23)
        job = site.wait_job(site.protect(vm_id, policy_id=policy_id), timeout=30)
        assert step_names(job) == ["Prerequisites check", "Create replication relationship", "Start replication"]
        item = site.item(vm_id)
        assert item["state"] == "initial_replication_pending"
        assert datetime.fromisoformat(item["initial_replication_at"]) == start_at
        assert site.jobs(vm_id, "initial_replication") == []

        initial = wait_until(lambda: site.jobs(vm_id, "initial_replication"), timeout=30, interval=0.2,
                             what="the scheduler to start the initial replication")[0]
        assert initial.created_at >= start_at
        done = site.wait_job(initial.id, timeout=60)
        assert step_names(done) == ENABLE_STEPS[3:]
        assert site.item(vm_id)["state"] == "protected"
        site.wait_idle(vm_id, timeout=30)
        site.verify_replica(vm_id)


def test_disable_protection_removes_tracking_replicas_and_points_and_protection_can_be_enabled_again(
    tmp_path: Path,
) -> None:
    with RecoverySite(tmp_path) as site:
        vm_id = site.create_vm("host1", "app01", TWO_DISKS, fill=0.5, seed=29)
        site.wait_job(site.protect(vm_id), timeout=60)
        item_id = site.item_id(vm_id)
        host = site.host("host1")
        storage = site.storage()
        try:
            assert storage.list_objects("host1/app01/")

            job = site.wait_job(disable_protection(item_id), timeout=60)
            assert step_names(job) == ["Check retention lock", "Disable protection", "Stop tracking disks",
                                       "Remove replica disks", "Finalize disabling protection"]
            item = site.item(vm_id)
            assert (item["state"], item["health"], item["recovery_points"]) == ("disabled", "Healthy", 0)
            assert storage.list_objects("host1/app01/") == []
            assert not host.is_tracked("app01", "disk0") and not host.is_tracked("app01", "disk1")
        finally:
            storage.close()

        site.wait_job(site.protect(vm_id), timeout=60)
        assert site.item_id(vm_id) == item_id and site.item(vm_id)["state"] == "protected"
        site.wait_idle(vm_id, timeout=30)
        assert_replica_at_last_point(site, vm_id)
