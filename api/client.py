"""A small typed Python client of the REST API (api/rest.py; the document is docs/openapi.json), for other
services and scripts.

    with SiteRecoveryClient("https://127.0.0.1:8000", api_key) as asr:
        job = asr.protect("app01", policy="gold", recovery_storage="azure:replicas")
        final = asr.wait_job(job["job_id"], timeout=600)
        for snapshot in asr.events(job["job_id"]):     # or follow it as server-sent events
            print(snapshot["state"], snapshot["percent"])

One method per route, named as the route's operation id. Every error answer raises `ApiError(status,
message)` with the server's message; a connection failure raises httpx's own errors.
"""
from __future__ import annotations

import json
import ssl
import time
from collections.abc import Iterator
from types import TracebackType
from typing import Any, TypedDict
from urllib.parse import quote

import httpx

__all__ = ["SiteRecoveryClient", "ApiError", "JobRef", "JobSnapshot", "Job", "JobStep", "StepProgress",
           "FINISHED_STATES"]

API_PREFIX = "/api/v1"
FINISHED_STATES = ("succeeded", "failed", "cancelled")


class ApiError(Exception):
    """An error answer of the API: its HTTP status and the server's message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class JobRef(TypedDict, total=False):
    """What starting an operation answers: the job to follow."""

    job_id: str
    kind: str
    vm: str | None
    plan: str | None
    restarted_from: str | None


class StepProgress(TypedDict):
    done: int
    total: int
    percent: float


class JobStep(TypedDict, total=False):
    id: str
    stage: int
    index: int
    name: str
    state: str
    queue: str
    attempts: int
    deaths: int  # runs whose worker vanished (ASR_MAX_STEP_DEATHS of them fail the step as poison)
    interruptions: int  # runs a broker outage ended: not counted as deaths
    broker_lost_at: str | None  # its worker lost the broker at this time and has not reconnected
    started_at: str | None
    ended_at: str | None
    next_attempt_at: str | None
    error: str | None
    instructions: str | None
    progress: StepProgress


class Job(TypedDict, total=False):
    id: str
    kind: str
    state: str
    target: str | None
    vm: str | None
    plan: str | None
    params: dict[str, Any]
    created_at: str
    started_at: str | None
    ended_at: str | None
    error: str | None
    percent: float
    finished: bool
    next_attempt_at: str | None
    waiting_for: list[dict[str, Any]]
    steps: list[JobStep]


class JobSnapshot(TypedDict, total=False):
    """One server-sent event of a job: its state and each step's progress."""

    job_id: str
    kind: str
    vm: str | None
    state: str
    finished: bool
    percent: float
    error: str | None
    next_attempt_at: str | None
    waiting_for: list[dict[str, Any]]
    steps: list[dict[str, Any]]


def _segment(value: str) -> str:
    # Quoted whole, so a value cannot add path segments; the server refuses what is not a valid name.
    return quote(str(value), safe="")


