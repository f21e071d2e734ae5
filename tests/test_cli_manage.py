"""The verbs that change and remove what an operator registered, and `asr replicate`, run as an operator runs
them: the installed `asr` in subprocesses against a whole deployment (tests/recovery_site.py: a private
redis-server, SQLite, real Celery workers and beat, a primary host `host1` and a recovery host `dr1`).

A lost host key is replaced with `asr host rekey` (the real agent launcher refuses the old key and starts with
the new one); `asr replicate` runs a delta cycle whose replica is then checked byte for byte; every removal and
edit is refused, with exit 2 and a message naming what depends on the thing, while something does, and the
registrations in the database are then exactly as before.

Time is not scaled here: the protected VM's policy copies every 15 minutes, so beat starts no delta cycle of it
while the test runs and every cycle is the test's own.
"""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from recovery_site import RecoverySite
from sqlmodel import select
from test_cli_ops import ASR, asr, asr_json, asr_many, check_refused, job_id_of, operator_jobs, refused

from api import service
from api.cli import main
from models.db import session_scope
from models.fabric import Host as HostRow
from models.fabric import NetworkMapping, Site, VirtualDisk, VirtualMachine, VmNetworkAdapter, verify_host_key
from models.jobs import Job
from models.plans import RecoveryPlan
from models.policy import ReplicationPolicy
from models.protection import ProtectedItem
from sites.host import Host
from sites.localservices import CeleryProcess, stop_all

# Whole deployments (workers, beat, Redis) or real guests per test: out of the quick loop (-m "not slow").
pytestmark = pytest.mark.slow

DISKS = [("disk0", "8M", "vhd"), ("disk1", "4M", "raw")]
JOB_TIMEOUT = 60


def registrations() -> dict[str, list[Any]]:
    """Every registration a verb here may change or remove, as plain values: what "changes nothing" compares
    (without the columns workers and beat update as they run: heartbeats, health, times)."""
    with session_scope() as session:
        def rows(model: Any, *columns: str) -> list[tuple[Any, ...]]:
            return sorted(tuple(json.dumps(getattr(row, column), default=str) for column in columns)
                          for row in session.exec(select(model)))

        return {
            "sites": rows(Site, "id", "name", "description"),
            "hosts": rows(HostRow, "id", "name", "site_id", "root", "key_hash"),
            "vms": rows(VirtualMachine, "id", "host_id", "name"),
            "disks": rows(VirtualDisk, "id", "vm_id", "name", "size"),
            "adapters": rows(VmNetworkAdapter, "id", "vm_id", "vm_network"),
            "mappings": rows(NetworkMapping, "id", "site_id", "source_network", "recovery_network"),
            "policies": [tuple(json.dumps(policy.model_dump(), default=str, sort_keys=True))
                         for policy in session.exec(select(ReplicationPolicy).order_by(ReplicationPolicy.id))],
            "plans": rows(RecoveryPlan, "id", "name", "description", "groups"),
            "items": rows(ProtectedItem, "id", "vm_id", "policy_id", "recovery_host_id", "replication_state"),
        }


def vm_id(name: str) -> str:
    with session_scope() as session:
        return session.exec(select(VirtualMachine).where(VirtualMachine.name == name)).one().id


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory):
    with RecoverySite(tmp_path_factory.mktemp("manage"), recovery_host_names=("dr1",), time_scale=1) as deployment:
        yield deployment


