"""Immutable retention (issue 11): a policy's retention lock, the lock each recovery point carries, retention
pruning that keeps locked points, and the refusals of deleting points and of disabling protection while a point
is locked, at the model, the service and the REST API (its roles too). SQLite and PostgreSQL; no workers: the
requests refused here are refused before any job exists (tests/test_retention_lock_site.py runs the jobs).
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, select
from starlette.testclient import TestClient

from api import service
from api.rest import API_PREFIX, app
from api.rest import auth as rest_auth
from models import apikeys, fabric, protection
from models import policy as policies
from models.db import database_now, session_scope
from models.jobs import Job
from models.policy import MAX_RETENTION_LOCK_H, ReplicationPolicy, RetentionLockError
from models.protection import ProtectedItem, RecoveryPoint, ReplicationState
from models.retention_lock import delete_points_before, points_before, require_disable_allowed
from workflows.kinds import delete_recovery_points

DISK = "3b8f1f59-0f6c-4c1e-9d39-6d4c8e3b8a01"
KEYS = {role: apikeys.new_key()[0] for role in apikeys.ROLES}


# ---- a protected VM with points, some locked -------------------------------------------------------------
@pytest.fixture(autouse=True)
def storage_roots(monkeypatch: pytest.MonkeyPatch) -> None:
    # The administrator's allow-list of local recovery storage (sites/storage/policy.py) names the items' folder.
    monkeypatch.setenv("ASR_STORAGE_ROOTS", "/srv/recovery")


def protected_item(session: Session, *, retention_h: int = 2, lock_h: int = 0) -> ProtectedItem:
    site = fabric.create_site(session, "branch-office")
    host, _key = fabric.register_host(session, "hv01", "/srv/hosts/hv01", site=site)
    vm = fabric.add_vm(session, host, "app01", [{"name": "disk0", "file": "disk0.vhd", "size": 8 << 20,
                                                   "format": "vhd"}], [])
    policy = policies.create_policy(session, "gold", recovery_point_retention_h=retention_h,
                                    app_consistent_frequency_h=0, retention_lock_h=lock_h)
    item = protection.protect_vm(session, vm, policy, recovery_storage="file:///srv/recovery")
    protection.transition(item, ReplicationState.INITIAL_REPLICATION)
    protection.transition(item, ReplicationState.PROTECTED)
    session.add(item)
    session.flush()
    return item


def record(session: Session, item: ProtectedItem, created_at: datetime, generation: int) -> RecoveryPoint:
    return protection.record_recovery_point(session, item, {DISK: generation}, created_at, versions={DISK: generation})


def lock_policy(session: Session, hours: int) -> None:
    policy = session.exec(select(ReplicationPolicy).where(ReplicationPolicy.name == "gold")).one()
    policies.update_policy(session, policy, retention_lock_h=hours)


def item_with_mixed_points(engine: Engine) -> tuple[str, datetime, dict[str, datetime]]:
    """app01 protected under "gold" (retention 0 h): two points made before the lock was turned on, then the lock
    at 2 h and three more: one whose lock has ended, two still locked. Returns the item id, now, and the points'
    times by name."""
    with session_scope(engine) as session:
        now = database_now(session)
        item = protected_item(session, retention_h=0)
        times = {"old1": now - timedelta(hours=5), "old2": now - timedelta(hours=4)}
        for generation, name in enumerate(("old1", "old2"), start=1):
            record(session, item, times[name], generation)
        lock_policy(session, 2)
        times |= {"expired": now - timedelta(hours=3), "locked": now - timedelta(hours=1),
                  "latest": now - timedelta(minutes=10)}
        for generation, name in enumerate(("expired", "locked", "latest"), start=3):
            record(session, item, times[name], generation)
        return item.id, now, times


def point_rows(engine: Engine, item_id: str) -> list[tuple[str, datetime, datetime | None]]:
    with session_scope(engine) as session:
        return [(point.id, point.created_at, point.locked_until)
                for point in protection.recovery_points(session, session.get(ProtectedItem, item_id))]


# ---- the policy's setting ------------------------------------------------------------------------------------
def test_the_lock_is_off_by_default_and_validated_like_every_setting(engine: Engine) -> None:
    with session_scope(engine) as session:
        assert policies.create_policy(session, "plain").retention_lock_h == 0
        assert policies.create_policy(session, "year", retention_lock_h=MAX_RETENTION_LOCK_H).retention_lock_h == 8760
        for wrong in (-1, 8761, True, "24", 2.5):
            with pytest.raises(ValueError, match=r"retention lock \(hours\) must be a whole number from 0 to 8760"):
                policies.create_policy(session, "wrong", retention_lock_h=wrong)
        assert "retention_lock_h" in policies.POLICY_SETTINGS


def test_a_lock_that_is_on_can_be_raised_but_never_lowered_or_turned_off(engine: Engine) -> None:
    with session_scope(engine) as session:
        policy = policies.create_policy(session, "gold")
        policies.update_policy(session, policy, retention_lock_h=0)  # off stays off: nothing to lower
        policies.update_policy(session, policy, retention_lock_h=24)
        policies.update_policy(session, policy, retention_lock_h=48)
        policies.update_policy(session, policy, copy_frequency_s=30)  # other settings change freely
        policies.update_policy(session, policy, retention_lock_h=48)  # the same value is no lowering
        for lower, said in ((24, "cannot be lowered to 24 h"), (0, "cannot be turned off")):
            with pytest.raises(RetentionLockError, match=f"retention lock of 48 h {said}: a lock that is on can "
                                                         f"only be raised"):
                policies.update_policy(session, policy, retention_lock_h=lower, copy_frequency_s=900)
        with pytest.raises(ValueError, match="from 0 to 8760"):
            policies.update_policy(session, policy, retention_lock_h=9000)
        policy_id = policy.id
    with session_scope(engine) as session:
        stored = session.get(ReplicationPolicy, policy_id)
        assert (stored.retention_lock_h, stored.copy_frequency_s) == (48, 30), "a refused change changes nothing"


def test_each_point_keeps_the_lock_its_policy_had_when_it_was_made(engine: Engine) -> None:
    with session_scope(engine) as session:
        now = database_now(session)
        item = protected_item(session)
        unlocked = record(session, item, now - timedelta(hours=2), 1)
        lock_policy(session, 24)
        day = record(session, item, now - timedelta(hours=1), 2)
        lock_policy(session, 48)
        two_days = record(session, item, now, 3)
        assert unlocked.locked_until is None and not unlocked.locked_at(now)
        assert day.locked_until == now - timedelta(hours=1) + timedelta(hours=24)
        assert two_days.locked_until == now + timedelta(hours=48)
        assert day.locked_at(now) and not day.locked_at(now + timedelta(hours=23))
        item_id = item.id
    # Read back from the database: the same instants, aware UTC.
    rows = point_rows(engine, item_id)
    assert [locked for _id, _created, locked in rows] == [None, now + timedelta(hours=23), now + timedelta(hours=48)]


# ---- retention pruning ---------------------------------------------------------------------------------------
def test_pruning_stops_at_the_first_locked_point_and_keeps_every_point_after_it(engine: Engine) -> None:
    item_id, now, times = item_with_mixed_points(engine)
    with session_scope(engine) as session:
        item = session.get(ProtectedItem, item_id)
        pruned = protection.prune_recovery_points(session, item, now)
        # Retention 0 h: everything but the latest is expired; the lock keeps "locked" (and the latest).
        assert sorted(point.created_at for point in pruned) == [times["old1"], times["old2"], times["expired"]]
    assert [created for _id, created, _locked in point_rows(engine, item_id)] == [times["locked"], times["latest"]]
    with session_scope(engine) as session:
        item = session.get(ProtectedItem, item_id)
        assert protection.prune_recovery_points(session, item, now + timedelta(minutes=30)) == []
        # Once the lock has ended, retention applies again (the latest point always stays).
        assert len(protection.prune_recovery_points(session, item, now + timedelta(hours=2))) == 1
        assert len(protection.recovery_points(session, item)) == 1


def test_an_unlocked_point_after_a_locked_one_is_kept_too(engine: Engine) -> None:
    # Only a lock set by hand can be out of order (a lock can only be raised): pruning still deletes only the
    # oldest points, up to the first locked one, so the kept points are the newest and their replica versions
    # (a version is read through the undo logs of every later one) all stay.
    with session_scope(engine) as session:
        now = database_now(session)
        item = protected_item(session, retention_h=0)
        points = [record(session, item, now - timedelta(hours=hours), 6 - hours) for hours in (5, 4, 3, 2)]
        points[1].locked_until = now + timedelta(hours=1)
        session.add(points[1])
        session.flush()
        pruned = protection.prune_recovery_points(session, item, now)
        assert [point.versions[DISK] for point in pruned] == [1]
        assert [point.versions[DISK] for point in protection.recovery_points(session, item)] == [2, 3, 4]


# ---- deleting points, disabling protection -------------------------------------------------------------------
def test_deleting_points_is_all_or_none_and_never_touches_a_locked_one(engine: Engine) -> None:
    item_id, now, times = item_with_mixed_points(engine)
    before = point_rows(engine, item_id)
    with session_scope(engine) as session:
        item = session.get(ProtectedItem, item_id)
        end = re.escape((times["locked"] + timedelta(hours=2)).isoformat(timespec="seconds"))
        with pytest.raises(RetentionLockError, match=rf"cannot delete 4 recovery point\(s\) of VM 'app01' made "
                                                     rf"before .*: 1 of them is inside the retention lock until "
                                                     rf"{end}.*nothing was deleted"):
            delete_points_before(session, item, now, now, "app01")
    assert point_rows(engine, item_id) == before
    with session_scope(engine) as session:
        item = session.get(ProtectedItem, item_id)
        # Up to the locked point: the two made before the lock and the one whose lock has ended.
        deleted = delete_points_before(session, item, times["locked"], now, "app01")
        assert sorted(point.created_at for point in deleted) == [times["old1"], times["old2"], times["expired"]]
        assert delete_points_before(session, item, times["locked"], now, "app01") == []  # a rerun finds them gone
    assert [created for _id, created, _locked in point_rows(engine, item_id)] == [times["locked"], times["latest"]]
    with session_scope(engine) as session:
        item = session.get(ProtectedItem, item_id)
        # Once its lock has ended it can go; the latest point never does.
        later = now + timedelta(hours=3)
        assert [point.created_at for point in delete_points_before(session, item, later, later, "app01")] == [
            times["locked"]]
        assert points_before(session, item, later + timedelta(days=1)) == []


def test_disabling_protection_is_refused_while_any_point_is_locked(engine: Engine) -> None:
    item_id, now, times = item_with_mixed_points(engine)
    with session_scope(engine) as session:
        item = session.get(ProtectedItem, item_id)
        end = times["latest"] + timedelta(hours=2)
        with pytest.raises(RetentionLockError, match=rf"cannot disable protection of VM 'app01', which deletes its "
                                                     rf"recovery points: 2 of them are inside the retention lock "
                                                     rf"until {re.escape(end.isoformat(timespec='seconds'))}"):
            require_disable_allowed(session, item, now, "app01")
        require_disable_allowed(session, item, end, "app01")  # allowed once the last lock has ended


# ---- the service and the REST API ----------------------------------------------------------------------------
@pytest.fixture
def api(engine: Engine, db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    """The real REST app (and service layer) on the test's database, with a key of each role."""
    monkeypatch.setenv("ASR_DATABASE_URL", db_url)
    monkeypatch.setenv("ASR_API_KEY_HASHES", ",".join(apikeys.env_entry(key, role) for role, key in KEYS.items()))
    for cache in (rest_auth._key_cache, rest_auth._bad_keys, rest_auth._limiter):
        cache.clear()
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client
    for cache in (rest_auth._key_cache, rest_auth._bad_keys, rest_auth._limiter):
        cache.clear()


