"""Honest RPO: computed when read on the database's clock, held to the policy's thresholds, driving health
even when no cycle runs, and unchanged by a host agent whose clock is off.

The measured failure this answers: a VM whose replication had been stopped for 16 minutes showed RPO 1.0 s
and Healthy (the RPO was a value stored by the last successful cycle), and a point's time came from the
host agent's clock.
"""
from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from recovery_site import RecoverySite
from sqlalchemy.engine import Engine, make_url
from sqlmodel import select
from webhook_receiver import webhook_receiver

from api.service import health as service_health
from models import fabric
from models import policy as policies
from models.db import database_now, dispose_engines, session_scope
from models.jobs import Job, JobStep
from models.policy import ReplicationPolicy
from models.protection import Health, ProtectedItem, RecoveryPoint, ReplicationState, protect_vm, transition
from sites.localservices import wait_until
from workflows import rpo

ASR = str(Path(sys.executable).with_name("asr"))
SKEW = timedelta(minutes=10)
WEBHOOK_SECRET = b"the webhook's secret, 16 bytes or more"


@pytest.fixture(autouse=True)
def storage_allow_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASR_STORAGE_ROOTS", "/srv/recovery")  # the local recovery storage these tests name


def make_protected_item(session, **policy_options) -> ProtectedItem:
    site = fabric.create_site(session, "primary")
    host, _key = fabric.register_host(session, "hv01", "/srv/hosts/hv01", site=site)
    vm = fabric.add_vm(session, host, "app01", [{"name": "disk0", "file": "disk0.vhd", "size": 8 << 20,
                                                 "format": "vhd"}], [])
    policy = policies.create_policy(session, "gold", **policy_options)
    item = protect_vm(session, vm, policy, recovery_storage="file:///srv/recovery")
    for state in (ReplicationState.INITIAL_REPLICATION, ReplicationState.PROTECTED):
        transition(item, state)
    session.add(item)
    session.flush()
    return item


# ---- the model: thresholds, RPO, health ---------------------------------------------------------------
def test_rpo_thresholds_default_to_twice_and_four_times_the_copy_frequency_and_are_checked(engine: Engine) -> None:
    with session_scope(engine) as session:
        assert policies.create_policy(session, "default").rpo_thresholds_s() == (600, 1200)
        assert policies.create_policy(session, "fast", copy_frequency_s=30).rpo_thresholds_s() == (60, 120)
        assert policies.create_policy(session, "set", copy_frequency_s=30, rpo_warning_s=45,
                                      rpo_critical_s=90).rpo_thresholds_s() == (45, 90)
        # One left out is derived; both are checked as they will apply.
        assert policies.create_policy(session, "half", copy_frequency_s=300,
                                      rpo_critical_s=3600).rpo_thresholds_s() == (600, 3600)
    cases = [
        ({"rpo_warning_s": 30}, "copy frequency < warning < critical, got 30 s < 30 s < 120 s"),
        ({"rpo_warning_s": 90, "rpo_critical_s": 90}, "got 30 s < 90 s < 90 s"),
        ({"rpo_critical_s": 50}, "got 30 s < 60 s < 50 s"),
        ({"rpo_warning_s": 0}, "RPO warning threshold \\(seconds\\) must be a whole number from 1"),
        ({"rpo_warning_s": True}, "RPO warning threshold"),
        ({"rpo_critical_s": 61.5}, "RPO critical threshold"),
        ({"rpo_critical_s": 8 * 24 * 3600}, "RPO critical threshold"),
    ]
    for options, message in cases:
        with pytest.raises(ValueError, match=message), session_scope(engine) as session:
            policies.create_policy(session, "bad", copy_frequency_s=30, **options)
    with session_scope(engine) as session:
        assert session.exec(select(ReplicationPolicy).where(ReplicationPolicy.name == "bad")).first() is None


def test_the_database_clock_is_the_real_time(engine: Engine) -> None:
    with session_scope(engine) as session:
        before = datetime.now(UTC)
        first = database_now(session)
        time.sleep(0.05)
        second = database_now(session)  # within one transaction: still the moment of the query
        after = datetime.now(UTC)
    assert first.tzinfo is UTC and second.tzinfo is UTC
    assert before - timedelta(seconds=1) <= first < second <= after + timedelta(seconds=1)
    assert second - first >= timedelta(seconds=0.04)


