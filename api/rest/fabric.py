"""Routes of the fabric: sites, VMM clouds, hosts, VMs, network mappings and replication policies.

A VM's own page (GET /vms/{vm}) is routed in api/rest/protection.py, after the routes under it."""
from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import Field

from api import service

from .common import HostQuery, Name, NamePath, QualifiedName, Text, VmPath, _Body, _vm_ref
from .roles import ADMIN, OPERATOR, READER

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
    root: str = Field(max_length=4096, description="Absolute path of the host's tree on the host")
    site: Name | None = None
    cloud: QualifiedName | None = Field(None, description="'server/cloud', or a cloud name only one VMM server has")


class VmIn(_Body):
    host: Name
    name: Name


class DiskIn(_Body):
    name: Name
    size: Annotated[int, Field(ge=0, le=1 << 50)] | Text(32) | None = Field(
        None, description="Bytes or '64M'; omitted when an image gives the content")
    format: str = Field("raw", max_length=8, description="raw or vhd")
    image: str | None = Field(None, max_length=4096,
                              description="A raw or fixed-VHD file inside the host's root to import")


class GuestIn(_Body):
    kernel: Name | None = Field(None, description="The kernel's file name (a key of boot_files); or boot_disk")
    boot_disk: Name | None = Field(None, description="The VM's disk the guest boots from (its boot loader loads "
                                   "the kernel); instead of kernel, initrd, cmdline and boot_files")
    initrd: Name | None = None
    cmdline: str = Field("", max_length=1024)
    heartbeat: str = Field(max_length=200, description="Regex: the guest is up once a console line matches it")
    check_pass: str | None = Field(None, max_length=200, description="Regex: the guest's own check passed")
    check_fail: str | None = Field(None, max_length=200, description="Regex: the guest's own check failed")
    memory_mb: int = Field(256, ge=64, le=16384)
    guest_agent: bool = True
    boot_timeout_s: float = Field(120.0, ge=5, le=3600)


class VmCreateIn(_Body):
    name: Name
    disks: list[DiskIn] = Field(min_length=1, max_length=16)
    networks: list[Name] | None = Field(None, max_length=8)
    generation: int = Field(1, ge=1, le=2)
    guest: GuestIn | None = Field(None, description="Makes the VM a QEMU guest (docs/runtime.md)")
    boot_files: dict[Text(64), Text(4096)] | None = Field(
        None, max_length=8, description="Boot file name -> a file inside the host's root")


class VmStopIn(_Body):
    timeout_s: float = Field(30.0, ge=1, le=600)


class NetworkMappingIn(_Body):
    source_network: Name
    recovery_network: Name
    recovery_subnet: str = Field(max_length=64, description="CIDR, e.g. 10.1.0.0/24")
    site: Name | None = None
    cloud: QualifiedName | None = None


class PolicySettingsIn(_Body):
    """A policy's settings, as POST /policies takes them and PATCH /policies/{name} changes them."""

    copy_frequency_s: int | None = Field(None, le=86400, description="30, 300 or 900")
    recovery_point_retention_h: int | None = Field(None, le=8760, description="0 to 24")
    app_consistent_frequency_h: int | None = Field(None, le=8760, description="0 (off) to 12, at most the retention")
    initial_replication_at: datetime | None = Field(None, description="At most 24 h ahead; omitted: at once")
    office_hours: Annotated[list[Text(16)], Field(max_length=2)] | Text(32) | None = Field(
        None, description="'08:00-18:00' or ['08:00', '18:00']")
    office_days: Annotated[list[Annotated[int, Field(le=1000)] | Text(16)], Field(max_length=7)] | Text(128) | None = \
        Field(None, description="Weekday names or numbers (0 = Monday)")
    office_timezone: str | None = Field(None, max_length=64, description="IANA zone, e.g. Europe/Berlin")
    rpo_warning_s: int | None = Field(None, le=10**7, description="RPO (s) from which a VM is Warning; default 2x "
                                                                  "the copy frequency")
    rpo_critical_s: int | None = Field(None, le=10**7, description="RPO (s) from which a VM is Critical; default 4x "
                                                                   "the copy frequency")
    consistency_check_interval_h: int | None = Field(
        None, le=8760, description="Hours between scheduled consistency checks, 0 (off) to 168; default 24")
    consistency_check_off_hours: bool | None = Field(
        None, description="Scheduled consistency checks wait for the end of office hours (default true)")
    drill_reminder_days: int | None = Field(
        None, le=100000, description="Days without a passed drill before an alert says one is overdue; 0 for never; "
                                     "default 180")
    retention_lock_h: int | None = Field(
        None, le=100000, description="Immutable retention: hours each recovery point cannot be deleted after it is "
                                     "made, by anyone; 0 (off, the default) to 8760. Once on it can only be raised: "
                                     "lowering it or turning it off is refused with 409")


class PolicyIn(PolicySettingsIn):
    name: Name


