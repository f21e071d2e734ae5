"""Immutable retention with real workers (tests/recovery_site.py: a private redis-server, SQLite, Celery workers
and beat, local recovery storage): a VM replicates under a policy whose retention lock is turned on half-way; a
request to delete its locked points is refused, through the service (no job) and as a job started around the
service's check (its first step refuses), and so is disabling protection, with every point and every byte of the
recovery storage as it was; the points made before the lock are deleted, with the replica versions only they
needed; a retention of 0 h then keeps the locked points; and the points left still verify and restore to the
bytes their VM had.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
from recovery_site import RecoverySite
from sqlmodel import select

from api import service
from datapath.digest import disk_digest
from datapath.disk import create_disk, open_disk
from datapath.points import PointUnavailableError, open_point, restore_point
from models.db import session_scope
from models.jobs import Job
from models.protection import ProtectedItem, RecoveryPoint, recovery_points
from tasks.replication import replica_of
from workflows import jobkind
from workflows.items import ItemRequest, load_item, view_of
from workflows.kinds import delete_recovery_points

pytestmark = pytest.mark.slow

DISKS = [("disk0", "8M", "vhd"), ("disk1", "4M", "raw")]
JOB_TIMEOUT = 90
# 900 s at time scale 1: beat starts no delta cycle behind the test's back, so the recovery storage changes only
# when the test makes it.
POLICY = {"copy_frequency_s": 900, "recovery_point_retention_h": 24, "app_consistent_frequency_h": 0}


def storage_bytes(site: RecoverySite) -> dict[str, str]:
    """sha256 of every file of the recovery storage (replicas, undo logs, manifests, states, keys)."""
    return {str(path.relative_to(site.recovery_dir)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(site.recovery_dir.rglob("*")) if path.is_file()}


def point_rows(item_id: str) -> list[tuple[str, str, dict, str | None]]:
    with session_scope() as session:
        return [(point.id, point.created_at.isoformat(), dict(point.versions),
                 point.locked_until.isoformat() if point.locked_until else None)
                for point in recovery_points(session, session.get(ProtectedItem, item_id))]


def new_point(site: RecoverySite, vm_id: str, seed: int) -> tuple[str, dict[str, str]]:
    """Writes through the VM's trackers, then a delta cycle with the VM quiet: the new point, and the digest of
    each disk it must restore to."""
    site.host("host1").start_workload("app01", rate_mb_s=3.0, seed=seed)
    time.sleep(0.3)
    site.final_cycle(vm_id)
    vm = site.host("host1").get_vm("app01")
    digests = {disk.name: disk_digest(disk.path) for disk in vm.disks}
    with session_scope() as session:
        latest = session.exec(select(RecoveryPoint).where(RecoveryPoint.item_id == site.item_id(vm_id))
                              .order_by(RecoveryPoint.created_at.desc())).first()
        return latest.id, digests


def delete_jobs(item_id: str) -> list[Job]:
    with session_scope() as session:
        return list(session.exec(select(Job).where(Job.target == item_id, Job.kind == "delete_recovery_points")))


def test_locked_points_are_kept_byte_for_byte_and_unlocked_ones_deleted(tmp_path: Path) -> None:
    with RecoverySite(tmp_path, time_scale=1, policy_options=POLICY) as site:
        vm_id = site.create_vm("host1", "app01", DISKS, seed=11)
        site.wait_job(site.protect(vm_id), timeout=JOB_TIMEOUT)
        item_id = site.item_id(vm_id)
        # Before the lock: points without one.
        unlocked = dict(new_point(site, vm_id, seed) for seed in (12, 13))
        site.when_free(service.update_policy, "default", retention_lock_h=1)
        locked = dict(new_point(site, vm_id, seed) for seed in (14, 15))
        rows = point_rows(item_id)
        by_id = {row[0]: row for row in rows}
        assert all(by_id[point][3] is None for point in unlocked) and all(by_id[point][3] for point in locked)
        assert len(rows) >= 5, rows  # the initial replication's point too
        first_locked = by_id[next(iter(locked))]
        stored = storage_bytes(site)

        # Refused by the service: naming the lock's end, no job created.
        with pytest.raises(service.Conflict, match=f"inside the retention lock until {first_locked[3][:19]}"):
            site.when_free(service.delete_recovery_points, "app01", before=rows[-1][1], confirm="app01")
        with pytest.raises(service.Conflict, match="disable protection of VM 'app01', which deletes its recovery"):
            site.when_free(service.disable_protection, "app01", confirm="app01")
        assert delete_jobs(item_id) == []

        # A job started around the service's check: its first step refuses, the pruning steps never run.
        view = view_of(item_id)
        request = delete_recovery_points.DeletePointsRequest(
            **vars(ItemRequest.of(view, before=rows[-1][1])), before=rows[-1][1])
        job_id = site.when_free(jobkind.start, delete_recovery_points.KIND, request)
        job = site.wait_job(job_id, timeout=JOB_TIMEOUT, states=("failed",))
        assert "inside the retention lock until" in job["error"] and "nothing was deleted" in job["error"], job
        assert [step["state"] for step in job["steps"]][0] == "failed"
        assert not [step for step in job["steps"] if step["state"] == "succeeded"], site.describe_job(job)
        assert point_rows(item_id) == rows
        assert storage_bytes(site) == stored, "a refused delete changed the recovery storage"

        # The points made before the first locked one go, with the replica versions only they needed.
        ref = site.when_free(service.delete_recovery_points, "app01", before=first_locked[1], confirm="app01")
        done = site.wait_job(ref["job_id"], timeout=JOB_TIMEOUT)
        assert done["steps"][0]["result"]["deleted"] == len(rows) - len(locked), site.describe_job(done)
        assert [row[0] for row in point_rows(item_id)] == list(locked)
        with session_scope() as session:
            view = load_item(session, item_id)
        storage = site.storage()
        try:
            for disk in view.disks:
                replica = replica_of(view, storage, disk.name)
                with pytest.raises(PointUnavailableError):
                    open_point(replica, by_id[next(iter(unlocked))][2][disk.disk_uuid])
        finally:
            storage.close()

        # Retention 0 h: the next cycle's pruning stops at the first locked point, so every locked one stays.
        site.when_free(service.update_policy, "default", recovery_point_retention_h=0)
        latest, latest_digests = new_point(site, vm_id, 16)
        assert [row[0] for row in point_rows(item_id)] == [*locked, latest]
        with pytest.raises(service.Conflict, match="cannot be turned off"):
            service.update_policy("default", retention_lock_h=0)

        # The points left verify from the recovery storage and restore to their VM's bytes.
        for point in locked:
            verified = site.when_free(service.verify, "app01", point=point)
            site.wait_job(verified["job_id"], timeout=JOB_TIMEOUT)
        storage = site.storage()
        try:
            for point, digests in [*locked.items(), (latest, latest_digests)]:
                versions = {row[0]: row[2] for row in point_rows(item_id)}[point]
                for disk in view.disks:
                    target = tmp_path / f"restored-{point}-{disk.name}.raw"
                    create_disk(target, disk.size)
                    with open_disk(target, writable=True) as out:
                        restore_point(replica_of(view, storage, disk.name), versions[disk.disk_uuid], out)
                    assert disk_digest(target) == digests[disk.name], f"{disk.name} at point {point}"
        finally:
            storage.close()
        assert site.item(vm_id)["health"] == "Healthy", site.item(vm_id)
