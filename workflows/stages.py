"""Stage fragments several job kinds share, as pure functions of a request (no database, no clock).

Stages run one after another, the steps of one stage in parallel. Queues: the item's host agent
(`request.queue`), `recovery`, `orchestration`, or another host's agent for the recovery site.
"""
from __future__ import annotations

from itertools import zip_longest

from models.fabric import host_queue
from workflows import actions as A
from workflows.engine import ORCHESTRATION_QUEUE, RECOVERY_QUEUE, StepSpec
from workflows.failover_request import FailbackRequest, FailoverRequest, VmRequest
from workflows.items import ItemRequest

Stages = list[list[StepSpec]]


def merge_logs(request: ItemRequest) -> Stages:
    """Seal and ship the host's logs, apply them at the recovery site, acknowledge them on the host."""
    params = request.params
    return [
        [StepSpec("Ship logs", A.SHIP_LOGS, request.queue, params)],
        [StepSpec("Apply logs", A.APPLY_LOGS, RECOVERY_QUEUE, params)],
        [StepSpec("Acknowledge logs", A.ACKNOWLEDGE_LOGS, request.queue, params)],
    ]


def initial_replication(request: ItemRequest, enter_state: str | None) -> Stages:
    """Snapshot, copy every disk, delete the snapshot, merge the logs written meanwhile, finalize."""
    params = request.params
    return [
        [StepSpec("Take VM snapshot", A.SNAPSHOT_VM, request.queue, {**params, "enter_state": enter_state})],
        [StepSpec(f"Copy disk {disk.name}", A.COPY_DISK, request.queue, {**params, "disk_id": disk.id})
         for disk in request.disks],
        [StepSpec("Delete VM snapshot", A.DELETE_SNAPSHOT, request.queue, params)],
        *merge_logs(request),
        [StepSpec("Finalize protection", A.FINALIZE, ORCHESTRATION_QUEUE, params)],
    ]


def resynchronization(request: ItemRequest) -> Stages:
    """Snapshot (the item becomes resynchronizing), send only differing blocks of each disk, merge the logs
    written meanwhile, resume replication."""
    params = request.params
    return [
        [StepSpec("Take VM snapshot", A.SNAPSHOT_VM, request.queue, {**params, "enter_state": "resynchronizing"})],
        [StepSpec(f"Resynchronize disk {disk.name}", A.RESYNC_DISK, request.queue, {**params, "disk_id": disk.id})
         for disk in request.disks],
        *merge_logs(request),
        [StepSpec("Resume replication", A.FINALIZE, ORCHESTRATION_QUEUE, params)],
    ]


def labelled(name: str, label: str | None) -> str:
    """A step's name, prefixed with its VM's name inside a recovery plan (`label`)."""
    return name if label is None else f"{label}: {name}"


def relabelled(stages: Stages, label: str | None) -> Stages:
    return [[StepSpec(labelled(step.name, label), step.action, step.queue, step.params) for step in stage]
            for stage in stages]


def side_by_side(per_vm: list[Stages]) -> Stages:
    """The stages of several VMs run side by side: stage k of the result holds every VM's stage k (a Celery
    group), so the VMs of a recovery plan's group move together."""
    return [[step for stage in stages if stage for step in stage]
            for stages in zip_longest(*per_vm, fillvalue=[])]