def test_rpo_grows_without_a_cycle_and_turns_health_warning_then_critical_with_the_reason(engine: Engine) -> None:
    with session_scope(engine) as session:
        item = make_protected_item(session, copy_frequency_s=30)
        policy = session.get(ReplicationPolicy, item.policy_id)
        now = database_now(session)
        item.last_recovery_point_at, item.last_replicated_at = now, now + timedelta(seconds=2)
        checks = {}
        for age_s in (59, 60, 119, 120, 16 * 60):
            checks[age_s] = (rpo.rpo_s(item.last_recovery_point_at, now + timedelta(seconds=age_s)),
                             rpo.assess(item, policy, now + timedelta(seconds=age_s)))
        # The tick at 16 minutes: Critical, with the reason and when replication last succeeded.
        later = now + timedelta(minutes=16)
        assert rpo.apply_rpo_health(session, item, policy, later).severity is Health.CRITICAL
        assert rpo.apply_rpo_health(session, item, policy, later + timedelta(seconds=5)) is None  # said already
        errors, health = list(item.health_errors), item.health
        status = rpo.rpo_status(item, policy, later)
        # A new point: the RPO error is cleared, other errors stay.
        item.last_recovery_point_at = later
        assert rpo.apply_rpo_health(session, item, policy, later + timedelta(seconds=1)).severity is Health.HEALTHY
        cleared = (item.health, list(item.health_errors))
        # After a failover the recovery VM is the VM: the primary's RPO is not data at risk.
        item.last_recovery_point_at = now
        transition(item, ReplicationState.FAILING_OVER)
        after_failover = rpo.assess(item, policy, later)
    assert {age: (value, found.severity) for age, (value, found) in checks.items()} == {
        59: (59.0, Health.HEALTHY), 60: (60.0, Health.WARNING), 119: (119.0, Health.WARNING),
        120: (120.0, Health.CRITICAL), 960: (960.0, Health.CRITICAL)}
    assert "warning threshold of 60 s (2x the copy frequency)" in checks[60][1].message
    assert health is Health.CRITICAL and [error["code"] for error in errors] == [rpo.RPO_CODE]
    message = errors[0]["message"]
    assert "critical threshold of 2 min (4x the copy frequency)" in message, message
    assert f"no recovery point since {now.isoformat()}" in message, message
    assert f"replication last succeeded at {(now + timedelta(seconds=2)).isoformat()}" in message, message
    assert status == {"rpo_s": 960.0, "rpo_warning_s": 60, "rpo_critical_s": 120,
                      "last_replicated_at": (now + timedelta(seconds=2)).isoformat()}
    assert cleared == (Health.HEALTHY, [])
    assert after_failover == rpo.RpoHealth(Health.HEALTHY, None)


def test_check_rpo_moves_every_item_and_leaves_other_errors(engine: Engine) -> None:
    with session_scope(engine) as session:
        item = make_protected_item(session, copy_frequency_s=30, rpo_warning_s=100, rpo_critical_s=1000)
        now = database_now(session)
        item.last_recovery_point_at = now - timedelta(seconds=150)
        item.health_errors = [{"code": "app_consistency_failed", "message": "quiesce failed",
                               "severity": "Warning", "at": now.isoformat()}]
        item.health = Health.WARNING
        item_id = item.id
    # check_rpo runs on the default engine: point it at this test's.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ASR_DATABASE_URL", engine.url.render_as_string(hide_password=False))
        dispose_engines()
        first, again = rpo.check_rpo(), rpo.check_rpo()
        with session_scope() as session:
            item = session.get(ProtectedItem, item_id)
            codes = [(error["code"], error["severity"]) for error in item.health_errors]
            message = item.health_errors[-1]["message"]
            item.last_recovery_point_at = now - timedelta(seconds=1000)
        critical = rpo.check_rpo()
        with session_scope() as session:
            item = session.get(ProtectedItem, item_id)
            health = item.health
            item.last_recovery_point_at = database_now(session)
        healed = rpo.check_rpo()
        with session_scope() as session:
            left = [error["code"] for error in session.get(ProtectedItem, item_id).health_errors]
        dispose_engines()
    assert (first, again) == ({"rpo_warning": 1}, {})
    assert codes == [("app_consistency_failed", "Warning"), (rpo.RPO_CODE, "Warning")]
    # Thresholds the policy set are not said to come from the copy frequency.
    assert "warning threshold of 100 s: no recovery point since" in message, message
    assert (critical, health) == ({"rpo_critical": 1}, Health.CRITICAL)
    assert healed == {"rpo_healthy": 1} and left == ["app_consistency_failed"]