@pytest.fixture(scope="module")
def fabric(site: RecoverySite) -> dict[str, Any]:
    """Through the CLI: a site `branch` with a host `edge` (no agent runs for it) and its own mapping of
    `default`; VMs `web1` (protected under policy `slow` with recovery host dr1) and `spare` on host1, `lonely`
    on edge; a policy `unused`; a plan `spares` naming `spare`."""
    driver = site.host("host1")
    driver.create_vm("web1", DISKS)
    driver.write_initial_data("web1", seed=11, fraction=0.5)
    driver.create_vm("spare", [("disk0", "4M", "raw")])
    edge_root = site.workdir / "hosts" / "edge"
    edge_root.mkdir(parents=True)
    Host(edge_root, "edge").create_vm("lonely", [("disk0", "4M", "raw")])
    added = ""
    for batch in (
        [("site", "add", "branch"), ("vm", "add", "host1", "web1"), ("vm", "add", "host1", "spare"),
         ("policy", "add", "slow", "--copy-frequency", "900", "--office-days", "none"),
         ("policy", "add", "unused", "--copy-frequency", "300")],
        [("host", "add", "edge", str(edge_root), "--site", "branch"),
         ("network", "add", "default", "recovery-branch", "10.30.0.0/24", "--site", "branch")],
        [("vm", "add", "edge", "lonely")],
    ):
        for proc in asr_many(site, batch):
            assert proc.returncode == 0, f"{' '.join(proc.args)}: {proc.stderr}{proc.stdout}"
            if proc.args[1:3] == ["host", "add"]:
                added = proc.stdout
    plan_file = site.workdir / "spares.json"
    plan_file.write_text(json.dumps([{"name": "spares", "vms": ["host1/spare"]}]))
    asr(site, "plan", "create", "spares", "--file", str(plan_file))
    asr(site, "protect", "web1", "--policy", "slow", "--recovery-storage", site.recovery_storage,
        "--recovery-host", "dr1", "--wait")
    web1 = vm_id("web1")
    site.vm_hosts[web1] = "host1"
    key = next(line.split(":", 1)[1].strip() for line in added.splitlines() if line.startswith("registration key"))
    return {"edge_key": key, "edge_root": edge_root, "web1": web1}


def replica_differs(site: RecoverySite, vm: str) -> bool:
    """Whether any disk of the VM differs from its replica (read in this process from both sides)."""
    try:
        site.verify_replica(vm)
    except AssertionError:
        return True
    return False


def in_process(*args: str) -> Any:
    """`asr ARGS` run in this process (the same verbs as the console script, without its second of imports)."""
    return CliRunner().invoke(main, list(args))


def check_refused_here(result: Any, needle: str) -> None:
    """As check_refused, for `in_process`: exit 2, the reason on stderr, nothing on stdout, no traceback."""
    what = f"exit {result.exit_code}: {result.stderr}{result.stdout}"
    assert result.exit_code == 2 and result.stdout == "" and isinstance(result.exception, SystemExit), what
    assert needle.lower() in result.stderr.lower(), what