def as_role(role: str) -> dict[str, str]:
    return {"X-API-Key": KEYS[role]}


def job_count(engine: Engine) -> int:
    with session_scope(engine) as session:
        return len(session.exec(select(Job.id)).all())


def test_the_service_answers_409_for_a_lowered_lock_a_locked_delete_and_a_locked_disable(
        engine: Engine, api: TestClient) -> None:
    item_id, now, times = item_with_mixed_points(engine)
    before = point_rows(engine, item_id)
    with pytest.raises(service.Conflict, match="cannot be lowered to 1 h") as lowered:
        service.update_policy("gold", retention_lock_h=1)
    assert lowered.value.status == 409
    with pytest.raises(service.Invalid, match="from 0 to 8760"):
        service.add_policy("too-long", retention_lock_h=8761)
    assert service.add_policy("locked", retention_lock_h=12)["retention_lock_h"] == 12
    assert service.update_policy("gold", retention_lock_h=3)["retention_lock_h"] == 3

    # The latest point is never deleted: of those the request names, "locked" is the one locked.
    end = re.escape((times["locked"] + timedelta(hours=2)).isoformat(timespec="seconds"))
    with pytest.raises(service.Conflict, match=rf"1 of them is inside the retention lock until {end}"):
        service.delete_recovery_points("app01", before=now.isoformat(), confirm="app01")
    with pytest.raises(service.Conflict, match="which deletes its recovery points: 2 of them"):
        service.disable_protection("app01", confirm="app01")
    # A wrong confirmation is refused before the lock is looked at; a time that does not read is bad input.
    with pytest.raises(service.ServiceError, match="cannot be undone: confirm by sending") as unconfirmed:
        service.delete_recovery_points("app01", before=now.isoformat(), confirm="app02")
    assert unconfirmed.value.status == 400
    with pytest.raises(service.Invalid, match="not an ISO 8601 time"):
        service.delete_recovery_points("app01", before="yesterday", confirm="app01")
    # The request is checked before a job exists: how many points it would delete, none locked.
    assert delete_recovery_points.check(item_id, times["locked"]) == 3
    assert point_rows(engine, item_id) == before and job_count(engine) == 0

    listed = service.recovery_points("app01")
    assert [point["locked_until"] for point in listed] == [
        None, None, *((times[name] + timedelta(hours=2)).isoformat() for name in ("expired", "locked", "latest"))]
    assert service.show_policy("gold")["retention_lock_h"] == 3


