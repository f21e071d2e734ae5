"""Protected items (one per protected VM), their replication state and health, and recovery points.

The replication state moves only along `ALLOWED_TRANSITIONS`; any other move is an invalid replica state,
a non-recoverable error as in the reference. Health is the worst severity among the item's current
errors, each kept once per code with when it was last seen.
"""
import enum
import json
from collections.abc import Mapping
from datetime import datetime, timedelta
from pathlib import PurePosixPath
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import object_session
from sqlmodel import Field, Session, SQLModel, select

from datapath.errors import NonRecoverableError
from models.db import UtcDateTime, as_utc, clock_now, new_id, string_enum
from models.fabric import Host, VirtualMachine
from models.policy import ReplicationPolicy
from sites.storage.policy import StoragePolicyError, check_storage
from workflows import settings

__all__ = [
    "ReplicationState", "Health", "RecoveryPointKind", "ProtectedItem", "RecoveryPoint", "InvalidStateError",
    "ALLOWED_TRANSITIONS", "ROLLBACKS", "protect_vm", "transition", "roll_back", "require_resync", "mark_critical",
    "mark_warning",
    "mark_healthy", "record_recovery_point", "recovery_points", "prune_recovery_points", "item_lock_key",
]


class ReplicationState(enum.StrEnum):
    ENABLING_PROTECTION = "enabling_protection"
    INITIAL_REPLICATION_PENDING = "initial_replication_pending"
    """Initial replication is scheduled for later (the policy's start time)."""
    INITIAL_REPLICATION = "initial_replication"
    PROTECTED = "protected"
    RESYNC_REQUIRED = "resync_required"
    RESYNCHRONIZING = "resynchronizing"
    FAILING_OVER = "failing_over"
    FAILED_OVER = "failed_over"
    """Running at the recovery site, not committed: the failover can still be cancelled."""
    FAILOVER_COMMITTED = "failover_committed"
    """The recovery site's VM is the VM now; the primary is not replicated any more."""
    FAILING_BACK = "failing_back"
    FAILBACK_READY = "failback_ready"
    """Minimize-downtime failback: the primary holds a staged copy; waits for the operator to complete."""
    FAILED_BACK = "failed_back"
    """Running on the primary again, from the swapped-in disks; waits for commit."""
    FAILBACK_COMMITTED = "failback_committed"
    """Waits for reverse replication to protect the primary again."""
    DISABLING_PROTECTION = "disabling_protection"
    DISABLED = "disabled"


class Health(enum.StrEnum):
    HEALTHY = "Healthy"
    WARNING = "Warning"
    CRITICAL = "Critical"


class RecoveryPointKind(enum.StrEnum):
    CRASH_CONSISTENT = "crash_consistent"
    APP_CONSISTENT = "app_consistent"


_S = ReplicationState
ALLOWED_TRANSITIONS: dict[ReplicationState, frozenset[ReplicationState]] = {
    # A failed or cancelled enable is cleaned up by disabling protection.
    _S.ENABLING_PROTECTION: frozenset(
        {_S.INITIAL_REPLICATION_PENDING, _S.INITIAL_REPLICATION, _S.DISABLING_PROTECTION}
    ),
    _S.INITIAL_REPLICATION_PENDING: frozenset({_S.INITIAL_REPLICATION, _S.DISABLING_PROTECTION}),
    # An initial copy whose tracking was lost cannot finish by copying: it needs a resync.
    _S.INITIAL_REPLICATION: frozenset({_S.PROTECTED, _S.RESYNC_REQUIRED, _S.DISABLING_PROTECTION}),
    _S.PROTECTED: frozenset({_S.RESYNC_REQUIRED, _S.FAILING_OVER, _S.DISABLING_PROTECTION}),
    # Failover uses existing recovery points, so it stays possible while the replica needs a resync.
    _S.RESYNC_REQUIRED: frozenset({_S.RESYNCHRONIZING, _S.FAILING_OVER, _S.DISABLING_PROTECTION}),
    _S.RESYNCHRONIZING: frozenset({_S.PROTECTED, _S.RESYNC_REQUIRED, _S.FAILING_OVER, _S.DISABLING_PROTECTION}),
    # A failover that fails returns the item to replicating (or needing a resync).
    _S.FAILING_OVER: frozenset({_S.FAILED_OVER, _S.PROTECTED, _S.RESYNC_REQUIRED}),
    # From failed over: fail over again to another point, cancel (the primary resumes), commit, or stop.
    _S.FAILED_OVER: frozenset({_S.FAILING_OVER, _S.PROTECTED, _S.FAILOVER_COMMITTED, _S.DISABLING_PROTECTION}),
    _S.FAILOVER_COMMITTED: frozenset({_S.FAILING_BACK, _S.DISABLING_PROTECTION}),
    # A cancelled or failed failback leaves the recovery VM the VM (the primary's disks were not swapped).
    _S.FAILING_BACK: frozenset({_S.FAILBACK_READY, _S.FAILED_BACK, _S.FAILOVER_COMMITTED}),
    _S.FAILBACK_READY: frozenset({_S.FAILING_BACK, _S.FAILOVER_COMMITTED}),
    _S.FAILED_BACK: frozenset({_S.FAILBACK_COMMITTED}),
    # Reverse replication is a resynchronization against the replica the failover started from.
    _S.FAILBACK_COMMITTED: frozenset({_S.RESYNCHRONIZING, _S.DISABLING_PROTECTION}),
    _S.DISABLING_PROTECTION: frozenset({_S.DISABLED}),
    _S.DISABLED: frozenset({_S.ENABLING_PROTECTION}),
}

