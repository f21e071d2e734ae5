"""What the engine decides never rests on a root or state read back from the recovery storage alone.

Whoever can write to the recovery storage can change every object in it. These tests change objects the
engine itself wrote there, as such a person could, with real workers running the jobs (tests/recovery_site.py),
and check that the next job that would act on them compares them with the database (the values recorded
by the step that computed them) and fails with a clear reason, writing nothing it was not sure of:

- failback's `final.json` (the final logs' generations, the disk id, the recovery disk's final root) edited
  or removed: the completion fails before anything is applied to the staging disk and the primary disk is
  byte for byte what it was;
- a replica folder put back to an older copy of itself (replica disk, state, manifests, undo logs, as a
  restored backup would be): a drill and a delta cycle refuse it against the database, no test VM boots,
  the item needs a resync, and the resync brings the replica back to the source;
- a version's stored manifest changed (its state left agreeing with the database): the next apply refuses
  to build the next version's manifest on it;
- a valid log of the next generation placed before the engine shipped it: replaced, not applied;
- a state naming the next resync's snapshot as copied already: the resync runs all the same;
- an initial copy's checkpoint (or its completion) moved forward in the state: the copy resumes only from
  the checkpoint recorded.

(State files edited by hand are covered by tests/test_consistency.py.)
"""
from __future__ import annotations

import json
import shutil
import time

import pytest
from recovery_site import RecoverySite
from sqlmodel import select

import datapath.replication as replication
from datapath.compare import first_difference
from datapath.digest import disk_digest
from datapath.disk import open_disk
from datapath.failback import failback_object
from datapath.logformat import LogWriter
from datapath.manifest import Manifest
from datapath.replication import ReplicaDisk, initial_copy
from datapath.snapshot import SnapshotView
from datapath.tracker import ReplicationTracker
from models.db import session_scope
from models.failover import FailoverKind, FailoverRecord
from models.protection import ProtectedItem, recovery_points
from sites.host import Host
from sites.localservices import wait_until
from sites.storage.local import LocalDirectoryStorage
from tasks.replication import replica_of
from workflows import kinds
from workflows.engine import get_job
from workflows.items import load_item

# Whole deployments (workers, beat, Redis) or real guests per test: out of the quick loop (-m "not slow").
pytestmark = pytest.mark.slow

JOB_TIMEOUT = 90
MIB = 1024 * 1024
ONE_DISK = [("disk0", "16M", "vhd")]


def files(site: RecoverySite, host: str, vm: str) -> dict[str, bytes]:
    """Every disk file of the VM, whole, footer and all (small disks: compared byte for byte)."""
    return {disk.name: disk.path.read_bytes() for disk in site.host(host).get_vm(vm).disks}


def contents(site: RecoverySite, host: str, vm: str) -> dict[str, str]:
    """The digest of every disk's content (a fixed VHD's footer left out: each image has its own)."""
    return {disk.name: disk_digest(disk.path) for disk in site.host(host).get_vm(vm).disks}


def failback_record(item_id: str) -> FailoverRecord:
    with session_scope() as session:
        return session.exec(select(FailoverRecord).where(
            FailoverRecord.item_id == item_id, FailoverRecord.kind == FailoverKind.FAILBACK,
        ).order_by(FailoverRecord.started_at.desc())).first()


def step_succeeded(job_id: str, name: str) -> bool:
    return any(step["name"] == name and step["state"] == "succeeded" for step in get_job(job_id)["steps"])


# ---- failback ---------------------------------------------------------------------------------------------
def _forge_root(final: dict) -> dict:
    return {**final, "root": ("0" if final["root"][0] != "0" else "1") + final["root"][1:]}


def _forge_generations(final: dict) -> dict:
    assert final["generations"], final
    return {**final, "generations": final["generations"][:-1]}


def _forge_disk_id(final: dict) -> dict:
    return {**final, "disk_id": "ab" * 16}


FORGERIES = {"root": _forge_root, "generations": _forge_generations, "disk_id": _forge_disk_id, "removed": None}


