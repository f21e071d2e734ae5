"""Immutable retention: recovery points inside their retention lock cannot be deleted, by anyone.

Each point carries its own lock end (`RecoveryPoint.locked_until`, fixed when it was recorded from its
policy's `retention_lock_h`). Retention pruning stops at the first locked point
(`models.protection.prune_recovery_points`); here are the checks of the two operator requests that delete
points: deleting a VM's points before a time (the `delete_recovery_points` job) and disabling protection
(which deletes all of them). Each refuses with RetentionLockError naming when the lock ends, before anything
is deleted; the service layer checks before a job is created, the job's step checks again before it deletes
(a point may have become locked since, or a request may not have come through the service).

The lock is the application's: the database's owner role, and anyone with write access to the recovery
storage, can still delete what it protects (docs/operations.md, "Retention lock").
"""
from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from sqlmodel import Session

from models.db import as_utc
from models.policy import RetentionLockError
from models.protection import ProtectedItem, RecoveryPoint, recovery_points

__all__ = ["points_before", "require_unlocked", "deletable_points_before", "delete_points_before",
           "require_disable_allowed"]


def points_before(session: Session, item: ProtectedItem, before: datetime) -> list[RecoveryPoint]:
    """The item's points made before `before`, oldest first, never its latest point: a replica must stay
    recoverable (as retention pruning keeps the latest however old it is)."""
    cutoff = as_utc(before)
    return [point for point in recovery_points(session, item)[:-1] if point.created_at < cutoff]


def require_unlocked(points: Iterable[RecoveryPoint], now: datetime, doing: str) -> None:
    """RetentionLockError when any of `points` is inside its retention lock at `now`, naming when the last
    of their locks ends; `doing` says what was refused ("delete 3 recovery points of VM 'app01'")."""
    locked = [point for point in points if point.locked_at(now)]
    if not locked:
        return
    end = max(point.locked_until for point in locked)
    raise RetentionLockError(
        f"cannot {doing}: {len(locked)} of them {'is' if len(locked) == 1 else 'are'} inside the retention "
        f"lock until {end.isoformat(timespec='seconds')} (the oldest locked: point {locked[0].id} of "
        f"{locked[0].created_at.isoformat(timespec='seconds')}); nothing was deleted. Locked points cannot be "
        f"deleted by anyone until their lock ends")


def deletable_points_before(session: Session, item: ProtectedItem, before: datetime, now: datetime,
                            vm_name: str) -> list[RecoveryPoint]:
    """The item's points made before `before` (never the latest) that a delete request would delete:
    RetentionLockError when any of them is locked at `now`. The request's check and its step's."""
    doomed = points_before(session, item, before)
    require_unlocked(doomed, now, f"delete {len(doomed)} recovery point(s) of VM {vm_name!r} made before "
                                  f"{as_utc(before).isoformat(timespec='seconds')}")
    return doomed


def delete_points_before(session: Session, item: ProtectedItem, before: datetime, now: datetime,
                         vm_name: str) -> list[RecoveryPoint]:
    """Delete the item's points made before `before` (never the latest), all or none: RetentionLockError,
    nothing deleted, when any of them is locked at `now`. Returns the deleted points. Idempotent: a second
    call finds them gone. The caller prunes the replica versions no kept point needs."""
    doomed = deletable_points_before(session, item, before, now, vm_name)
    for point in doomed:
        session.delete(point)
    session.flush()
    return doomed


def require_disable_allowed(session: Session, item: ProtectedItem, now: datetime, vm_name: str) -> None:
    """RetentionLockError when any point of the item is locked at `now`: disabling protection deletes every
    point and replica."""
    require_unlocked(recovery_points(session, item), now,
                     f"disable protection of VM {vm_name!r}, which deletes its recovery points")