def test_the_rest_api_answers_409_and_only_an_admin_may_delete_points(engine: Engine, api: TestClient) -> None:
    item_id, now, times = item_with_mixed_points(engine)
    before = point_rows(engine, item_id)
    route = f"{API_PREFIX}/vms/app01/recovery-points/delete"
    body = {"before": now.isoformat(), "confirm": "app01"}
    for role in ("reader", "operator"):
        refused = api.post(route, headers=as_role(role), json=body)
        assert refused.status_code == 403 and "the admin role" in refused.json()["error"], refused.text

    locked = api.post(route, headers=as_role("admin"), json=body)
    end = (times["locked"] + timedelta(hours=2)).isoformat(timespec="seconds")
    assert locked.status_code == 409 and f"until {end}" in locked.json()["error"], locked.text
    unconfirmed = api.post(route, headers=as_role("admin"), json={"before": now.isoformat()})
    assert unconfirmed.status_code == 400 and 'confirm by sending {"confirm": "app01"}' in unconfirmed.json()["error"]
    assert api.post(route, headers=as_role("admin"), json={"confirm": "app01"}).status_code == 422

    disable = api.post(f"{API_PREFIX}/vms/app01/disable-protection", headers=as_role("admin"),
                       json={"confirm": "app01"})
    assert disable.status_code == 409 and "inside the retention lock" in disable.json()["error"], disable.text

    lowered = api.patch(f"{API_PREFIX}/policies/gold", headers=as_role("admin"), json={"retention_lock_h": 0})
    assert lowered.status_code == 409 and "cannot be turned off" in lowered.json()["error"], lowered.text
    raised = api.patch(f"{API_PREFIX}/policies/gold", headers=as_role("admin"), json={"retention_lock_h": 24})
    assert raised.status_code == 200 and raised.json()["retention_lock_h"] == 24
    assert api.patch(f"{API_PREFIX}/policies/gold", headers=as_role("operator"),
                     json={"retention_lock_h": 48}).status_code == 403

    listed = api.get(f"{API_PREFIX}/vms/app01/recovery-points", headers=as_role("reader")).json()
    assert listed[-1]["locked_until"] == (times["latest"] + timedelta(hours=2)).isoformat()
    assert point_rows(engine, item_id) == before and job_count(engine) == 0


