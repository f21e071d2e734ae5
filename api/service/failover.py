"""Failover and back: test failover (drill) and its cleanup, planned and unplanned failover, commit and cancel,
failback and reverse replication; and the checks of the recovery point, host and addresses they are given."""
from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

from models.db import session_scope
from models.failover import failover_records
from models.protection import ProtectedItem, RecoveryPoint, ReplicationState
from workflows import kinds
from workflows.failover_request import FailbackMode, PointChoice

from .errors import Conflict, Invalid, NotFound, _operation
from .lookups import _check_host, _name, _optional_name, _protected
from .presenters import _job_ref, _plain

FAILBACK_MODES = FailbackMode.ALL
POINT_CHOICES = PointChoice.NAMED


def _check_point(item_id: str, point: Any) -> str:
    if not isinstance(point, str) or not point:
        raise Invalid(f"a recovery point is one of {', '.join(POINT_CHOICES)} or a point id, got {point!r}")
    if point in POINT_CHOICES:
        return point
    with session_scope() as session:
        row = session.get(RecoveryPoint, point)
        if row is None or row.item_id != item_id:
            raise NotFound(f"recovery point {point!r} not found for this VM (pruned past retention, or of "
                           f"another VM; see its recovery points); or use one of {', '.join(POINT_CHOICES)}")
    return point


def _check_public_ips(public_ips: Any) -> dict[str, str] | None:
    if public_ips is None:
        return None
    if not isinstance(public_ips, Mapping):
        raise Invalid(f"public_ips maps network adapter names to IP addresses, got {public_ips!r}")
    checked = {}
    for adapter, address in public_ips.items():
        _name(adapter, "network adapter")
        try:
            checked[adapter] = str(ipaddress.ip_address(address))
        except (TypeError, ValueError):
            raise Invalid(f"public IP of adapter {adapter!r}: {address!r} is not an IP address") from None
    return checked


@_operation
def test_failover(vm: str, *, point: str = "latest_processed", recovery_host: str | None = None,
                  test_network: str | None = None) -> dict:
    """A drill: the VM comes up at the recovery site in an isolated network; replication goes on."""
    item_id, name = _protected(vm)
    point = _check_point(item_id, point)
    recovery_host = _check_host(recovery_host, "recovery host")
    _optional_name(test_network, "test network")
    job_id = kinds.test_failover.start(item_id, point=point, recovery_host=recovery_host,
                                                    test_network=test_network)
    return _job_ref(job_id, kinds.test_failover.KIND.name, name)


@_operation
def test_failover_cleanup(vm: str) -> dict:
    """Delete the drill's test VM."""
    item_id, name = _protected(vm)
    return _job_ref(kinds.test_failover_cleanup.start(item_id),
                    kinds.test_failover_cleanup.KIND.name, name)


@_operation
def planned_failover(vm: str, *, recovery_host: str | None = None,
                     public_ips: dict[str, str] | None = None) -> dict:
    """Shut the VM down, ship its last changes, bring it up at the recovery site: nothing is lost."""
    item_id, name = _protected(vm)
    recovery_host = _check_host(recovery_host, "recovery host")
    job_id = kinds.planned_failover.start(item_id, recovery_host=recovery_host,
                                                       public_ips=_check_public_ips(public_ips))
    return _job_ref(job_id, kinds.planned_failover.KIND.name, name)


@_operation
def unplanned_failover(vm: str, *, point: str = "latest_processed", recovery_host: str | None = None,
                       public_ips: dict[str, str] | None = None) -> dict:
    """The primary is lost: bring the VM up at the recovery site from a point the recovery site has."""
    item_id, name = _protected(vm)
    point = _check_point(item_id, point)
    recovery_host = _check_host(recovery_host, "recovery host")
    job_id = kinds.unplanned_failover.start(item_id, point=point, recovery_host=recovery_host,
                                                         public_ips=_check_public_ips(public_ips))
    return _job_ref(job_id, kinds.unplanned_failover.KIND.name, name)


