"""The deployment `asr demo` runs on: the product's services (sites/deployment.py) with the demo's fabric
registered on them (two primary hosts, a recovery host, four VMs), the VMs' writers, the jobs it starts
and follows, and what it reads back (states, recovery points, replicas)."""
from __future__ import annotations

import base64
import json
import random
import secrets
import shutil
import signal
import ssl
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import time as time_of_day
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from api.demo_report import Check, Console, MiB, Stage, compare_disks
from sites.brokeracl import host_user_name
from sites.deployment import AZURE_CONNECTION_ENV, Deployment
from sites.localservices import LOCALHOST
from sites.planscripts import shared_folder, write_registry

HOSTS = ("host1", "host2")
RECOVERY_HOST = "dr1"
VMS = (("host1", "app01"), ("host1", "app02"), ("host2", "db01"), ("host2", "web01"))
DISKS = (("disk0", "32M", "vhd"), ("disk1", "24M", "raw"))
RECOVERY_NETWORKS = {"default": ("recovery-default", "10.10.0.0/24")}
WRITER_RATE_MB_S = 0.5
"""Per VM, spread evenly over its disks. Logs of half a disk unsent would require a resync: at this rate a
24 MiB disk gets there in about 50 s, far longer than any job of the demo holds replication up, even on a
slow machine with the Azure backend."""
RECOVERY_WRITER_RATE_MB_S = 0.2  # a few writes: failback then sends only a few chunks
JOB_TIMEOUT_S = 120.0
BUSY_TIMEOUT_S = 60.0
"""How long a request waits for a delta cycle the scheduler started on the same VM to finish."""
FLOWER_USER = "asr"
FINISHED = ("succeeded", "failed", "cancelled")
ALL_DAY = (time_of_day(0, 0), time_of_day(23, 59, 59, 999999))
LOG_TAIL_CHARS = 1500
PLAN_SCRIPT = "check-data"
PLAN_SCRIPT_TEXT = '#!/bin/sh\necho "plan $ASR_PLAN_ID checked group $ASR_ARG_GROUP as $(id -un)"\n'
"""The demo plan's script: what it prints (into the job record) shows it ran, with what, and as whom."""


class DemoError(Exception):
    """The demo cannot go on (a job failed, a wait ran out): the message says which and why."""


@dataclass
class DemoVm:
    name: str
    host: str
    vm_id: str
    item_id: str | None = None


