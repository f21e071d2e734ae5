"""Routes of protection and failover: enable, disable, resync, consistency check, recovery points (and their
deletion) and verification of a VM; its
drills, failovers, commit and cancel, failback and reverse replication; the health of every protected VM.

The VM itself (GET /vms/{vm}, a fabric route) is routed here, after the GET routes under it: its `{vm:path}`
would take them. The routes are in the order they are matched and listed in the OpenAPI document."""
from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Response
from pydantic import Field

from api import service

from .common import ACCEPTED, HostQuery, Name, Text, VmPath, _Body, _started, _vm_ref
from .roles import ADMIN, OPERATOR, READER

router = APIRouter()


# ---- request bodies ----------------------------------------------------------------------------------------
class ProtectIn(_Body):
    policy: Name = Field(description="Name or id of the replication policy")
    recovery_storage: str = Field(max_length=4096, description="'file:///absolute/dir' or 'azure:<container>'")
    storage_options: dict[Text(64), Text(2048) | Annotated[int, Field(le=1000)]] | None = Field(
        None, max_length=8, description="e.g. {'connection_string_env': 'NAME'}: credentials only by reference")
    recovery_host: Name | None = None


class DisableProtectionIn(_Body):
    confirm: str | None = Field(None, max_length=64, description=(
        "The VM's name, required: disabling protection deletes its replicas, shipped logs and recovery points"))


class DeletePointsIn(_Body):
    before: datetime = Field(description=(
        "Delete the points made before this time (ISO 8601; UTC when it has no zone); the latest point is kept"))
    confirm: str | None = Field(None, max_length=64, description=(
        "The VM's name, required: deleted points cannot be restored"))


class TestFailoverIn(_Body):
    point: str = Field("latest_processed", max_length=64,
                       description="latest_processed, latest_app_consistent, latest or a point id")
    recovery_host: Name | None = None
    test_network: Name | None = None


class PlannedFailoverIn(_Body):
    recovery_host: Name | None = None
    public_ips: dict[Text(64), Text(64)] | None = Field(None, max_length=32,
                                                        description="{adapter name: public IP address}")


class UnplannedFailoverIn(_Body):
    point: str = Field("latest_processed", max_length=64,
                       description="latest_processed, latest_app_consistent or a point id")
    recovery_host: Name | None = None
    public_ips: dict[Text(64), Text(64)] | None = Field(None, max_length=32)


class FailbackIn(_Body):
    mode: str = Field("minimize_downtime", max_length=32, description="minimize_downtime or full_download")
    create_vm: bool = False
    host: Name | None = Field(None, description="Fail back to this host instead of the VM's own")


class VerifyIn(_Body):
    point: str | None = Field(None, max_length=64, description="A point id or choice; omitted: the latest point")


# ---- routes ------------------------------------------------------------------------------------------------
@router.post("/vms/{vm:path}/protect", dependencies=[OPERATOR],
             tags=["protection"], summary="Enable protection", **ACCEPTED)
def protect(vm: VmPath, body: ProtectIn, response: Response, host: HostQuery = None) -> dict[str, Any]:
    return _started(response, service.protect(_vm_ref(vm, host), policy=body.policy,
                                              recovery_storage=body.recovery_storage,
                                              storage_options=body.storage_options, recovery_host=body.recovery_host))


@router.post("/vms/{vm:path}/disable-protection", dependencies=[ADMIN],
             tags=["protection"], summary="Disable protection (admin; body {\"confirm\": \"<vm name>\"})", **ACCEPTED)
def disable_protection(vm: VmPath, response: Response, body: DisableProtectionIn | None = None,
                       host: HostQuery = None) -> dict[str, Any]:
    confirm = (body.confirm if body else None) or ""  # missing: refused with 400, saying what to send
    return _started(response, service.disable_protection(_vm_ref(vm, host), confirm=confirm))


@router.post("/vms/{vm:path}/resync", dependencies=[OPERATOR],
             tags=["protection"], summary="Resynchronize now", **ACCEPTED)
def resync(vm: VmPath, response: Response, host: HostQuery = None) -> dict[str, Any]:
    return _started(response, service.resync(_vm_ref(vm, host)))


@router.post("/vms/{vm:path}/resync-preview", dependencies=[OPERATOR], tags=["protection"],
             summary="What a resync would send, without sending (a job; each step's result counts the chunks and "
                     "bytes that differ)", **ACCEPTED)
def resync_preview(vm: VmPath, response: Response, host: HostQuery = None) -> dict[str, Any]:
    return _started(response, service.preview_resync(_vm_ref(vm, host)))


@router.post("/vms/{vm:path}/consistency-check", dependencies=[OPERATOR], tags=["protection"],
             summary="Compare the disks with their replicas; resynchronize only drifted chunks", **ACCEPTED)
def consistency_check(vm: VmPath, response: Response, host: HostQuery = None) -> dict[str, Any]:
    return _started(response, service.consistency_check(_vm_ref(vm, host)))


@router.get("/vms/{vm:path}/recovery-points", dependencies=[READER],
            tags=["protection"], summary="Recovery points, oldest first")
def recovery_points(vm: VmPath, host: HostQuery = None) -> list[dict[str, Any]]:
    return service.recovery_points(_vm_ref(vm, host))


@router.post("/vms/{vm:path}/recovery-points/delete", dependencies=[ADMIN], tags=["protection"],
             summary="Delete the recovery points made before a time (admin; body {\"before\": \"<ISO time>\", "
                     "\"confirm\": \"<vm name>\"}); 409, nothing deleted, when any is inside its retention lock",
             **ACCEPTED)
