"""What happens to a protected item when one of its jobs ends without success: the kinds' failure hooks.

Hooks run on an orchestration worker once nothing of the job runs any more, in one transaction with the
record that they ran, and again after a crash: each is idempotent.
"""
from __future__ import annotations

from sqlmodel import Session

from datapath.errors import LogCorruptError, LogOutOfSequenceError, ResyncRequiredError
from datapath.statecheck import ReplicaStateMismatchError
from models.failover import FailoverRecord, FailoverStatus
from models.jobs import Job
from models.policy import ReplicationPolicy
from models.protection import ProtectedItem, ReplicationState, mark_critical, mark_healthy, mark_warning, roll_back
from workflows import clock

# A job failing with one of these has already marked its item resync_required (Warning, with the reason):
# the item is not Critical, a resync heals it. A broken log chain, or a recovery-side state the database's
# record refutes (datapath.statecheck), or a tracker whose logs may lack writes (its service stopped uncleanly).
RESYNC_ERROR_CLASSES = frozenset(
    f"{cls.__module__}.{cls.__qualname__}"
    for cls in (LogCorruptError, LogOutOfSequenceError, ReplicaStateMismatchError, ResyncRequiredError)
)


def _item(session: Session, job: Job) -> ProtectedItem | None:
    item_id = job.params.get("item_id")
    return session.get(ProtectedItem, item_id) if item_id else None


def replication_failed(job: Job, session: Session) -> None:
    """A replication job of the item failed without a retry left: an administrator must look (Critical),
    unless the failure already marked the item resync_required (a broken log chain: a resync heals it)."""
    item = _item(session, job)
    if item is None:  # the item is gone: nothing to mark
        return
    if job.kind == "delta_replication":
        # The scheduler would otherwise start the next cycle at once, and again, every tick.
        policy = session.get(ReplicationPolicy, item.policy_id)
        item.next_delta_at = clock.after(policy.copy_frequency_s)
        session.add(item)
    if job.error_class in RESYNC_ERROR_CLASSES and item.replication_state is ReplicationState.RESYNC_REQUIRED:
        session.flush()
        return
    mark_critical(session, item, failure_code(job.kind), job.error or f"job {job.id} failed")


def failure_code(kind: str) -> str:
    """The health error a failed job of `kind` leaves on its item, until a job of that kind succeeds."""
    return f"{kind}_failed"


def revert_item(session: Session, item: ProtectedItem, record: FailoverRecord | None, outcome: str,
                error: str | None, code: str) -> None:
    """A failover or failback of the item ended without success (`outcome`: failed or cancelled): the item
    goes back to where it was (`models.protection.ROLLBACKS`), the record says how it ended, and a failure
    marks the item Critical with `code`."""
    if record is not None and record.status is FailoverStatus.IN_PROGRESS:
        record.status = FailoverStatus.CANCELLED if outcome == "cancelled" else FailoverStatus.FAILED
        record.details = {**record.details, "error": error}
        session.add(record)
    roll_back(item, record.details.get("previous_state") if record is not None else None, outcome)
    session.add(item)
    if outcome == "failed":
        mark_critical(session, item, code, error or "a failover job failed")
    session.flush()


def failover_ended(job: Job, session: Session) -> None:
    """The hook of failover and failback kinds that failed or were cancelled."""
    item = _item(session, job)
    if item is None:
        return
    failover_id = job.params.get("failover_id")
    record = session.get(FailoverRecord, failover_id) if failover_id else None
    revert_item(session, item, record, job.state.value, job.error, failure_code(job.kind))


def operation_succeeded(job: Job, session: Session) -> None:
    """A job of the item succeeded: the error an earlier failed job of the same kind left is cleared, since
    what it failed to do is now done (the way out of a failure ends Healthy)."""
    item = _item(session, job)
    if item is not None:
        mark_healthy(session, item, failure_code(job.kind))


def verification_failed(job: Job, session: Session) -> None:
    """A replica that does not hold what its point recorded is not to be trusted for failover: Warning."""
    item = _item(session, job)
    if item is not None:
        # The kind's own code, so that the verify's restart (same point) clears it when it succeeds.
        mark_warning(session, item, failure_code(job.kind), job.error or "verification failed")
