"""Routes that change or remove what was registered: a host's new registration key, root, site or cloud; a
site's description; a VM's networks and guest definition; a network mapping's recovery network and subnet; a
policy's settings; a plan's groups (each refused with 409 while something depends on what it changes);
removing a VM, host, site, network mapping, policy or plan (each with `?confirm=<its name>`, refused with 409
while something depends on it); and a delta cycle started now.

Included after the other areas' routers: no earlier route takes these methods and paths."""
from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Response
from pydantic import Field

from api import service

from .common import (
    ACCEPTED,
    QUALIFIED_NAME_CHARS,
    HostQuery,
    Name,
    NamePath,
    Text,
    VmPath,
    _Body,
    _started,
    _vm_ref,
)
from .fabric import PolicySettingsIn
from .plans import PLAN_DESCRIPTION_CHARS, PlanGroups
from .roles import ADMIN, OPERATOR

router = APIRouter()

Confirm = Annotated[str | None, Query(max_length=64, description=(
    "The name of what is removed, required: without it (or with another name) the request is refused with 400"))]


# ---- request bodies ----------------------------------------------------------------------------------------
class SiteUpdateIn(_Body):
    description: str = Field(max_length=1024)


class HostUpdateIn(_Body):
    root: str | None = Field(None, max_length=4096, description="A new absolute path of the host's tree; every VM "
                             "registered on the host must be there (a tree that moved)")
    site: Name | None = Field(None, description="Move the host to this site (refused while it has protected VMs)")
    cloud: str | None = Field(None, max_length=129, description="Or to this VMM cloud: 'server/cloud' or 'cloud'")


class GuestUpdateIn(_Body):
    """The fields of a guest definition (as POST /hosts/{host}/vms takes them) that can change; those left out
    keep their values. check_pass and check_fail both null remove the guest's own check, a null cmdline empties
    it, a null for another field is refused. How the guest boots (kernel, initrd, boot disk) cannot change."""

    memory_mb: int | None = Field(None, ge=64, le=16384)
    boot_timeout_s: float | None = Field(None, ge=5, le=3600)
    heartbeat: str | None = Field(None, max_length=200, description="Regex: the guest is up once a console line "
                                                                    "matches it")
    check_pass: str | None = Field(None, max_length=200)
    check_fail: str | None = Field(None, max_length=200)
    cmdline: str | None = Field(None, max_length=1024, description="A direct-kernel guest's kernel command line")
    guest_agent: bool | None = None


class VmUpdateIn(_Body):
    networks: dict[Name, Name] | None = Field(None, max_length=8, description="Adapter name -> its new VM network")
    guest: GuestUpdateIn | None = Field(None, description="A QEMU guest's definition (refused while it runs)")


class NetworkMappingUpdateIn(_Body):
    recovery_network: Name | None = None
    recovery_subnet: Text(64) | None = Field(None, description="CIDR, e.g. 10.1.0.0/24")


class PolicyUpdateIn(PolicySettingsIn):
    """The settings of POST /policies to change; those left out keep their values."""


class PlanUpdateIn(_Body):
    groups: PlanGroups = Field(max_length=20, description="The plan's new groups, as POST /plans takes them")
    description: str | None = Field(None, max_length=PLAN_DESCRIPTION_CHARS,
                                    description="Omitted: the description stays as it is")


# ---- a host's key, a site, a policy, a plan ----------------------------------------------------------------
@router.post("/hosts/{name:path}/rekey", dependencies=[ADMIN], tags=["fabric"],
             summary="A new registration key for a host (in the answer, shown once); the old key stops working")
def rekey_host(name: NamePath) -> dict[str, Any]:
    return service.rekey_host(name)


@router.patch("/sites/{name:path}", dependencies=[ADMIN], tags=["fabric"], summary="Change a site's description")
def update_site(name: NamePath, body: SiteUpdateIn) -> dict[str, Any]:
    return service.update_site(name, description=body.description)


@router.patch("/hosts/{name:path}", dependencies=[ADMIN], tags=["fabric"],
              summary="Give a host another root, or move it to another site or cloud (refused with 409 while "
                      "protected VMs depend on them)")
def update_host(name: NamePath, body: HostUpdateIn) -> dict[str, Any]:
    return service.update_host(name, root=body.root, site=body.site, cloud=body.cloud)