def _drop_none(values: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


class SiteRecoveryClient:
    """The REST API at `base_url` (e.g. "https://127.0.0.1:8000"), authenticated with `api_key`."""

    def __init__(self, base_url: str, api_key: str, timeout: float = 30, *,
                 transport: httpx.BaseTransport | None = None, verify: ssl.SSLContext | None = None) -> None:
        """An https `base_url` is verified with `verify`, by default ASR_TLS_CA_FILE (else the system's
        CAs); an http one is refused unless ASR_INSECURE_TRANSPORT=1 (workflows/transport.py)."""
        from workflows.transport import check_http_url, client_ssl_context

        self.base_url = check_http_url("base_url", base_url.rstrip("/"))
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, transport=transport,
                                  verify=verify if verify is not None else client_ssl_context(),
                                  headers={"X-API-Key": api_key} if api_key else {})

    # ---- plumbing ------------------------------------------------------------------------------------------
    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> SiteRecoveryClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @staticmethod
    def _raise_for(response: httpx.Response) -> None:
        if response.status_code < 400:
            return
        try:
            message = response.json().get("error") or response.text
        except (ValueError, AttributeError):
            message = response.text or response.reason_phrase
        raise ApiError(response.status_code, message)

    def _request(self, method: str, path: str, *, json_body: Any = None, params: dict[str, Any] | None = None) -> Any:
        response = self._http.request(method, API_PREFIX + path, json=json_body,
                                      params=_drop_none(params or {}) or None)
        self._raise_for(response)
        return response.json()

    def _delete(self, path: str, **params: Any) -> Any:
        return self._request("DELETE", path, params=params)

    def _get(self, path: str, **params: Any) -> Any:
        return self._request("GET", path, params=params)

    def _post(self, path: str, body: dict[str, Any] | None = None, **params: Any) -> Any:
        return self._request("POST", path, json_body=body, params=params)

    @staticmethod
    def _vm(vm: str) -> tuple[str, dict[str, Any]]:
        """Path segment and query of a VM reference: a name or id, or "host/name"."""
        host, _, name = vm.rpartition("/")
        return _segment(name), {"host": host or None}

    def _vm_action(self, vm: str, action: str, body: dict[str, Any] | None = None) -> JobRef:
        segment, query = self._vm(vm)
        return self._post(f"/vms/{segment}/{action}", body, **query)

    def healthz(self) -> dict[str, Any]:
        response = self._http.get("/healthz")
        self._raise_for(response)
        return response.json()

    # ---- fabric --------------------------------------------------------------------------------------------
    def list_sites(self) -> list[dict[str, Any]]:
        return self._get("/sites")

    def add_site(self, name: str, description: str = "") -> dict[str, Any]:
        return self._post("/sites", {"name": name, "description": description})

    def show_site(self, name: str) -> dict[str, Any]:
        return self._get(f"/sites/{_segment(name)}")

    def add_cloud(self, server: str, name: str) -> dict[str, Any]:
        return self._post("/clouds", {"server": server, "name": name})

    def list_hosts(self) -> list[dict[str, Any]]:
        return self._get("/hosts")

    def add_host(self, name: str, root: str, *, site: str | None = None, cloud: str | None = None) -> dict[str, Any]:
        return self._post("/hosts", _drop_none({"name": name, "root": root, "site": site, "cloud": cloud}))

    def show_host(self, name: str) -> dict[str, Any]:
        return self._get(f"/hosts/{_segment(name)}")

    def list_vms(self) -> list[dict[str, Any]]:
        return self._get("/vms")

    def add_vm(self, host: str, name: str) -> dict[str, Any]:
        return self._post("/vms", {"host": host, "name": name})

    def create_vm(self, host: str, name: str, *, disks: list[dict[str, Any]], networks: list[str] | None = None,
                  generation: int = 1, guest: dict[str, Any] | None = None,
                  boot_files: dict[str, str] | None = None) -> dict[str, Any]:
        return self._post(f"/hosts/{_segment(host)}/vms", _drop_none({
            "name": name, "disks": disks, "networks": networks, "generation": generation, "guest": guest,
            "boot_files": boot_files}))

    def start_vm(self, vm: str) -> dict[str, Any]:
        segment, query = self._vm(vm)
        return self._post(f"/vms/{segment}/start", None, **query)

    def stop_vm(self, vm: str, *, timeout: float = 30.0) -> dict[str, Any]:
        segment, query = self._vm(vm)
        return self._post(f"/vms/{segment}/stop", {"timeout_s": timeout}, **query)

    def vm_console(self, vm: str, *, max_bytes: int = 16000) -> dict[str, Any]:
        segment, query = self._vm(vm)
        return self._get(f"/vms/{segment}/console", max_bytes=max_bytes, **query)

    def show_vm(self, vm: str) -> dict[str, Any]:
        segment, query = self._vm(vm)
        return self._get(f"/vms/{segment}", **query)

    def list_network_mappings(self) -> list[dict[str, Any]]:
        return self._get("/network-mappings")

    def add_network_mapping(self, source_network: str, recovery_network: str, recovery_subnet: str, *,
                            site: str | None = None, cloud: str | None = None) -> dict[str, Any]:
        return self._post("/network-mappings", _drop_none({
            "source_network": source_network, "recovery_network": recovery_network,
            "recovery_subnet": recovery_subnet, "site": site, "cloud": cloud}))

    def list_policies(self) -> list[dict[str, Any]]:
        return self._get("/policies")

    def add_policy(self, name: str, **options: Any) -> dict[str, Any]:
        return self._post("/policies", _drop_none({"name": name, **options}))

    def show_policy(self, name: str) -> dict[str, Any]:
        return self._get(f"/policies/{_segment(name)}")

    # ---- changing and removing what was registered ----------------------------------------------------------
    def rekey_host(self, name: str) -> dict[str, Any]:
        """A new registration key for the host (`registration_key`, shown once); the old one stops working."""
        return self._post(f"/hosts/{_segment(name)}/rekey")

    def update_site(self, name: str, *, description: str) -> dict[str, Any]:
        return self._request("PATCH", f"/sites/{_segment(name)}", json_body={"description": description})

    def update_host(self, name: str, *, root: str | None = None, site: str | None = None,
                    cloud: str | None = None) -> dict[str, Any]:
        """Another root, site or cloud for the host (those left out stay)."""
        return self._request("PATCH", f"/hosts/{_segment(name)}",
                             json_body=_drop_none({"root": root, "site": site, "cloud": cloud}))

    def update_vm(self, vm: str, *, networks: dict[str, str] | None = None,
                  guest: dict[str, Any] | None = None) -> dict[str, Any]:
        """`networks`: adapter name -> its new VM network; `guest`: fields of a QEMU guest's definition to change
        (memory_mb, boot_timeout_s, heartbeat, check_pass, check_fail, cmdline, guest_agent)."""
        segment, query = self._vm(vm)
        return self._request("PATCH", f"/vms/{segment}", json_body=_drop_none({"networks": networks, "guest": guest}),
                             params=query)

    def update_network_mapping(self, source_network: str, *, site: str | None = None, cloud: str | None = None,
                               recovery_network: str | None = None,
                               recovery_subnet: str | None = None) -> dict[str, Any]:
        return self._request("PATCH", f"/network-mappings/{_segment(source_network)}",
                             json_body=_drop_none({"recovery_network": recovery_network,
                                                   "recovery_subnet": recovery_subnet}),
                             params={"site": site, "cloud": cloud})

    def update_policy(self, name: str, **options: Any) -> dict[str, Any]:
        """Change the given settings (those of add_policy); the others keep their values."""
        return self._request("PATCH", f"/policies/{_segment(name)}", json_body=_drop_none(options))

    def update_plan(self, name: str, groups: list[dict[str, Any]], description: str | None = None) -> dict[str, Any]:
        return self._request("PUT", f"/plans/{_segment(name)}",
                             json_body=_drop_none({"groups": groups, "description": description}))

    def remove_vm(self, vm: str, *, confirm: str) -> dict[str, Any]:
        """`confirm` must be the VM's name (each remove_* takes the name of what it removes)."""
        segment, query = self._vm(vm)
        return self._delete(f"/vms/{segment}", confirm=confirm, **query)

    def remove_host(self, name: str, *, confirm: str) -> dict[str, Any]:
        return self._delete(f"/hosts/{_segment(name)}", confirm=confirm)

    def remove_site(self, name: str, *, confirm: str) -> dict[str, Any]:
        return self._delete(f"/sites/{_segment(name)}", confirm=confirm)

    def remove_network_mapping(self, source_network: str, *, site: str | None = None, cloud: str | None = None,
                               confirm: str) -> dict[str, Any]:
        return self._delete(f"/network-mappings/{_segment(source_network)}", site=site, cloud=cloud, confirm=confirm)

    def remove_policy(self, name: str, *, confirm: str) -> dict[str, Any]:
        return self._delete(f"/policies/{_segment(name)}", confirm=confirm)

    def remove_plan(self, name: str, *, confirm: str) -> dict[str, Any]:
        return self._delete(f"/plans/{_segment(name)}", confirm=confirm)

    # ---- protection and failover ---------------------------------------------------------------------------
    def protect(self, vm: str, *, policy: str, recovery_storage: str, storage_options: dict[str, Any] | None = None,
                recovery_host: str | None = None) -> JobRef:
        return self._vm_action(vm, "protect", _drop_none({
            "policy": policy, "recovery_storage": recovery_storage, "storage_options": storage_options,
            "recovery_host": recovery_host}))

    def disable_protection(self, vm: str, *, confirm: str) -> JobRef:
        """`confirm` must be the VM's name: its replicas and recovery points are deleted."""
        return self._vm_action(vm, "disable-protection", {"confirm": confirm})

    def replicate(self, vm: str) -> JobRef:
        """A delta replication cycle now."""
        return self._vm_action(vm, "replicate")

    def resync(self, vm: str) -> JobRef:
        return self._vm_action(vm, "resync")

    def preview_resync(self, vm: str) -> JobRef:
        """What a resync would send, without sending (a job; its steps' results count chunks and bytes)."""
        return self._vm_action(vm, "resync-preview")

    def consistency_check(self, vm: str) -> JobRef:
        return self._vm_action(vm, "consistency-check")

    def recovery_points(self, vm: str) -> list[dict[str, Any]]:
        segment, query = self._vm(vm)
        return self._get(f"/vms/{segment}/recovery-points", **query)

    def delete_recovery_points(self, vm: str, *, before: str, confirm: str) -> JobRef:
        """Delete the VM's points made before `before` (ISO time), never the latest (admin; 409 when any is
        inside its retention lock)."""
        return self._vm_action(vm, "recovery-points/delete", {"before": before, "confirm": confirm})

    def verify(self, vm: str, *, point: str | None = None) -> JobRef:
        return self._vm_action(vm, "verify", _drop_none({"point": point}))

    def test_failover(self, vm: str, *, point: str = "latest_processed", recovery_host: str | None = None,
                      test_network: str | None = None) -> JobRef:
        return self._vm_action(vm, "failover/test", _drop_none({
            "point": point, "recovery_host": recovery_host, "test_network": test_network}))

    def test_failover_cleanup(self, vm: str) -> JobRef:
        return self._vm_action(vm, "failover/cleanup")

    def planned_failover(self, vm: str, *, recovery_host: str | None = None,
                         public_ips: dict[str, str] | None = None) -> JobRef:
        return self._vm_action(vm, "failover/planned", _drop_none({
            "recovery_host": recovery_host, "public_ips": public_ips}))

    def unplanned_failover(self, vm: str, *, point: str = "latest_processed", recovery_host: str | None = None,
                           public_ips: dict[str, str] | None = None) -> JobRef:
        return self._vm_action(vm, "failover/unplanned", _drop_none({
            "point": point, "recovery_host": recovery_host, "public_ips": public_ips}))

    def complete_failover(self, vm: str) -> JobRef:
        return self._vm_action(vm, "failover/complete")

    def commit_failover(self, vm: str) -> JobRef:
        return self._vm_action(vm, "failover/commit")

    def cancel_failover(self, vm: str) -> JobRef:
        return self._vm_action(vm, "failover/cancel")

    def failback(self, vm: str, *, mode: str = "minimize_downtime", create_vm: bool = False,
                 host: str | None = None) -> JobRef:
        return self._vm_action(vm, "failback", _drop_none({"mode": mode, "create_vm": create_vm, "host": host}))

    def reverse_replication(self, vm: str) -> JobRef:
        return self._vm_action(vm, "reverse-replication")

    def failover_history(self, vm: str, *, limit: int = 20) -> list[dict[str, Any]]:
        segment, query = self._vm(vm)
        return self._get(f"/vms/{segment}/failovers", limit=limit, **query)

    def health(self) -> list[dict[str, Any]]:
        return self._get("/health")

    def metrics(self) -> str:
        """The Prometheus metrics, as text (`prometheus_client.parser.text_string_to_metric_families` reads it)."""
        response = self._http.get(f"{API_PREFIX}/metrics")
        self._raise_for(response)
        return response.text

    def list_alerts(self, *, active: bool = False, limit: int = 100) -> list[dict[str, Any]]:
        """Alerts raised and resolved, newest first, with their delivery to the webhook."""
        return self._get("/alerts", active=str(active).lower(), limit=limit)

    # ---- recovery plans --------------------------------------------------------------------------------------
    def list_plans(self) -> list[dict[str, Any]]:
        return self._get("/plans")

    def plan_scripts(self) -> list[dict[str, Any]]:
        return self._get("/plan-scripts")

    def create_plan(self, name: str, groups: list[dict[str, Any]], description: str = "") -> dict[str, Any]:
        return self._post("/plans", {"name": name, "groups": groups, "description": description})

    def show_plan(self, name: str) -> dict[str, Any]:
        return self._get(f"/plans/{_segment(name)}")

    def run_plan(self, name: str, operation: str, **options: Any) -> JobRef:
        return self._post(f"/plans/{_segment(name)}/run", _drop_none({"operation": operation, **options}))

    def validate_plan(self, name: str, operation: str, **options: Any) -> dict[str, Any]:
        """A dry run of `run_plan`: the groups the run would take, or the ApiError it would give."""
        return self._post(f"/plans/{_segment(name)}/validate", _drop_none({"operation": operation, **options}))

    # ---- jobs --------------------------------------------------------------------------------------------------
    def list_jobs(self, *, state: str | None = None, kind: str | None = None, vm: str | None = None,
                  plan: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        return self._get("/jobs", state=state, kind=kind, vm=vm, plan=plan, limit=limit)

    def show_job(self, job_id: str) -> Job:
        return self._get(f"/jobs/{_segment(job_id)}")

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        return self._post(f"/jobs/{_segment(job_id)}/cancel")

    def retry_job(self, job_id: str) -> dict[str, Any]:
        return self._post(f"/jobs/{_segment(job_id)}/retry")

    def restart_job(self, job_id: str) -> JobRef:
        return self._post(f"/jobs/{_segment(job_id)}/restart")

    def resume_job(self, job_id: str, note: str = "") -> dict[str, Any]:
        return self._post(f"/jobs/{_segment(job_id)}/resume", {"note": note})

    def wait_job(self, job_id: str, timeout: float, *, interval: float = 0.5) -> Job:
        """Poll the job until it has finished and return it; TimeoutError after `timeout` s."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.show_job(job_id)
            if job["state"] in FINISHED_STATES:
                return job
            if time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} ({job['kind']}) is still {job['state']} after {timeout:g} s")
            time.sleep(interval)

    def events(self, job_id: str, *, interval: float = 0.5, timeout: float | None = None) -> Iterator[JobSnapshot]:
        """The job's server-sent events, as snapshots, until it has finished (the last one has `finished` true)
        or `timeout` s have passed on the server (the stream then ends with the last snapshot it had)."""
        params = _drop_none({"interval": interval, "timeout": timeout})
        # No read timeout: a quiet job sends nothing but keep-alive comments between its changes.
        with self._http.stream("GET", f"{API_PREFIX}/jobs/{_segment(job_id)}/events", params=params,
                               timeout=httpx.Timeout(self._http.timeout.connect or 30, read=None)) as response:
            if response.status_code >= 400:
                response.read()
                self._raise_for(response)
            for event, data in _parse_sse(response.iter_lines()):
                if data is None:
                    continue
                snapshot = json.loads(data)
                yield snapshot
                if event in ("end", "timeout"):
                    return


def _parse_sse(lines: Iterator[str]) -> Iterator[tuple[str, str | None]]:
    """(event name, data) of each event of a text/event-stream; comments (keep-alives) are skipped."""
    event, data = "message", []
    for line in lines:
        if line == "":
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "event":
            event = value
        elif field == "data":
            data.append(value)
    if data:
        yield event, "\n".join(data)
