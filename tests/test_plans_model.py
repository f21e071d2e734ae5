"""Recovery plans on a real SQLite file and a real PostgreSQL server: structure checked at creation (every
problem reported, nothing written), and the fabric checked before each operation."""
from __future__ import annotations

import pickle
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from datapath.errors import NonRecoverableError
from models import fabric, plans, protection
from models import policy as policies
from models.db import session_scope
from models.fabric import Host, NetworkMapping, VirtualMachine, VmNetworkAdapter
from models.plans import PlanError, PlanNotFoundError, PlanOperation, RecoveryPlan
from models.protection import ProtectedItem, ReplicationState
from sites.planscripts import write_registry

DISK = {"name": "disk0", "file": "disk0.raw", "size": 1 << 20, "format": "raw"}
S = ReplicationState
# The moves protect_vm's enabling_protection takes to reach each state the tests need.
PATHS = {
    S.ENABLING_PROTECTION: [],
    S.PROTECTED: [S.INITIAL_REPLICATION, S.PROTECTED],
    S.RESYNC_REQUIRED: [S.INITIAL_REPLICATION, S.PROTECTED, S.RESYNC_REQUIRED],
    S.RESYNCHRONIZING: [S.INITIAL_REPLICATION, S.PROTECTED, S.RESYNC_REQUIRED, S.RESYNCHRONIZING],
    S.FAILED_OVER: [S.INITIAL_REPLICATION, S.PROTECTED, S.FAILING_OVER, S.FAILED_OVER],
}


# ---- helpers ---------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def registered_scripts(tmp_path, monkeypatch) -> None:
    """The scripts an administrator registered (ASR_PLAN_SCRIPTS_DIR): plans may name only these."""
    folder = tmp_path / "plan-scripts"
    folder.mkdir()
    write_registry(folder, {
        "check-db": ("#!/bin/sh\nexit 0\n", {"timeout_s": 120, "args": {"mode": "quick|full"}}),
        "switch-dns": ("#!/bin/sh\nexit 0\n", {}),
    })
    monkeypatch.setenv("ASR_PLAN_SCRIPTS_DIR", str(folder))
    monkeypatch.setenv("ASR_STORAGE_ROOTS", "/srv/recovery")  # the local recovery storage these tests name


def counts(engine: Engine) -> dict[str, int]:
    with Session(engine) as session:
        return {
            table.__tablename__: session.exec(select(sa.func.count()).select_from(table)).one()
            for table in (RecoveryPlan, VirtualMachine, ProtectedItem, NetworkMapping)
        }


def add_vm(session: Session, host: Host, name: str, networks: tuple[str, ...] = ("corp",)) -> VirtualMachine:
    adapters = [{"name": f"nic{n}", "vm_network": network} for n, network in enumerate(networks)]
    return fabric.add_vm(session, host, name, [DISK], adapters)


def protect(session: Session, vm: VirtualMachine, state: ReplicationState = S.PROTECTED) -> ProtectedItem:
    policy = session.exec(select(policies.ReplicationPolicy)).first() or policies.create_policy(session, "every-5-min")
    item = protection.protect_vm(session, vm, policy, recovery_storage="file:///srv/recovery")
    for step in PATHS[state]:
        protection.transition(item, step)
    session.add(item)
    session.flush()
    return item


def build_fabric(engine: Engine) -> dict[str, str]:
    """A Hyper-V site (host hv01, mapping of 'corp') and a VMM cloud (host hv02, mapping of 'vmm-corp'),
    with protected VMs web01, web02 (two adapters), app01 on hv01 and db01 on hv02; VM ids by name."""
    with session_scope(engine) as session:
        site = fabric.create_site(session, "primary")
        hv01, _key = fabric.register_host(session, "hv01", "/srv/hosts/hv01", site=site)
        cloud = fabric.create_cloud(session, fabric.create_vmm_server(session, "vmm01"), "gold")
        hv02, _key = fabric.register_host(session, "hv02", "/srv/hosts/hv02", cloud=cloud)
        fabric.add_network_mapping(session, "corp", "recovery-corp", "10.1.0.0/24", site=site)
        fabric.add_network_mapping(session, "backup", "recovery-backup", "10.2.0.0/24", site=site)
        fabric.add_network_mapping(session, "vmm-corp", "recovery-vmm", "10.3.0.0/24", cloud=cloud)
        vms = [
            add_vm(session, hv01, "web01"), add_vm(session, hv01, "web02", ("corp", "backup")),
            add_vm(session, hv01, "app01"), add_vm(session, hv02, "db01", ("vmm-corp",)),
        ]
        for vm in vms:
            protect(session, vm)
        return {vm.name: vm.id for vm in vms}


