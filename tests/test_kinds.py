"""Job kinds as data: their stage graphs for representative requests, the action catalog, the transition
and rollback tables. Pure: no database, no Redis, no workers."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

import tasks  # noqa: F401  (registers every action's code, as a worker does)
from models.failover import FailoverKind
from models.plans import PlanOperation
from models.protection import ALLOWED_TRANSITIONS, ROLLBACKS, ProtectedItem, ReplicationState, roll_back
from workflows import actions as A
from workflows.engine import ORCHESTRATION_QUEUE, RECOVERY_QUEUE
from workflows.engine.registry import declared_kinds, registered_actions
from workflows.failover_request import FailbackRequest, FailoverRequest, RecordRequest
from workflows.items import DiskRef, ItemRequest
from workflows.jobkind import KINDS, JobKind, NotRestartableError, kind_named, restart, stage_actions
from workflows.kinds import (
    cancel_failover,
    consistency_check,
    delete_recovery_points,
    delta_replication,
    disable_protection,
    enable_protection,
    failback,
    failback_completion,
    planned_failover,
    recovery_plan,
    resync_preview,
    resynchronize,
    reverse_replication,
    test_failover,
    unplanned_failover,
    verify_recovery_point,
)

S = ReplicationState
REPO = Path(__file__).resolve().parents[1]
ONE_DISK = (DiskRef("d0", "disk0"),)
THREE_DISKS = (DiskRef("d0", "disk0"), DiskRef("d1", "disk1"), DiskRef("d2", "disk2"))


def item(disks=ONE_DISK, **extra) -> ItemRequest:
    return ItemRequest("item-1", "app01", "host.hv1", disks, tuple(extra.items()))


def shape(stages) -> list[list[tuple[str, str, str]]]:
    """Each stage as (step name, action, queue) triples."""
    return [[(step.name, step.action, step.queue) for step in stage] for stage in stages]


def actions_of(stages) -> list[list[str]]:
    return [[step.action for step in stage] for stage in stages]


def failover_request(kind: str, point: str = "latest_processed", disks=ONE_DISK, label=None) -> FailoverRequest:
    return FailoverRequest("item-1", "app01", "host.hv1", disks, "fo-1", label, {}, kind=kind, point=point,
                           target_host="dr1", target_vm="app01-test" if kind == "test" else "app01",
                           placement=({"adapter": "nic0", "network": "net", "subnet": None},),
                           requested_at=1.0)


def failback_request(mode: str, complete: bool = False, disks=ONE_DISK, label=None) -> FailbackRequest:
    return FailbackRequest("item-1", "app01", "host.hv1", disks, "fb-1", label, {}, mode=mode, primary_host="hv1",
                           recovery_host="dr1", recovery_vm="app01", requested_at=1.0, complete=complete)


# ---- the catalog ---------------------------------------------------------------------------------------
def test_every_catalog_action_has_its_code_and_every_registered_action_is_in_the_catalog():
    product = {value for name, value in vars(A).items() if name.isupper() and isinstance(value, str)}
    assert product <= A.CATALOG and len(product) == 54
    assert product - set(registered_actions) == set(), "every product action has its code in tasks/"
    assert set(registered_actions) - A.CATALOG == set(), "no code runs under a name the catalog lacks"


def test_every_product_kind_is_declared_with_the_engine_and_uses_only_catalog_actions():
    product = {name for name in KINDS if "." not in name}  # tests and extensions namespace theirs
    assert product == {
        "enable_protection", "initial_replication", "delta_replication", "resynchronize", "disable_protection",
        "test_failover", "test_failover_cleanup", "planned_failover", "unplanned_failover", "cancel_failover",
        "commit_failover", "failback", "failback_completion", "cancel_failback", "commit_failback",
        "reverse_replication", "verify_recovery_point", "plan_test_failover", "plan_planned_failover",
        "plan_unplanned_failover", "plan_failback", "consistency_check", "resync_preview", "delete_recovery_points",
    }
    for name, kind in KINDS.items():
        assert declared_kinds[name] == kind.actions
        assert kind.actions <= A.CATALOG


def test_a_kind_using_an_action_outside_the_catalog_or_an_unreachable_state_is_refused_when_declared():
    with pytest.raises(ValueError, match="not in the catalog: replication.teleport"):
        JobKind(name="bad", summary="", actions=frozenset({"replication.teleport"}), build=lambda r: [],
                locks=lambda r: [], target=lambda r: None, params=lambda r: {})


def test_every_product_kind_declares_a_way_out_of_its_failures():
    product = {name: kind for name, kind in KINDS.items() if "." not in name}
    assert all(kind.restart is not None for kind in product.values())
    # The replication kinds leave the item where they stopped: the same job resumes (a copy from its
    # checkpoint); the others roll the item back or are cheap to run again: a new job.
    assert {name for name, kind in product.items() if kind.recovery == "resume"} == {
        "enable_protection", "initial_replication", "resynchronize", "reverse_replication", "disable_protection"}


def test_restart_of_an_unknown_kind_is_refused_naming_it():
    with pytest.raises(NotRestartableError, match="no job kind 'frobnicate'"):
        restart("frobnicate", {})
    assert kind_named("delta_replication") is delta_replication.KIND


# ---- stage graphs: every step of every kind stays inside its declared actions ---------------------------
REPRESENTATIVE = [
    (enable_protection.KIND, enable_protection.EnableRequest(*vars(item(THREE_DISKS)).values())),
    (enable_protection.KIND, enable_protection.EnableRequest(*vars(item()).values(), scheduled_at="2026-12-03")),
    (delta_replication.KIND, item(THREE_DISKS)),
    (resynchronize.KIND, item(THREE_DISKS, manual=True)),
    (reverse_replication.KIND, item()),
    (disable_protection.KIND, item()),
    (test_failover.KIND, failover_request("test", "latest")),
    (planned_failover.KIND, failover_request("planned", "latest", THREE_DISKS)),
    (unplanned_failover.KIND, failover_request("unplanned")),
    (failback.KIND, failback_request("minimize_downtime")),
    (failback.KIND, failback_request("full_download", disks=THREE_DISKS)),
    (verify_recovery_point.KIND, verify_recovery_point.VerifyRequest(*vars(item(THREE_DISKS)).values(),
                                                                      point_id="p-1")),
    (consistency_check.KIND, item(THREE_DISKS)),
    (resync_preview.KIND, item(THREE_DISKS)),
    (delete_recovery_points.KIND, delete_recovery_points.DeletePointsRequest(
        *vars(item(THREE_DISKS, before="2026-12-04T09:00:00+00:00")).values(), before="2026-12-04T09:00:00+00:00")),
]


@pytest.mark.parametrize(("kind", "request_"), REPRESENTATIVE, ids=lambda value: getattr(value, "name", ""))
def test_each_kind_builds_only_its_declared_actions_and_passes_ids_never_data(kind, request_):
    stages = kind.build(request_)
    assert stages and all(stages)
    assert stage_actions(stages) <= kind.actions
    for stage in stages:
        for step in stage:
            assert step.params["item_id"] == "item-1"
            assert all(not isinstance(value, bytes) for value in step.params.values())
    assert kind.build(request_) == stages, "a builder is pure: the same request gives the same stages"


def test_enable_protection_copies_every_disk_in_one_parallel_stage_on_the_host_queue():
    stages = enable_protection.build(enable_protection.EnableRequest(*vars(item(THREE_DISKS)).values()))
    assert actions_of(stages) == [
        [A.PREREQUISITES], [A.CREATE_RELATIONSHIP], [A.START_REPLICATION], [A.SNAPSHOT_VM],
        [A.COPY_DISK] * 3, [A.DELETE_SNAPSHOT], [A.SHIP_LOGS], [A.APPLY_LOGS], [A.ACKNOWLEDGE_LOGS], [A.FINALIZE],
    ]
    copies = stages[4]
    assert [step.params["disk_id"] for step in copies] == ["d0", "d1", "d2"]
    assert {step.queue for step in copies} == {"host.hv1"}
    assert stages[7][0].queue == RECOVERY_QUEUE and stages[2][0].queue == ORCHESTRATION_QUEUE


def test_enable_protection_scheduled_for_later_ends_after_start_replication():
    stages = enable_protection.build(enable_protection.EnableRequest(*vars(item()).values(),
                                                                    scheduled_at="2026-12-03T00:00:00+00:00"))
    assert actions_of(stages) == [[A.PREREQUISITES], [A.CREATE_RELATIONSHIP], [A.START_REPLICATION]]
    assert stages[2][0].params["scheduled_at"] == "2026-12-03T00:00:00+00:00"


def test_delta_cycle_and_resync_shapes():
    assert shape(delta_replication.build(item())) == [
        [("Ship logs", A.SHIP_LOGS, "host.hv1")], [("Apply logs", A.APPLY_LOGS, RECOVERY_QUEUE)],
        [("Acknowledge logs", A.ACKNOWLEDGE_LOGS, "host.hv1")],
        [("Update replication health", A.UPDATE_HEALTH, ORCHESTRATION_QUEUE)],
    ]
    resync = resynchronize.build(item(THREE_DISKS))
    assert resync[0][0].params["enter_state"] == "resynchronizing"
    assert [step.name for step in resync[1]] == ["Resynchronize disk disk0", "Resynchronize disk disk1",
                                                 "Resynchronize disk disk2"]
    assert actions_of(reverse_replication.build(item()))[0] == [A.BEGIN_REVERSE]
    assert actions_of(reverse_replication.build(item()))[1:] == actions_of(resynchronize.build(item()))


def test_consistency_check_brings_the_replica_to_the_snapshot_then_checks_every_disk_in_parallel():
    stages = consistency_check.build(item(THREE_DISKS))
    assert actions_of(stages) == [
        [A.DELETE_SNAPSHOT], [A.SNAPSHOT_VM], [A.SHIP_LOGS], [A.APPLY_LOGS], [A.ACKNOWLEDGE_LOGS],
        [A.CHECK_DISK] * 3, [A.DELETE_SNAPSHOT], [A.FINISH_CHECK],
    ]
    # No seal after the snapshot's: the replica stops at the generation the snapshot holds.
    assert stages[2][0].params["seal"] is False and stages[1][0].params["enter_state"] is None
    assert [(step.name, step.queue, step.params["disk_id"]) for step in stages[5]] == [
        ("Check disk disk0", "host.hv1", "d0"), ("Check disk disk1", "host.hv1", "d1"),
        ("Check disk disk2", "host.hv1", "d2")]
    assert stages[-1][0].queue == ORCHESTRATION_QUEUE
    assert consistency_check.KIND.starts_from == (S.PROTECTED,) and consistency_check.KIND.recovery == "restart"


def test_delete_recovery_points_deletes_the_rows_then_prunes_every_disk_in_parallel():
    before = "2026-12-04T09:00:00+00:00"
    request = delete_recovery_points.DeletePointsRequest(*vars(item(THREE_DISKS, before=before)).values(),
                                                         before=before)
    stages = delete_recovery_points.build(request)
    assert shape(stages) == [
        [("Delete recovery points", A.DELETE_POINTS, ORCHESTRATION_QUEUE)],
        [(f"Prune replica versions of disk {name}", A.PRUNE_POINT_VERSIONS, RECOVERY_QUEUE)
         for name in ("disk0", "disk1", "disk2")],
    ]
    assert stages[0][0].params == {"item_id": "item-1", "before": before}
    assert [step.params["disk_id"] for step in stages[1]] == ["d0", "d1", "d2"]
    kind = delete_recovery_points.KIND
    assert kind.starts_from == (S.PROTECTED, S.RESYNC_REQUIRED) and kind.recovery == "restart"
    assert kind.moves_to == frozenset() and kind.params(request)["before"] == before


def test_disable_protection_checks_the_retention_lock_before_it_moves_the_item():
    assert actions_of(disable_protection.build(item())) == [
        [A.CHECK_RETENTION_LOCK], [A.BEGIN_DISABLE], [A.STOP_TRACKING], [A.REMOVE_REPLICAS], [A.FINISH_DISABLE]]


def test_failover_kinds_differ_only_where_the_primary_is_involved():
    planned = actions_of(planned_failover.KIND.build(failover_request("planned", "latest")))
    unplanned = actions_of(unplanned_failover.KIND.build(failover_request("unplanned")))
    drill_latest = actions_of(test_failover.KIND.build(failover_request("test", "latest")))
    tail = [[A.CHOOSE_POINT], [A.CREATE_RECOVERY_VM], [A.RESTORE_DISK], [A.START_RECOVERY_VM], [A.CHECK_RECOVERY_BOOT],
            [A.FINISH_FAILOVER]]
    merge = [[A.SHIP_LOGS], [A.APPLY_LOGS], [A.ACKNOWLEDGE_LOGS]]
    assert planned == [[A.BEGIN_FAILOVER], [A.SHUT_DOWN_PRIMARY], *merge, *tail]
    assert unplanned == [[A.BEGIN_FAILOVER], *tail]
    assert drill_latest == [[A.BEGIN_FAILOVER], *merge, *tail]
    restore = planned_failover.KIND.build(failover_request("planned", "latest", THREE_DISKS))[-4]
    assert [(step.queue, step.params["disk_id"]) for step in restore] == [("host.dr1", "d0"), ("host.dr1", "d1"),
                                                                          ("host.dr1", "d2")]


def test_failback_minimize_downtime_stops_ready_and_full_download_completes_in_one_job():
    minimize = actions_of(failback.KIND.build(failback_request("minimize_downtime")))
    assert minimize[-1] == [A.FAILBACK_READY] and A.SWAP_DISKS not in {a for s in minimize for a in s}
    full = failback.KIND.build(failback_request("full_download", disks=THREE_DISKS))
    assert actions_of(full)[:3] == [[A.BEGIN_FAILBACK], [A.PREPARE_PRIMARY_VM], [A.SHUT_DOWN_RECOVERY_VM]]
    assert actions_of(full)[-2:] == [[A.SWAP_DISKS], [A.FINISH_FAILBACK]]
    assert [step.queue for step in full[4]] == ["host.dr1"] * 3, "differences are sent from the recovery host"
    completion = failback_completion.build(RecordRequest("item-1", "app01", "host.hv1", ONE_DISK, "fb-1",
                                                         target_host="hv1", recovery_host="dr1"))
    assert actions_of(completion) == [[A.BEGIN_FAILBACK], [A.SHUT_DOWN_RECOVERY_VM], [A.SEND_FINAL_CHANGES],
                                      [A.APPLY_FINAL_CHANGES], [A.SWAP_DISKS], [A.FINISH_FAILBACK]]
    assert completion[0][0].params["completing"] is True


def test_cancel_failover_starts_the_primary_again_only_after_a_planned_failover():
    request = RecordRequest("item-1", "app01", "host.hv1", ONE_DISK, "fo-1", target_host="dr1")
    planned = actions_of(cancel_failover.build(replace(request, record_kind=FailoverKind.PLANNED)))
    unplanned = actions_of(cancel_failover.build(replace(request, record_kind=FailoverKind.UNPLANNED)))
    assert planned == [[A.DELETE_RECOVERY_VM], [A.RESUME_PRIMARY], [A.FINISH_CANCEL]]
    assert unplanned == [[A.DELETE_RECOVERY_VM], [A.FINISH_CANCEL]]


def test_a_plan_runs_its_groups_in_order_with_the_vms_of_a_group_side_by_side():
    web = [replace(failover_request("planned", "latest"), item_id=f"web-{n}", vm=f"web{n}", label=f"web{n}")
           for n in range(2)]
    db = replace(failover_request("planned", "latest", THREE_DISKS), item_id="db", vm="db", label="db")
    request = recovery_plan.PlanRequest("plan-1", "tiers", "planned_failover", (
        recovery_plan.PlanGroup("db", (), (db,), ({"kind": "script", "name": "check", "script": "check-db",
                                                        "args": {"mode": "quick"}, "timeout_s": 60},)),
        recovery_plan.PlanGroup("web", ({"kind": "manual", "name": "dns", "instructions": "switch DNS"},),
                                tuple(web), ()),
    ))
    kind = recovery_plan.KINDS[PlanOperation.PLANNED_FAILOVER]
    stages = kind.build(request)
    assert stage_actions(stages) <= kind.actions
    vm_stages = len(planned_failover.KIND.build(db))
    assert len(stages) == vm_stages + 1 + 1 + vm_stages, "db's stages, its after script, web's manual, web's"
    assert [step.action for step in stages[vm_stages]] == [A.RUN_SCRIPT]
    assert stages[vm_stages][0].params == {"plan_id": "plan-1", "script": "check-db", "args": {"mode": "quick"},
                                           "timeout_s": 60.0}
    assert [step.action for step in stages[vm_stages + 1]] == [A.MANUAL_ACTION]
    web_begin = stages[vm_stages + 2]
    assert [step.name for step in web_begin] == ["web0: Begin failover", "web1: Begin failover"]
    assert stages[0][0].name == "db: Begin failover"
    assert kind.locks(request) == ["plan:plan-1", "item:db", "item:web-0", "item:web-1"]
    assert kind.params(request)["failover_ids"] == {"db": "fo-1", "web-0": "fo-1", "web-1": "fo-1"}


# ---- item states as data ------------------------------------------------------------------------------
def test_every_rollback_target_is_a_move_of_the_transition_table():
    for current, targets in ROLLBACKS.items():
        for target in targets.values():
            assert target in ALLOWED_TRANSITIONS[current], (current, target)


def test_every_kind_starts_from_and_moves_to_states_the_table_knows():
    for kind in KINDS.values():
        for state in kind.starts_from:
            assert state in ALLOWED_TRANSITIONS
        for state in kind.moves_to:
            assert any(state in targets for targets in ALLOWED_TRANSITIONS.values()), (kind.name, state)


@pytest.mark.parametrize(("state", "previous", "outcome", "expected"), [
    (S.FAILING_OVER, "protected", "failed", S.PROTECTED),
    (S.FAILING_OVER, "resynchronizing", "cancelled", S.RESYNC_REQUIRED),
    (S.FAILING_OVER, "failed_over", "failed", S.FAILED_OVER),
    (S.FAILING_OVER, None, "failed", S.PROTECTED),
    (S.FAILING_OVER, "not a state", "failed", S.PROTECTED),
    (S.FAILING_BACK, "failback_ready", "failed", S.FAILBACK_READY),
    (S.FAILING_BACK, "failback_ready", "cancelled", S.FAILOVER_COMMITTED),
    (S.FAILING_BACK, "failover_committed", "failed", S.FAILOVER_COMMITTED),
    (S.PROTECTED, "protected", "failed", S.PROTECTED),
])
def test_roll_back_returns_the_item_to_where_it_was(state, previous, outcome, expected):
    item_row = ProtectedItem(vm_id="vm", policy_id="p", recovery_storage="file:///x", replication_state=state)
    moved = roll_back(item_row, previous, outcome)
    assert item_row.replication_state is expected
    assert moved == (state is not expected)


def test_no_code_assigns_the_replication_state_outside_the_transition_function():
    found = subprocess.run(["grep", "-rn", "--include=*.py", "replication_state = ", "workflows", "tasks", "api",
                            "models", "sites"], capture_output=True, text=True, check=False, cwd=REPO)
    found = found.stdout.splitlines()
    assert [line for line in found if not line.startswith("models/protection.py")] == []


def test_importing_the_engine_and_the_kinds_imports_no_celery():
    probe = ("import sys, workflows.engine, workflows.kinds, workflows.scheduler; "
             "print(sorted(name for name in ('celery', 'kombu') if name in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                            cwd=REPO)
    assert result.stdout.strip() == "[]"