@router.patch("/vms/{vm:path}", dependencies=[ADMIN], tags=["fabric"],
              summary="Change a VM's adapters' networks or its guest definition, on its host and in its registration")
def update_vm(vm: VmPath, body: VmUpdateIn, host: HostQuery = None) -> dict[str, Any]:
    return service.update_vm(_vm_ref(vm, host), networks=body.networks,
                             guest=body.guest.model_dump(exclude_unset=True) if body.guest else None)


@router.patch("/network-mappings/{source_network:path}", dependencies=[ADMIN], tags=["fabric"],
              summary="Point a network mapping of a site or cloud at another recovery network or subnet")
def update_network_mapping(source_network: NamePath, body: NetworkMappingUpdateIn,
                           site: Annotated[Name | None, Query()] = None,
                           cloud: Annotated[str | None, Query(max_length=QUALIFIED_NAME_CHARS)] = None
                           ) -> dict[str, Any]:
    return service.update_network_mapping(source_network, site=site, cloud=cloud,
                                          recovery_network=body.recovery_network,
                                          recovery_subnet=body.recovery_subnet)


@router.patch("/policies/{name:path}", dependencies=[ADMIN], tags=["fabric"],
              summary="Change a replication policy's settings (validated as a new policy; from the next cycle)")
def update_policy(name: NamePath, body: PolicyUpdateIn) -> dict[str, Any]:
    return service.update_policy(name, **body.model_dump(exclude_none=True))


@router.put("/plans/{name:path}", dependencies=[ADMIN], tags=["plans"],
            summary="Replace a recovery plan's groups (validated as a new plan; refused while it runs)")
def update_plan(name: NamePath, body: PlanUpdateIn) -> dict[str, Any]:
    return service.update_plan(name, body.groups, body.description)


# ---- removals ----------------------------------------------------------------------------------------------
@router.delete("/vms/{vm:path}", dependencies=[ADMIN], tags=["fabric"],
               summary="Forget a VM that is not protected (its disks stay on its host)")
def remove_vm(vm: VmPath, confirm: Confirm = None, host: HostQuery = None) -> dict[str, Any]:
    return service.remove_vm(_vm_ref(vm, host), confirm=confirm or "")


@router.delete("/hosts/{name:path}", dependencies=[ADMIN], tags=["fabric"],
               summary="Forget a host without VMs that is no protected VM's recovery host")
def remove_host(name: NamePath, confirm: Confirm = None) -> dict[str, Any]:
    return service.remove_host(name, confirm=confirm or "")


@router.delete("/sites/{name:path}", dependencies=[ADMIN], tags=["fabric"],
               summary="Forget a site without hosts (and its network mappings)")
def remove_site(name: NamePath, confirm: Confirm = None) -> dict[str, Any]:
    return service.remove_site(name, confirm=confirm or "")


@router.delete("/network-mappings/{source_network:path}", dependencies=[ADMIN], tags=["fabric"],
               summary="Forget a network mapping of a site or cloud no protected VM's failover needs")
def remove_network_mapping(source_network: NamePath, site: Annotated[Name | None, Query()] = None,
                           cloud: Annotated[str | None, Query(max_length=QUALIFIED_NAME_CHARS)] = None,
                           confirm: Confirm = None) -> dict[str, Any]:
    return service.remove_network_mapping(source_network, site=site, cloud=cloud, confirm=confirm or "")


@router.delete("/policies/{name:path}", dependencies=[ADMIN], tags=["fabric"],
               summary="Forget a replication policy no VM's protection refers to")
def remove_policy(name: NamePath, confirm: Confirm = None) -> dict[str, Any]:
    return service.remove_policy(name, confirm=confirm or "")


@router.delete("/plans/{name:path}", dependencies=[ADMIN], tags=["plans"],
               summary="Forget a recovery plan that is not running")
def remove_plan(name: NamePath, confirm: Confirm = None) -> dict[str, Any]:
    return service.remove_plan(name, confirm=confirm or "")


# ---- a delta cycle now -------------------------------------------------------------------------------------
@router.post("/vms/{vm:path}/replicate", dependencies=[OPERATOR], tags=["protection"],
             summary="Start a delta replication cycle now", **ACCEPTED)
def replicate(vm: VmPath, response: Response, host: HostQuery = None) -> dict[str, Any]:
    return _started(response, service.replicate(_vm_ref(vm, host)))