def three_groups(ids: dict[str, str]) -> list[dict]:
    return [
        {"name": "databases", "vms": [ids["db01"]],
         "before": [{"kind": "manual", "name": "stop-batch", "instructions": "Stop the nightly batch jobs."}],
         "after": [{"kind": "script", "name": "check-db", "script": "check-db", "args": {"mode": "quick"},
                    "timeout_s": 60}]},
        {"name": "applications", "vms": ["app01"]},  # by name: stored as its id
        {"name": "web", "vms": ["hv01/web01", ids["web02"]], "before": [],
         "after": [{"kind": "script", "name": "dns", "script": "switch-dns"},
                   {"kind": "manual", "name": "smoke-test", "instructions": "Open the shop and buy something."}]},
    ]


def refused(engine: Engine, attempt: Callable[[Session], object]) -> PlanError:
    """The PlanError `attempt` raises in a session scope, checking it wrote nothing."""
    before = counts(engine)
    with pytest.raises(PlanError) as raised:
        with session_scope(engine) as session:
            attempt(session)
    assert counts(engine) == before
    assert isinstance(raised.value, NonRecoverableError)
    for problem in raised.value.problems:
        assert problem in str(raised.value)
    return raised.value


def set_state(engine: Engine, vm_id: str, state: ReplicationState) -> None:
    with session_scope(engine) as session:
        item = session.exec(select(ProtectedItem).where(ProtectedItem.vm_id == vm_id)).one()
        item.replication_state = state
        session.add(item)


# ---- creating, reading, deleting -------------------------------------------------------------------
def test_a_three_group_plan_with_actions_round_trips(engine: Engine) -> None:
    ids = build_fabric(engine)
    with session_scope(engine) as session:
        plan = plans.create_plan(session, "shop-dr", three_groups(ids), description="The whole web shop")
        plan_id = plan.id
    with session_scope(engine) as session:
        for key in (plan_id, "shop-dr"):
            plan = plans.get_plan(session, key)
            assert (plan.id, plan.name, plan.description) == (plan_id, "shop-dr", "The whole web shop")
        assert plan.created_at.tzinfo == UTC
        assert abs(plan.created_at - datetime.now(UTC)) < timedelta(minutes=1)
        assert plan.groups == [
            {"name": "databases", "vms": [ids["db01"]],
             "before": [{"kind": "manual", "name": "stop-batch", "instructions": "Stop the nightly batch jobs."}],
             "after": [{"kind": "script", "name": "check-db", "script": "check-db", "args": {"mode": "quick"},
                        "timeout_s": 60}]},
            {"name": "applications", "vms": [ids["app01"]], "before": [], "after": []},
            {"name": "web", "vms": [ids["web01"], ids["web02"]], "before": [],
             "after": [{"kind": "script", "name": "dns", "script": "switch-dns", "args": {}, "timeout_s": 300.0},
                       {"kind": "manual", "name": "smoke-test", "instructions": "Open the shop and buy something."}]},
        ]
        items = {item.vm_id: item.id for item in session.exec(select(ProtectedItem))}
        assert plans.plan_items(session, plan) == [
            [items[ids["db01"]]], [items[ids["app01"]]], [items[ids["web01"]], items[ids["web02"]]],
        ]
        plans.create_plan(session, "app-only", [{"name": "g", "vms": ["app01"]}])
    with session_scope(engine) as session:
        assert [p.name for p in plans.list_plans(session)] == ["app-only", "shop-dr"]
        assert plans.delete_plan(session, "shop-dr").id == plan_id
    with session_scope(engine) as session:
        assert [p.name for p in plans.list_plans(session)] == ["app-only"]
        for key in (plan_id, "shop-dr"):
            with pytest.raises(PlanNotFoundError, match=f"recovery plan '{key}' not found") as raised:
                plans.get_plan(session, key)
            assert isinstance(raised.value, NonRecoverableError)
        with pytest.raises(PlanNotFoundError):
            plans.delete_plan(session, "shop-dr")
    assert counts(engine)["protected_item"] == 4  # deleting a plan leaves its VMs protected