def _state_of(item_id: str) -> ReplicationState:
    with session_scope() as session:
        return session.get(ProtectedItem, item_id).replication_state


@_operation
def complete_failover(vm: str) -> dict:
    """Complete a minimize-downtime failback waiting in failback_ready: the recovery VM shuts down, its last
    changes are copied, the primary's disks are swapped in and the VM starts there."""
    item_id, name = _protected(vm)
    return _job_ref(kinds.failback_completion.start(item_id), kinds.failback_completion.KIND.name, name)


@_operation
def commit_failover(vm: str) -> dict:
    """Commit what is pending: a failover (failed_over) or a failback (failed_back)."""
    item_id, name = _protected(vm)
    state = _state_of(item_id)
    if state is ReplicationState.FAILED_OVER:
        return _job_ref(kinds.commit_failover.start(item_id), kinds.commit_failover.KIND.name, name)
    if state is ReplicationState.FAILED_BACK:
        return _job_ref(kinds.commit_failback.start(item_id), kinds.commit_failback.KIND.name, name)
    raise Conflict(f"VM {name!r} is {state}: there is nothing to commit (a failover commits from failed_over, "
                   f"a failback from failed_back)")


@_operation
def cancel_failover(vm: str) -> dict:
    """Cancel what is pending: a failover not committed (failed_over), or a failback before its swap
    (failing_back, failback_ready)."""
    item_id, name = _protected(vm)
    state = _state_of(item_id)
    if state is ReplicationState.FAILED_OVER:
        return _job_ref(kinds.cancel_failover.start(item_id), kinds.cancel_failover.KIND.name, name)
    if state in (ReplicationState.FAILING_BACK, ReplicationState.FAILBACK_READY):
        return _job_ref(kinds.cancel_failback.start(item_id), kinds.cancel_failback.KIND.name, name)
    raise Conflict(f"VM {name!r} is {state}: there is nothing to cancel (a failover cancels from failed_over, a "
                   f"failback from failing_back or failback_ready)")


def _failback_mode(mode: Any) -> str:
    normalized = mode.replace("-", "_") if isinstance(mode, str) else mode
    if normalized not in FAILBACK_MODES:
        raise Invalid(f"failback mode must be one of {', '.join(FAILBACK_MODES)}, got {mode!r}")
    return normalized


@_operation
def failback(vm: str, *, mode: str = "minimize_downtime", create_vm: bool = False, host: str | None = None) -> dict:
    """Fail a committed failover back to the primary (or to `host`). minimize_downtime stops at
    failback_ready (then complete_failover); full_download does it all with the recovery VM off."""
    mode = _failback_mode(mode)
    if not isinstance(create_vm, bool):
        raise Invalid(f"create_vm is true or false, got {create_vm!r}")
    item_id, name = _protected(vm)
    host = _check_host(host, "failback host")
    job_id = kinds.failback.start(item_id, mode=mode, create_vm=create_vm, host=host)
    return _job_ref(job_id, kinds.failback.KIND.name, name)


@_operation
def reverse_replication(vm: str) -> dict:
    """Protect the failed-back VM again: its disks are resynchronized against the replica, then delta
    replication resumes."""
    item_id, name = _protected(vm)
    return _job_ref(kinds.reverse_replication.start(item_id),
                    kinds.reverse_replication.KIND.name, name)


MAX_FAILOVER_HISTORY = 200


@_operation
def failover_history(vm: str, *, limit: int = 20) -> list[dict]:
    """The VM's drills, failovers and failbacks, newest first (at most `limit`, 1-200): each one's record, as
    `show_vm` gives the latest (point, manifest roots expected and produced, verified, boot check, RTO, RPO)."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_FAILOVER_HISTORY:
        raise Invalid(f"limit must be a whole number from 1 to {MAX_FAILOVER_HISTORY}, got {limit!r}")
    item_id, _name_of_vm = _protected(vm)
    with session_scope() as session:
        return [_plain(record.model_dump()) for record in failover_records(session, item_id, limit)]
