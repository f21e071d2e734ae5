"""The database is the source of truth for what the recovery side holds, and the end-to-end consistency
check that compares replicas with their sources. Real Redis, real Celery workers, SQLite, real host trees
and the local recovery storage; every replica checked byte for byte against its source.

The measured failure these reproduce: bumping `applied_generation` in a replica's `state.json` made Ship
logs send nothing, Apply logs apply nothing and Acknowledge delete the host's log, while health stayed
Healthy and the replica held zeros where the primary held the write.
"""
from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from recovery_site import RecoverySite
from sqlmodel import select

import tasks.replication as replication_actions
from api import service
from api.cli import main
from datapath.manifest import DEFAULT_CHUNK_SIZE
from datapath.replication import ReplicaDisk
from datapath.snapshot import SnapshotError
from models.db import session_scope
from models.replicas import ReplicaRecord
from workflows.engine import StepContext
from workflows.items import load_item
from workflows.kinds.delta_replication import start as start_delta_replication
from workflows.kinds.resynchronize import start as start_resync

# Whole deployments (workers, beat, Redis) or real guests per test: out of the quick loop (-m "not slow").
pytestmark = pytest.mark.slow

MIB = 1024 * 1024
DISKS = [("disk0", "16M", "vhd"), ("disk1", "8M", "raw")]


def _replica(site: RecoverySite, vm_id: str, disk: str) -> tuple[Any, ReplicaDisk]:
    storage = site.storage()
    with session_scope() as session:
        view = load_item(session, site.item_id(vm_id))
    return storage, replication_actions.replica_of(view, storage, disk)


def _state(site: RecoverySite, vm_id: str, disk: str) -> dict[str, Any]:
    storage, replica = _replica(site, vm_id, disk)
    try:
        return json.loads(storage.read_object(replica.state_name))
    finally:
        storage.close()


def _tamper_state(site: RecoverySite, vm_id: str, disk: str, **changes: int) -> dict[str, Any]:
    """Change fields of the replica's state.json on the recovery storage, as anyone with access could."""
    storage, replica = _replica(site, vm_id, disk)
    try:
        state = json.loads(storage.read_object(replica.state_name))
        for name, delta in changes.items():
            state[name] += delta
        storage.put_object(replica.state_name, json.dumps(state).encode())
        return state
    finally:
        storage.close()


def _guest_write(site: RecoverySite, vm_id: str, disk: str, offset: int, nbytes: int, *, seed: int) -> None:
    """A write through the disk's tracker, as the VM makes it."""
    host = site.host(site.vm_hosts[vm_id])
    with host.tracker(site.vm_name(vm_id), disk) as tracker:
        tracker.write(offset, random.Random(seed).randbytes(nbytes))


def _bypassing_write(site: RecoverySite, vm_id: str, disk: str, offset: int, nbytes: int, *, seed: int) -> None:
    """A write into the source disk's file itself: the tracker never sees it (raw and fixed VHD images
    hold the disk's bytes from offset 0)."""
    vm = site.host(site.vm_hosts[vm_id]).get_vm(site.vm_name(vm_id))
    path = next(d.path for d in vm.disks if d.name == disk)
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, random.Random(seed).randbytes(nbytes), offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def _protected_site(tmp_path: Path, disks=DISKS, **site_options: Any) -> tuple[RecoverySite, str]:
    """A site with one protected VM, one delta cycle done, and beat stopped, so that no cycle runs
    behind the test's back."""
    site = RecoverySite(tmp_path, **site_options)
    try:
        vm_id = site.create_vm("host1", "app01", disks, fill=0.25, seed=3)
        site.wait_job(site.protect(vm_id), timeout=90)
        site.stop_process("beat")
        site.wait_idle(vm_id, timeout=30)
        site.delta_cycle(vm_id)
        return site, vm_id
    except BaseException:
        site.close()
        raise


def _failed_step(job: dict[str, Any]) -> dict[str, Any]:
    [step] = [step for step in job["steps"] if step["state"] == "failed"]
    return step