# Each case: the groups (or a function of the VM ids giving them), and what the one problem says.
STRUCTURE_CASES: list[tuple[object, str]] = [
    ("not-a-list", "groups must be a list of groups, got str"),
    ([], "a plan needs at least one group"),
    (["web01"], "group 1 must be an object, got 'web01'"),
    ([{"name": "g", "vms": []}], "group 'g' needs a non-empty list of VMs, got []"),
    ([{"name": "g"}], "group 'g' needs a non-empty list of VMs, got None"),
    ([{"name": "g", "vms": "web01"}], "group 'g' needs a non-empty list of VMs, got 'web01'"),
    ([{"name": "g", "vms": [7]}], "group 'g': a VM is given by its id or name, got 7"),
    ([{"name": "has space", "vms": ["web01"]}], "group 1: invalid group name 'has space'"),
    ([{"vms": ["web01"]}], "group 1: invalid group name None"),
    ([{"name": "g", "vms": ["web01"]}, {"name": "g", "vms": ["app01"]}], "group name 'g' is used twice"),
    ([{"name": "g", "vms": ["web01"], "befor": []}], "group 'g': unknown keys befor"),
    ([{"name": "g", "vms": ["ghost"]}], "group 'g': VM 'ghost' not found"),
    ([{"name": "g", "vms": ["hv02/web01"]}], "group 'g': VM 'web01' not found on host 'hv02'"),
    ([{"name": "g", "vms": ["web01", "web01"]}], "VM 'web01' on host 'hv01' is listed twice (in group 'g')"),
    (lambda ids: [{"name": "a", "vms": ["web01"]}, {"name": "b", "vms": [ids["web01"]]}],
     "VM 'web01' on host 'hv01' is listed twice (in group 'a' and group 'b'): a VM fails over once"),
    ([{"name": "g", "vms": ["web01"], "before": {"kind": "manual"}}], "group 'g', before: actions must be a list"),
    ([{"name": "g", "vms": ["web01"], "after": ["reboot"]}], "group 'g', after action 1 must be an object"),
    ([{"name": "g", "vms": ["web01"], "before": [{"kind": "email", "name": "tell"}]}],
     "group 'g', before action 'tell': kind must be one of script, manual, got 'email'"),
    ([{"name": "g", "vms": ["web01"], "before": [{"kind": "manual", "instructions": "x"}]}],
     "group 'g', before action 1: invalid action name None"),
    ([{"name": "g", "vms": ["web01"], "before": [{"kind": "manual", "name": "m", "instructions": ""}]}],
     "group 'g', before action 'm': instructions must be non-empty text"),
    ([{"name": "g", "vms": ["web01"], "before": [{"kind": "manual", "name": "m", "instructions": "x" * 4097}]}],
     "group 'g', before action 'm': instructions must be non-empty text of at most 4096 characters"),
    ([{"name": "g", "vms": ["web01"],
       "before": [{"kind": "manual", "name": "m", "instructions": "x", "command": ["x"]}]}],
     "group 'g', before action 'm': unknown keys command"),
    ([{"name": "g", "vms": ["web01"], "before": [{"kind": "script", "name": "s"}]}],
     "group 'g', before action 's': a script action needs \"script\": the name of a registered script"),
    *[
        ([{"name": "g", "vms": ["web01"], "before": [{"kind": "script", "name": "s", "command": command}]}],
         "group 'g', before action 's': a command line (command) is not accepted: a script action names a script "
         "an administrator registered")
        for command in (["/bin/sh", "-c", "id; env"], ["check-db"], [], "/bin/true")
    ],
    ([{"name": "g", "vms": ["web01"], "before": [{"kind": "script", "name": "s", "script": "check-db",
                                                   "args": {"mode": "quick"}, "command": ["check-db"]}]}],
     "group 'g', before action 's': a command line (command) is not accepted"),
    ([{"name": "g", "vms": ["web01"], "before": [{"kind": "script", "name": "s", "script": "rm-rf"}]}],
     "group 'g', before action 's': script 'rm-rf' is not registered (registered: check-db, switch-dns)"),
    ([{"name": "g", "vms": ["web01"], "before": [{"kind": "script", "name": "s", "script": "../bin/sh"}]}],
     "group 'g', before action 's': script '../bin/sh' is not registered"),
    ([{"name": "g", "vms": ["web01"], "before": [{"kind": "script", "name": "s", "script": "check-db"}]}],
     "group 'g', before action 's': script 'check-db' needs argument 'mode'"),
    ([{"name": "g", "vms": ["web01"],
       "before": [{"kind": "script", "name": "s", "script": "check-db", "args": {"mode": "quick; id"}}]}],
     "group 'g', before action 's': argument 'mode' must match 'quick|full', got 'quick; id'"),
    ([{"name": "g", "vms": ["web01"],
       "before": [{"kind": "script", "name": "s", "script": "check-db", "args": {"mode": 1}}]}],
     "group 'g', before action 's': argument 'mode' must be text of at most 1024 characters"),
    ([{"name": "g", "vms": ["web01"],
       "before": [{"kind": "script", "name": "s", "script": "switch-dns", "args": {"zone": "x"}}]}],
     "group 'g', before action 's': script 'switch-dns' has no argument zone (it declares none)"),
    ([{"name": "g", "vms": ["web01"],
       "before": [{"kind": "script", "name": "s", "script": "switch-dns", "args": ["x"]}]}],
     "group 'g', before action 's': args must be an object of argument values"),
    *[
        ([{"name": "g", "vms": ["web01"],
           "after": [{"kind": "script", "name": "s", "script": "check-db", "args": {"mode": "full"},
                      "timeout_s": bad}]}],
         f"group 'g', after action 's': timeout_s must be 1 to 120 seconds (script 'check-db''s limit), got {bad!r}")
        for bad in (0, 0.5, 121, 86401, -1, "60", True, None, float("nan"), float("inf"))
    ],
    ([{"name": "g", "vms": ["web01"], "before": [{"kind": "manual", "name": "m", "instructions": "x"}],
       "after": [{"kind": "script", "name": "m", "script": "switch-dns"}]}],
     "group 'g': action name 'm' is used twice"),
]