# ---- failover and failback of one VM (also one VM's part of a recovery plan) ----------------------------
def failover(request: FailoverRequest) -> Stages:
    """Begin, [shut the primary down], [merge its pending logs], choose the point, create the recovery VM,
    restore every disk, start it (roots checked), finish."""
    params, label = request.params, request.label
    test = request.kind == "test"
    recovery = host_queue(request.target_host)
    stages: Stages = [[StepSpec(
        labelled("Begin test failover" if test else "Begin failover", label), A.BEGIN_FAILOVER, ORCHESTRATION_QUEUE,
        {**params, "kind": request.kind, "point": request.point, "target_host": request.target_host,
         "target_vm": request.target_vm, "placement": [dict(nic) for nic in request.placement],
         "public_ips": dict(request.public_ips), "requested_at": request.requested_at, "replaces": request.replaces},
    )]]
    if request.kind == "planned":
        stages.append([StepSpec(labelled("Shut down VM", label), A.SHUT_DOWN_PRIMARY, request.queue, params)])
    if request.point == "latest":
        stages += relabelled(merge_logs(ItemRequest(request.item_id, request.vm, request.queue, request.disks)),
                             label)
    return stages + [
        [StepSpec(labelled("Choose recovery point", label), A.CHOOSE_POINT, ORCHESTRATION_QUEUE, params)],
        [StepSpec(labelled("Create recovery VM", label), A.CREATE_RECOVERY_VM, recovery, params)],
        [StepSpec(labelled(f"Restore disk {disk.name}", label), A.RESTORE_DISK, recovery,
                  {**params, "disk_id": disk.id}) for disk in request.disks],
        [StepSpec(labelled("Start recovery VM", label), A.START_RECOVERY_VM, recovery, params)],
        [StepSpec(labelled("Check recovery VM boot", label), A.CHECK_RECOVERY_BOOT, recovery, params)],
        [StepSpec(labelled("Finish test failover" if test else "Finish failover", label), A.FINISH_FAILOVER,
                  ORCHESTRATION_QUEUE, params)],
    ]


def failback(request: FailbackRequest) -> Stages:
    """Begin, prepare the VM on the primary, [shut the recovery VM down: full download], stage each disk,
    send and download its differences; then stop at failback_ready (minimize downtime) or complete."""
    params, label = request.params, request.label
    primary, recovery = host_queue(request.primary_host), host_queue(request.recovery_host)
    stages: Stages = [
        [StepSpec(labelled("Begin failback", label), A.BEGIN_FAILBACK, ORCHESTRATION_QUEUE,
                  {**params, "mode": request.mode, "create_vm": request.create_vm,
                   "target_host": request.primary_host, "recovery_host": request.recovery_host,
                   "recovery_vm": request.recovery_vm, "requested_at": request.requested_at})],
        [StepSpec(labelled("Prepare VM on the primary", label), A.PREPARE_PRIMARY_VM, primary, params)],
    ]
    minimize_downtime = request.mode == "minimize_downtime"
    if not minimize_downtime:
        stages.append([StepSpec(labelled("Shut down recovery VM", label), A.SHUT_DOWN_RECOVERY_VM, recovery,
                                params)])
    stages += [
        [StepSpec(labelled(f"Prepare staging disk {disk.name}", label), A.PREPARE_STAGING, primary,
                  {**params, "disk_id": disk.id}) for disk in request.disks],
        [StepSpec(labelled(f"Send differences of disk {disk.name}", label), A.SEND_DIFFERENCES, recovery,
                  {**params, "disk_id": disk.id}) for disk in request.disks],
        [StepSpec(labelled(f"Download differences of disk {disk.name}", label), A.DOWNLOAD_DIFFERENCES, primary,
                  {**params, "disk_id": disk.id}) for disk in request.disks],
    ]
    if minimize_downtime and not request.complete:
        return stages + [[StepSpec(labelled("Failback ready to complete", label), A.FAILBACK_READY,
                                   ORCHESTRATION_QUEUE, params)]]
    return stages + failback_completion(request, primary, recovery, shut_down=minimize_downtime)


def failback_completion(request: VmRequest, primary: str, recovery: str, *, shut_down: bool) -> Stages:
    """[Shut the recovery VM down], send its final changes, apply them to each staging disk, swap, finish."""
    params, label = request.params, request.label
    stages: Stages = []
    if shut_down:
        stages.append([StepSpec(labelled("Shut down recovery VM", label), A.SHUT_DOWN_RECOVERY_VM, recovery,
                                params)])
    return stages + [
        [StepSpec(labelled("Send final changes", label), A.SEND_FINAL_CHANGES, recovery, params)],
        [StepSpec(labelled(f"Apply final changes to disk {disk.name}", label), A.APPLY_FINAL_CHANGES, primary,
                  {**params, "disk_id": disk.id}) for disk in request.disks],
        [StepSpec(labelled("Swap in failed-back disks and start VM", label), A.SWAP_DISKS, primary, params)],
        [StepSpec(labelled("Finish failback", label), A.FINISH_FAILBACK, ORCHESTRATION_QUEUE, params)],
    ]