def test_failback_refuses_a_final_json_the_database_did_not_record(tmp_path, request):
    """`final.json` edited (root, generations, disk id) or removed between Send final changes and Apply
    final changes: the completion fails naming final.json and what the database records, the primary disk is
    untouched byte for byte, the item is back at failback_ready; left alone, the completion succeeds."""
    with RecoverySite(tmp_path, recovery_host_names=("dr1",)) as site:
        vm_id = site.create_vm("host1", "app01", ONE_DISK, seed=1)
        site.wait_job(site.protect(vm_id), JOB_TIMEOUT)
        item_id = site.item_id(vm_id)
        site.wait_job(site.when_free(kinds.planned_failover.start, item_id), JOB_TIMEOUT)
        site.wait_job(kinds.commit_failover.start(item_id), JOB_TIMEOUT)
        site.host("dr1").start_workload("app01", rate_mb_s=0.5, seed=9)
        time.sleep(0.5)
        site.wait_job(kinds.failback.start(item_id), JOB_TIMEOUT)
        assert site.item(vm_id)["state"] == "failback_ready"
        primary = files(site, "host1", "app01")
        final_name = failback_object("host1", "app01", "disk0", "final.json")

        for what, forge in FORGERIES.items():
            # The primary's agent is stopped, so Apply final changes waits while final.json is changed.
            site.stop_process("host-host1")
            job_id = kinds.failback_completion.start(item_id)
            wait_until(lambda job_id=job_id: step_succeeded(job_id, "Send final changes"), timeout=JOB_TIMEOUT,
                       what="Send final changes to complete")
            recorded = failback_record(item_id).details["final"]["disk0"]
            storage = site.storage()
            try:
                assert json.loads(storage.read_object(final_name)) == recorded
                if forge is None:
                    storage.delete_object(final_name)
                else:
                    storage.put_object(final_name, json.dumps(forge(recorded)).encode())
            finally:
                storage.close()
            site.start_host_worker("host1")
            job = site.wait_job(job_id, JOB_TIMEOUT, states=("failed",))
            assert "final.json" in job["error"] and "the database records" in job["error"], (what, job["error"])
            assert "the primary disk was not touched" in job["error"], job["error"]
            apply_step = next(s for s in job["steps"] if s["name"].startswith("Apply final changes"))
            assert apply_step["state"] == "failed", apply_step
            assert files(site, "host1", "app01") == primary, f"final.json {what}: the primary disk changed"
            assert site.item(vm_id)["state"] == "failback_ready"

        # Untouched, the same failback completes: the primary then holds the recovery VM's disk.
        site.wait_job(kinds.failback_completion.start(item_id), JOB_TIMEOUT)
        assert contents(site, "host1", "app01") == contents(site, "dr1", "app01")
        assert files(site, "host1", "app01") != primary, "the recovery VM's writes must have come back"
        record = failback_record(item_id)
        assert record.verified and record.expected_roots == {"disk0": record.details["final"]["disk0"]["root"]}
        assert site.item(vm_id)["state"] == "failed_back"