def test_a_vm_that_is_failed_over_is_refused_a_delete_by_its_state(engine: Engine, api: TestClient) -> None:
    item_id, now, _times = item_with_mixed_points(engine)
    with session_scope(engine) as session:
        item = session.get(ProtectedItem, item_id)
        protection.transition(item, ReplicationState.FAILING_OVER)
        session.add(item)
    with pytest.raises(service.Conflict, match="cannot delete recovery points of VM 'app01'.*failing_over"):
        service.delete_recovery_points("app01", before=(now - timedelta(days=1)).isoformat(), confirm="app01")


def test_points_made_before_the_upgrade_have_no_lock(engine: Engine) -> None:
    # Migration 0010 adds the column empty: nothing deletable before the upgrade becomes locked by it.
    with session_scope(engine) as session:
        now = datetime.now(UTC)
        item = protected_item(session, lock_h=0)
        point = record(session, item, now, 1)
        assert point.locked_until is None and not point.locked_at(now)


def test_asr_takes_a_time_back_from_now_for_before() -> None:
    from api.cli_parsing import _moment

    now = datetime.now(UTC)
    assert abs(_moment("-2h", "--before") - (now - timedelta(hours=2))) < timedelta(seconds=5)
    assert abs(_moment("-30m", "--before") - (now - timedelta(minutes=30))) < timedelta(seconds=5)
    assert abs(_moment("+30m", "--initial-replication-at") - (now + timedelta(minutes=30))) < timedelta(seconds=5)
    assert _moment("2030-01-01T02:00", "--before") == datetime(2030, 1, 1, 2, 0, tzinfo=UTC)