def asr(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if not key.startswith("ASR_")}
    env["ASR_DATABASE_URL"] = f"sqlite:///{tmp_path / 'asr.db'}"
    return subprocess.run([ASR, *args], capture_output=True, text=True, timeout=120, env=env)


def test_the_cli_sets_and_shows_a_policys_rpo_thresholds(tmp_path: Path) -> None:
    added = asr(tmp_path, "policy", "add", "gold", "--copy-frequency", "30", "--rpo-warning", "90",
                "--rpo-critical", "300", "--json")
    default = asr(tmp_path, "policy", "add", "silver", "--copy-frequency", "300")
    refused = asr(tmp_path, "policy", "add", "bad", "--copy-frequency", "300", "--rpo-warning", "200")
    shown = asr(tmp_path, "policy", "show", "silver")
    listed = asr(tmp_path, "policy", "list", "--json")
    assert added.returncode == 0, added.stderr
    assert {key: json.loads(added.stdout)[key] for key in ("rpo_warning_s", "rpo_critical_s", "rpo_thresholds_set")} \
        == {"rpo_warning_s": 90, "rpo_critical_s": 300, "rpo_thresholds_set": True}
    assert default.returncode == 0 and re.search(r"^RPO warning \(s\) +600$", default.stdout, re.M), default.stdout
    assert re.search(r"^RPO critical \(s\) +1200$", shown.stdout, re.M), shown.stdout
    assert refused.returncode == 2 and "copy frequency < warning < critical, got 300 s < 200 s" in refused.stderr
    assert sorted(policy["name"] for policy in json.loads(listed.stdout)) == ["gold", "silver"]


# ---- a real deployment ----------------------------------------------------------------------------------
def recovery_points(item_id: str) -> list[RecoveryPoint]:
    with session_scope() as session:
        return list(session.exec(select(RecoveryPoint).where(RecoveryPoint.item_id == item_id)
                                 .order_by(RecoveryPoint.created_at)).all())