# Where a failover or failback job that failed or was cancelled puts the item back, as data: for the state
# the job left it in, (the state before the operation began, how the job ended) -> the state to return to,
# None standing for any. A failover returns the item to replicating as before (a resync it interrupted must
# start again); a failback leaves the recovery VM the VM, except that a failed completion of a minimize-
# downtime failback can be completed again. Every target is a move of ALLOWED_TRANSITIONS (`roll_back`).
ROLLBACKS: dict[ReplicationState, dict[tuple[ReplicationState | None, str | None], ReplicationState]] = {
    _S.FAILING_OVER: {
        (_S.PROTECTED, None): _S.PROTECTED,
        (_S.RESYNC_REQUIRED, None): _S.RESYNC_REQUIRED,
        (_S.RESYNCHRONIZING, None): _S.RESYNC_REQUIRED,
        (_S.FAILED_OVER, None): _S.FAILED_OVER,
        (None, None): _S.PROTECTED,
    },
    _S.FAILING_BACK: {
        (_S.FAILBACK_READY, "failed"): _S.FAILBACK_READY,
        (None, None): _S.FAILOVER_COMMITTED,
    },
}
del _S

_SEVERITY = {Health.HEALTHY: 0, Health.WARNING: 1, Health.CRITICAL: 2}
# Values that are credentials themselves; storage options must hold references to them (an environment
# variable's name, a file path), never the secret, since the database is readable by every worker.
_SECRET_MARKERS = ("accountkey=", "sharedaccesssignature=", "sig=")


class InvalidStateError(NonRecoverableError):
    """A replication-state move the state machine does not allow ("invalid replica state")."""


# ---- tables ------------------------------------------------------------------------------------
class ProtectedItem(SQLModel, table=True):
    __tablename__ = "protected_item"

    id: str = Field(default_factory=new_id, primary_key=True, max_length=36)
    vm_id: str = Field(foreign_key="virtual_machine.id", unique=True, max_length=36)
    policy_id: str = Field(foreign_key="replication_policy.id", index=True, max_length=36)
    recovery_storage: str = Field(max_length=4096)
    """What `sites.storage.open_storage` opens: "file:///abs/dir" or "azure:<container>"."""
    storage_options: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON)
    """Options for the storage opener; credentials only by reference (e.g. an environment variable name)."""
    replication_state: ReplicationState = Field(
        default=ReplicationState.ENABLING_PROTECTION, sa_type=string_enum(ReplicationState)
    )
    health: Health = Field(default=Health.HEALTHY, sa_type=string_enum(Health))
    health_errors: list[dict[str, Any]] = Field(default_factory=list, sa_type=sa.JSON)
    """[{"code", "message", "severity", "at" (ISO 8601 UTC)}], one per code."""
    resync_required_reason: str | None = Field(default=None, max_length=2048)
    resync_scheduled_for: datetime | None = Field(default=None, sa_type=UtcDateTime)
    last_recovery_point_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    """The latest recovery point's time (on the database's clock): the RPO is now minus this, computed
    when read (workflows.rpo), never stored."""
    last_replicated_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    """When replication last succeeded: the latest point was applied at the recovery site (database clock)."""
    unsent_ratio: float = Field(default=0.0)
    """The largest share, over the item's disks, of tracked changes not yet sent."""
    next_delta_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    next_app_consistent_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    """When the next delta cycle quiesces the VM first and makes an app-consistent point."""
    recovery_host_id: str | None = Field(default=None, foreign_key="host.id", max_length=36)
    """The recovery site's compute host failovers create the VM on (unless a failover names another)."""
    replica_folder: str | None = Field(default=None, max_length=200)
    """`<host>/<vm>` of the replicas, fixed when protection is enabled, so a VM failed back to an alternate
    host keeps its replicas (reverse replication then sends only what differs)."""
    initial_replication_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    """When a scheduled initial replication starts (state initial_replication_pending); None otherwise."""
    next_consistency_check_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    """When the scheduler starts the next consistency check (the policy's interval after the last one);
    None until the scheduler first sees the item protected."""
    created_at: datetime = Field(default_factory=clock_now, sa_type=UtcDateTime)
    updated_at: datetime = Field(
        default_factory=clock_now, sa_type=UtcDateTime, sa_column_kwargs={"onupdate": clock_now}
    )