class DemoSite:
    """Redis, the database, the workers, beat and Flower of one backend's run (and Azurite for the Azure
    backend), with this process pointed at them, the fabric registered and the VMs created. `close()` stops
    everything it started."""

    def __init__(self, workdir: Path, backend: str, console: Console, *, time_scale: float, seed: int) -> None:
        self.workdir = workdir
        self.backend = backend
        self.console = console
        self.time_scale = time_scale
        self.seed = seed
        self.flower_password = secrets.token_urlsafe(12)
        self.console_key: str | None = None
        """An operator's API key for the web console, made once the deployment's database exists."""
        self.hosts: dict[str, Any] = {}
        self.vms: dict[str, DemoVm] = {}
        self._writer_starts = 0
        # The orchestration worker runs four at a time: the recovery-side steps of the four VMs (apply logs,
        # restore) side by side. Redis is append-only, as in production: the queue survives a restart.
        # The hosts' agents start once their hosts are registered (`register`): each proves it is its host
        # with the registration key, as `asr worker host` starts it.
        workers = {"orchestration": (["orchestration", "recovery"], 4)}
        # The recovery plan's script, registered as an administrator would (sites/planscripts.py); outside the
        # work folder, which may be private, since the script runs as an unprivileged user.
        self.plan_scripts = shared_folder("asr-demo-scripts-")
        write_registry(self.plan_scripts, {PLAN_SCRIPT: (PLAN_SCRIPT_TEXT, {
            "description": "Reports the plan and group it checked", "timeout_s": 30, "args": {"group": "[a-z0-9-]+"}})})
        self.services = Deployment(
            workdir, workers=workers, flower=(FLOWER_USER, self.flower_password), azurite=backend == "azure",
            settings={"ASR_HEARTBEAT_S": "1", "ASR_STALE_AFTER_S": "5", "ASR_RECONCILE_S": "1", "ASR_TICK_S": "1",
                      "ASR_TIME_SCALE": f"{time_scale:g}", "ASR_PLAN_SCRIPTS_DIR": str(self.plan_scripts),
                      "ASR_STORAGE_ROOTS": str(workdir)},
            logs=workdir / "logs", ready_timeout=60, say=console.say, api=True,
            # TLS on every connection, as a deployment should run: the deployment's CA and certificates are
            # made in workdir/tls (as `asr certs create` makes them), Redis speaks TLS only and wants client
            # certificates, Flower (and Azurite for the Azure backend) serve HTTPS.
            tls=True,
            # Each host agent reaches Redis as its own ACL user, which may consume only its host's queue; the
            # other processes as the engine's user; no administration command for either (sites/brokeracl.py).
            broker_acl=True,
        )
        if backend == "azure":
            self.recovery_storage = f"azure:demo-{uuid.uuid4().hex[:16]}"
            self.storage_options: dict[str, Any] = {"connection_string_env": AZURE_CONNECTION_ENV}
        else:
            self.recovery_storage = f"file://{workdir / 'recovery-site'}"
            self.storage_options = {}

    @property
    def flower(self) -> Any:
        return self.services.flower

    @property
    def console_url(self) -> str:
        return f"{self.services.api.url}/console/"

    # ---- processes --------------------------------------------------------------------------------------
    def start(self) -> list[Check]:
        services = self.services.start()
        return [
            Check("redis-server answers over TLS with the deployment's client certificate",
                  bool(services.redis.client().ping()), services.redis.url),
            Check("redis-server refuses plain-text clients", self._plain_redis_refused(),
                  f"redis://{LOCALHOST}:{services.redis.port}"),
            Check("workers, beat and Flower ready and running",
                  all(p.process.poll() is None for p in services.processes),
                  ", ".join(f"{p.name} (pid {p.process.pid})" for p in services.processes)),
            *self.flower_checks(),
            *self.console_checks(),
        ]

    def console_checks(self) -> list[Check]:
        """An operator's key for the console (printed: the demo is this person's), and a real login with it."""
        from api import service

        self.console_key = service.create_api_key("demo-console", "operator")["key"]
        self.console.say(f"  Console: {self.console_url}  (log in with API key {self.console_key})")
        status, cookie = self._console_login(self.console_key)
        refused, _ = self._console_login("asr_not-a-key")
        return [Check("the web console serves HTTPS, verified with the deployment's CA, and the demo's key logs in",
                      self.console_url.startswith("https://") and status == 303 and cookie, f"HTTP {status}"),
                Check("the console refuses a wrong key", refused == 401, f"HTTP {refused}")]

    def _console_login(self, key: str) -> tuple[int, bool]:
        import httpx

        from api.console.sessions import COOKIE

        url = self.services.api.url
        with httpx.Client(verify=self._tls_context() or True, timeout=10, follow_redirects=False) as client:
            response = client.post(f"{url}/console/login", data={"api_key": key, "next": "/console/"},
                                   headers={"Origin": url})
        return response.status_code, f"{COOKIE}=" in response.headers.get("set-cookie", "")

    def _plain_redis_refused(self) -> bool:
        import redis

        try:
            redis.Redis(host=LOCALHOST, port=self.services.redis.port, socket_timeout=3,
                        socket_connect_timeout=3).ping()
        except redis.ConnectionError:
            return True
        return False

    def _host_users_confined(self, host_names: list[str]) -> bool:
        """Every host's broker user may not read another host's queue (the ACL refuses it), nor flush Redis."""
        import redis

        for name in host_names:
            url = urlparse(self.services.host_broker_url(name))
            client = self.services.redis.client(url.username, url.password)
            for other in host_names:
                if other == name:
                    continue
                try:
                    client.lrange(f"host.{other}", 0, 0)
                    return False
                except redis.exceptions.NoPermissionError:
                    pass
            try:
                client.flushall()
                return False
            except redis.exceptions.NoPermissionError:
                pass
        return True

    def _tls_context(self) -> ssl.SSLContext | None:
        certificates = self.services.certificates
        return None if certificates is None else ssl.create_default_context(cafile=str(certificates.ca_file))

    def flower_get(self, path: str, *, auth: bool = True) -> tuple[int, Any]:
        request = urllib.request.Request(self.flower.url + path)
        if auth:
            token = base64.b64encode(f"{FLOWER_USER}:{self.flower_password}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            # Flower serves HTTPS with the deployment's certificate: verified with its CA.
            with urllib.request.urlopen(request, timeout=10, context=self._tls_context()) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            return error.code, None

    def flower_checks(self) -> list[Check]:
        anonymous, _ = self.flower_get("/api/workers", auth=False)
        signed_in, _ = self.flower_get("/api/tasks?limit=1")
        return [Check("Flower serves HTTPS, verified with the deployment's CA",
                      self.flower.url.startswith("https://") and signed_in == 200, self.flower.url),
                Check("Flower refuses requests without credentials", anonymous == 401, f"HTTP {anonymous}"),
                Check("Flower's API answers with credentials", signed_in == 200, f"HTTP {signed_in}")]

    def close(self) -> None:
        """Stop the writers, Flower, the workers and beat, Redis and Azurite (each bounded); restore this
        process's settings. Ctrl-C is ignored meanwhile: a half-done stop would leave processes behind."""
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for host in self.hosts.values():
                for vm in host.list_vms():
                    try:
                        host.stop_workload(vm.name, timeout=5)
                    except Exception as error:  # noqa: BLE001 - stopping must go on to everything else
                        self.console.say(f"  could not stop the writer of {vm.name} on {host.name}: {error}")
            self.services.close()
        finally:
            shutil.rmtree(self.plan_scripts, ignore_errors=True)
            signal.signal(signal.SIGINT, previous)

    def log_tails(self) -> str:
        return "\n".join(f"--- {p.name} ({p.log_path}) ---\n{p.log()[-LOG_TAIL_CHARS:]}"
                         for p in self.services.processes)

    # ---- fabric -----------------------------------------------------------------------------------------
    def register(self) -> list[Check]:
        from sqlmodel import select

        from models.db import session_scope
        from models.fabric import Host as HostRow
        from models.fabric import add_network_mapping, create_site, import_vm_manifest, register_host, vm_disks
        from models.policy import create_policy
        from sites.host import Host

        say = self.console.say
        keys: dict[str, str] = {}
        with session_scope() as session:
            primary = create_site(session, "primary", "the protected datacenter")
            recovery = create_site(session, "recovery", "the recovery datacenter")
            for name, site in [*((h, primary) for h in HOSTS), (RECOVERY_HOST, recovery)]:
                root = self.workdir / "hosts" / name
                root.mkdir(parents=True)
                keys[name] = register_host(session, name, str(root), site=site)[1]
                self.hosts[name] = Host(root, name)
            for network, (target, subnet) in RECOVERY_NETWORKS.items():
                add_network_mapping(session, network, target, subnet, site=primary)
            # Office hours all day: no automatic resync starts behind the demo's back.
            policy = create_policy(session, "demo", copy_frequency_s=30, app_consistent_frequency_h=1,
                                   office_hours=ALL_DAY, office_days=range(7))
            self.policy_id = policy.id
        say(f"  sites primary ({', '.join(HOSTS)}) and recovery ({RECOVERY_HOST}); network default -> "
            f"{RECOVERY_NETWORKS['default'][0]} {RECOVERY_NETWORKS['default'][1]}; policy demo: copy every 30 s, "
            f"app-consistent every hour, time scaled by {self.time_scale:g}")
        agents = [self.services.add_worker(f"host-{name}", [f"host.{name}"], concurrency=3, wait=False,
                                           env={**self.services.env, "ASR_HOST_NAME": name, "ASR_HOST_KEY": key})
                  for name, key in keys.items()]
        for agent in agents:
            agent.wait_ready(self.services.ready_timeout)
        say("  host agents " + ", ".join(f"{agent.name} (pid {agent.process.pid})" for agent in agents)
            + ", each started with its host's registration key")
        for number, (host_name, vm_name) in enumerate(VMS):
            driver = self.hosts[host_name]
            vm = driver.create_vm(vm_name, list(DISKS), networks=("default",))
            written = driver.write_initial_data(vm_name, seed=self.seed * 100 + number, fraction=0.5)
            with session_scope() as session:
                row = session.exec(select(HostRow).where(HostRow.name == host_name)).one()
                self.vms[vm_name] = DemoVm(vm_name, host_name, import_vm_manifest(session, row, vm.to_manifest()).id)
            say(f"  VM {vm_name} on {host_name}: " + ", ".join(
                f"{d.name} ({d.format}, {d.size // MiB} MiB, {written[d.name] // MiB} MiB of data)" for d in vm.disks))
        with session_scope() as session:
            from models.fabric import VirtualMachine

            registered = {vm.name: len(vm_disks(session, session.get(VirtualMachine, vm.vm_id)))
                          for vm in self.vms.values()}
        return [Check("host agents ready, each started with its host's key", all(
                          agent.process.poll() is None for agent in agents), ", ".join(a.name for a in agents)),
                Check("each host agent's broker user is refused the other hosts' queues",
                      self._host_users_confined(list(keys)), "Redis ACL users " + ", ".join(
                          host_user_name(name) for name in keys)),
                Check("VMs and disks registered", registered == {name: len(DISKS) for _, name in VMS},
                      f"{registered}")]

    # ---- writers -------------------------------------------------------------------------------------------
    def start_writer(self, vm: str, host: str | None = None, rate: float = WRITER_RATE_MB_S) -> None:
        host = host or self.vms[vm].host
        # A different stream of writes each time, the same ones for the same --seed.
        self._writer_starts += 1
        seed = random.Random(f"{self.seed}/{vm}/{host}/{self._writer_starts}").randrange(1 << 30)
        self.hosts[host].start_workload(vm, rate_mb_s=rate, seed=seed)

    def stop_writer(self, vm: str, host: str | None = None) -> None:
        self.hosts[host or self.vms[vm].host].stop_workload(vm, timeout=10)

    # ---- jobs -----------------------------------------------------------------------------------------------
    def request(self, start: Callable[[], str], what: str, stage: Stage) -> str:
        """Start a job; while a delta cycle the scheduler started holds the VM, wait (bounded) and ask again."""
        from workflows.engine import ItemBusyError

        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while True:
            try:
                job_id = start()
                break
            except ItemBusyError as busy:
                if time.monotonic() > deadline:
                    raise DemoError(f"{what}: still busy after {BUSY_TIMEOUT_S:g} s: {busy}") from None
                time.sleep(0.2)
        stage.jobs.append(job_id)
        self.console.say(f"  {what}: job {job_id}")
        return job_id

    def wait(self, jobs: dict[str, str], *, states: Iterable[str] = ("succeeded",),
             timeout: float = JOB_TIMEOUT_S) -> dict[str, dict[str, Any]]:
        """Follow the jobs ({job id: label}) to one of `states`, printing each one's step progress as it
        changes; DemoError naming the job, its failed step and the workers' logs when one ends otherwise."""
        from workflows.engine import get_job
        from workflows.progress import job_progress

        wanted = tuple(states)
        deadline = time.monotonic() + timeout
        done: dict[str, dict[str, Any]] = {}
        shown: dict[str, tuple[str, float]] = {}
        while True:
            for job_id, label in jobs.items():
                if job_id in done:
                    continue
                job = get_job(job_id)
                line = self._progress_line(job, label, job_progress(job_id) if job["state"] == "running" else {})
                last_line, last_time = shown.get(job_id, ("", 0.0))
                if line != last_line and (job["state"] != "running" or time.monotonic() - last_time >= 1.0):
                    self.console.say(line)
                    shown[job_id] = (line, time.monotonic())
                if job["state"] in wanted:
                    done[job_id] = job
                elif job["state"] in FINISHED:
                    failed = [f"{s['name']}: {s['error']}" for s in job["steps"] if s["state"] == "failed"]
                    raise DemoError(f"job {job_id} ({job['kind']}, {label}) ended {job['state']}: {job['error']}"
                                    + (f"; failed step {failed[0]}" if failed else "")
                                    + f"\n{self.log_tails()}")
            if len(done) == len(jobs):
                return done
            if time.monotonic() > deadline:
                pending = ", ".join(f"{jobs[j]} ({j})" for j in jobs if j not in done)
                raise DemoError(f"jobs not {'/'.join(wanted)} within {timeout:g} s: {pending}\n{self.log_tails()}")
            time.sleep(0.2)

    @staticmethod
    def _progress_line(job: dict[str, Any], label: str, live: dict[str, dict[str, Any]]) -> str:
        steps = job["steps"]
        finished = sum(1 for s in steps if s["state"] == "succeeded")
        running = []
        for step in steps:
            if step["state"] != "running":
                continue
            record = live.get(step["id"])
            done, total = ((record["done"], record["total"]) if record
                           else (step["progress_done"], step["progress_total"]))
            running.append(f"{step['name']} {100 * done // total}%" if total else step["name"])
        tail = f"; {', '.join(running)}" if running else ""
        return f"    {label}: {job['kind']} {job['state']} {finished}/{len(steps)} steps{tail}"

    def run(self, start: Callable[[], str], what: str, stage: Stage, **wait: Any) -> dict[str, Any]:
        job_id = self.request(start, what, stage)
        return self.wait({job_id: what}, **wait)[job_id]

    def delta_cycles(self, vms: Iterable[str], stage: Stage) -> dict[str, dict[str, Any]]:
        """One delta cycle of each VM, side by side; {vm: finished job}."""
        from workflows.kinds.delta_replication import start as start_delta_replication

        started = {self.request(lambda vm=vm: start_delta_replication(self.vms[vm].item_id), f"delta cycle {vm}",
                                stage): vm for vm in vms}
        finished = self.wait({job_id: f"delta cycle {vm}" for job_id, vm in started.items()})
        return {started[job_id]: job for job_id, job in finished.items()}

    def quiet_cycles(self, vms: Iterable[str], stage: Stage) -> None:
        """Pause the writers, then one more cycle each: the replicas (and their latest points) then hold
        exactly what the disks hold."""
        vms = list(vms)
        for vm in vms:
            self.stop_writer(vm)
        self.delta_cycles(vms, stage)

    # ---- reading state ------------------------------------------------------------------------------------
    def state(self, vm: str) -> str:
        from workflows.items import item_status

        return item_status(self.vms[vm].item_id)["state"]

    def points(self, vm: str) -> list[Any]:
        from models.db import session_scope
        from models.protection import ProtectedItem, recovery_points

        with session_scope() as session:
            return recovery_points(session, session.get(ProtectedItem, self.vms[vm].item_id))

    def latest_record(self, vm: str, kind: str) -> Any:
        from models.db import session_scope
        from models.failover import FailoverKind, latest_failover

        with session_scope() as session:
            return latest_failover(session, self.vms[vm].item_id, (FailoverKind(kind),))

    def disks(self, vm: str, host: str | None = None) -> list[Any]:
        return self.hosts[host or self.vms[vm].host].get_vm(vm).disks

    def copy_disks(self, vm: str, label: str) -> dict[str, Path]:
        """A copy of the VM's disk images as they are now (its writer paused): what a point must hold."""
        folder = self.workdir / "copies" / label / vm
        folder.mkdir(parents=True, exist_ok=True)
        copies = {}
        for disk in self.disks(vm):
            copies[disk.name] = folder / disk.path.name
            shutil.copyfile(disk.path, copies[disk.name])
        return copies

    @contextmanager
    def replicas(self, vm: str) -> Iterator[dict[str, Any]]:
        """{disk name: the replica's disk endpoint on the recovery storage}, open for the block."""
        from models.db import session_scope
        from tasks.recovery_storage import open_recovery_storage
        from tasks.replication import replica_of
        from workflows.items import load_item

        with session_scope() as session:
            view = load_item(session, self.vms[vm].item_id)
        storage = open_recovery_storage(view.item.recovery_storage, view.item.storage_options)
        opened: dict[str, Any] = {}
        try:
            for disk in view.disks:
                opened[disk.name] = storage.open_disk(replica_of(view, storage, disk.name).name)
            yield opened
        finally:
            for endpoint in opened.values():
                endpoint.close()
            storage.close()

    def verify_replicas(self, vm: str, checks: list[Check], *, damage: bool = False) -> None:
        """Every replica of the VM against its source disk, byte for byte (the writer paused)."""
        sources = {disk.name: disk.path for disk in self.disks(vm)}
        with self.replicas(vm) as replicas:
            if damage:
                self._damage(vm, replicas)
            for name, replica in replicas.items():
                ok, detail = compare_disks(sources[name], replica)
                checks.append(Check(f"replica of {vm}/{name} equals its source", ok, detail))

    def _damage(self, vm: str, replicas: dict[str, Any]) -> None:
        name, replica = sorted(replicas.items())[-1]
        offset = (replica.size // 2) // 4096 * 4096
        replica.write(offset, random.Random(self.seed).randbytes(4096))
        replica.flush()
        self.console.say(f"  (injected failure: 4 KiB of the replica of {vm}/{name} overwritten at offset {offset})")