def test_a_vm_whose_replication_stopped_turns_warning_then_critical_with_no_cycle_and_heals(tmp_path: Path) -> None:
    """The measured failure: replication stopped (the host's agent is down) and no cycle succeeds, yet the
    RPO grows when read and health turns Warning, then Critical, with the reason; replication back, Healthy.
    Operators hear it: the webhook (a real HTTP receiver) gets the RPO Warning, then Critical, the VM Critical
    and the host agent silent, each signed, and their resolution once replication is back."""
    # A 3 s cycle (30 s scaled by 10); Warning from 15 s, Critical from 30 s of real time.
    secret = tmp_path / "webhook-secret"
    secret.write_bytes(WEBHOOK_SECRET)
    with webhook_receiver() as receiver, RecoverySite(
            tmp_path, policy_options={"rpo_warning_s": 150, "rpo_critical_s": 300},
            env={"ASR_ALERT_WEBHOOK_URL": receiver.url, "ASR_ALERT_WEBHOOK_SECRET_FILE": str(secret),
                 "ASR_HOST_HEARTBEAT_S": "1", "ASR_ALERT_HOST_SILENT_S": "5"}) as site:
        vm_id = site.create_vm("host1", "app01", [("disk0", "8M", "raw")], fill=0.25, seed=5)
        site.wait_job(site.protect(vm_id), timeout=60)
        item_id = site.item_id(vm_id)
        protected = site.item(vm_id)
        assert (protected["health"], protected["rpo_warning_s"], protected["rpo_critical_s"]) == ("Healthy", 15, 30)
        assert 0 <= protected["rpo_s"] < 15, protected
        site.stop_process("host-host1")
        stopped_at = time.monotonic()
        points = len(recovery_points(item_id))

        warning = wait_until(lambda: (status := site.item(vm_id))["health"] != "Healthy" and status, timeout=40,
                             interval=0.2, what="the item to leave Healthy while replication is stopped")
        warned_after = time.monotonic() - stopped_at
        critical = wait_until(lambda: (status := site.item(vm_id))["health"] == "Critical" and status,
                              timeout=60, interval=0.2, what="the item to turn Critical")
        report = {entry["vm"]: entry for entry in service_health()}["app01"]
        # No cycle made a point meanwhile: the RPO grew on its own.
        assert len(recovery_points(item_id)) == points
        assert critical["last_replicated_at"] == protected["last_replicated_at"]

        site.start_host_worker("host1")
        healed = wait_until(lambda: (status := site.item(vm_id))["health"] == "Healthy" and status, timeout=60,
                            interval=0.2, what="the item to be Healthy again once replication resumes")
        wait_until(lambda: sum(alert["event"] == "resolved" for alert in receiver.alerts()) >= 4, timeout=30,
                   interval=0.2, what=f"the webhook to hear every condition resolved: {receiver.alerts()}")
    assert warning["health"] == "Warning" and 15 <= warning["rpo_s"] < 30, warning
    assert warned_after < 30, f"Warning came {warned_after:.1f} s after replication stopped"
    assert [error["code"] for error in warning["errors"]] == ["rpo_exceeded"], warning["errors"]
    assert "warning threshold of 15 s" in warning["errors"][0]["message"]
    assert critical["rpo_s"] >= 30 and [error["severity"] for error in critical["errors"]] == ["Critical"]
    assert "critical threshold of 30 s" in critical["errors"][0]["message"]
    assert f"replication last succeeded at {protected['last_replicated_at']}" in critical["errors"][0]["message"]
    assert report["health"] == "Critical" and report["rpo_s"] >= 30, report
    assert (report["rpo_warning_s"], report["rpo_critical_s"]) == (15, 30)
    assert report["last_replicated_at"] == protected["last_replicated_at"]
    assert healed["errors"] == [] and healed["rpo_s"] < 15, healed
    heard = [(alert["event"], alert["kind"], alert["severity"], alert["subject"]) for alert in receiver.alerts()]
    assert sorted(heard) == sorted([
        ("raised", "rpo_threshold", "Warning", "host1/app01"), ("raised", "rpo_threshold", "Critical", "host1/app01"),
        ("raised", "vm_critical", "Critical", "host1/app01"), ("raised", "host_silent", "Critical", "host1"),
        ("resolved", "rpo_threshold", "Info", "host1/app01"), ("resolved", "rpo_threshold", "Info", "host1/app01"),
        ("resolved", "vm_critical", "Info", "host1/app01"), ("resolved", "host_silent", "Info", "host1"),
    ]), heard
    assert all(entry.signed_with(WEBHOOK_SECRET) for entry in receiver.received)
    assert heard.index(("raised", "rpo_threshold", "Warning", "host1/app01")) < \
        heard.index(("raised", "rpo_threshold", "Critical", "host1/app01"))


@pytest.fixture
def postgres_url(postgres_admin: Engine) -> Iterator[str]:
    """A PostgreSQL schema of the test's own: a database server, whose clock no host shares."""
    schema = f"asr_test_{uuid.uuid4().hex[:16]}"
    with postgres_admin.connect() as connection:
        connection.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    url = make_url(postgres_admin.url).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        dispose_engines()
        with postgres_admin.connect() as connection:
            connection.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))