class RecoveryPoint(SQLModel, table=True):
    __tablename__ = "recovery_point"
    __table_args__ = (sa.Index("ix_recovery_point_item_created", "item_id", "created_at"),)

    id: str = Field(default_factory=new_id, primary_key=True, max_length=36)
    item_id: str = Field(foreign_key="protected_item.id", max_length=36, ondelete="CASCADE")
    generations: dict[str, int] = Field(sa_type=sa.JSON)
    """{disk_uuid: generation of the last replication log applied to that disk}."""
    created_at: datetime = Field(sa_type=UtcDateTime)
    """On the database's clock, taken just before the host sealed the point's logs: the point holds every
    write made before it (so an RPO measured from it is never under-stated)."""
    kind: RecoveryPointKind = Field(sa_type=string_enum(RecoveryPointKind))
    manifest_roots: dict[str, str] = Field(default_factory=dict, sa_type=sa.JSON)
    """{disk_uuid: checksum-manifest root of the replica at this point}."""
    versions: dict[str, int] = Field(default_factory=dict, sa_type=sa.JSON)
    """{disk_uuid: replica version at this point} (datapath.points opens a replica at a version)."""
    locked_until: datetime | None = Field(default=None, sa_type=UtcDateTime)
    """Until when the point cannot be deleted (immutable retention): its time plus the retention lock its
    policy had when it was recorded; None when the policy had none. Fixed then: a later change of the
    policy does not shorten it (nor can one: a lock that is on can only be raised)."""

    def locked_at(self, now: datetime) -> bool:
        """Whether the point is still inside its retention lock at `now`."""
        return self.locked_until is not None and as_utc(now) < self.locked_until


# ---- protecting a VM ---------------------------------------------------------------------------
def protect_vm(
    session: Session, vm: VirtualMachine, policy: ReplicationPolicy, *, recovery_storage: str,
    storage_options: Mapping[str, Any] | None = None, recovery_host: Host | None = None,
) -> ProtectedItem:
    """The VM's protected item, new in state enabling_protection. A VM whose protection was disabled
    gets its item back, re-enabling; a VM protected already is refused. `recovery_host` is where its
    failovers create the VM by default."""
    where = f"protection of VM {vm.name!r}"
    _check_recovery_storage(where, recovery_storage)
    options = _check_storage_options(where, storage_options or {})
    try:
        check_storage(recovery_storage, options, roots=settings.storage_roots(),
                      account_urls=settings.storage_account_urls())
    except StoragePolicyError as exc:
        raise ValueError(f"{where}: {exc}") from None
    item = session.exec(select(ProtectedItem).where(ProtectedItem.vm_id == vm.id)).first()
    if item is None:
        item = ProtectedItem(
            vm_id=vm.id, policy_id=policy.id, recovery_storage=recovery_storage, storage_options=options,
        )
    elif item.replication_state is ReplicationState.DISABLED:
        transition(item, ReplicationState.ENABLING_PROTECTION)
        item.policy_id, item.recovery_storage, item.storage_options = policy.id, recovery_storage, options
        item.health, item.health_errors = Health.HEALTHY, []
        item.last_recovery_point_at = item.last_replicated_at = item.next_delta_at = None
        item.initial_replication_at = item.next_consistency_check_at = None
        item.resync_required_reason = item.resync_scheduled_for = None
        item.unsent_ratio = 0.0
    else:
        raise ValueError(f"VM {vm.name!r} is already protected (item {item.id}, state {item.replication_state})")
    if recovery_host is not None:
        if recovery_host.id == vm.host_id:
            raise ValueError(f"{where}: the recovery host {recovery_host.name!r} is the VM's own host")
        item.recovery_host_id = recovery_host.id
    host = session.get(Host, vm.host_id)
    item.replica_folder = f"{host.name}/{vm.name}"
    session.add(item)
    session.flush()
    return item