# ---- the recovery side's state against the database ------------------------------------------------------
def test_statecheck_adopts_the_trace_of_a_completed_step_and_refuses_any_other_difference(local_storage, tmp_path):
    """Pure data path: the record as values, the state on a local recovery storage."""
    from datapath.replication import apply_shipped_logs, initial_copy, ship_pending_logs
    from datapath.statecheck import RecordedState, ReplicaStateMismatchError, check_state
    from sites.host import Host

    host = Host(tmp_path / "host1", "host1")
    machine = host.create_vm("app01", [("disk0", 8 * MIB, "raw")])
    host.write_initial_data(machine, seed=1, fraction=0.5)
    host.enable_tracking(machine)
    replica = ReplicaDisk(local_storage, ReplicaDisk.name_for("host1", "app01", "disk0"))
    with host.tracker(machine, "disk0") as tracker:
        state = initial_copy(tracker, replica)
        recorded = RecordedState(True, state.applied_generation, state.version, state.manifest_root)
        assert check_state(replica, recorded).adopted is False

        # Apply completed two logs and the step crashed before recording them: the state is ahead by whole
        # versions whose manifests are stored. That is adopted, not refused.
        for seed in (2, 3):
            tracker.write(seed * MIB, random.Random(seed).randbytes(8192))
            tracker.seal()
        ship_pending_logs(tracker, replica, applied_generation=recorded.applied_generation)
        report = apply_shipped_logs(replica)
        assert check_state(replica, recorded).adopted is True
        recorded = RecordedState(True, report.applied_generation, report.version, report.manifest_root)

    def refused(**changes: int) -> str:
        good = local_storage.read_object(replica.state_name)
        try:
            tampered = json.loads(good)
            for name, delta in changes.items():
                tampered[name] += delta
            local_storage.put_object(replica.state_name, json.dumps(tampered).encode())
            with pytest.raises(ReplicaStateMismatchError) as error:
                check_state(replica, recorded)
            return str(error.value)
        finally:
            local_storage.put_object(replica.state_name, good)

    assert "ahead" in refused(applied_generation=1)  # the measured failure: a generation without a version
    assert "ahead" in refused(applied_generation=1, version=1)  # a version whose manifest was never stored
    assert "behind" in refused(applied_generation=-1)
    assert "behind" in refused(version=-1, applied_generation=-1)
    message = refused(applied_generation=5)
    assert f"generation {recorded.applied_generation + 5} applied" in message
    assert f"which records generation {recorded.applied_generation} applied" in message
    assert check_state(replica, recorded).adopted is False


@pytest.mark.parametrize("delta,word", [(1, "ahead"), (-1, "behind")])
def test_tampered_state_is_refused_with_the_reason_and_a_resync_makes_the_replica_identical(
    tmp_path: Path, delta: int, word: str,
) -> None:
    site, vm_id = _protected_site(tmp_path)
    with site:
        item_id = site.item_id(vm_id)
        before = _state(site, vm_id, "disk0")
        _tamper_state(site, vm_id, "disk0", applied_generation=delta)
        _guest_write(site, vm_id, "disk0", 5 * MIB + 4096, 256 * 1024, seed=41)

        job = site.wait_job(start_delta_replication(item_id), timeout=60, states=("failed",))
        step = _failed_step(job)
        assert step["name"] == "Ship logs", site.describe_job(job)
        assert step["error_class"].endswith("ReplicaStateMismatchError"), step
        for expected in ("state.json", word, f"generation {before['applied_generation'] + delta} applied",
                         f"the database, which records generation {before['applied_generation']} applied",
                         "resynchronization"):
            assert expected in step["error"], (expected, step["error"])

        item = site.item(vm_id)
        assert (item["state"], item["health"]) == ("resync_required", "Warning"), item
        assert "disk disk0" in item["resync_required_reason"] and word in item["resync_required_reason"], item
        assert [error["code"] for error in item["errors"]] == ["resync_required"], item
        # The disk itself is marked, with the same reason.
        shown = {disk["name"]: disk["replica_record"] for disk in service.show_vm("host1/app01")["disks"]}
        assert word in shown["disk0"]["resync_reason"] and shown["disk1"]["resync_reason"] is None, shown
        assert shown["disk0"]["applied_generation"] == before["applied_generation"], shown
        # The host's log of the write is still there: nothing the database does not count as applied is gone.
        with site.host("host1").tracker("app01", "disk0") as tracker:
            assert tracker.pending_logs() or tracker.unsent_bytes() > 0

        site.wait_job(start_resync(item_id), timeout=90)
        site.final_cycle(vm_id)
        site.verify_replica(vm_id)
        item = site.item(vm_id)
        assert (item["state"], item["health"]) == ("protected", "Healthy"), item
        shown = {disk["name"]: disk["replica_record"] for disk in service.show_vm("host1/app01")["disks"]}
        assert shown["disk0"]["resync_reason"] is None, shown
        assert shown["disk0"]["applied_generation"] == _state(site, vm_id, "disk0")["applied_generation"]