# ---- a replica rolled back ---------------------------------------------------------------------------------
def test_a_replica_put_back_to_an_older_copy_of_itself_is_refused_against_the_database(tmp_path, request):
    """The replica's whole folder (disk, state, manifests, undo logs) copied at version N and put back after
    more cycles: everything in it agrees with itself, only the database knows it is old. A drill refuses it
    before writing the test VM's disks (nothing boots), and so does the next delta cycle; the item needs a
    resync, which makes the replica equal to its source again."""
    with RecoverySite(tmp_path, recovery_host_names=("dr1",), policy_options={"copy_frequency_s": 900}) as site:
        vm_id = site.create_vm("host1", "app01", ONE_DISK, seed=2)
        site.wait_job(site.protect(vm_id), JOB_TIMEOUT)
        item_id = site.item_id(vm_id)
        host = site.host("host1")
        host.start_workload("app01", rate_mb_s=1.0, seed=3)
        site.delta_cycle(vm_id)
        site.final_cycle(vm_id)
        folder = site.recovery_dir / "host1" / "app01"
        old_copy = tmp_path / "old-copy"
        shutil.copytree(folder, old_copy)

        host.start_workload("app01", rate_mb_s=1.0, seed=4)
        for _ in range(2):
            time.sleep(0.3)
            site.delta_cycle(vm_id)
        site.final_cycle(vm_id)
        with session_scope() as session:
            latest = recovery_points(session, session.get(ProtectedItem, item_id))[-1]
        shutil.rmtree(folder)
        shutil.copytree(old_copy, folder)

        job = site.wait_job(site.when_free(kinds.test_failover.start, item_id), JOB_TIMEOUT, states=("failed",))
        assert "behind the database" in job["error"], job["error"]
        restore = next(s for s in job["steps"] if s["name"].startswith("Restore disk"))
        assert restore["state"] == "failed", restore
        test_vms = [vm for vm in site.host("dr1").list_vms() if vm.name == "app01-test"]
        assert all(vm.state != "running" for vm in test_vms), "nothing restored from the old copy may boot"
        drill = next(r for r in _records(item_id) if r.kind is FailoverKind.TEST)
        assert drill.point_id == latest.id and not drill.produced_roots
        status = site.item(vm_id)
        assert status["state"] == "resync_required", status
        assert "behind the database" in status["resync_required_reason"], status

        # The resync rebuilds the replica from the source; a drill run again then replaces the failed one.
        site.wait_job(site.when_free(kinds.resynchronize.start, item_id), JOB_TIMEOUT)
        assert site.item(vm_id)["state"] == "protected"
        site.final_cycle(vm_id)
        site.verify_replica(vm_id)
        site.wait_job(site.when_free(kinds.test_failover.start, item_id), JOB_TIMEOUT)
        assert contents(site, "dr1", "app01-test") == contents(site, "host1", "app01")


def _records(item_id: str) -> list[FailoverRecord]:
    with session_scope() as session:
        return list(session.exec(select(FailoverRecord).where(FailoverRecord.item_id == item_id)
                                 .order_by(FailoverRecord.started_at.desc())).all())


def test_a_delta_cycle_refuses_a_replica_put_back_to_an_older_copy_of_itself(tmp_path, request):
    with RecoverySite(tmp_path, policy_options={"copy_frequency_s": 900}) as site:
        vm_id = site.create_vm("host1", "app01", ONE_DISK, seed=5)
        site.wait_job(site.protect(vm_id), JOB_TIMEOUT)
        item_id = site.item_id(vm_id)
        folder = site.recovery_dir / "host1" / "app01"
        old_copy = tmp_path / "old-copy"
        shutil.copytree(folder, old_copy)
        site.host("host1").start_workload("app01", rate_mb_s=1.0, seed=6)
        site.delta_cycle(vm_id)
        site.final_cycle(vm_id)
        shutil.rmtree(folder)
        shutil.copytree(old_copy, folder)

        job = site.wait_job(site.when_free(kinds.delta_replication.start, item_id), JOB_TIMEOUT, states=("failed",))
        ship = next(s for s in job["steps"] if s["name"] == "Ship logs")
        assert ship["state"] == "failed" and "behind the database" in ship["error"], ship
        assert site.item(vm_id)["state"] == "resync_required"
        site.wait_job(site.when_free(kinds.resynchronize.start, item_id), JOB_TIMEOUT)
        site.final_cycle(vm_id)
        site.verify_replica(vm_id)


# ---- a stored manifest changed ----------------------------------------------------------------------------
def test_apply_refuses_to_build_on_a_stored_manifest_the_database_does_not_know(tmp_path, request):
    """The current version's manifest object rewritten with other chunk hashes (a valid manifest, its own
    root recomputed; the state untouched, so it still agrees with the database): Apply logs refuses it
    before applying anything, the item needs a resync; the resync makes the replica equal to its source."""
    with RecoverySite(tmp_path, policy_options={"copy_frequency_s": 900}) as site:
        vm_id = site.create_vm("host1", "app01", ONE_DISK, seed=7)
        site.wait_job(site.protect(vm_id), JOB_TIMEOUT)
        item_id = site.item_id(vm_id)
        with session_scope() as session:
            view = load_item(session, item_id)
        storage = site.storage()
        try:
            replica = replica_of(view, storage, "disk0")
            state = json.loads(storage.read_object(replica.state_name))
            name = replica.manifest_name(state["version"])
            manifest = Manifest.from_bytes(storage.read_object(name))
            forged = manifest.with_chunk_hashes({0: bytes(16)})
            assert forged.root_hex != manifest.root_hex
            storage.put_object(name, forged.to_bytes())
        finally:
            storage.close()
        replica_bytes = (site.recovery_dir / replica.name).read_bytes()

        site.host("host1").start_workload("app01", rate_mb_s=1.0, seed=8)
        job = site.wait_job(site.when_free(kinds.delta_replication.start, item_id), JOB_TIMEOUT, states=("failed",))
        apply = next(s for s in job["steps"] if s["name"] == "Apply logs")
        assert apply["state"] == "failed" and f"stored manifest of version {state['version']}" in apply["error"], apply
        assert (site.recovery_dir / replica.name).read_bytes() == replica_bytes, "nothing may have been applied"
        assert site.item(vm_id)["state"] == "resync_required"
        site.wait_job(site.when_free(kinds.resynchronize.start, item_id), JOB_TIMEOUT)
        site.final_cycle(vm_id)
        site.verify_replica(vm_id)