def _check_recovery_storage(where: str, url: object) -> None:
    if isinstance(url, str) and url.startswith("file://"):
        path = url[len("file://"):]
        if PurePosixPath(path).is_absolute() and "\x00" not in path:
            return
    elif isinstance(url, str) and url.startswith("azure:"):
        from sites.storage.azure import check_container_name

        try:
            check_container_name(url.split(":", 1)[1].lstrip("/"))
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        return
    raise ValueError(f"{where}: recovery storage must be 'file:///absolute/dir' or 'azure:<container>', got {url!r}")


def _check_storage_options(where: str, options: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(options, Mapping) or not all(isinstance(key, str) for key in options):
        raise ValueError(f"{where}: storage options must be a mapping with string keys, got {options!r}")
    try:
        text = json.dumps(dict(options))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: storage options must be JSON values ({exc})") from None
    if any(marker in text.lower() for marker in _SECRET_MARKERS):
        raise ValueError(
            f"{where}: storage options contain a credential; store a reference to it instead, e.g. "
            f"{{'connection_string_env': 'ASR_AZURE_CONNECTION_STRING'}}"
        )
    return json.loads(text)


# ---- replication state -------------------------------------------------------------------------
def transition(item: ProtectedItem, new_state: ReplicationState | str) -> bool:
    """Move the item to `new_state` if `ALLOWED_TRANSITIONS` allows it; InvalidStateError otherwise.
    Moving to the state it is in changes nothing (a rerun step may repeat its move) and returns False.
    Reaching `protected` clears the resync reason and schedule."""
    current = ReplicationState(item.replication_state)
    try:
        target = ReplicationState(new_state)
    except ValueError:
        raise InvalidStateError(
            f"invalid replica state: {new_state!r} is not a replication state of {_describe(item)}"
        ) from None
    if target is current:
        return False
    allowed = ALLOWED_TRANSITIONS[current]
    if target not in allowed:
        raise InvalidStateError(
            f"invalid replica state: {_describe(item)} cannot move from {current} to {target} "
            f"(from {current} it can move to: {', '.join(sorted(allowed))})"
        )
    item.replication_state = target
    if target is ReplicationState.PROTECTED:
        item.resync_required_reason = item.resync_scheduled_for = None
    return True


def roll_back(item: ProtectedItem, previous: str | None, outcome: str) -> bool:
    """Return an item whose failover or failback job ended `outcome` ("failed", "cancelled") to where it was
    before (`previous`, the state the operation began in), along `ROLLBACKS` and through `transition`.
    Returns whether the item moved (an item not mid-operation stays where it is)."""
    targets = ROLLBACKS.get(ReplicationState(item.replication_state))
    if targets is None:
        return False
    before = ReplicationState(previous) if previous in set(ReplicationState) else None
    target = targets.get((before, outcome)) or targets.get((before, None)) or targets[(None, None)]
    return transition(item, target)


def require_resync(
    session: Session, item: ProtectedItem, reason: str, policy: ReplicationPolicy, now: datetime | None = None
) -> datetime:
    """Mark the item as needing a resync for `reason`, scheduled at the policy's next slot outside office
    hours; returns that moment."""
    transition(item, ReplicationState.RESYNC_REQUIRED)
    item.resync_required_reason = reason
    item.resync_scheduled_for = policy.next_resync_slot(now or clock_now())
    session.add(item)
    session.flush()
    return item.resync_scheduled_for


def _describe(item: ProtectedItem) -> str:
    session = object_session(item)
    vm = session.get(VirtualMachine, item.vm_id) if session is not None else None
    return f"protected item {item.id} (VM {vm.name!r})" if vm is not None else f"protected item {item.id}"


# ---- health ------------------------------------------------------------------------------------
def mark_critical(session: Session, item: ProtectedItem, code: str, message: str) -> None:
    """Record an error that needs an administrator; the item's health becomes Critical."""
    _record_health_error(session, item, Health.CRITICAL, code, message)


def mark_warning(session: Session, item: ProtectedItem, code: str, message: str) -> None:
    """Record a condition to watch; health becomes Warning unless it is Critical already."""
    _record_health_error(session, item, Health.WARNING, code, message)


def mark_healthy(session: Session, item: ProtectedItem, code: str | None = None) -> None:
    """Clear the error `code` (every error when None); health becomes the worst of those left."""
    remaining = [] if code is None else [e for e in item.health_errors if e["code"] != code]
    _set_health_errors(session, item, remaining)


def _record_health_error(session: Session, item: ProtectedItem, severity: Health, code: str, message: str) -> None:
    if not isinstance(code, str) or not code or not isinstance(message, str):
        raise ValueError(
            f"health error of {_describe(item)} needs a non-empty code and a message, got {code!r}, {message!r}"
        )
    entry = {"code": code, "message": message, "severity": str(severity), "at": clock_now().isoformat()}
    # Once per code: a failure that repeats every cycle updates its entry instead of growing the list.
    _set_health_errors(session, item, [e for e in item.health_errors if e["code"] != code] + [entry])


def _set_health_errors(session: Session, item: ProtectedItem, errors: list[dict[str, Any]]) -> None:
    item.health_errors = errors  # a new list: in-place changes to a JSON column are not tracked
    item.health = max((Health(e["severity"]) for e in errors), key=_SEVERITY.__getitem__, default=Health.HEALTHY)
    session.add(item)
    session.flush()


# ---- one workflow at a time ----------------------------------------------------------------------
def item_lock_key(item_id: str) -> str:
    """The job-engine lock every workflow of the item holds (workflows.engine.start_job's lock_key)."""
    return f"item:{item_id}"


# ---- recovery points -----------------------------------------------------------------------------
def record_recovery_point(
    session: Session, item: ProtectedItem, generations: Mapping[str, int], created_at: datetime,
    kind: RecoveryPointKind = RecoveryPointKind.CRASH_CONSISTENT, manifest_roots: Mapping[str, str] | None = None,
    versions: Mapping[str, int] | None = None,
) -> RecoveryPoint:
    """A new recovery point of the item at `created_at`: when its content was sealed, on the database's clock
    (the clock RPO is measured by), never a host's. Locked until `created_at` plus the retention lock the
    item's policy has now (none when it is 0)."""
    if not generations or not all(
        isinstance(disk, str) and isinstance(generation, int) and not isinstance(generation, bool) and generation >= 0
        for disk, generation in generations.items()
    ):
        raise ValueError(
            f"recovery point of {_describe(item)}: generations must map each disk id to a generation "
            f"number, got {dict(generations)!r}"
        )
    lock_h = session.get(ReplicationPolicy, item.policy_id).retention_lock_h
    created_at = as_utc(created_at)
    point = RecoveryPoint(
        item_id=item.id, generations=dict(generations), created_at=created_at,
        kind=RecoveryPointKind(kind), manifest_roots=dict(manifest_roots or {}), versions=dict(versions or {}),
        locked_until=created_at + timedelta(hours=lock_h) if lock_h else None,
    )
    session.add(point)
    if item.last_recovery_point_at is None or point.created_at > item.last_recovery_point_at:
        item.last_recovery_point_at = point.created_at
        session.add(item)
    session.flush()
    return point


def recovery_points(session: Session, item: ProtectedItem) -> list[RecoveryPoint]:
    """The item's recovery points, oldest first."""
    query = (
        select(RecoveryPoint).where(RecoveryPoint.item_id == item.id)
        .order_by(RecoveryPoint.created_at, RecoveryPoint.id)
    )
    return list(session.exec(query))


def prune_recovery_points(session: Session, item: ProtectedItem, now: datetime) -> list[RecoveryPoint]:
    """Delete the points older than the policy's retention window, always keeping the latest (a replica
    must stay recoverable even when replication has stalled longer than the window); returns them.

    Oldest first, stopping at the first point still inside its retention lock: every point after it is kept
    too. So what is deleted is always the oldest points, and the replica versions the kept ones need stay
    (the caller prunes the versions before the oldest kept point's: a version is read through the undo logs
    of every later version, so a kept point needs all of them, whatever the later points' own locks)."""
    policy = session.get(ReplicationPolicy, item.policy_id)
    cutoff = as_utc(now) - timedelta(hours=policy.recovery_point_retention_h)
    expired = []
    for point in recovery_points(session, item)[:-1]:
        if point.created_at >= cutoff or point.locked_at(now):
            break
        expired.append(point)
    for point in expired:
        session.delete(point)
    session.flush()
    return expired
