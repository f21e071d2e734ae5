"""Routes of the fabric: sites, VMM clouds, hosts, VMs, network mappings and replication policies.

A VM's own page (GET /vms/{vm}) is routed in api/rest/protection.py, after the routes under it."""
from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter
from pydantic import Field

from api import service

from .common import Name, _Body

router = APIRouter()


# ---- request bodies ----------------------------------------------------------------------------------------
class SiteIn(_Body):
    name: Name
    description: str = Field("", max_length=1024)


class CloudIn(_Body):
    server: Name
    name: Name


class HostIn(_Body):
    name: Name
    root: str = Field(description="Absolute path of the host's tree on the host")
    site: Name | None = None
    cloud: str | None = Field(None, description="'server/cloud', or a cloud name only one VMM server has")


class VmIn(_Body):
    host: Name
    name: Name


class NetworkMappingIn(_Body):
    source_network: Name
    recovery_network: Name
    recovery_subnet: str = Field(description="CIDR, e.g. 10.1.0.0/24")
    site: Name | None = None
    cloud: str | None = None


class PolicyIn(_Body):
    name: Name
    copy_frequency_s: int | None = Field(None, description="30, 300 or 900")
    recovery_point_retention_h: int | None = Field(None, description="0 to 24")
    app_consistent_frequency_h: int | None = Field(None, description="0 (off) to 12, at most the retention")
    initial_replication_at: datetime | None = Field(None, description="At most 24 h ahead; omitted: at once")
    office_hours: list[str] | str | None = Field(None, description="'08:00-18:00' or ['08:00', '18:00']")
    office_days: list[int | str] | str | None = Field(None, description="Weekday names or numbers (0 = Monday)")
    office_timezone: str | None = Field(None, description="IANA zone, e.g. Europe/Berlin")
    rpo_warning_s: int | None = Field(None, description="RPO (s) from which a VM is Warning; default 2x the copy "
                                                        "frequency")
    rpo_critical_s: int | None = Field(None, description="RPO (s) from which a VM is Critical; default 4x the copy "
                                                         "frequency")
    consistency_check_interval_h: int | None = Field(
        None, description="Hours between scheduled consistency checks, 0 (off) to 168; default 24")
    consistency_check_off_hours: bool | None = Field(
        None, description="Scheduled consistency checks wait for the end of office hours (default true)")


# ---- routes ------------------------------------------------------------------------------------------------
@router.get("/sites", tags=["fabric"], summary="List sites")
def list_sites() -> list[dict[str, Any]]:
    return service.list_sites()


@router.post("/sites", tags=["fabric"], status_code=201, summary="Register a Hyper-V site")
def add_site(body: SiteIn) -> dict[str, Any]:
    return service.add_site(body.name, body.description)


@router.get("/sites/{name:path}", tags=["fabric"], summary="A site with its hosts and network mappings")
def show_site(name: str) -> dict[str, Any]:
    return service.show_site(name)


@router.post("/clouds", tags=["fabric"], status_code=201, summary="Register a VMM cloud (and its server)")
def add_cloud(body: CloudIn) -> dict[str, Any]:
    return service.add_vmm_cloud(body.server, body.name)


@router.get("/hosts", tags=["fabric"], summary="List hosts")
def list_hosts() -> list[dict[str, Any]]:
    return service.list_hosts()


@router.post("/hosts", tags=["fabric"], status_code=201,
             summary="Register a host (the answer holds its agent's registration key, shown once)")
def add_host(body: HostIn) -> dict[str, Any]:
    return service.add_host(body.name, body.root, site=body.site, cloud=body.cloud)


@router.get("/hosts/{name:path}", tags=["fabric"], summary="A host with its VMs")
def show_host(name: str) -> dict[str, Any]:
    return service.show_host(name)


@router.get("/vms", tags=["fabric"], summary="List VMs with their protection state")
def list_vms() -> list[dict[str, Any]]:
    return service.list_vms()


@router.post("/vms", tags=["fabric"], status_code=201, summary="Register a VM as its host describes it")
def add_vm(body: VmIn) -> dict[str, Any]:
    return service.add_vm(body.host, body.name)


@router.get("/network-mappings", tags=["fabric"], summary="List network mappings")
def list_network_mappings() -> list[dict[str, Any]]:
    return service.list_network_mappings()


@router.post("/network-mappings", tags=["fabric"], status_code=201,
             summary="Map a VM network of a site or cloud to a recovery network")
def add_network_mapping(body: NetworkMappingIn) -> dict[str, Any]:
    return service.add_network_mapping(body.source_network, body.recovery_network, body.recovery_subnet,
                                       site=body.site, cloud=body.cloud)


@router.get("/policies", tags=["fabric"], summary="List replication policies")
def list_policies() -> list[dict[str, Any]]:
    return service.list_policies()


@router.post("/policies", tags=["fabric"], status_code=201, summary="Create a replication policy")
def add_policy(body: PolicyIn) -> dict[str, Any]:
    options = body.model_dump(exclude={"name"}, exclude_none=True)
    return service.add_policy(body.name, **options)


@router.get("/policies/{name:path}", tags=["fabric"], summary="A replication policy and the VMs it protects")
def show_policy(name: str) -> dict[str, Any]:
    return service.show_policy(name)