# ---- a log object put there before the engine shipped it --------------------------------------------------
def test_a_log_placed_ahead_of_the_engine_is_replaced_not_applied(tmp_path, request):
    """A valid, sealed log of the next generation (right disk id, size and checksums: nothing secret) placed
    in the storage before the Ship step: the database records no such generation as shipped, so Ship
    uploads the tracker's own log over it instead of taking it as already sent, and the replica ends equal
    to its source, not holding the placed bytes."""
    with RecoverySite(tmp_path, policy_options={"copy_frequency_s": 900}) as site:
        vm_id = site.create_vm("host1", "app01", ONE_DISK, seed=9)
        site.wait_job(site.protect(vm_id), JOB_TIMEOUT)
        item_id = site.item_id(vm_id)
        with session_scope() as session:
            view = load_item(session, item_id)
        storage = site.storage()
        try:
            replica = replica_of(view, storage, "disk0")
            state = json.loads(storage.read_object(replica.state_name))
            generation = state["applied_generation"] + 1
            placed = tmp_path / "placed.hrl"
            with LogWriter.create(placed, disk_id=bytes.fromhex(state["disk_id"]), generation=generation,
                                  first_seq=1, disk_size=state["size"]) as log:
                log.append(0, b"#!/bin/sh\necho placed\n".ljust(4096, b"\0"))
                log.seal()
            with open(placed, "rb") as data:
                storage.put_object(replica.log_name(generation), data)
        finally:
            storage.close()

        site.host("host1").start_workload("app01", rate_mb_s=1.0, seed=10)
        site.delta_cycle(vm_id)
        site.final_cycle(vm_id)
        site.verify_replica(vm_id)
        assert site.item(vm_id)["state"] == "protected"


# ---- a resync told by the state that its snapshot was copied already ----------------------------------------
def test_a_state_naming_the_next_snapshot_does_not_skip_a_resync(tmp_path, request):
    """The state's `copy_started_generation` set to the generation the next resync's snapshot will have (the
    host's tracker makes it predictable) and the disk written through its tracker before that snapshot: the
    resync must not take the state's word that this snapshot was copied already (only the database's), so it
    sends the write. (Not damage to the replica: where the source did not change, a resync trusts the
    replica's stored manifest, and damage there is the consistency check's to find.)"""
    with RecoverySite(tmp_path, policy_options={"copy_frequency_s": 900}) as site:
        vm_id = site.create_vm("host1", "app01", ONE_DISK, seed=11)
        site.wait_job(site.protect(vm_id), JOB_TIMEOUT)
        item_id = site.item_id(vm_id)
        site.final_cycle(vm_id)
        vm = site.host("host1").get_vm("app01")
        with ReplicationTracker(vm.disk("disk0").path) as tracker:
            next_snapshot = tracker.generation + 1  # create_snapshot seals the active log first
            tracker.write(2 * 1024 * 1024 + 512, b"\xee" * 4096)  # in the log the snapshot seals
        with session_scope() as session:
            view = load_item(session, item_id)
        storage = site.storage()
        try:
            replica = replica_of(view, storage, "disk0")
            state = json.loads(storage.read_object(replica.state_name))
            forged = {**state, "copy_started_generation": next_snapshot}
            storage.put_object(replica.state_name, json.dumps(forged).encode())
        finally:
            storage.close()

        job = site.wait_job(site.when_free(kinds.resynchronize.start, item_id), JOB_TIMEOUT)
        resync = next(s["result"] for s in job["steps"] if s["name"].startswith("Resynchronize disk"))
        assert resync["first_generation"] == next_snapshot, resync
        assert resync["bytes_sent"] >= 4096, resync
        site.final_cycle(vm_id)
        site.verify_replica(vm_id)