def test_each_structural_rule_is_refused_with_a_clear_message_and_nothing_written(engine: Engine) -> None:
    ids = build_fabric(engine)
    for groups, message in STRUCTURE_CASES:
        groups = groups(ids) if callable(groups) else groups
        error = refused(engine, lambda session, groups=groups: plans.create_plan(session, "shop-dr", groups))
        assert len(error.problems) == 1 and error.problems[0].startswith(message), (groups, error.problems)
        assert str(error).startswith("recovery plan 'shop-dr' cannot be created: 1 problem: ")
    good = [{"name": "g", "vms": ["web01"]}]
    for bad_name, message in [
        ("has space", "invalid recovery plan name 'has space'"), ("x" * 65, "invalid recovery plan name"),
        (None, "invalid recovery plan name None"),
    ]:
        error = refused(engine, lambda session, bad_name=bad_name: plans.create_plan(session, bad_name, good))
        assert len(error.problems) == 1 and error.problems[0].startswith(message)
    error = refused(engine, lambda session: plans.create_plan(session, "shop-dr", good, description="d" * 1025))
    assert error.problems == ["description must be text of at most 1024 characters"]
    with session_scope(engine) as session:
        plan_id = plans.create_plan(session, "shop-dr", good).id
    error = refused(engine, lambda session: plans.create_plan(session, "shop-dr", [{"name": "g", "vms": ["app01"]}]))
    assert error.problems == [f"a recovery plan named 'shop-dr' already exists (id {plan_id})"]