def shown(*args: str) -> Any:
    result = in_process(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# ---- no deployment needed ---------------------------------------------------------------------------------
def test_the_verbs_exist_with_help():
    runner = CliRunner()
    for verb in ("host rekey", "host set", "host remove", "site set", "site remove", "vm set", "vm remove",
                 "network set", "network remove",
                 "policy set", "policy remove", "plan update", "plan remove", "replicate", "delete-points"):
        result = runner.invoke(main, [*verb.split(), "--help"])
        assert result.exit_code == 0 and "Usage:" in result.output, (verb, result.output)
    # `policy set` takes every option of `policy add`, and can turn off-hours-only checks either way.
    add = {opt for param in main.commands["policy"].commands["add"].params for opt in param.opts}
    changed = {opt for param in main.commands["policy"].commands["set"].params for opt in param.opts}
    assert add - {"--consistency-check-anytime"} <= changed
    assert {"--consistency-check-anytime", "--consistency-check-off-hours"} <= changed | {
        opt for param in main.commands["policy"].commands["set"].params for opt in param.secondary_opts}


# ---- a delta cycle now ---------------------------------------------------------------------------------------
def test_replicate_runs_a_delta_cycle_now(site: RecoverySite, fabric: dict[str, Any]):
    web1 = fabric["web1"]
    points = len(asr_json(site, "points", "web1"))
    # Writes through the tracker that no cycle has sent yet: the replica is behind its source.
    driver = site.host("host1")
    driver.start_workload("web1", rate_mb_s=2.0, seed=5)
    time.sleep(1.5)
    driver.stop_workload("web1", timeout=10)
    assert replica_differs(site, web1)

    proc = asr(site, "replicate", "web1", "--wait")
    job_id = job_id_of(proc.stdout)
    assert "delta_replication of web1" in proc.stdout.splitlines()[0], proc.stdout
    assert proc.stdout.splitlines()[-1].startswith(f"job {job_id} (delta_replication) succeeded"), proc.stdout
    assert "done     Ship logs" in proc.stdout and "done     Apply logs" in proc.stdout
    assert len(asr_json(site, "points", "web1")) == points + 1
    site.verify_replica(web1)  # the replica equals its source, byte for byte

    # Refusals: a VM that is not protected, one that is unknown, and a cycle while one runs (here: queued on
    # host1's agent, stopped meanwhile); none starts a job.
    before = operator_jobs()
    refusals = asr_many(site, [("replicate", "spare"), ("replicate", "ghost")])
    check_refused(refusals[0], "not protected")
    check_refused(refusals[1], "ghost")
    site.stop_process("host-host1")
    try:
        pending = json.loads(asr(site, "replicate", "web1", "--json").stdout)
        jobs = len(asr_json(site, "jobs", "list", "--vm", "web1", "--limit", "200"))
        busy = asr(site, "replicate", "web1", check=False)
        check_refused(busy, f"already running: job {pending['job_id']}")
        # Nor is its definition changed while the job works on it (in this process: no need for another `asr`).
        changing = in_process("vm", "set", "web1", "--network", "nic0=backend")
        check_refused_here(changing, f"VM host1/web1 is busy with job {pending['job_id']}")
        assert site.host("host1").get_vm("web1").adapter("nic0").vm_network == "default"
        assert len(asr_json(site, "jobs", "list", "--vm", "web1", "--limit", "200")) == jobs
        assert operator_jobs() == before
        asr(site, "jobs", "cancel", pending["job_id"])
    finally:
        site.start_host_worker("host1")
    site.wait_idle(web1, JOB_TIMEOUT)


def test_delete_points_asks_first_and_keeps_the_latest(site: RecoverySite, fabric: dict[str, Any]):
    points = asr_json(site, "points", "web1")
    assert len(points) >= 2 and all(point["locked_until"] is None for point in points), points
    listed = asr(site, "points", "web1").stdout
    assert "LOCKED UNTIL" in listed.splitlines()[0], listed
    before = points[-1]["created_at"]
    # No answer at the terminal: nothing is done, exit 1 (as `asr unprotect`).
    asked = subprocess.run([ASR, "delete-points", "web1", "--before", before], input="", capture_output=True,
                           text=True, env=site.env, timeout=JOB_TIMEOUT)
    assert asked.returncode == 1 and "Delete the recovery points of web1 made before" in asked.stdout, asked
    check_refused(asr(site, "delete-points", "web1", "--before", "yesterday", "--yes", check=False), "--before")
    assert asr_json(site, "points", "web1") == points
    site.wait_idle(fabric["web1"], JOB_TIMEOUT)
    proc = asr(site, "delete-points", "web1", "--before", before, "--yes", "--wait")
    assert f"{len(points) - 1} recovery point(s) deleted, 1 kept" in proc.stdout, proc.stdout
    assert [point["id"] for point in asr_json(site, "points", "web1")] == [points[-1]["id"]]


# ---- a lost host key -------------------------------------------------------------------------------------------
def test_host_rekey_replaces_a_lost_key(site: RecoverySite, fabric: dict[str, Any]):
    old = fabric["edge_key"]
    keys = site.workdir / "keys"
    keys.mkdir(exist_ok=True)
    (keys / "old").write_text(old)
    admitted = asr(site, "worker", "host", "edge", "--key-file", str(keys / "old"), "--dry-run")
    assert "host.edge" in admitted.stdout

    proc = asr(site, "host", "rekey", "edge")
    new = next(line.split(": ", 1)[1] for line in proc.stdout.splitlines()
               if line.startswith("new registration key of host edge"))
    assert new != old and len(new) >= 32 and "shown this once" in proc.stdout
    assert new not in asr(site, "host", "show", "edge", "--json").stdout  # only its hash is kept
    with session_scope() as session:
        row = session.exec(select(HostRow).where(HostRow.name == "edge")).one()
        assert verify_host_key(row, new) and not verify_host_key(row, old)

    # The real agent launcher: the old key is refused (at once, nothing started, the way out named) ...
    before = registrations()
    started = time.monotonic()
    refused_start = asr(site, "worker", "host", "edge", "--key-file", str(keys / "old"), check=False, timeout=30)
    check_refused(refused_start, "is not its registration key")
    assert "asr host rekey edge" in refused_start.stderr and time.monotonic() - started < 20
    assert registrations() == before
    (keys / "new").write_text(new)
    # ... and the new key starts the agent, which takes the host's queue.
    agent = CeleryProcess("agent-edge", [], site.env, site.workdir / "agent-edge",
                          ready_pattern=r" host-edge@\S+ ready\.$",
                          command=[ASR, "worker", "host", "edge", "--key-file", str(keys / "new"), "-c", "1"])
    try:
        agent.wait_ready(timeout=60)
        assert "host.edge" in agent.log()
    finally:
        stop_all([agent])

    refused(site, "host", "rekey", "ghost", needle="host 'ghost' not found")
    refused(site, "host", "rekey", "../edge", needle="cannot contain")


# ---- edits -------------------------------------------------------------------------------------------------
def test_edits_are_validated_as_creation_is(site: RecoverySite, fabric: dict[str, Any], tmp_path: Path):
    before = registrations()
    bad_plan = tmp_path / "bad.json"
    bad_plan.write_text(json.dumps([{"name": "g", "vms": ["no-such-vm"]}, {"name": "g", "vms": []}]))
    cases = [
        (("policy", "set", "slow", "--app-consistent-hours", "5", "--retention-hours", "2"), "would not survive"),
        (("policy", "set", "slow", "--copy-frequency", "30", "--rpo-warning", "20"),
         "copy frequency < warning < critical"),
        (("policy", "set", "slow", "--office-hours", "18:00-08:00"), "start before they end"),
        (("policy", "set", "slow", "--timezone", "Mars/Olympus"), "unknown office time zone"),
        (("policy", "set", "slow", "--copy-frequency", "60"), "60"),
        (("policy", "set", "slow", "--initial-replication-at", "+30h"), "24"),
        (("policy", "set", "slow"), "nothing to change"),
        (("policy", "set", "ghost", "--retention-hours", "3"), "ghost"),
        (("site", "set", "ghost", "--description", "x"), "site 'ghost' not found"),
        (("site", "set", "branch", "--description", "d" * 1025), "1024"),
        (("plan", "update", "spares", "--file", str(bad_plan)), "no-such-vm"),
        (("plan", "update", "ghost", "--file", str(bad_plan)), "ghost"),
    ]
    procs = asr_many(site, [args for args, _ in cases])
    for proc, (_args, needle) in zip(procs, cases, strict=True):
        check_refused(proc, needle)
    assert "used twice" in procs[10].stderr and "non-empty list of VMs" in procs[10].stderr
    # The same check, the same words as a new policy's.
    add = asr(site, "policy", "add", "probe", "--app-consistent-hours", "5", "--retention-hours", "2", check=False)
    assert add.stderr.replace("'probe'", "'slow'") == procs[0].stderr
    assert registrations() == before

    changed = asr(site, "policy", "set", "slow", "--retention-hours", "4", "--app-consistent-hours", "3",
                  "--rpo-critical", "7200")
    assert "from their next cycle" in changed.stdout
    slow = asr_json(site, "policy", "show", "slow")
    assert (slow["recovery_point_retention_h"], slow["app_consistent_frequency_h"], slow["rpo_critical_s"]) == (
        4, 3, 7200)
    assert slow["copy_frequency_s"] == 900 and slow["office_days"] == [] and slow["rpo_warning_s"] == 1800
    assert slow["protected_vms"] == ["host1/web1"]
    anytime = asr_json(site, "policy", "set", "slow", "--consistency-check-anytime")
    assert anytime["consistency_check_off_hours"] is False and "next cycle" in anytime["applies_from"]
    assert asr_json(site, "policy", "set", "slow", "--consistency-check-off-hours")["consistency_check_off_hours"]

    # A retention lock can be raised, never lowered or turned off: exit 2 naming why, nothing changed.
    asr(site, "policy", "add", "vault", "--retention-lock-hours", "5")
    lowered = asr_many(site, [("policy", "set", "vault", "--retention-lock-hours", "1"),
                              ("policy", "set", "vault", "--retention-lock-hours", "0")])
    check_refused(lowered[0], "retention lock of 5 h cannot be lowered to 1 h")
    check_refused(lowered[1], "retention lock of 5 h cannot be turned off")
    assert asr_json(site, "policy", "show", "vault")["retention_lock_h"] == 5
    assert asr_json(site, "policy", "set", "vault", "--retention-lock-hours", "8")["retention_lock_h"] == 8
    asr(site, "policy", "remove", "vault", "--yes")  # it locks no point: no VM's protection refers to it

    asr(site, "site", "set", "branch", "--description", "the branch office, moved")
    assert asr_json(site, "site", "show", "branch")["description"] == "the branch office, moved"

    good = tmp_path / "good.json"
    good.write_text(json.dumps({"description": "spares and the edge", "groups": [
        {"name": "first", "vms": ["spare"]}, {"name": "then", "vms": ["edge/lonely"], "after": [
            {"kind": "manual", "name": "call", "instructions": "phone the branch"}]}]}))
    updated = asr(site, "plan", "update", "spares", "--file", str(good))
    assert "updated: 2 groups" in updated.stdout
    shown = asr_json(site, "plan", "show", "spares")
    assert [group["name"] for group in shown["groups"]] == ["first", "then"]
    assert shown["description"] == "spares and the edge"
    assert [vm["host"] + "/" + vm["name"] for vm in shown["groups"][1]["vms"]] == ["edge/lonely"]


# ---- hosts, VMs and network mappings ------------------------------------------------------------------------
def test_hosts_vms_and_mappings_change_as_they_are_created_unless_something_depends_on_them(
        site: RecoverySite, fabric: dict[str, Any], tmp_path: Path):
    driver, edge_root = site.host("host1"), str(fabric["edge_root"])
    before = registrations()
    manifests = {vm: driver.get_vm(vm).to_manifest() for vm in ("web1", "spare")}
    cases = [
        (("host", "set", "edge", "--root", "edge"), "root of host 'edge' must be an absolute path"),
        (("host", "set", "edge", "--root", str(tmp_path)), f"VM(s) lonely registered that are not under {tmp_path}"),
        (("host", "set", "host1", "--site", "branch"),
         "host 'host1' has protected VM(s) host1/web1: their failovers use the network mappings of its site"),
        (("host", "set", "host1", "--root", str(tmp_path)), "host 'host1' has protected VM(s) host1/web1"),
        (("host", "set", "dr1", "--root", str(tmp_path)), "recovery host of protected VM(s) host1/web1"),
        (("host", "set", "edge", "--site", "nowhere"), "site 'nowhere' not found"),
        (("host", "set", "edge", "--site", "branch", "--cloud", "c"), "not both"),
        (("host", "set", "edge"), "nothing to change"),
        (("host", "set", "ghost", "--root", "/x"), "host 'ghost' not found"),
        (("vm", "set", "web1", "--network", "nic0=dmz"),
         "VM host1/web1 is protected: its failover would find no network mapping for network(s) dmz"),
        (("vm", "set", "spare", "--network", "nic7=backend"), "has no network adapter 'nic7' (its adapters: nic0)"),
        (("vm", "set", "spare", "--network", "nic0=../up"), "invalid network name '../up'"),
        (("vm", "set", "spare", "--network", "nic0"), "ADAPTER=NETWORK"),
        (("vm", "set", "spare", "--memory", "512"), "synthetic VM: it has no guest definition"),
        (("vm", "set", "spare"), "nothing to change"),
        (("vm", "set", "ghost", "--network", "nic0=backend"), "ghost"),
        (("network", "set", "default", "--site", "branch", "--subnet", "10.30.0.1/24"),
         "recovery subnet '10.30.0.1/24' is not a network in CIDR form"),
        (("network", "set", "default", "--site", "branch", "--recovery-network", "a..b"), "cannot contain"),
        (("network", "set", "nowhere", "--site", "branch", "--recovery-network", "x"), "not mapped"),
        (("network", "set", "default", "--recovery-network", "x"), "--site"),
        (("network", "set", "default", "--site", "branch"), "nothing to change"),
    ]
    results = [in_process(*args) for args, _ in cases]
    for result, (_args, needle) in zip(results, cases, strict=True):
        check_refused_here(result, needle)
    # The same checks, the same words as creation's.
    with pytest.raises(service.Invalid) as added:
        service.add_host("probe", "edge", site="branch")
    assert f"asr: error: {str(added.value).replace('probe', 'edge')}" in results[0].stderr
    with pytest.raises(service.Invalid) as mapped:
        service.add_network_mapping("probe", "x", "10.30.0.1/24", site="branch")
    assert str(mapped.value).replace("probe", "default") in results[16].stderr
    assert registrations() == before
    assert {vm: driver.get_vm(vm).to_manifest() for vm in manifests} == manifests

    # Each change, read back; then undone (the tests below count on the fabric as it was).
    moved = shown("network", "set", "default", "--site", "branch", "--recovery-network", "recovery-b2",
                  "--subnet", "10.31.0.0/24")
    assert (moved["recovery_network"], moved["recovery_subnet"]) == ("recovery-b2", "10.31.0.0/24")
    branch = [m for m in shown("network", "show", "default") if m["site"] == "branch"]
    assert [(m["recovery_network"], m["recovery_subnet"]) for m in branch] == [("recovery-b2", "10.31.0.0/24")]

    # A VM's network: in its host's manifest (what `asr vm add` reads) and in its registration; a protected VM's
    # new network is mapped in its site (backend is).
    for vm in ("spare", "web1"):
        changed = shown("vm", "set", vm, "--network", "nic0=backend")
        assert [(a["name"], a["vm_network"]) for a in changed["adapters"]] == [("nic0", "backend")]
        assert [(a["name"], a["vm_network"]) for a in shown("vm", "show", vm)["adapters"]] == [("nic0", "backend")]
        assert driver.get_vm(vm).adapter("nic0").vm_network == "backend"
    service.add_vm("host1", "spare")  # registering it again reads the host's word: the same
    with session_scope() as session:
        assert session.exec(select(VmNetworkAdapter.vm_network).where(
            VmNetworkAdapter.vm_id == vm_id("spare"))).all() == ["backend"]

    # A host with no protected VM moves to another site; its tree to another root holding its VMs.
    assert shown("host", "set", "edge", "--site", "primary")["site"] == "primary"
    assert shown("host", "show", "edge")["site"] == "primary"
    link = tmp_path / "edge-moved"
    link.symlink_to(edge_root)
    assert shown("host", "set", "edge", "--root", str(link))["root"] == str(link)
    assert shown("host", "show", "edge")["root"] == str(link)

    for args in (("host", "set", "edge", "--site", "branch", "--root", edge_root),
                 ("vm", "set", "web1", "--network", "nic0=default"),
                 ("vm", "set", "spare", "--network", "nic0=default"),
                 ("network", "set", "default", "--site", "branch", "--recovery-network", "recovery-branch",
                  "--subnet", "10.30.0.0/24")):
        assert in_process(*args).exit_code == 0, args
    assert registrations() == before
    assert {vm: driver.get_vm(vm).to_manifest() for vm in manifests} == manifests


# ---- removals refused ------------------------------------------------------------------------------------------
def test_removals_are_refused_while_something_depends_on_the_thing(site: RecoverySite, fabric: dict[str, Any],
                                                                   tmp_path: Path):
    before, jobs = registrations(), operator_jobs()
    cases = [
        (("vm", "remove", "web1", "--yes"), "asr unprotect host1/web1"),
        (("vm", "remove", "spare", "--yes"), "in recovery plan(s) spares"),
        (("vm", "remove", "ghost", "--yes"), "ghost"),
        (("host", "remove", "host1", "--yes"), "host 'host1' has 2 registered VM(s): spare, web1"),
        (("host", "remove", "dr1", "--yes"), "recovery host of protected VM(s) host1/web1"),
        (("host", "remove", "ghost", "--yes"), "ghost"),
        (("site", "remove", "primary", "--yes"), "site 'primary' has 1 host(s): host1"),
        (("site", "remove", "branch", "--yes"), "asr host remove"),
        (("network", "remove", "default", "--site", "primary", "--yes"), "used by protected VM(s) host1/web1"),
        (("network", "remove", "nowhere", "--site", "branch", "--yes"), "not mapped"),
        (("network", "remove", "default", "--yes"), "--site"),
        (("policy", "remove", "slow", "--yes"), "in use by protected VM(s) host1/web1"),
        (("policy", "remove", "ghost", "--yes"), "ghost"),
        (("plan", "remove", "ghost", "--yes"), "ghost"),
    ]
    for proc, (_args, needle) in zip(asr_many(site, [args for args, _ in cases]), cases, strict=True):
        check_refused(proc, needle)
    # Without --yes it asks; no answer is no (exit 1), and nothing is removed.
    asked = subprocess.run([ASR, "policy", "remove", "unused"], capture_output=True, text=True, timeout=60,
                           env=site.env, input="")
    assert asked.returncode == 1 and "Remove replication policy unused?" in asked.stdout, asked

    # A plan that runs (waiting at its manual action, holding its lock) can be neither changed nor removed.
    drill = tmp_path / "drill.json"
    drill.write_text(json.dumps([{"name": "web", "vms": ["web1"], "before": [
        {"kind": "manual", "name": "wait", "instructions": "nothing"}]}]))
    asr(site, "plan", "create", "drill", "--file", str(drill))
    running = asr(site, "plan", "failover", "drill", "--kind", "test")
    plan_job = job_id_of(running.stdout)
    deadline = time.monotonic() + JOB_TIMEOUT
    while asr_json(site, "jobs", "show", plan_job)["state"] != "waiting_action":
        assert time.monotonic() < deadline, asr(site, "jobs", "show", plan_job).stdout
        time.sleep(0.3)
    during = registrations()
    refusals = asr_many(site, [("plan", "remove", "drill", "--yes"), ("plan", "update", "drill", "--file", str(drill))])
    check_refused(refusals[0], f"recovery plan 'drill' is running: job {plan_job}")
    check_refused(refusals[1], f"recovery plan 'drill' is running: job {plan_job}")
    assert registrations() == during
    asr(site, "jobs", "cancel", plan_job)
    site.wait_idle(fabric["web1"], JOB_TIMEOUT)
    wait_settled(plan_job)
    asr(site, "plan", "remove", "drill", "--yes")

    assert registrations() == before
    assert operator_jobs() == sorted([*jobs, plan_job])


def wait_settled(job_id: str, timeout: float = JOB_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with session_scope() as session:
            job = session.get(Job, job_id)
            if job.settled_at is not None and not job.hook_pending:
                return
        assert time.monotonic() < deadline, f"job {job_id} did not settle"
        time.sleep(0.2)


# ---- removals done -------------------------------------------------------------------------------------------
def test_removals_forget_registrations_and_keep_disks(site: RecoverySite, fabric: dict[str, Any]):
    spare_disk = site.host("host1").get_vm("spare").disk("disk0").path
    content = spare_disk.read_bytes()
    asr(site, "plan", "remove", "spares", "--yes")
    removed = asr(site, "vm", "remove", "host1/spare", "--yes")
    assert "disks were not deleted" in removed.stdout and str(spare_disk) in removed.stdout, removed.stdout
    assert "asr vm add host1 spare" in removed.stdout
    assert spare_disk.read_bytes() == content  # untouched, byte for byte
    assert "spare" not in asr(site, "vm", "list").stdout
    asr(site, "vm", "add", "host1", "spare")  # the way back
    assert json.loads(asr(site, "vm", "remove", "spare", "--yes", "--json").stdout)["disks_kept"] == [str(spare_disk)]

    # A VM whose protection is disabled: its policy stays named by it until the VM goes; dr1 was only its
    # recovery host.
    asr(site, "unprotect", "web1", "--yes", "--wait")
    refused(site, "policy", "remove", "slow", "--yes", needle="disabled protection of VM(s) host1/web1")
    web1_disks = [disk.path for disk in site.host("host1").get_vm("web1").disks]
    sizes = [path.stat().st_size for path in web1_disks]
    asr(site, "vm", "remove", "web1", "--yes")
    assert [path.stat().st_size for path in web1_disks] == sizes
    with session_scope() as session:
        assert session.exec(select(ProtectedItem).where(ProtectedItem.vm_id == fabric["web1"])).first() is None

    # Bottom up: a site's hosts, then the site (its mappings go with it); policies.
    refused(site, "site", "remove", "branch", "--yes", needle="edge")
    for args in (("vm", "remove", "edge/lonely", "--yes"), ("host", "remove", "edge", "--yes"),
                 ("policy", "remove", "slow", "--yes"), ("policy", "remove", "unused", "--yes", "--json")):
        asr(site, *args)
    assert Host(fabric["edge_root"], "edge").get_vm("lonely").disk("disk0").path.is_file()  # kept on the host
    gone = asr(site, "site", "remove", "branch", "--yes")
    assert "with the mappings of network(s) default" in gone.stdout
    asr(site, "network", "add", "backend", "recovery-x", "10.40.0.0/24", "--site", "recovery")
    asr(site, "network", "remove", "backend", "--site", "recovery", "--yes")
    with session_scope() as session:
        assert sorted(session.exec(select(Site.name))) == ["primary", "recovery"]
        assert sorted(session.exec(select(HostRow.name))) == ["dr1", "host1"]
        assert sorted(session.exec(select(ReplicationPolicy.name))) == ["default"]
        assert sorted(session.exec(select(VirtualMachine.name))) == []
        assert sorted(session.exec(select(RecoveryPlan.name))) == []
        primary = session.exec(select(Site).where(Site.name == "primary")).one().id
        assert sorted(session.exec(select(NetworkMapping.source_network, NetworkMapping.site_id))) == [
            ("backend", primary), ("default", primary)]
    # Removed things are unknown now.
    for args, needle in ((("host", "show", "edge"), "edge"), (("site", "show", "branch"), "branch"),
                         (("policy", "show", "slow"), "slow"), (("vm", "show", "web1"), "web1")):
        refused(site, *args, needle=needle)