def delete_recovery_points(vm: VmPath, body: DeletePointsIn, response: Response,
                           host: HostQuery = None) -> dict[str, Any]:
    return _started(response, service.delete_recovery_points(_vm_ref(vm, host), before=body.before,
                                                             confirm=body.confirm or ""))


@router.get("/vms/{vm:path}/failovers", dependencies=[READER], tags=["failover"],
            summary="Drills, failovers and failbacks of the VM, newest first, each with its report")
def failover_history(vm: VmPath, host: HostQuery = None,
                     limit: Annotated[int, Query(ge=1, le=service.MAX_FAILOVER_HISTORY)] = 20) -> list[dict[str, Any]]:
    return service.failover_history(_vm_ref(vm, host), limit=limit)


@router.get("/vms/{vm:path}", dependencies=[READER], tags=["fabric"],
            summary="A VM: disks (primary path, replica, recovery path), protection, latest failover")
def show_vm(vm: VmPath, host: HostQuery = None) -> dict[str, Any]:
    return service.show_vm(_vm_ref(vm, host))


@router.post("/vms/{vm:path}/verify", dependencies=[OPERATOR], tags=["protection"],
             summary="Verify the replica against a recovery point, from the recovery storage", **ACCEPTED)
def verify(vm: VmPath, response: Response, body: VerifyIn | None = None, host: HostQuery = None) -> dict[str, Any]:
    return _started(response, service.verify(_vm_ref(vm, host), point=body.point if body else None))


@router.post("/vms/{vm:path}/failover/test", dependencies=[OPERATOR],
             tags=["failover"], summary="Test failover (drill)", **ACCEPTED)
def test_failover(vm: VmPath, response: Response, body: TestFailoverIn | None = None,
                  host: HostQuery = None) -> dict[str, Any]:
    body = body or TestFailoverIn()
    return _started(response, service.test_failover(_vm_ref(vm, host), point=body.point,
                                                    recovery_host=body.recovery_host, test_network=body.test_network))


@router.post("/vms/{vm:path}/failover/cleanup", dependencies=[OPERATOR],
             tags=["failover"], summary="Clean up the drill's test VM", **ACCEPTED)
def test_failover_cleanup(vm: VmPath, response: Response, host: HostQuery = None) -> dict[str, Any]:
    return _started(response, service.test_failover_cleanup(_vm_ref(vm, host)))


@router.post("/vms/{vm:path}/failover/planned", dependencies=[OPERATOR],
             tags=["failover"], summary="Planned failover (no data loss)",
             **ACCEPTED)
def planned_failover(vm: VmPath, response: Response, body: PlannedFailoverIn | None = None,
                     host: HostQuery = None) -> dict[str, Any]:
    body = body or PlannedFailoverIn()
    return _started(response, service.planned_failover(_vm_ref(vm, host), recovery_host=body.recovery_host,
                                                       public_ips=body.public_ips))


@router.post("/vms/{vm:path}/failover/unplanned", dependencies=[OPERATOR],
             tags=["failover"], summary="Unplanned failover", **ACCEPTED)
def unplanned_failover(vm: VmPath, response: Response, body: UnplannedFailoverIn | None = None,
                       host: HostQuery = None) -> dict[str, Any]:
    body = body or UnplannedFailoverIn()
    return _started(response, service.unplanned_failover(_vm_ref(vm, host), point=body.point,
                                                         recovery_host=body.recovery_host, public_ips=body.public_ips))


@router.post("/vms/{vm:path}/failover/complete", dependencies=[OPERATOR], tags=["failover"],
             summary="Complete a minimize-downtime failback", **ACCEPTED)
def complete_failover(vm: VmPath, response: Response, host: HostQuery = None) -> dict[str, Any]:
    return _started(response, service.complete_failover(_vm_ref(vm, host)))


@router.post("/vms/{vm:path}/failover/commit", dependencies=[OPERATOR],
             tags=["failover"], summary="Commit the pending failover or failback",
             **ACCEPTED)
def commit_failover(vm: VmPath, response: Response, host: HostQuery = None) -> dict[str, Any]:
    return _started(response, service.commit_failover(_vm_ref(vm, host)))


@router.post("/vms/{vm:path}/failover/cancel", dependencies=[OPERATOR],
             tags=["failover"], summary="Cancel the pending failover or failback",
             **ACCEPTED)
def cancel_failover(vm: VmPath, response: Response, host: HostQuery = None) -> dict[str, Any]:
    return _started(response, service.cancel_failover(_vm_ref(vm, host)))


@router.post("/vms/{vm:path}/failback", dependencies=[OPERATOR],
             tags=["failover"], summary="Fail back a committed failover", **ACCEPTED)
def failback(vm: VmPath, response: Response, body: FailbackIn | None = None, host: HostQuery = None) -> dict[str, Any]:
    body = body or FailbackIn()
    return _started(response, service.failback(_vm_ref(vm, host), mode=body.mode, create_vm=body.create_vm,
                                               host=body.host))


@router.post("/vms/{vm:path}/reverse-replication", dependencies=[OPERATOR],
             tags=["failover"], summary="Reverse replication after failback",
             **ACCEPTED)
def reverse_replication(vm: VmPath, response: Response, host: HostQuery = None) -> dict[str, Any]:
    return _started(response, service.reverse_replication(_vm_ref(vm, host)))


@router.get("/health", dependencies=[READER], tags=["protection"], summary="Replication health of every protected VM")
def health() -> list[dict[str, Any]]:
    return service.health()
