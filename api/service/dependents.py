"""What depends on a thing an operator wants to change or remove: the job holding a protected item's or a
plan's lock (or whose hooks are still to run on it), the recovery plans that name a VM, the protection of the
VMs on a host or recovering to it."""
from __future__ import annotations

from sqlmodel import Session, select

from models.fabric import Host, VirtualMachine
from models.jobs import Job, JobLock
from models.plans import RecoveryPlan
from models.protection import ProtectedItem, ReplicationState, item_lock_key
from workflows.kinds.recovery_plan import plan_lock_key


def lock_holder(session: Session, lock_key: str) -> Job | None:
    """The job holding `lock_key` (an active job keeps its locks until it settles), or None."""
    lock = session.get(JobLock, lock_key)
    return session.get(Job, lock.job_id) if lock is not None else None


def item_job(session: Session, item_id: str) -> Job | None:
    """The job that still works on the protected item: the holder of its lock, or a finished job whose hooks
    (which update the item) have not run yet."""
    holder = lock_holder(session, item_lock_key(item_id))
    if holder is not None:
        return holder
    return session.exec(select(Job).where(Job.target == item_id, Job.hook_pending.is_(True))).first()


def plan_job(session: Session, plan_id: str) -> Job | None:
    """The run of the plan going on (its job holds the plan's lock until it settles), or None."""
    return lock_holder(session, plan_lock_key(plan_id))


def plans_naming(session: Session, vm_id: str) -> list[str]:
    """The names of the recovery plans that have the VM in a group, sorted."""
    return sorted(plan.name for plan in session.exec(select(RecoveryPlan))
                  if any(vm_id in group.get("vms", ()) for group in plan.groups))


def describe_job(job: Job) -> str:
    return f"job {job.id} ({job.kind}, {job.state.value})"


def listed(values: list[str], limit: int = 10) -> str:
    """The first `limit` values, comma-separated, and how many more there are."""
    shown = ", ".join(values[:limit])
    return shown + (f" and {len(values) - limit} more" if len(values) > limit else "")


def protected_on(session: Session, host: Host) -> list[str]:
    """The VMs of the host ("host/vm", sorted) whose protection is not disabled."""
    rows = session.exec(select(VirtualMachine.name)
                        .join(ProtectedItem, ProtectedItem.vm_id == VirtualMachine.id)
                        .where(VirtualMachine.host_id == host.id,
                               ProtectedItem.replication_state != ReplicationState.DISABLED)).all()
    return sorted(f"{host.name}/{name}" for name in rows)


def recovery_items(session: Session, host: Host) -> list[tuple[str, ProtectedItem]]:
    """("host/vm", item) of every protected item (disabled ones too) whose recovery host is `host`, sorted."""
    rows = session.exec(select(VirtualMachine, Host.name, ProtectedItem)
                        .join(ProtectedItem, ProtectedItem.vm_id == VirtualMachine.id)
                        .join(Host, Host.id == VirtualMachine.host_id)
                        .where(ProtectedItem.recovery_host_id == host.id)).all()
    return sorted(((f"{host_name}/{vm.name}", item) for vm, host_name, item in rows), key=lambda pair: pair[0])