def test_every_structural_problem_is_reported_at_once(engine: Engine) -> None:
    build_fabric(engine)
    groups = [
        {"name": "g1", "vms": ["web01", "ghost"],
         "before": [{"kind": "script", "name": "s", "script": "check-db", "args": {"mode": "x"}, "timeout_s": 0}]},
        {"name": "g2", "vms": []},
        {"name": "g3", "vms": ["hv01/web01"], "after": [{"kind": "manual", "name": "m"}]},
    ]
    error = refused(engine, lambda session: plans.create_plan(session, "bad plan", groups))
    assert error.problems == [
        "invalid recovery plan name 'bad plan': use 1 to 64 letters, digits, '.', '_' or '-', starting with a letter "
        "or digit",
        "group 'g1', before action 's': argument 'mode' must match 'quick|full', got 'x'",
        "group 'g1', before action 's': timeout_s must be 1 to 120 seconds (script 'check-db''s limit), got 0",
        "group 'g2' needs a non-empty list of VMs, got []",
        "group 'g3', after action 'm': instructions must be non-empty text of at most 4096 characters, got None",
        "group 'g1': VM 'ghost' not found",
        "VM 'web01' on host 'hv01' is listed twice (in group 'g1' and group 'g3'): a VM fails over once",
    ]
    assert str(error).startswith("recovery plan 'bad plan' cannot be created: 7 problems: invalid recovery plan")
    copy = pickle.loads(pickle.dumps(error))  # errors travel between worker processes
    assert (type(copy), str(copy), copy.problems) == (PlanError, str(error), error.problems)


def test_vms_by_id_name_or_host_and_name(engine: Engine) -> None:
    ids = build_fabric(engine)
    with session_scope(engine) as session:
        hv02 = session.exec(select(Host).where(Host.name == "hv02")).one()
        twin = add_vm(session, hv02, "app01")
    error = refused(engine, lambda session: plans.create_plan(session, "p", [{"name": "g", "vms": ["app01"]}]))
    assert error.problems == ["group 'g': VM name 'app01' exists on hosts hv01, hv02: name the host"]
    with session_scope(engine) as session:
        plan = plans.create_plan(session, "p", [{"name": "g", "vms": ["hv02/app01", "hv01/app01", ids["web01"]]}])
        assert plan.groups[0]["vms"] == [twin.id, ids["app01"], ids["web01"]]


def test_a_plan_holds_100_vms_in_20_groups_and_no_more(engine: Engine) -> None:
    with session_scope(engine) as session:
        site = fabric.create_site(session, "primary")
        host, _key = fabric.register_host(session, "hv01", "/srv/hosts/hv01", site=site)
        fabric.add_network_mapping(session, "corp", "recovery-corp", "10.1.0.0/24", site=site)
        names = [f"vm{n:03d}" for n in range(101)]
        for name in names:
            protect(session, add_vm(session, host, name))
    hundred = [{"name": f"g{g:02d}", "vms": names[g * 5:(g + 1) * 5]} for g in range(20)]
    assert sum(len(group["vms"]) for group in hundred) == 100
    with session_scope(engine) as session:
        plan = plans.create_plan(session, "everything", hundred)
    with session_scope(engine) as session:
        plan = plans.get_plan(session, "everything")
        assert len(plan.groups) == 20 and sum(len(group["vms"]) for group in plan.groups) == 100
        plans.validate_plan(session, plan, PlanOperation.TEST_FAILOVER)
        assert [len(group) for group in plans.plan_items(session, plan)] == [5] * 20
    too_many_vms = [*hundred[:-1], {**hundred[-1], "vms": names[95:]}]
    error = refused(engine, lambda session: plans.create_plan(session, "too-big", too_many_vms))
    assert error.problems == ["a plan has at most 100 VMs, got 101"]
    too_many_groups = [*hundred, {"name": "g20", "vms": ["vm100"]}]
    error = refused(engine, lambda session: plans.create_plan(session, "too-big", too_many_groups))
    assert error.problems == ["a plan has at most 20 groups, got 21", "a plan has at most 100 VMs, got 101"]
    error = refused(engine, lambda session: plans.create_plan(
        session, "too-big", [{"name": f"g{g:02d}", "vms": [names[g]]} for g in range(21)]
    ))
    assert error.problems == ["a plan has at most 20 groups, got 21"]


