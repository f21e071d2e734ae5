"""enable_protection: protect a VM: check it, create the replication relationship, then copy it.

Prerequisites check (H: VM and disks on the host as registered, raw/VHD, whole MiB, size limits, storage
reachable and credentials accepted) → Create replication relationship (H: trackers on, replica disks
created) → Start replication (O: `initial_replication`, or `initial_replication_pending` when the policy
schedules it, and the job ends there) → the initial replication (`workflows.stages.initial_replication`).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlmodel import select

from models.db import session_scope
from models.fabric import Host, VirtualMachine, VmNotFoundError, vm_disks
from models.policy import ReplicationPolicy
from models.protection import InvalidStateError, ProtectedItem, ReplicationState, protect_vm
from workflows import actions as A
from workflows import clock
from workflows.engine import ORCHESTRATION_QUEUE, ItemBusyError, StepSpec
from workflows.items import (
    ItemRequest,
    busy_error,
    item_job_params,
    item_locks,
    item_target,
    lock_holder,
    start_for_item,
    view_of,
)
from workflows.jobkind import JobKind, declare
from workflows.outcomes import operation_succeeded, replication_failed
from workflows.stages import Stages, initial_replication

S = ReplicationState


@dataclass(frozen=True)
class EnableRequest(ItemRequest):
    scheduled_at: str | None = None
    """When the policy schedules the initial replication (ISO time), or None: now."""


def build(request: EnableRequest) -> Stages:
    params = request.params
    stages = [
        [StepSpec("Prerequisites check", A.PREREQUISITES, request.queue, params)],
        [StepSpec("Create replication relationship", A.CREATE_RELATIONSHIP, request.queue, params)],
        [StepSpec("Start replication", A.START_REPLICATION, ORCHESTRATION_QUEUE,
                  {**params, "scheduled_at": request.scheduled_at})],
    ]
    return stages if request.scheduled_at else stages + initial_replication(request, enter_state=None)


def start(vm_id: str, policy_id: str, *, recovery_storage: str, storage_options: dict | None = None,
          recovery_host: str | None = None) -> str:
    """Protect the VM: creates (or reuses, after a failed enable) its protected item and starts the
    enable_protection job. Returns the job id. ItemBusyError while another job holds the item.
    `recovery_host` (a registered host's name) is where failovers create the VM by default."""
    item_id = _protected_item_for(vm_id, policy_id, recovery_storage, storage_options or {}, recovery_host)
    view = view_of(item_id)
    scheduled_at = view.policy.initial_replication_at
    scheduled = scheduled_at is not None and scheduled_at > clock.now()
    base = ItemRequest.of(view)
    return start_for_item(KIND, EnableRequest(**vars(base), scheduled_at=scheduled_at.isoformat() if scheduled
                                              else None))


def restart(params: Mapping[str, Any]) -> str:
    """Enable again with the item's settings, while replication has not started (after that, a resync
    completes it, not a second enable)."""
    with session_scope() as session:
        item = session.get(ProtectedItem, params["item_id"])
        if item is None:
            raise VmNotFoundError(f"the protected item {params['item_id']} of this job is gone")
        if item.replication_state not in (S.ENABLING_PROTECTION, S.DISABLED):
            raise InvalidStateError(f"the VM of this job is {item.replication_state} already: resynchronize it "
                                    f"instead")
        host = session.get(Host, item.recovery_host_id) if item.recovery_host_id else None
        request = (item.vm_id, item.policy_id, item.recovery_storage, dict(item.storage_options),
                   host.name if host else None)
    return start(request[0], request[1], recovery_storage=request[2], storage_options=request[3],
                 recovery_host=request[4])


def _protected_item_for(
    vm_id: str, policy_id: str, recovery_storage: str, storage_options: dict, recovery_host: str | None = None,
) -> str:
    with session_scope() as session:
        if recovery_host is not None and session.exec(
                select(Host).where(Host.name == recovery_host)).first() is None:
            raise ValueError(f"protection of VM {vm_id}: no host {recovery_host!r} is registered to recover to")
        vm = session.get(VirtualMachine, vm_id)
        if vm is None:
            raise VmNotFoundError(f"no VM {vm_id} is registered")
        policy = session.get(ReplicationPolicy, policy_id)
        if policy is None:
            raise ValueError(f"protection of VM {vm.name!r}: no replication policy {policy_id}")
        vm_name = vm.name
        if not vm_disks(session, vm):
            raise ValueError(f"VM {vm_name!r} has no disks registered: there is nothing to protect")
        item = session.exec(select(ProtectedItem).where(ProtectedItem.vm_id == vm_id)).first()
    if item is not None and lock_holder(item.id) is not None:
        raise busy_error(item.id, vm_name, KIND.name)
    if item is not None and item.replication_state is S.ENABLING_PROTECTION:
        # A previous enable failed before starting replication: its item is reused, with its settings.
        if (item.policy_id, item.recovery_storage, item.storage_options) != (
                policy_id, recovery_storage, storage_options):
            raise ValueError(
                f"protection of VM {vm_name!r} was started with policy {item.policy_id} and recovery storage "
                f"{item.recovery_storage} (options {item.storage_options}); retry it with the same settings"
            )
        return item.id
    seen = None if item is None else (item.id, item.replication_state)
    try:
        with session_scope() as session:
            vm = session.get(VirtualMachine, vm_id)
            policy = session.get(ReplicationPolicy, policy_id)
            target = None if recovery_host is None else session.exec(
                select(Host).where(Host.name == recovery_host)).first()
            return protect_vm(session, vm, policy, recovery_storage=recovery_storage,
                              storage_options=storage_options, recovery_host=target).id
    except (sa.exc.IntegrityError, ValueError):
        # Another request may have created or re-enabled the item since we looked: that one runs.
        if _item_state(vm_id) != seen:
            raise ItemBusyError(
                f"VM {vm_name!r} is busy: another request is enabling its protection right now"
            ) from None
        raise


def _item_state(vm_id: str) -> tuple[str, ReplicationState] | None:
    with session_scope() as session:
        item = session.exec(select(ProtectedItem).where(ProtectedItem.vm_id == vm_id)).first()
        return None if item is None else (item.id, item.replication_state)


KIND = declare(JobKind(
    name="enable_protection",
    summary="Protect a VM: prerequisites, replication relationship, then its initial replication",
    actions=frozenset({A.PREREQUISITES, A.CREATE_RELATIONSHIP, A.START_REPLICATION, A.SNAPSHOT_VM, A.COPY_DISK,
                       A.DELETE_SNAPSHOT, A.SHIP_LOGS, A.APPLY_LOGS, A.ACKNOWLEDGE_LOGS, A.FINALIZE}),
    build=build, locks=item_locks, target=item_target, params=item_job_params, restart=restart,
    recovery="resume",
    starts_from=(S.ENABLING_PROTECTION,),
    moves_to=frozenset({S.INITIAL_REPLICATION_PENDING, S.INITIAL_REPLICATION, S.PROTECTED, S.RESYNC_REQUIRED}),
    on_failed=(replication_failed,), on_succeeded=(operation_succeeded,),
))