def test_a_completed_apply_whose_step_died_before_recording_it_is_adopted_not_refused(tmp_path: Path) -> None:
    from datapath.replication import apply_shipped_logs, ship_pending_logs

    site, vm_id = _protected_site(tmp_path, disks=[("disk0", "8M", "raw")])
    with site:
        recorded = _state(site, vm_id, "disk0")
        _guest_write(site, vm_id, "disk0", 3 * MIB, 64 * 1024, seed=8)
        # What Ship (recording what it shipped, as the step does) and Apply do: as if the Apply step died right
        # after its work, before recording it.
        storage, replica = _replica(site, vm_id, "disk0")
        try:
            with site.host("host1").tracker("app01", "disk0") as tracker:
                tracker.seal()
                shipped = ship_pending_logs(tracker, replica, applied_generation=recorded["applied_generation"])
            with session_scope() as session:
                record = session.exec(select(ReplicaRecord).where(ReplicaRecord.replica_name == replica.name)).one()
                record.shipped_generation = max(shipped)
                session.add(record)
            report = apply_shipped_logs(replica)
        finally:
            storage.close()
        assert report.version == recorded["version"] + 1

        job = site.delta_cycle(vm_id)
        assert job["state"] == "succeeded"
        item = site.item(vm_id)
        assert (item["state"], item["health"]) == ("protected", "Healthy"), item
        shown = {disk["name"]: disk["replica_record"] for disk in service.show_vm("host1/app01")["disks"]}
        assert shown["disk0"]["version"] == _state(site, vm_id, "disk0")["version"] > report.version, shown
        site.verify_replica(vm_id)


@pytest.mark.parametrize("damage", ["missing", "unreadable"])
def test_a_missing_or_unreadable_state_is_refused(tmp_path: Path, damage: str) -> None:
    site, vm_id = _protected_site(tmp_path, disks=[("disk0", "8M", "raw")])
    with site:
        storage, replica = _replica(site, vm_id, "disk0")
        try:
            if damage == "missing":
                storage.delete_object(replica.state_name)
            else:
                storage.put_object(replica.state_name, b'{"disk_id": "x", "applied_')
        finally:
            storage.close()
        job = site.wait_job(start_delta_replication(site.item_id(vm_id)), timeout=60, states=("failed",))
        step = _failed_step(job)
        assert step["name"] == "Ship logs" and damage in step["error"], step
        assert site.item(vm_id)["state"] == "resync_required"
        site.wait_job(start_resync(site.item_id(vm_id)), timeout=90)
        site.final_cycle(vm_id)
        site.verify_replica(vm_id)


def test_acknowledge_deletes_only_logs_the_database_records_as_applied(tmp_path: Path) -> None:
    site, vm_id = _protected_site(tmp_path, disks=[("disk0", "8M", "raw")])
    with site:
        item_id = site.item_id(vm_id)
        _guest_write(site, vm_id, "disk0", 2 * MIB, 64 * 1024, seed=7)
        with site.host("host1").tracker("app01", "disk0") as tracker:
            sealed = tracker.seal().generation  # as the next Ship step would, before anything is shipped
        # The recovery side now claims the sealed log is applied; it never was.
        state = _tamper_state(site, vm_id, "disk0", applied_generation=sealed - _state(
            site, vm_id, "disk0")["applied_generation"])
        assert state["applied_generation"] == sealed

        # The Acknowledge step, run on its own (beat is stopped and no job holds the item).
        context = StepContext(job_id="test-acknowledge", step_id="test-acknowledge", step_name="Acknowledge logs",
                              attempt=1, emit_event=lambda **_: None)
        result = replication_actions.acknowledge_logs(context, item_id=item_id)
        assert result["acknowledged"]["disk0"] < sealed, result
        with site.host("host1").tracker("app01", "disk0") as tracker:
            assert sealed in [log.generation for log in tracker.pending_logs()], "the unapplied log was deleted"

        # The next cycle refuses the state, a resync repairs, the write reaches the replica.
        site.wait_job(start_delta_replication(item_id), timeout=60, states=("failed",))
        site.wait_job(start_resync(item_id), timeout=90)
        site.final_cycle(vm_id)
        site.verify_replica(vm_id)