# ---- before a run ------------------------------------------------------------------------------------
def test_a_plan_on_a_good_fabric_passes_every_failover(engine: Engine) -> None:
    ids = build_fabric(engine)
    with session_scope(engine) as session:
        plan = plans.create_plan(session, "shop-dr", three_groups(ids))
        for operation in ("test_failover", PlanOperation.PLANNED_FAILOVER, PlanOperation.UNPLANNED_FAILOVER):
            plans.validate_plan(session, plan, operation)
    # A replica needing or getting a resync can still fail over to the points it has, unplanned only.
    set_state(engine, ids["app01"], S.RESYNC_REQUIRED)
    set_state(engine, ids["web01"], S.RESYNCHRONIZING)
    with session_scope(engine) as session:
        plans.validate_plan(session, plans.get_plan(session, "shop-dr"), PlanOperation.UNPLANNED_FAILOVER)
    error = refused(engine, lambda s: plans.validate_plan(s, plans.get_plan(s, "shop-dr"), "planned_failover"))
    assert error.problems == [
        "VM 'app01' on host 'hv01' is resync_required; planned failover needs protected",
        "VM 'web01' on host 'hv01' is resynchronizing; planned failover needs protected",
    ]
    assert str(error).startswith("recovery plan 'shop-dr' cannot run planned failover: 2 problems: ")


def test_validation_reports_every_problem_at_once(engine: Engine) -> None:
    ids = build_fabric(engine)
    with session_scope(engine) as session:
        hv01 = session.exec(select(Host).where(Host.name == "hv01")).one()
        hv02 = session.exec(select(Host).where(Host.name == "hv02")).one()
        unprotected = add_vm(session, hv01, "batch01")
        # 'corp' is mapped for the site of hv01, not for the cloud of hv02.
        misplaced = add_vm(session, hv02, "cache01", ("vmm-corp", "corp"))
        protect(session, misplaced)
        unmapped = add_vm(session, hv01, "mail01", ("corp", "dmz"))
        protect(session, unmapped)
        plan = plans.create_plan(session, "shop-dr", [
            {"name": "first", "vms": [ids["db01"], "batch01"]},
            {"name": "second", "vms": ["app01", "cache01", "mail01", "web01"]},
        ])
    set_state(engine, ids["app01"], S.RESYNC_REQUIRED)
    set_state(engine, ids["web01"], S.FAILED_OVER)
    expected = [
        "VM 'batch01' on host 'hv01' is not protected",
        "VM 'app01' on host 'hv01' is resync_required; test failover needs protected",
        "VM 'cache01' on host 'hv02', network adapter 'nic1': VM network 'corp' has no network mapping in VMM "
        "cloud 'gold'",
        "VM 'mail01' on host 'hv01', network adapter 'nic1': VM network 'dmz' has no network mapping in site "
        "'primary'",
        "VM 'web01' on host 'hv01' is failed_over; test failover needs protected",
    ]
    error = refused(engine, lambda s: plans.validate_plan(s, plans.get_plan(s, "shop-dr"), "test_failover"))
    assert error.problems == expected
    assert str(error).startswith("recovery plan 'shop-dr' cannot run test failover: 5 problems: ")
    error = refused(engine, lambda s: plans.validate_plan(s, plans.get_plan(s, "shop-dr"), "unplanned_failover"))
    assert error.problems == [
        expected[0], expected[2], expected[3],
        "VM 'web01' on host 'hv01' is failed_over; unplanned failover needs protected or resync_required or "
        "resynchronizing",
    ]
    with session_scope(engine) as session:
        with pytest.raises(PlanError) as raised:
            plans.plan_items(session, plans.get_plan(session, "shop-dr"))
        assert raised.value.problems == ["VM 'batch01' on host 'hv01' is not protected"]

    # Fixing each problem makes the plan pass.
    with session_scope(engine) as session:
        primary = session.exec(select(fabric.Site)).one()
        gold = session.exec(select(fabric.VmmCloud)).one()
        protect(session, session.get(VirtualMachine, unprotected.id))
        fabric.add_network_mapping(session, "corp", "recovery-corp", "10.4.0.0/24", cloud=gold)
        fabric.add_network_mapping(session, "dmz", "recovery-dmz", "10.5.0.0/24", site=primary)
    set_state(engine, ids["app01"], S.PROTECTED)
    set_state(engine, ids["web01"], S.PROTECTED)
    with session_scope(engine) as session:
        plan = plans.get_plan(session, "shop-dr")
        plans.validate_plan(session, plan, PlanOperation.TEST_FAILOVER)
        assert len(plans.plan_items(session, plan)[1]) == 4


