"""A way out of every failed job: each job kind driven to a poison failure, then back to Healthy by the
recovery its kind declares (`asr jobs restart`: resume the same job from the failed step, or start it again),
without disabling protection.

The poison is real: `tests/step_killer.py` makes the worker process running the chosen step SIGKILL itself
(after the engine claimed the step), the reconciler finds the step's heartbeat gone and counts the death, and
with ASR_MAX_STEP_DEATHS=1 the step fails as a poison message and the job fails, its failure hooks run.
Then the kill is disarmed, the job restarted through the service, and the item must end Healthy in the state
the operation leads to, its replica equal to its source byte for byte where it replicates.
Real Redis, Celery workers, beat, SQLite and local recovery storage.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from recovery_site import RecoverySite
from step_killer import KILL_FILE_SETTING

from api import service
from datapath.digest import disk_digest
from models.db import session_scope
from models.jobs import Job
from models.plans import create_plan
from sites.localservices import wait_until
from workflows import kinds
from workflows.engine import ItemBusyError
from workflows.kinds.recovery_plan import start_plan

pytestmark = pytest.mark.slow

JOB_TIMEOUT = 90
DISKS = [("disk0", "8M", "vhd"), ("disk1", "4M", "raw")]
POISON_REASON = "worker died 1 times while running this step (poison message?)"


def vm_digests(site: RecoverySite, host: str, vm: str) -> dict[str, str]:
    return {disk.name: disk_digest(disk.path) for disk in site.host(host).get_vm(vm).disks}


def when_free(start: Callable[[], Any]) -> Any:
    """`start()`, again while the item is busy with a job of its own (beat's delta cycles run every 30 s)."""
    deadline = time.monotonic() + JOB_TIMEOUT
    while True:
        try:
            return start()
        except (ItemBusyError, service.Conflict) as error:
            if "busy with job" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def hooks_ran(job_id: str) -> bool:
    with session_scope() as session:
        job = session.get(Job, job_id)
        return job.settled_at is not None and not job.hook_pending


class PoisonDrill:
    """A deployment whose workers die on the armed action, with the steps to poison a job and recover it."""

    def __init__(self, tmp_path: Path, **options: Any) -> None:
        self.kill_file = tmp_path / "kill-action"
        self.kill_file.write_text("")
        self.site = RecoverySite(tmp_path, env={
            "ASR_MAX_STEP_DEATHS": "1", KILL_FILE_SETTING: str(self.kill_file),
            "ASR_ACTION_MODULES": "tasks.replication,tests.step_killer",
        }, **options)
        self.covered: set[str] = set()

    def __enter__(self) -> PoisonDrill:
        return self

    def __exit__(self, *exc: object) -> None:
        self.site.close()

    def poisoned(self, kind: str, action: str, start: Callable[[], str]) -> dict[str, Any]:
        """Start a job of `kind` with `action` armed; returns the failed job once its hooks ran."""
        self.kill_file.write_text(action)
        try:
            job_id = when_free(start)
            job = self.site.wait_job(job_id, timeout=JOB_TIMEOUT, states=("failed",))
        finally:
            self.kill_file.write_text("")
        assert job["kind"] == kind, job["kind"]
        [step] = [step for step in job["steps"] if step["state"] == "failed"]
        assert (step["error"], step["deaths"]) == (POISON_REASON, 1), self.site.describe_job(job)
        assert job["error_class"] == "workflows.engine.errors.PoisonStepError", job["error_class"]
        wait_until(lambda: hooks_ran(job_id), timeout=30, what=f"the failed {kind} job's hooks to run")
        return job

    def recovered(self, job: dict[str, Any], how: str) -> dict[str, Any]:
        """`asr jobs restart` of the failed job; returns the job that carried it to success."""
        answer = when_free(lambda: service.restart_job(job["id"]))
        assert answer["recovery"] == how, answer
        assert (answer["job_id"] == job["id"]) == (how == "resumed"), answer
        done = self.site.wait_job(answer["job_id"], timeout=JOB_TIMEOUT)
        self.covered.add(job["kind"])
        return done

    def healthy_after_rollback(self, vm_id: str, state: str) -> None:
        """A failed failover or failback rolled the item back to `state`, Critical with the job's failure."""
        item = self.site.item(vm_id)
        assert (item["state"], item["health"]) == (state, "Critical"), item

    def healthy(self, vm_id: str, state: str) -> None:
        try:
            wait_until(lambda: (self.site.item(vm_id)["state"], self.site.item(vm_id)["health"]) == (state, "Healthy"),
                       timeout=30, what=f"the item to be {state} and Healthy")
        except AssertionError as error:
            raise AssertionError(f"{error}: {self.site.item(vm_id)}") from None


def test_replication_kinds_poisoned_and_recovered(tmp_path: Path) -> None:
    with PoisonDrill(tmp_path) as drill:
        site = drill.site
        vm_id = site.create_vm("host1", "app01", DISKS, seed=41)

        # The dead end issue 12 measured: a poisoned copy, now resumed from its checkpoint.
        job = drill.poisoned("enable_protection", "replication.copy_disk", lambda: site.protect(vm_id))
        assert site.item(vm_id)["state"] == "initial_replication"
        drill.recovered(job, "resumed")
        drill.healthy(vm_id, "protected")
        site.verify_replica(vm_id)
        item_id = site.item_id(vm_id)

        job = drill.poisoned("delta_replication", "replication.apply_logs",
                             lambda: kinds.delta_replication.start(item_id))
        drill.recovered(job, "restarted")
        drill.healthy(vm_id, "protected")

        job = drill.poisoned("verify_recovery_point", "points.verify", lambda: service.verify("app01")["job_id"])
        drill.recovered(job, "restarted")
        drill.healthy(vm_id, "protected")

        # Deleting old points, poisoned while it prunes their replica versions: run again, it finds the points
        # gone and prunes.
        job = drill.poisoned("delete_recovery_points", "points.prune_versions", lambda: service.delete_recovery_points(
            "app01", before=service.recovery_points("app01")[-1]["created_at"], confirm="app01")["job_id"])
        drill.recovered(job, "restarted")
        drill.healthy(vm_id, "protected")

        job = drill.poisoned("resync_preview", "preview.resync_disk",
                             lambda: service.preview_resync("app01")["job_id"])
        drill.recovered(job, "restarted")
        drill.healthy(vm_id, "protected")

        job = drill.poisoned("resynchronize", "replication.resync_disk", lambda: service.resync("app01")["job_id"])
        drill.recovered(job, "resumed")
        drill.healthy(vm_id, "protected")
        # A consistency check poisoned while it compares a disk (its snapshot left behind): run again, it
        # discards that snapshot first and ends Healthy.
        job = drill.poisoned("consistency_check", "consistency.check_disk",
                             lambda: service.consistency_check("app01")["job_id"])
        assert site.item(vm_id)["health"] == "Critical"
        drill.recovered(job, "restarted")
        drill.healthy(vm_id, "protected")
        site.final_cycle(vm_id)
        site.verify_replica(vm_id)

        # A scheduled initial replication (its policy starts it hours from now), started and poisoned.
        later = site.create_policy("later", initial_replication_at=datetime.now(UTC) + timedelta(hours=6))
        other = site.create_vm("host1", "app02", [("disk0", "8M", "vhd")], seed=42)
        site.wait_job(site.protect(other, policy_id=later), timeout=JOB_TIMEOUT)
        assert site.item(other)["state"] == "initial_replication_pending"
        job = drill.poisoned("initial_replication", "replication.copy_disk",
                             lambda: kinds.initial_replication.start(site.item_id(other)))
        drill.recovered(job, "resumed")
        drill.healthy(other, "protected")
        site.final_cycle(other)
        site.verify_replica(other)

        # Disabling protection, poisoned while it removes the replicas, resumed to its end.
        job = drill.poisoned("disable_protection", "replication.remove_replicas",
                             lambda: service.disable_protection("app02")["job_id"])
        drill.recovered(job, "resumed")
        assert not [vm for vm in service.health() if vm["vm"] == "app02"]
        # Only the folder's wrapped data key may stay (docs/operations.md, "Security: encryption at rest").
        folder = site.recovery_dir / "host1" / "app02"
        assert not folder.exists() or {path.name for path in folder.iterdir()} <= {"asr-data-key.json"}
        drill.healthy(vm_id, "protected")  # the other VM never noticed


def test_failover_and_failback_kinds_poisoned_and_recovered(tmp_path: Path) -> None:
    with PoisonDrill(tmp_path, recovery_host_names=("dr1",)) as drill:
        site = drill.site
        vm_id = site.create_vm("host1", "app01", DISKS, seed=43)
        site.wait_job(site.protect(vm_id), timeout=JOB_TIMEOUT)
        item_id = site.item_id(vm_id)
        site.final_cycle(vm_id)
        primary = vm_digests(site, "host1", "app01")

        job = drill.poisoned("test_failover", "failover.restore_disk", lambda: kinds.test_failover.start(item_id))
        drill.recovered(job, "restarted")
        assert vm_digests(site, "dr1", "app01-test") == primary
        job = drill.poisoned("test_failover_cleanup", "failover.delete_recovery_vm",
                             lambda: kinds.test_failover_cleanup.start(item_id))
        drill.recovered(job, "restarted")
        assert "app01-test" not in [vm.name for vm in site.host("dr1").list_vms()]
        drill.healthy(vm_id, "protected")

        job = drill.poisoned("planned_failover", "failover.restore_disk", lambda: kinds.planned_failover.start(item_id))
        drill.healthy_after_rollback(vm_id, "protected")
        drill.recovered(job, "restarted")
        drill.healthy(vm_id, "failed_over")
        assert vm_digests(site, "dr1", "app01") == primary

        job = drill.poisoned("cancel_failover", "failover.finish_cancel", lambda: kinds.cancel_failover.start(item_id))
        drill.recovered(job, "restarted")
        drill.healthy(vm_id, "protected")
        assert "app01" not in [vm.name for vm in site.host("dr1").list_vms()]

        site.wait_job(when_free(lambda: kinds.planned_failover.start(item_id)), timeout=JOB_TIMEOUT)
        job = drill.poisoned("commit_failover", "failover.commit", lambda: kinds.commit_failover.start(item_id))
        drill.recovered(job, "restarted")
        drill.healthy(vm_id, "failover_committed")

        site.host("dr1").start_workload("app01", rate_mb_s=0.2, seed=44)
        job = drill.poisoned("failback", "failback.prepare_staging", lambda: kinds.failback.start(item_id))
        drill.healthy_after_rollback(vm_id, "failover_committed")
        drill.recovered(job, "restarted")
        drill.healthy(vm_id, "failback_ready")
        assert vm_digests(site, "host1", "app01") == primary, "nothing touches the primary before the swap"

        job = drill.poisoned("cancel_failback", "failback.discard_staging",
                             lambda: kinds.cancel_failback.start(item_id))
        drill.recovered(job, "restarted")
        drill.healthy(vm_id, "failover_committed")

        site.wait_job(when_free(lambda: kinds.failback.start(item_id)), timeout=JOB_TIMEOUT)
        job = drill.poisoned("failback_completion", "failback.shut_down_recovery_vm",
                             lambda: kinds.failback_completion.start(item_id))
        drill.recovered(job, "restarted")
        drill.healthy(vm_id, "failed_back")
        assert vm_digests(site, "host1", "app01") == vm_digests(site, "dr1", "app01")

        job = drill.poisoned("commit_failback", "failback.commit", lambda: kinds.commit_failback.start(item_id))
        drill.recovered(job, "restarted")
        drill.healthy(vm_id, "failback_committed")

        job = drill.poisoned("reverse_replication", "replication.resync_disk",
                             lambda: kinds.reverse_replication.start(item_id))
        drill.recovered(job, "resumed")
        drill.healthy(vm_id, "protected")
        site.final_cycle(vm_id)
        site.verify_replica(vm_id)

        site.final_cycle(vm_id)
        at_point = vm_digests(site, "host1", "app01")
        job = drill.poisoned("unplanned_failover", "failover.restore_disk",
                             lambda: kinds.unplanned_failover.start(item_id))
        drill.healthy_after_rollback(vm_id, "protected")
        drill.recovered(job, "restarted")
        drill.healthy(vm_id, "failed_over")
        assert vm_digests(site, "dr1", "app01") == at_point
        site.wait_job(when_free(lambda: kinds.cancel_failover.start(item_id)), timeout=JOB_TIMEOUT)
        drill.healthy(vm_id, "protected")


def test_recovery_plan_kinds_poisoned_and_recovered(tmp_path: Path) -> None:
    with PoisonDrill(tmp_path, recovery_host_names=("dr1",)) as drill:
        site = drill.site
        vms = {name: site.create_vm("host1", name, [("disk0", "8M", "vhd")], seed=50 + i)
               for i, name in enumerate(("db03", "web03"))}
        for vm_id in vms.values():
            site.wait_job(site.protect(vm_id), timeout=JOB_TIMEOUT)
        with session_scope() as session:
            create_plan(session, "shop", [{"name": "data", "vms": [vms["db03"]]},
                                          {"name": "web", "vms": [vms["web03"]]}])
        items = {name: site.item_id(vm_id) for name, vm_id in vms.items()}

        def every_item(state: str) -> None:
            for vm_id in vms.values():
                drill.healthy(vm_id, state)

        def each(start: Callable[[str], str]) -> None:
            for item_id in items.values():
                site.wait_job(when_free(lambda item_id=item_id: start(item_id)), timeout=JOB_TIMEOUT)

        job = drill.poisoned("plan_test_failover", "failover.restore_disk",
                             lambda: start_plan("shop", "test_failover"))
        drill.recovered(job, "restarted")
        every_item("protected")
        assert {"db03-test", "web03-test"} <= {vm.name for vm in site.host("dr1").list_vms()}
        each(kinds.test_failover_cleanup.start)

        for vm_id in vms.values():
            site.final_cycle(vm_id)
        at_shutdown = {name: vm_digests(site, "host1", name) for name in vms}
        job = drill.poisoned("plan_planned_failover", "failover.restore_disk",
                             lambda: start_plan("shop", "planned_failover"))
        drill.recovered(job, "restarted")
        every_item("failed_over")
        assert {name: vm_digests(site, "dr1", name) for name in vms} == at_shutdown
        each(kinds.commit_failover.start)

        job = drill.poisoned("plan_failback", "failback.prepare_staging", lambda: start_plan("shop", "failback"))
        drill.recovered(job, "restarted")
        every_item("failed_back")
        for name in vms:
            assert vm_digests(site, "host1", name) == vm_digests(site, "dr1", name), name
        each(kinds.commit_failback.start)
        each(kinds.reverse_replication.start)
        every_item("protected")

        job = drill.poisoned("plan_unplanned_failover", "failover.restore_disk",
                             lambda: start_plan("shop", "unplanned_failover"))
        drill.recovered(job, "restarted")
        every_item("failed_over")
        each(kinds.cancel_failover.start)
        every_item("protected")
        for vm_id in vms.values():
            site.final_cycle(vm_id)
            site.verify_replica(vm_id)


def test_every_job_kind_has_a_poison_drill() -> None:
    """The drills above cover every declared kind: a new kind gets one too (this list is the checklist)."""
    import workflows.kinds  # noqa: F401  (declares every kind)
    from workflows.jobkind import KINDS

    drilled = {"enable_protection", "delta_replication", "verify_recovery_point", "resynchronize",
               "initial_replication", "disable_protection", "test_failover", "test_failover_cleanup",
               "planned_failover", "cancel_failover", "commit_failover", "failback", "cancel_failback",
               "failback_completion", "commit_failback", "reverse_replication", "unplanned_failover",
               "plan_test_failover", "plan_planned_failover", "plan_failback", "plan_unplanned_failover",
               "consistency_check", "resync_preview", "delete_recovery_points"}
    source = Path(__file__).read_text()
    for kind in drilled:
        assert f'drill.poisoned("{kind}"' in source, kind
    # The product's kinds: other modules of the same run declare kinds of their own, all named test.* or bench.*.
    product = {name for name in KINDS if not name.startswith(("test.", "bench."))}
    assert product == drilled, product ^ drilled