# ---- the consistency check ----------------------------------------------------------------------------------
def _check_results(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {step["result"]["disk"]: step["result"] for step in job["steps"]
            if step["name"].startswith("Check disk")}


@pytest.mark.parametrize("backend", [
    pytest.param("local", id="local"),
    pytest.param("azure", id="azure", marks=pytest.mark.azure),
])
def test_consistency_check_finds_a_write_that_bypassed_the_tracker_and_repairs_only_its_chunks(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest,
) -> None:
    from workflows.kinds.consistency_check import start as start_check

    azurite = request.getfixturevalue("azurite") if backend == "azure" else None
    site, vm_id = _protected_site(tmp_path, backend=backend, azurite=azurite)
    with site:
        item_id = site.item_id(vm_id)
        # Two writes the tracker never sees, in chunks 3 and 9 of disk0, and one it does (chunk 5).
        _bypassing_write(site, vm_id, "disk0", 3 * MIB + 8192, 4096, seed=1)
        _bypassing_write(site, vm_id, "disk0", 9 * MIB + 65536, 20000, seed=2)
        _guest_write(site, vm_id, "disk0", 5 * MIB, 128 * 1024, seed=3)
        with pytest.raises(AssertionError, match="differs from the source"):
            site.verify_replica(vm_id)  # no other check notices: the replica misses the bypassing writes

        job = site.wait_job(start_check(item_id), timeout=90)
        results = _check_results(job)
        assert results["disk0"]["drifted_chunks"] == [3, 9], results
        assert results["disk1"]["drifted_chunks"] == [], results
        assert results["disk0"]["chunks_compared"] == 16 and results["disk1"]["chunks_compared"] == 8
        # Only the drifted chunks are resynchronized: the differing blocks inside them, never more.
        assert 4096 + 20000 <= results["disk0"]["bytes_sent"] <= 2 * DEFAULT_CHUNK_SIZE, results
        assert results["disk1"]["bytes_sent"] == 0
        assert results["disk0"]["drifted_ranges"] == [[3 * MIB, 4 * MIB], [9 * MIB, 10 * MIB]]

        item = site.item(vm_id)
        assert item["health"] == "Warning" and item["state"] == "protected", item
        [drift] = [error for error in item["errors"] if error["code"] == "consistency_drift"]
        assert "disk disk0" in drift["message"] and "chunks 3, 9" in drift["message"], drift
        site.verify_replica(vm_id)  # byte for byte, without another cycle
        shown = {disk["name"]: disk["replica_record"] for disk in service.show_vm("host1/app01")["disks"]}
        assert shown["disk0"]["last_check_drifted_chunks"] == [3, 9] and shown["disk0"]["last_checked_at"], shown

        # A second check, from the command line this time, finds nothing and clears the warning.
        cli = CliRunner().invoke(main, ["check", "host1/app01", "--json"])
        assert cli.exit_code == 0, cli.output
        started = json.loads(cli.output)
        assert started["kind"] == "consistency_check", started
        job = site.wait_job(started["job_id"], timeout=90)
        assert all(result["drifted_chunks"] == [] for result in _check_results(job).values())
        assert site.item(vm_id)["health"] == "Healthy"
        # Replication goes on from the repaired replica.
        _guest_write(site, vm_id, "disk1", 1 * MIB, 64 * 1024, seed=4)
        site.final_cycle(vm_id)
        site.verify_replica(vm_id)


def test_consistency_check_finds_corruption_of_the_replica_storage(tmp_path: Path) -> None:
    from workflows.kinds.consistency_check import start as start_check

    site, vm_id = _protected_site(tmp_path, disks=[("disk0", "8M", "raw")])
    with site:
        storage, replica = _replica(site, vm_id, "disk0")
        try:
            target = storage.open_disk(replica.name)
            try:
                target.write(6 * MIB, bytes([0x5A]) * 4096)  # bit rot no step wrote
                target.flush()
            finally:
                target.close()
        finally:
            storage.close()
        job = site.wait_job(start_check(site.item_id(vm_id)), timeout=90)
        result = _check_results(job)["disk0"]
        # Where the source holds zeros the repair clears the range instead of sending data.
        repaired = result["bytes_sent"] + result["bytes_zeroed"]
        assert result["drifted_chunks"] == [6] and 4096 <= repaired <= DEFAULT_CHUNK_SIZE, result
        assert result["damaged_chunks"] == [6], result  # the replica did not hold its own recorded content
        site.verify_replica(vm_id)


def test_the_scheduler_runs_consistency_checks_on_the_policy_interval_outside_office_hours(tmp_path: Path) -> None:
    from datetime import timedelta

    from models.policy import ReplicationPolicy
    from models.protection import ProtectedItem
    from workflows import clock
    from workflows.scheduler import run_scheduler

    site, vm_id = _protected_site(tmp_path, disks=[("disk0", "8M", "raw")])
    with site:
        item_id = site.item_id(vm_id)
        now = clock.now()
        # The first tick that sees the item protected schedules its check one interval (24 h scaled by 10) on.
        run_scheduler(now)
        with session_scope() as session:
            due = session.get(ProtectedItem, item_id).next_consistency_check_at
        assert due is not None and abs((due - now) - timedelta(hours=2.4)) < timedelta(seconds=5), due
        assert site.item(vm_id)["next_consistency_check_at"] == due.isoformat()
        _bypassing_write(site, vm_id, "disk0", 2 * MIB, 4096, seed=5)

        # Due, but the site's policy has office hours all day: a delta cycle runs instead of the check.
        later = due + timedelta(minutes=1)
        report = run_scheduler(later)
        assert report.get("delta_started") == 1 and "consistency_check_started" not in report, report
        site.wait_idle(vm_id, timeout=60)
        assert not site.jobs(vm_id, "consistency_check")

        # A policy that lets checks run in office hours: the next tick starts it.
        with session_scope() as session:
            policy = session.get(ReplicationPolicy, site.policy_id)
            policy.consistency_check_off_hours = False
            session.add(policy)
        assert run_scheduler(later).get("consistency_check_started") == 1
        [check] = site.jobs(vm_id, "consistency_check")
        job = site.wait_job(check.id, timeout=90)
        assert _check_results(job)["disk0"]["drifted_chunks"] == [2]
        assert any(error["code"] == "consistency_drift" for error in site.item(vm_id)["errors"])
        with session_scope() as session:
            next_due = session.get(ProtectedItem, item_id).next_consistency_check_at
        # The next one is an interval after this one ended.
        assert abs(next_due - (clock.now() + timedelta(hours=2.4))) < timedelta(minutes=1), next_due
        site.verify_replica(vm_id)


def test_a_resync_preview_counts_what_the_resync_then_sends_and_sends_nothing(tmp_path: Path) -> None:
    """The preview reads the disks only (live, through their trackers), comparing them with the manifests of the
    replicas' last recorded versions: it counts the chunks the guest wrote since the last cycle, changes no
    record, state or replica and leaves no snapshot; the resync run next sends exactly those chunks. Through
    the CLI, which prints the figures."""
    site, vm_id = _protected_site(tmp_path)
    with site:
        # Writes since the last cycle: chunks 2 and 7 of disk0 (one write spans two chunks: 7 and 8).
        _guest_write(site, vm_id, "disk0", 2 * MIB + 4096, 8192, seed=11)
        _guest_write(site, vm_id, "disk0", 8 * MIB - 4096, 8192, seed=12)
        records = {disk["name"]: disk["replica_record"] for disk in service.show_vm("host1/app01")["disks"]}
        states_before = {disk: _state(site, vm_id, disk) for disk in ("disk0", "disk1")}

        cli = CliRunner().invoke(main, ["resync", "host1/app01", "--preview", "--wait"])
        assert cli.exit_code == 0, cli.output
        job_id = re.search(r"job (\S+) started: resync_preview", cli.output).group(1)
        previews = {step["result"]["disk"]: step["result"] for step in site.wait_job(job_id, timeout=90)["steps"]}
        after = {disk["name"]: disk["replica_record"] for disk in service.show_vm("host1/app01")["disks"]}
        item = site.item(vm_id)
        states_after = {disk: _state(site, vm_id, disk) for disk in ("disk0", "disk1")}
        host = site.host("host1")
        for disk in ("disk0", "disk1"):
            with host.tracker("app01", disk) as tracker, pytest.raises(SnapshotError):
                tracker.snapshot_view()  # no snapshot was taken or left behind

        resync = site.wait_job(start_resync(site.item_id(vm_id)), timeout=90)
        sent = {step["name"].split()[-1]: step["result"] for step in resync["steps"]
                if step["name"].startswith("Resynchronize disk")}
        site.verify_replica(vm_id)

    assert previews["disk0"] == {**previews["disk0"], "available": True, "chunks_compared": 16,
                                 "chunks_differing": 3, "bytes_differing": 3 * DEFAULT_CHUNK_SIZE}
    assert previews["disk1"]["chunks_differing"] == 0 and previews["disk1"]["bytes_differing"] == 0
    assert "disk0: 3 of 16 chunks of 1.0 MiB differ from replica version" in cli.output, cli.output
    assert "disk1: 0 of 8 chunks" in cli.output
    assert after == records and item["state"] == "protected", (after, records, item)  # nothing recorded or moved
    assert states_after == states_before  # the replicas' states on the recovery storage: untouched
    assert sent["disk0"]["chunks_sent"] == previews["disk0"]["chunks_differing"], sent
    assert sent["disk1"]["chunks_sent"] == 0, sent