# ---- an initial copy resumed from a checkpoint the storage alone says ---------------------------------------
@pytest.mark.parametrize("forged", ["checkpoint", "done"])
def test_a_resumed_copy_trusts_the_state_only_as_far_as_the_recorded_checkpoint(tmp_path, monkeypatch, forged):
    """An initial copy interrupted after its first checkpoint; then the state on the storage says the copy got
    to the end (or finished) while the replica holds other bytes past the real checkpoint. The copy run again
    with the checkpoint its caller recorded (the workflows: the database, replica_record) copies again from
    there, and the replica ends byte for byte equal to its source. (Data path and real tracker and storage;
    the Copy disk step passes the database's record.)"""
    host = Host(tmp_path / "host1", "host1")
    machine = host.create_vm("app01", [("disk0", 16 * MIB, "raw")])
    host.write_initial_data(machine, seed=12, fraction=0.9)
    host.enable_tracking(machine)
    disk = machine.disks[0]
    storage = LocalDirectoryStorage(tmp_path / "recovery")
    replica = ReplicaDisk(storage, ReplicaDisk.name_for(host.name, machine.name, disk.name))
    recorded: dict[str, tuple[int, int]] = {}

    def record(generation: int, offset: int) -> None:
        recorded["copy"] = (generation, offset)

    class Interrupted(Exception):
        pass

    def crash(done: int, total: int) -> None:
        raise Interrupted  # at the first durable checkpoint, after it was saved and recorded

    monkeypatch.setattr(replication, "CHECKPOINT_INTERVAL_S", 0)
    # The copy reports a checkpoint once its flusher made a part durable, which on a loaded machine can be
    # after the last read: the second half of the disk is read only after a pause, so the first half's flush
    # is done by then and the checkpoint falls inside the disk.
    read_into, paused = SnapshotView.read_into, []

    def read_second_half_late(view, offset, buf):
        if offset >= disk.size // 2 and not paused:
            paused.append(offset)
            time.sleep(2)
        return read_into(view, offset, buf)

    monkeypatch.setattr(SnapshotView, "read_into", read_second_half_late)
    tracker = host.tracker(machine, disk.name)
    try:
        with pytest.raises(Interrupted):
            initial_copy(tracker, replica, flush_interval=2 * MIB, on_progress=crash, on_checkpoint=record)
        monkeypatch.setattr(SnapshotView, "read_into", read_into)
        generation, checkpoint = recorded["copy"]
        assert 0 < checkpoint < disk.size

        state = replica.load_state()
        assert (state.copy_started_generation, state.copy_checkpoint) == (generation, checkpoint)
        state.copy_checkpoint = disk.size
        if forged == "done":
            state.initial_copy_done, state.version, state.manifest_root = True, 1, "00" * 16
        replica.save_state(state)
        target = storage.open_disk(replica.name)
        try:
            target.write(checkpoint + MIB, b"\xee" * MIB)
            target.flush()
        finally:
            target.close()

        copied = initial_copy(tracker, replica, flush_interval=2 * MIB, recorded=recorded["copy"],
                              on_checkpoint=record)
        assert copied.initial_copy_done and copied.version == 1
        assert recorded["copy"] == (generation, disk.size)
        with open_disk(disk.path) as source:
            replica_disk = storage.open_disk(replica.name)
            try:
                assert first_difference(source, replica_disk) is None
                assert replica_disk.size == source.size
                assert bytes(read_all(replica_disk)) == bytes(read_all(source))
            finally:
                replica_disk.close()
    finally:
        tracker.close()


def read_all(disk) -> bytearray:
    data = bytearray(disk.size)
    assert disk.read_into(0, memoryview(data)) == disk.size
    return data
