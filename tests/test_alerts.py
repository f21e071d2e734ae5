"""Alerts: conditions raised once when they start and resolved once when they end (SQLite and PostgreSQL),
delivered to a real HTTP receiver, signed, retried with back-off and recorded; bad settings refused.

The whole path with real workers (a host agent stopped: RPO Warning, Critical, host silent, then all
resolved) is in tests/test_rpo.py, whose scenario it is.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from test_rpo import (
    asr,
    make_protected_item,
    storage_allow_list,  # noqa: F401  (autouse: the local storage make_protected_item names)
)
from webhook_receiver import webhook_receiver

from api import service as api_service
from api.service import list_alerts
from models.alerts import Alert
from models.db import database_now, dispose_engines, session_scope
from models.fabric import Host
from models.failover import FailoverKind, FailoverRecord, FailoverStatus
from models.jobs import Job, JobState
from models.policy import ReplicationPolicy
from models.protection import ProtectedItem
from workflows import alerts, rpo, settings, webhook
from workflows.transport import InsecureTransportError

SECRET = b"a shared secret of the receiver's"


@pytest.fixture
def on_engine(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> Iterator[Engine]:
    """The engine's functions run on the default database: point it at this test's."""
    monkeypatch.setenv("ASR_DATABASE_URL", engine.url.render_as_string(hide_password=False))
    monkeypatch.delenv("ASR_ALERT_WEBHOOK_URL", raising=False)
    dispose_engines()
    yield engine
    dispose_engines()


def kinds(report_rows: list[dict]) -> list[tuple[str, str]]:
    return sorted((row["kind"], row["event"]) for row in report_rows)


def test_conditions_are_raised_once_and_resolved_once_when_they_end(on_engine: Engine) -> None:
    with session_scope() as session:
        item = make_protected_item(session, copy_frequency_s=30, rpo_warning_s=100, rpo_critical_s=1000)
        policy = session.get(ReplicationPolicy, item.policy_id)
        policy.drill_reminder_days = 1
        now = database_now(session)
        item.created_at = now - timedelta(days=2)  # protected for two days, never drilled
        item.last_recovery_point_at = now - timedelta(seconds=2000)
        host = session.get(Host, session.exec(sa.select(Host.id)).scalar_one())
        host.last_seen_at = now - timedelta(hours=1)
        for kind in ("planned_failover", "delta_replication", "plan_test_failover"):
            session.add(Job(kind=kind, state=JobState.failed, ended_at=now, error=f"{kind} broke", target="app01"))
        session.add(Job(kind="planned_failover", state=JobState.failed, ended_at=now - timedelta(days=30),
                        error="long ago"))
        item_id, policy_id = item.id, policy.id
    assert rpo.check_rpo() == {"rpo_critical": 1}

    raised, again = alerts.raise_and_resolve_alerts(), alerts.raise_and_resolve_alerts()
    rows = list_alerts(limit=100)
    with session_scope() as session:
        # The VM is healthy again, its agent heard from, a drill passed; the failed operations stay failed.
        item = session.get(ProtectedItem, item_id)
        item.last_recovery_point_at = database_now(session)
        session.get(Host, host.id).last_seen_at = database_now(session)
        session.add(FailoverRecord(item_id=item_id, kind=FailoverKind.TEST, status=FailoverStatus.CLEANED_UP,
                                   vm_up_at=database_now(session), verified=True))
    assert rpo.check_rpo() == {"rpo_healthy": 1}
    resolved, quiet = alerts.raise_and_resolve_alerts(), alerts.raise_and_resolve_alerts()
    active = list_alerts(active=True)
    everything = list_alerts()

    assert raised == {"alerts_raised": 6} and again == {}
    assert kinds(rows) == [("drill_overdue", "raised"), ("host_silent", "raised"), ("operation_failed", "raised"),
                           ("operation_failed", "raised"), ("rpo_threshold", "raised"), ("vm_critical", "raised")]
    by_kind = {row["kind"]: row for row in rows}
    assert by_kind["vm_critical"]["subject"] == "hv01/app01" and "critical threshold of 16 min 40 s" in \
        by_kind["vm_critical"]["message"]
    assert by_kind["rpo_threshold"]["severity"] == "Critical"
    assert "hv01" in by_kind["host_silent"]["message"] and "asr worker host hv01" in by_kind["host_silent"]["message"]
    assert "no drill passed since its protection began" in by_kind["drill_overdue"]["message"]
    failed = sorted(row["subject"] for row in rows if row["kind"] == "operation_failed")
    assert failed == ["plan_test_failover app01", "planned_failover app01"], failed  # not the delta cycle's
    assert {row["delivery"] for row in rows} == {"not sent"}  # no webhook is configured

    assert resolved == {"alerts_resolved": 4} and quiet == {}
    assert kinds(active) == [("operation_failed", "raised"), ("operation_failed", "raised")]
    assert kinds(everything[:4]) == [("drill_overdue", "resolved"), ("host_silent", "resolved"),
                                     ("rpo_threshold", "resolved"), ("vm_critical", "resolved")]
    # A drill reminder of 0 days is off; a reminder counts from the last passed drill.
    with session_scope() as session:
        session.get(ReplicationPolicy, policy_id).drill_reminder_days = 0
        session.get(ProtectedItem, item_id).created_at = database_now(session) - timedelta(days=3000)
    assert alerts.raise_and_resolve_alerts() == {}


def test_two_evaluations_at_once_raise_a_condition_once(on_engine: Engine) -> None:
    condition = alerts.Condition(alerts.AlertKind.HOST_SILENT, "host_silent:h1", "Critical", "h1", "silent")
    with session_scope() as session:
        now = database_now(session)
    first, second = alerts._raise(condition, now, False), alerts._raise(condition, now, False)
    with session_scope() as session:
        count = session.exec(sa.select(sa.func.count()).select_from(Alert)).scalar_one()
    assert (first, second, count) == (True, False, 1)


@pytest.fixture
def webhook_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    secret_file = tmp_path / "webhook-secret"
    secret_file.write_bytes(SECRET + b"\n")
    monkeypatch.setenv("ASR_ALERT_WEBHOOK_SECRET_FILE", str(secret_file))
    monkeypatch.setenv("ASR_TIME_SCALE", "1000")  # the 30 s first retry in 30 ms
    return secret_file


def raise_silent_host(name: str = "hv02") -> None:
    with session_scope() as session:
        now = database_now(session)
    assert alerts._raise(alerts.Condition(alerts.AlertKind.HOST_SILENT, f"host_silent:{name}", "Critical", name,
                                          f"the agent of host {name} is silent"), now, True)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_an_alert_is_signed_retried_after_a_failure_and_recorded(on_engine: Engine, webhook_settings: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    with webhook_receiver() as receiver:
        monkeypatch.setenv("ASR_ALERT_WEBHOOK_URL", receiver.url)
        receiver.statuses = [503]
        raise_silent_host()
        first = webhook.deliver_due_alerts()
        after_failure = list_alerts()[0]
        time.sleep(0.1)  # past the first retry (30 s scaled)
        second = webhook.deliver_due_alerts()
        third = webhook.deliver_due_alerts()
        delivered = list_alerts()[0]
    assert first == {"alerts_retrying": 1} and second == {"alerts_delivered": 1} and third == {}
    assert after_failure["delivery"] == "pending" and after_failure["attempts"] == 1
    assert after_failure["last_error"].startswith("HTTP 503")
    assert delivered["delivery"] == "delivered" and delivered["attempts"] == 2 and delivered["last_error"] is None
    assert len(receiver.received) == 2
    for entry in receiver.received:
        assert entry.signed_with(SECRET) and not entry.signed_with(b"another secret of sixteen bytes")
        assert entry.headers["x-asr-alert-id"] == delivered["id"]  # a receiver drops repeats by it
        assert entry.alert == {"id": delivered["id"], "kind": "host_silent", "event": "raised",
                               "severity": "Critical", "subject": "hv02",
                               "message": "the agent of host hv02 is silent",
                               "created_at": entry.alert["created_at"]}


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_failed_failover_and_an_overdue_drill_reach_the_webhook(on_engine: Engine, webhook_settings: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    with session_scope() as session:
        item = make_protected_item(session, copy_frequency_s=30)
        session.get(ReplicationPolicy, item.policy_id).drill_reminder_days = 1
        now = database_now(session)
        item.created_at = now - timedelta(days=2)  # protected for two days (scaled: long ago), never drilled
        item.last_recovery_point_at = now  # healthy otherwise: only the two conditions hold
        failed = Job(kind="unplanned_failover", state=JobState.failed, ended_at=now, error="the recovery host is "
                     "full", target="app01")
        session.add(failed)
        session.flush()
        job_id = failed.id
    with webhook_receiver() as receiver:
        monkeypatch.setenv("ASR_ALERT_WEBHOOK_URL", receiver.url)
        raised = alerts.raise_and_resolve_alerts()
        delivered = webhook.deliver_due_alerts()
    assert raised == {"alerts_raised": 2} and delivered == {"alerts_delivered": 2}
    assert all(entry.signed_with(SECRET) for entry in receiver.received)
    sent = {alert["kind"]: alert for alert in receiver.alerts()}
    assert sorted(sent) == ["drill_overdue", "operation_failed"] and len(receiver.received) == 2
    assert (sent["operation_failed"]["severity"], sent["operation_failed"]["subject"]) == ("Critical",
                                                                                           "unplanned_failover app01")
    assert sent["operation_failed"]["message"].startswith(f"job {job_id} (unplanned_failover, app01) failed: the "
                                                          f"recovery host is full")
    assert (sent["drill_overdue"]["severity"], sent["drill_overdue"]["subject"]) == ("Warning", "hv01/app01")
    assert "no drill passed since its protection began" in sent["drill_overdue"]["message"]
    assert {row["delivery"] for row in list_alerts()} == {"delivered"}


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_an_unreachable_webhook_is_retried_then_given_up_with_the_reason(on_engine: Engine, webhook_settings: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    with webhook_receiver() as receiver:
        url = receiver.url
    monkeypatch.setenv("ASR_ALERT_WEBHOOK_URL", url)  # its server is closed: connections are refused
    monkeypatch.setattr(webhook, "MAX_ATTEMPTS", 3)
    raise_silent_host()
    outcomes = []
    for _ in range(3):
        outcomes.append(webhook.deliver_due_alerts())
        time.sleep(0.15)
    row = list_alerts()[0]
    assert outcomes == [{"alerts_retrying": 1}, {"alerts_retrying": 1}, {"alerts_given_up": 1}]
    assert row["delivery"] == "given up" and row["attempts"] == 3 and "ConnectError" in row["last_error"]
    assert webhook.deliver_due_alerts() == {}
    # The schedule backs off: 30 s, 1 min, 2 min ... an hour, then hourly.
    assert [webhook.retry_delay_s(n) for n in (1, 2, 3, 7, 8, 20)] == [30, 60, 120, 3600, 3600, 3600]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_delivery_pass_claims_each_alert_once(on_engine: Engine, webhook_settings: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASR_ALERT_WEBHOOK_URL", "http://127.0.0.1:9/unused")
    raise_silent_host()
    with session_scope() as session:
        now = database_now(session) + timedelta(seconds=1)
    assert (len(webhook._claim_due(now)), len(webhook._claim_due(now))) == (1, 0)


def test_webhook_settings_are_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ASR_ALERT_WEBHOOK_SECRET_FILE", raising=False)
    with pytest.raises(ValueError, match="ASR_ALERT_WEBHOOK_SECRET_FILE is not set"):
        settings.alert_webhook_secret()
    short = tmp_path / "short"
    short.write_bytes(b"too short")
    monkeypatch.setenv("ASR_ALERT_WEBHOOK_SECRET_FILE", str(short))
    with pytest.raises(ValueError, match="fewer than 16"):
        settings.alert_webhook_secret()
    monkeypatch.setenv("ASR_ALERT_WEBHOOK_SECRET_FILE", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="missing"):
        settings.alert_webhook_secret()
    monkeypatch.setenv("ASR_ALERT_WEBHOOK_URL", "ftp://example.org/x")
    with pytest.raises(ValueError, match="not an http"):
        settings.alert_webhook_url()
    monkeypatch.delenv("ASR_INSECURE_TRANSPORT", raising=False)
    monkeypatch.setenv("ASR_ALERT_WEBHOOK_URL", "http://receiver.example/x")
    with pytest.raises(InsecureTransportError, match="ASR_ALERT_WEBHOOK_URL"):
        settings.alert_webhook_url()
    monkeypatch.setenv("ASR_ALERT_WEBHOOK_URL", "https://receiver.example/x")
    assert settings.alert_webhook_url() == "https://receiver.example/x"


def test_the_cli_lists_alerts_and_sets_a_policys_drill_reminder(tmp_path: Path) -> None:
    added = asr(tmp_path, "policy", "add", "gold", "--drill-reminder-days", "30", "--json")
    changed = asr(tmp_path, "policy", "set", "gold", "--drill-reminder-days", "0", "--json")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ASR_DATABASE_URL", f"sqlite:///{tmp_path / 'asr.db'}")
        dispose_engines()
        raise_silent_host()
        dispose_engines()
    listed = asr(tmp_path, "alerts", "list", "--json")
    active = asr(tmp_path, "alerts", "list", "--active")
    assert added.returncode == 0 and json.loads(added.stdout)["drill_reminder_days"] == 30, added.stderr
    assert changed.returncode == 0 and json.loads(changed.stdout)["drill_reminder_days"] == 0, changed.stderr
    assert [(row["kind"], row["subject"], row["delivery"]) for row in json.loads(listed.stdout)] == \
        [("host_silent", "hv02", "pending")]
    assert active.returncode == 0 and "host_silent" in active.stdout and "hv02" in active.stdout


def test_the_consoles_dashboard_shows_the_active_alerts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from test_console import browser, log_in  # the console's in-process client

    monkeypatch.setenv("ASR_DATABASE_URL", f"sqlite:///{tmp_path / 'asr.db'}")
    monkeypatch.setenv("ASR_HOME", str(tmp_path / "home"))
    dispose_engines()
    key = api_service.create_api_key("console-reader", "reader")["key"]
    with browser() as client:
        log_in(client, key)
        quiet = client.get("/console/").text
        raise_silent_host()
        alerted = client.get("/console/").text
    dispose_engines()
    assert "No alert is active." in quiet
    assert 'data-kind="host_silent"' in alerted and "the agent of host hv02 is silent" in alerted
    assert "No alert is active." not in alerted


def test_beat_sends_the_delivery_of_alerts_only_where_a_webhook_is_configured(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from workflows.scheduler import DELIVER_ALERTS_TASK, TICK_TASK, beat_schedule

    monkeypatch.delenv("ASR_ALERT_WEBHOOK_URL", raising=False)
    without = {entry["task"] for entry in beat_schedule().values()}
    monkeypatch.setenv("ASR_ALERT_WEBHOOK_URL", "https://receiver.example/hooks")
    with_webhook = {entry["task"] for entry in beat_schedule().values()}
    assert (without, with_webhook) == ({TICK_TASK}, {TICK_TASK, DELIVER_ALERTS_TASK})


def test_a_worker_loads_no_http_client_until_it_delivers_an_alert() -> None:
    """httpx imports its command-line tool (rich, pygments) with it: tens of milliseconds at every worker
    start, for a webhook only beat's alert pass uses. The worker's task modules leave it to that pass."""
    probe = ("import sys, worker, tasks; "
             "print(sorted(name for name in ('httpx', 'rich', 'pygments') if name in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                            cwd=Path(__file__).resolve().parents[1], env={**os.environ, "ASR_INSECURE_TRANSPORT": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