# ---- routes ------------------------------------------------------------------------------------------------
@router.get("/sites", dependencies=[READER], tags=["fabric"], summary="List sites")
def list_sites() -> list[dict[str, Any]]:
    return service.list_sites()


@router.post("/sites", dependencies=[ADMIN], tags=["fabric"], status_code=201, summary="Register a Hyper-V site")
def add_site(body: SiteIn) -> dict[str, Any]:
    return service.add_site(body.name, body.description)


@router.get("/sites/{name:path}", dependencies=[READER],
            tags=["fabric"], summary="A site with its hosts and network mappings")
def show_site(name: NamePath) -> dict[str, Any]:
    return service.show_site(name)


@router.post("/clouds", dependencies=[ADMIN],
             tags=["fabric"], status_code=201, summary="Register a VMM cloud (and its server)")
def add_cloud(body: CloudIn) -> dict[str, Any]:
    return service.add_vmm_cloud(body.server, body.name)


@router.get("/hosts", dependencies=[READER], tags=["fabric"], summary="List hosts")
def list_hosts() -> list[dict[str, Any]]:
    return service.list_hosts()


@router.post("/hosts", dependencies=[ADMIN], tags=["fabric"], status_code=201,
             summary="Register a host (the answer holds its agent's registration key, shown once)")
def add_host(body: HostIn) -> dict[str, Any]:
    return service.add_host(body.name, body.root, site=body.site, cloud=body.cloud)


@router.get("/hosts/{name:path}", dependencies=[READER], tags=["fabric"], summary="A host with its VMs")
def show_host(name: NamePath) -> dict[str, Any]:
    return service.show_host(name)


@router.get("/vms", dependencies=[READER], tags=["fabric"], summary="List VMs with their protection state")
def list_vms() -> list[dict[str, Any]]:
    return service.list_vms()


@router.post("/vms", dependencies=[ADMIN],
             tags=["fabric"], status_code=201, summary="Register a VM as its host describes it")
def add_vm(body: VmIn) -> dict[str, Any]:
    return service.add_vm(body.host, body.name)


@router.post("/hosts/{host}/vms", dependencies=[ADMIN], tags=["fabric"], status_code=201,
             summary="Create a VM on a host (disks by size or imported, a QEMU guest's boot) and register it")
def create_vm(host: NamePath, body: VmCreateIn) -> dict[str, Any]:
    return service.create_vm(host, body.name, disks=[disk.model_dump(exclude_none=True) for disk in body.disks],
                             networks=body.networks, generation=body.generation,
                             guest=body.guest.model_dump() if body.guest else None, boot_files=body.boot_files)


@router.post("/vms/{vm:path}/start", dependencies=[OPERATOR],
             tags=["fabric"], summary="Power a VM on (a QEMU guest boots)")
def start_vm(vm: VmPath, host: HostQuery = None) -> dict[str, Any]:
    return service.start_vm(_vm_ref(vm, host))


@router.post("/vms/{vm:path}/stop", dependencies=[OPERATOR],
             tags=["fabric"], summary="Shut a VM down (a guest through ACPI)")
def stop_vm(vm: VmPath, body: VmStopIn | None = None, host: HostQuery = None) -> dict[str, Any]:
    return service.stop_vm(_vm_ref(vm, host), timeout=(body or VmStopIn()).timeout_s)


@router.get("/vms/{vm:path}/console", dependencies=[OPERATOR],
            tags=["fabric"], summary="The end of a QEMU guest's serial console")
def vm_console(vm: VmPath, host: HostQuery = None,
               max_bytes: Annotated[int, Query(ge=1, le=service.CONSOLE_MAX_BYTES)] = 16000) -> dict[str, Any]:
    return service.vm_console(_vm_ref(vm, host), max_bytes=max_bytes)


@router.get("/network-mappings", dependencies=[READER], tags=["fabric"], summary="List network mappings")
def list_network_mappings() -> list[dict[str, Any]]:
    return service.list_network_mappings()


@router.post("/network-mappings", dependencies=[ADMIN], tags=["fabric"], status_code=201,
             summary="Map a VM network of a site or cloud to a recovery network")
def add_network_mapping(body: NetworkMappingIn) -> dict[str, Any]:
    return service.add_network_mapping(body.source_network, body.recovery_network, body.recovery_subnet,
                                       site=body.site, cloud=body.cloud)


@router.get("/policies", dependencies=[READER], tags=["fabric"], summary="List replication policies")
def list_policies() -> list[dict[str, Any]]:
    return service.list_policies()


@router.post("/policies", dependencies=[ADMIN], tags=["fabric"], status_code=201, summary="Create a replication policy")
def add_policy(body: PolicyIn) -> dict[str, Any]:
    options = body.model_dump(exclude={"name"}, exclude_none=True)
    return service.add_policy(body.name, **options)


@router.get("/policies/{name:path}", dependencies=[READER],
            tags=["fabric"], summary="A replication policy and the VMs it protects")
def show_policy(name: NamePath) -> dict[str, Any]:
    return service.show_policy(name)