def test_validation_finds_vms_removed_since_the_plan_was_made(engine: Engine) -> None:
    build_fabric(engine)
    with session_scope(engine) as session:
        hv01 = session.exec(select(Host).where(Host.name == "hv01")).one()
        gone_id = add_vm(session, hv01, "retired01").id
        protect(session, add_vm(session, hv01, "nonic01", ()))  # no adapter: nothing to map
        plans.create_plan(session, "p", [{"name": "g", "vms": ["retired01", "web01", "nonic01"]}])
    with session_scope(engine) as session:
        session.delete(session.get(VirtualMachine, gone_id))
    with session_scope(engine) as session:
        assert session.exec(select(VmNetworkAdapter).where(VmNetworkAdapter.vm_id == gone_id)).all() == []
    error = refused(engine, lambda s: plans.validate_plan(s, plans.get_plan(s, "p"), PlanOperation.TEST_FAILOVER))
    assert error.problems == [f"group 'g': VM id {gone_id} no longer exists"]
    with session_scope(engine) as session:
        with pytest.raises(PlanError, match=f"VM id {gone_id} \\(no longer exists\\) is not protected"):
            plans.plan_items(session, plans.get_plan(session, "p"))
    error = refused(engine, lambda s: plans.validate_plan(s, plans.get_plan(s, "p"), "rollback"))
    assert error.problems == ["unknown operation 'rollback': one of test_failover, planned_failover, "
                              "unplanned_failover, failback"]


def test_failback_starts_from_a_committed_failover(engine: Engine) -> None:
    ids = build_fabric(engine)
    with session_scope(engine) as session:
        plans.create_plan(session, "shop-dr", three_groups(ids))
    error = refused(engine, lambda s: plans.validate_plan(s, plans.get_plan(s, "shop-dr"), PlanOperation.FAILBACK))
    assert error.problems == [
        f"VM {name!r} on host {host!r} is protected; failback needs failover_committed"
        for name, host in (("db01", "hv02"), ("app01", "hv01"), ("web01", "hv01"), ("web02", "hv01"))
    ]
    committed = ReplicationState("failover_committed")  # the state a committed failover leaves items in
    for name in ids:
        set_state(engine, ids[name], committed)
    with session_scope(engine) as session:
        plans.validate_plan(session, plans.get_plan(session, "shop-dr"), PlanOperation.FAILBACK)
    error = refused(engine, lambda s: plans.validate_plan(s, plans.get_plan(s, "shop-dr"), "test_failover"))
    assert error.problems == [
        f"VM {name!r} on host {host!r} is failover_committed; test failover needs protected"
        for name, host in (("db01", "hv02"), ("app01", "hv01"), ("web01", "hv01"), ("web02", "hv01"))
    ]