def libfaketime() -> str:
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketimeMT.so.1") + glob.glob("/usr/lib/faketime/*MT.so.1"))
    if not found:
        pytest.fail("libfaketime is not installed: run scripts/ensure-tools.sh faketime (Debian: apt-get install "
                    "faketime)", pytrace=False)
    return found[0]


@pytest.fixture
def faketime_shared_memory() -> Iterator[None]:
    """Removes the shared memory and semaphore files libfaketime makes per process (/dev/shm/faketime_shm_<pid>,
    sem.faketime_sem_<pid>): a process stopped by a signal leaves its pair behind, and a later process that
    gets the same pid fails to start under libfaketime ("shm_open failed: File exists")."""
    pattern = "/dev/shm/*faketime_*"
    before = set(glob.glob(pattern))
    yield
    for leftover in set(glob.glob(pattern)) - before:
        Path(leftover).unlink(missing_ok=True)


@pytest.mark.usefixtures("faketime_shared_memory")
def test_a_host_agent_whose_clock_is_minutes_ahead_does_not_change_the_rpo(tmp_path: Path, postgres_url: str) -> None:
    skewed = {"LD_PRELOAD": libfaketime(), "FAKETIME": f"+{int(SKEW.total_seconds())}s",
              "FAKETIME_DONT_FAKE_MONOTONIC": "1", "FAKETIME_NO_CACHE": "1"}
    with RecoverySite(tmp_path, database_url=postgres_url, start_workers=False) as site:
        site.start_orchestration_worker()
        site.start_beat()
        site.start_host_worker("host1", env=skewed)
        vm_id = site.create_vm("host1", "app01", [("disk0", "8M", "vhd")], fill=0.25, seed=7)
        site.wait_job(site.protect(vm_id), timeout=90)
        item_id = site.item_id(vm_id)
        wait_until(lambda: len(recovery_points(item_id)) >= 3, timeout=60, interval=0.2,
                   what="two scheduled delta cycles")
        status = site.item(vm_id)
        with session_scope() as session:
            now = database_now(session)
            # The agent's clock is ahead indeed: the engine stamps a step's start with its runner's clock.
            ship = session.exec(select(JobStep, Job.created_at).join(Job, Job.id == JobStep.job_id)
                                .where(Job.target == item_id, JobStep.name == "Ship logs")
                                .order_by(Job.created_at.desc())).first()
        points = recovery_points(item_id)
    step, job_created = ship
    assert step.started_at - job_created > SKEW - timedelta(minutes=1), (step.started_at, job_created)
    # Every point's time is the orchestration's (the database's), minutes away from the agent's.
    for point in points:
        assert now - timedelta(minutes=1) < point.created_at <= now, (point.created_at, now)
    assert status["health"] == "Healthy" and 0 <= status["rpo_s"] < 30, status
    assert now - timedelta(minutes=1) < datetime.fromisoformat(status["last_replicated_at"]) <= now


# ---- when the next cycle is due ----------------------------------------------------------------------------
def test_the_next_delta_cycle_is_due_one_copy_frequency_after_the_point_this_cycle_cut(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: one copy frequency after the cycle *ended*, so the RPO peaked at the frequency plus two cycles
    (benchmarks/churn.py: p99 47 s at 5 MB/s and a 30 s frequency). Now one frequency after the recovery point
    the cycle cut; a cycle that outlasted the frequency leaves a quarter of it idle, no more."""
    from tasks.replication import _next_delta_due

    monkeypatch.setenv("ASR_TIME_SCALE", "1")
    cut = datetime(2026, 12, 3, 12, 0, 0, tzinfo=UTC)
    item = ProtectedItem(vm_id="vm", policy_id="policy", recovery_storage="file:///srv/recovery",
                         last_recovery_point_at=cut)
    # A 6 s cycle: due 30 s after its point, 24 s after it ended.
    assert _next_delta_due(item, 30, cut + timedelta(seconds=6), finishing=False) == cut + timedelta(seconds=30)
    # A 40 s cycle: due a quarter of the frequency after it ended.
    ended = cut + timedelta(seconds=40)
    assert _next_delta_due(item, 30, ended, finishing=False) == ended + timedelta(seconds=7.5)
    # The initial replication's end, or an item without a point yet: one frequency from now.
    assert _next_delta_due(item, 300, ended, finishing=True) == ended + timedelta(seconds=300)
    item.last_recovery_point_at = None
    assert _next_delta_due(item, 30, ended, finishing=False) == ended + timedelta(seconds=30)
    # The time scale of the tests and the demo shortens the frequency as it does every engine delay.
    monkeypatch.setenv("ASR_TIME_SCALE", "10")
    item.last_recovery_point_at = cut
    assert _next_delta_due(item, 30, cut + timedelta(seconds=1), finishing=False) == cut + timedelta(seconds=3)