# ---- registered scripts ------------------------------------------------------------------------------
def test_script_actions_are_refused_where_no_scripts_are_registered(engine: Engine, monkeypatch) -> None:
    build_fabric(engine)
    monkeypatch.delenv("ASR_PLAN_SCRIPTS_DIR")
    groups = [{"name": "g", "vms": ["web01"], "after": [{"kind": "script", "name": "s", "script": "check-db",
                                                         "args": {"mode": "quick"}}]}]
    error = refused(engine, lambda session: plans.create_plan(session, "p", groups))
    assert error.problems[0].startswith("no plan scripts are registered here (ASR_PLAN_SCRIPTS_DIR is not set)")
    with session_scope(engine) as session:  # a plan without scripts needs no registry
        plans.create_plan(session, "p", [{"name": "g", "vms": ["web01"]}])


def test_a_broken_registry_refuses_plans_with_scripts_and_says_why(engine: Engine, tmp_path, monkeypatch) -> None:
    build_fabric(engine)
    folder = tmp_path / "broken"
    folder.mkdir()
    write_registry(folder, {"ok": ("#!/bin/sh\n", {}), "open": ("#!/bin/sh\n", {"args": {"x": "("}})})
    (folder / "ok").chmod(0o777)  # anyone may change it: not a script an administrator vouches for
    (folder / "stray").write_text("#!/bin/sh\n")
    with open(folder / "scripts.toml", "a") as manifest:
        manifest.write('["missing"]\n["link"]\n')
    (folder / "link").symlink_to("/bin/sh")
    monkeypatch.setenv("ASR_PLAN_SCRIPTS_DIR", str(folder))
    groups = [{"name": "g", "vms": ["web01"], "after": [{"kind": "script", "name": "s", "script": "ok"}]}]
    error = refused(engine, lambda session: plans.create_plan(session, "p", groups))
    message = error.problems[0]
    assert message.startswith("the registered plan scripts cannot be read: ")
    for expected in ("script 'ok': ", "may be changed by users other than its owner", "script 'open': argument 'x': "
                     "bad pattern", "script 'missing': ", "does not exist", "script 'link': ", "is not a regular file"):
        assert expected in message, (expected, message)


def test_a_plan_stored_with_a_command_line_is_refused_when_it_runs(engine: Engine) -> None:
    """Plans stored before scripts were registered held an argv: such a plan never runs (validate_plan, which
    every run goes through, says why), whatever the fabric."""
    ids = build_fabric(engine)
    with session_scope(engine) as session:
        session.add(RecoveryPlan(name="old", groups=[
            {"name": "g", "vms": [ids["web01"]], "before": [],
             "after": [{"kind": "script", "name": "leak", "command": ["sh", "-c", "id; env"], "timeout_s": 300}]}]))
    with session_scope(engine) as session:
        plan = plans.get_plan(session, "old")
        with pytest.raises(PlanError) as raised:
            plans.validate_plan(session, plan, PlanOperation.TEST_FAILOVER)
    assert raised.value.problems == [
        f"group 'g', after action 'leak' was stored as a command line and will not run: {plans.LEGACY_COMMAND}; "
        f"create the plan again"]


def test_a_stored_plan_whose_script_is_no_longer_registered_is_refused_when_it_runs(engine: Engine, tmp_path,
                                                                                    monkeypatch) -> None:
    ids = build_fabric(engine)
    with session_scope(engine) as session:
        plans.create_plan(session, "shop-dr", three_groups(ids))
    folder = tmp_path / "fewer"
    folder.mkdir()
    write_registry(folder, {"check-db": ("#!/bin/sh\n", {"timeout_s": 30, "args": {"mode": "full"}})})
    monkeypatch.setenv("ASR_PLAN_SCRIPTS_DIR", str(folder))
    with session_scope(engine) as session:
        with pytest.raises(PlanError) as raised:
            plans.validate_plan(session, plans.get_plan(session, "shop-dr"), PlanOperation.TEST_FAILOVER)
    assert raised.value.problems == [
        "group 'databases', after action 'check-db': argument 'mode' must match 'full', got 'quick'",
        "group 'databases', after action 'check-db': timeout_s 60 is above script 'check-db''s limit of 30 s",
        "group 'web', after action 'dns': script 'switch-dns' is no longer registered",
    ]
