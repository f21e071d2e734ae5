"""`asr demo`: the whole Site Recovery Engine on this machine, every disk checked byte for byte.

One command starts a deployment of its own (a private redis-server on a free port, a SQLite database in
the work folder, Celery workers for orchestration and recovery and for each host, beat, Flower with
basic authentication, and Azurite for the Azure backend), then runs what an operator does, through the
same workflows the API and the CLI call:

1. register a primary site with two hosts, a recovery site with one host, network mappings, a policy
   (app-consistent points on); create four VMs (two per host, two disks each) with initial data;
2. protect them all while their writers run;
3. run delta cycles; pause the writers, verify every replica against its source;
4. drill one VM to the latest point and clean up, replication going on meanwhile;
5. planned failover of that VM, commit, a writer on the recovery VM, failback (minimize downtime),
   complete, commit, reverse replication;
6. a recovery plan of the other VMs (two groups and a script action) for a test failover, cleaned up;
7. a report of every stage with its checks and timings (`--json`: as JSON).

Everything it started is stopped at the end, on Ctrl-C, on SIGTERM and on failure; the exit status is 0
only when every check passed. A stage that fails ends the run (later stages would build on broken
state); `--inject-failure corrupt-replica` damages a replica before its check, to prove the checks fail.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import secrets
import shutil
import signal
import sys
import time
import traceback
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import time as time_of_day
from pathlib import Path
from typing import Any

import click

MiB = 1 << 20
HOSTS = ("host1", "host2")
RECOVERY_HOST = "dr1"
VMS = (("host1", "app01"), ("host1", "app02"), ("host2", "db01"), ("host2", "web01"))
FAILOVER_VM = "app01"
"""The VM drilled, failed over and failed back; the others go into the recovery plan."""
PLAN_GROUPS = (("data", ("db01",)), ("apps", ("app02", "web01")))
DISKS = (("disk0", "32M", "vhd"), ("disk1", "24M", "raw"))
RECOVERY_NETWORKS = {"default": ("recovery-default", "10.10.0.0/24")}
WRITER_RATE_MB_S = 0.5
"""Per VM, spread evenly over its disks. Logs of half a disk unsent would require a resync: at this rate a
24 MiB disk gets there in about 50 s, far longer than any job of the demo holds replication up, even on a
slow machine with the Azure backend."""
RECOVERY_WRITER_RATE_MB_S = 0.2  # a few writes: failback then sends only a few chunks
DELTA_ROUNDS = 3
JOB_TIMEOUT_S = 120.0
BUSY_TIMEOUT_S = 60.0
"""How long a request waits for a delta cycle the scheduler started on the same VM to finish."""
FLOWER_USER = "asr"
AZURE_CONNECTION_ENV = "ASR_AZURE_CONNECTION_STRING"
MARKER = ".asr-demo"
"""A file in the work folder saying the demo made it, so the demo only ever empties its own folders."""
FAILURES = ("corrupt-replica",)
FINISHED = ("succeeded", "failed", "cancelled")
ALL_DAY = (time_of_day(0, 0), time_of_day(23, 59, 59, 999999))
LOG_TAIL_CHARS = 1500


class DemoError(Exception):
    """The demo cannot go on (a job failed, a wait ran out): the message says which and why."""


class Interrupted(BaseException):
    """SIGTERM, handled like Ctrl-C: stop everything, report, exit non-zero."""


# ---- the report -----------------------------------------------------------------------------------------
@dataclass
class Check:
    check: str
    ok: bool
    detail: str


@dataclass
class Stage:
    backend: str
    stage: str
    title: str
    status: str = "skipped"  # passed | failed | interrupted | skipped
    seconds: float = 0.0
    checks: list[Check] = field(default_factory=list)
    jobs: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "passed"


@dataclass
class Report:
    stages: list[Stage] = field(default_factory=list)
    flower: dict[str, dict[str, Any]] = field(default_factory=dict)
    """By backend: Flower's address and the tasks it saw."""
    cleanup: list[Check] = field(default_factory=list)
    interrupted: bool = False

    @property
    def failed_checks(self) -> list[str]:
        named = [f"[{s.backend}] {s.stage}: {c.check}: {c.detail}" for s in self.stages for c in s.checks if not c.ok]
        named += [f"[{s.backend}] {s.stage}: {s.error}" for s in self.stages if s.error]
        return named + [f"cleanup: {c.check}: {c.detail}" for c in self.cleanup if not c.ok]

    @property
    def ok(self) -> bool:
        return (not self.interrupted and bool(self.stages) and all(s.ok for s in self.stages)
                and all(c.ok for c in self.cleanup))

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "interrupted": self.interrupted, "failed_checks": self.failed_checks,
            "flower": self.flower,
            "stages": [{**asdict(s), "ok": s.ok} for s in self.stages],
            "cleanup": [asdict(c) for c in self.cleanup],
        }


class Console:
    """Progress lines: on stdout, or on stderr with --json so stdout holds the JSON report alone."""

    def __init__(self, to_stderr: bool) -> None:
        self.to_stderr = to_stderr

    def say(self, text: str) -> None:
        click.echo(text, err=self.to_stderr)


# ---- byte-for-byte comparison ---------------------------------------------------------------------------
def compare_disks(a, b) -> tuple[bool, str]:
    """Open disk endpoints (or paths) `a` and `b`: equal content, or where they first differ."""
    from datapath.compare import first_difference
    from datapath.disk import open_disk

    with _endpoint(a, open_disk) as left, _endpoint(b, open_disk) as right:
        if left.size != right.size:
            return False, f"sizes differ: {left.size} and {right.size} bytes"
        offset = first_difference(left, right)
        if offset is None:
            return True, f"{left.size // MiB} MiB identical"
        return False, f"first difference at offset {offset}"


@contextmanager
def _endpoint(disk, open_disk) -> Iterator[Any]:
    if isinstance(disk, (str, Path)):
        with open_disk(disk) as opened:
            yield opened
    else:
        yield disk


def disk_digest(path: Path) -> str:
    """sha256 of the disk's guest-visible bytes (a VHD's footer excluded)."""
    from datapath.disk import open_disk

    digest = hashlib.sha256()
    with open_disk(path) as disk:
        buffer = bytearray(4 * MiB)
        for offset in range(0, disk.size, len(buffer)):
            view = memoryview(buffer)[:min(len(buffer), disk.size - offset)]
            disk.read_into(offset, view)
            digest.update(view)
    return digest.hexdigest()


# ---- the deployment ---------------------------------------------------------------------------------------
@dataclass
class DemoVm:
    name: str
    host: str
    vm_id: str
    item_id: str | None = None


class Deployment:
    """Redis, the database, the workers, beat and Flower of one backend's run, with this process pointed at
    them, the fabric registered and the VMs created. `close()` stops everything it started."""

    def __init__(self, workdir: Path, backend: str, console: Console, *, time_scale: float, seed: int) -> None:
        self.workdir = workdir
        self.backend = backend
        self.console = console
        self.time_scale = time_scale
        self.seed = seed
        self.processes: list[Any] = []
        self.redis = None
        self.azurite = None
        self.flower = None
        self.flower_password = secrets.token_urlsafe(12)
        self.hosts: dict[str, Any] = {}
        self.vms: dict[str, DemoVm] = {}
        self._saved_env: dict[str, str | None] = {}
        self._previous_broker: str | None = None
        self._writer_starts = 0

    # ---- processes --------------------------------------------------------------------------------------
    def start(self) -> list[Check]:
        from sites.localservices import (
            AzuriteProcess,
            RedisServer,
            celery_env,
            start_beat,
            start_flower,
            start_worker,
        )

        say = self.console.say
        self.workdir.mkdir(parents=True, exist_ok=True)
        # Append-only, as in production: the queue survives a Redis restart.
        self.redis = RedisServer(self.workdir / "redis", appendonly=True).start()
        say(f"  redis-server on {self.redis.url} (pid {self.redis.pid})")
        database_url = f"sqlite:///{self.workdir / 'asr.db'}"
        settings = {
            "ASR_HEARTBEAT_S": "1", "ASR_STALE_AFTER_S": "5", "ASR_RECONCILE_S": "1", "ASR_TICK_S": "1",
            "ASR_TIME_SCALE": f"{self.time_scale:g}",
        }
        if self.backend == "azure":
            self.azurite = AzuriteProcess(self.workdir / "azurite").start()
            say(f"  Azurite on {self.azurite.blob_endpoint}")
            settings[AZURE_CONNECTION_ENV] = self.azurite.connection_string()
            self.recovery_storage = f"azure:demo-{uuid.uuid4().hex[:16]}"
            self.storage_options: dict[str, Any] = {"connection_string_env": AZURE_CONNECTION_ENV}
        else:
            self.recovery_storage = f"file://{self.workdir / 'recovery-site'}"
            self.storage_options = {}
        self.env = celery_env(broker_url=self.redis.url, database_url=database_url, **settings)
        self._point_this_process_here({**settings, "ASR_BROKER_URL": self.redis.url,
                                       "ASR_DATABASE_URL": database_url})
        from models.db import init_db

        init_db()  # before the workers, so they do not race each other to create the tables
        logs = self.workdir / "logs"
        # Each one tracked as soon as it exists, so close() stops it even if a later one fails to start.
        # All started before any is waited for: they start side by side. The orchestration worker runs
        # four at a time: the recovery-side steps of the four VMs (apply logs, restore) side by side.
        starting = [start_worker("orchestration", ["orchestration", "recovery"], self.env, logs, concurrency=4,
                                 wait=False)]
        self.processes.append(starting[-1])
        for name in (*HOSTS, RECOVERY_HOST):
            starting.append(start_worker(f"host-{name}", [f"host.{name}"], self.env, logs, concurrency=3,
                                         wait=False))
            self.processes.append(starting[-1])
        starting.append(start_beat(self.env, logs, wait=False))
        self.processes.append(starting[-1])
        self.flower = start_flower(self.env, logs, user=FLOWER_USER, password=self.flower_password, wait=False)
        self.processes.append(self.flower)
        for process in starting:
            process.wait_ready(60)
            say(f"  {process.name} ready (pid {process.process.pid})")
        self.flower.wait_ready(60)
        say(f"  Flower: {self.flower.url}  (user {FLOWER_USER}, password {self.flower_password})")
        return [
            Check("redis-server answers", bool(self.redis.client().ping()), self.redis.url),
            Check("workers, beat and Flower ready and running", all(p.process.poll() is None for p in self.processes),
                  ", ".join(f"{p.name} (pid {p.process.pid})" for p in self.processes)),
            *self.flower_checks(),
        ]

    def _point_this_process_here(self, settings: dict[str, str]) -> None:
        from models.db import dispose_engines
        from sites.localservices import point_app_at
        from worker import app

        self._previous_broker = app.conf.broker_url
        for key, value in settings.items():
            self._saved_env.setdefault(key, os.environ.get(key))
            os.environ[key] = value
        dispose_engines()
        point_app_at(settings["ASR_BROKER_URL"])

    def flower_get(self, path: str, *, auth: bool = True) -> tuple[int, Any]:
        request = urllib.request.Request(self.flower.url + path)
        if auth:
            token = base64.b64encode(f"{FLOWER_USER}:{self.flower_password}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            return error.code, None

    def flower_checks(self) -> list[Check]:
        anonymous, _ = self.flower_get("/api/workers", auth=False)
        signed_in, _ = self.flower_get("/api/tasks?limit=1")
        return [Check("Flower refuses requests without credentials", anonymous == 401, f"HTTP {anonymous}"),
                Check("Flower's API answers with credentials", signed_in == 200, f"HTTP {signed_in}")]

    def close(self) -> None:
        """Stop the writers, Flower, the workers and beat, Redis and Azurite (each bounded); restore this
        process's settings. Ctrl-C is ignored meanwhile: a half-done stop would leave processes behind."""
        from models.db import dispose_engines
        from sites.localservices import point_app_at, stop_all

        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for host in self.hosts.values():
                for vm in host.list_vms():
                    try:
                        host.stop_workload(vm.name, timeout=5)
                    except Exception as error:  # noqa: BLE001 - stopping must go on to everything else
                        self.console.say(f"  could not stop the writer of {vm.name} on {host.name}: {error}")
            stop_all(self.processes)
            self.processes = []
            if self.redis is not None:
                self.redis.stop()
            if self.azurite is not None:
                self.azurite.stop()
            dispose_engines()
            for key, value in self._saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            if self._previous_broker is not None:
                point_app_at(self._previous_broker)
        finally:
            signal.signal(signal.SIGINT, previous)

    def log_tails(self) -> str:
        return "\n".join(f"--- {p.name} ({p.log_path}) ---\n{p.log()[-LOG_TAIL_CHARS:]}" for p in self.processes)

    # ---- fabric -----------------------------------------------------------------------------------------
    def register(self) -> list[Check]:
        from sqlmodel import select

        from models.db import session_scope
        from models.fabric import Host as HostRow
        from models.fabric import add_network_mapping, create_site, import_vm_manifest, register_host, vm_disks
        from models.policy import create_policy
        from sites.host import Host

        say = self.console.say
        with session_scope() as session:
            primary = create_site(session, "primary", "the protected datacenter")
            recovery = create_site(session, "recovery", "the recovery datacenter")
            for name, site in [*((h, primary) for h in HOSTS), (RECOVERY_HOST, recovery)]:
                root = self.workdir / "hosts" / name
                root.mkdir(parents=True)
                register_host(session, name, str(root), site=site)
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
        return [Check("VMs and disks registered", registered == {name: len(DISKS) for _, name in VMS},
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
        from workflows.protection import start_delta_replication

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
        from workflows.protection import item_status

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
        from tasks.replication import open_recovery_storage, replica_of
        from workflows.protection import load_item

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


# ---- the stages ------------------------------------------------------------------------------------------
def stage_protect(d: Deployment, stage: Stage, checks: list[Check]) -> None:
    from models.protection import RecoveryPointKind
    from workflows.engine import get_job
    from workflows.protection import enable_protection, item_status

    for vm in d.vms.values():
        # The writer writes only through the replication tracker (as a guest's writes pass Hyper-V
        # Replica's), so tracking goes on first; enabling protection keeps disks already tracked.
        d.hosts[vm.host].enable_tracking(vm.name)
        d.start_writer(vm.name)
    d.console.say(f"  writers running on every VM ({WRITER_RATE_MB_S:g} MB/s each, through the replication tracker)")
    jobs = {}
    for vm in d.vms.values():
        job_id = d.request(lambda vm=vm: enable_protection(
            vm.vm_id, d.policy_id, recovery_storage=d.recovery_storage, storage_options=dict(d.storage_options),
            recovery_host=RECOVERY_HOST), f"enable protection of {vm.name}", stage)
        jobs[job_id] = f"protect {vm.name}"
        vm.item_id = get_job(job_id)["params"]["item_id"]
    d.wait(jobs)
    for vm in d.vms.values():
        status = item_status(vm.item_id)
        checks.append(Check(f"{vm.name} protected and healthy", (status["state"], status["health"]) ==
                            ("protected", "Healthy"), f"{status['state']}, {status['health']}"))
        first = d.points(vm.name)[0]
        checks.append(Check(f"{vm.name}'s first recovery point is app-consistent",
                            first.kind is RecoveryPointKind.APP_CONSISTENT, str(first.kind)))
        checks.append(Check(f"{vm.name}'s writer kept running through protection",
                            d.hosts[vm.host].workload_running(vm.name), "running"))


def stage_replicate(d: Deployment, stage: Stage, checks: list[Check], *, corrupt: bool) -> None:
    names = list(d.vms)
    before = {vm: len(d.points(vm)) for vm in names}
    for round_number in range(1, DELTA_ROUNDS + 1):
        time.sleep(1.0)  # let the writers write something to ship
        for vm, job in d.delta_cycles(names, stage).items():
            applied = next(s["result"] for s in job["steps"] if s["name"] == "Apply logs")
            shipped = next(s["result"] for s in job["steps"] if s["name"] == "Ship logs")
            unsent = max(disk["unsent_ratio"] for disk in shipped["disks"].values())
            logs = ", ".join(f"{disk} {gens}" for disk, gens in sorted(applied["applied"].items()))
            d.console.say(f"  round {round_number} {vm}: log generations applied: {logs}; "
                          f"unsent before the cycle {unsent:.2%} of a disk")
    d.quiet_cycles(names, stage)
    for vm in names:
        d.verify_replicas(vm, checks, damage=corrupt and vm == names[1])
        made = len(d.points(vm)) - before[vm]
        checks.append(Check(f"{vm}: every cycle made a recovery point", made >= DELTA_ROUNDS + 1,
                            f"{made} new points"))
    for vm in names:
        d.start_writer(vm)
    d.console.say("  writers running again")


def stage_drill(d: Deployment, stage: Stage, checks: list[Check]) -> None:
    from models.failover import FailoverStatus
    from workflows import failover as fo

    vm, item_id = FAILOVER_VM, d.vms[FAILOVER_VM].item_id
    d.stop_writer(vm)  # the latest point then holds exactly these disks
    copies = d.copy_disks(vm, "drill")
    d.run(lambda: fo.start_test_failover(item_id, point=fo.PointChoice.LATEST), f"test failover of {vm}", stage)
    d.start_writer(vm)
    drill = d.latest_record(vm, "test")
    test_vm = drill.target_vm
    for disk in d.disks(test_vm, RECOVERY_HOST):
        ok, detail = compare_disks(copies[disk.name], disk.path)
        checks.append(Check(f"test VM {test_vm}/{disk.name} equals the source at the point", ok, detail))
    checks.append(Check("the drill verified its disks against the point's roots",
                        bool(drill.verified) and drill.produced_roots == drill.expected_roots,
                        f"verified={drill.verified}, RTO {drill.rto_s and round(drill.rto_s, 1)} s"))
    networks = {a.vm_network for a in d.hosts[RECOVERY_HOST].get_vm(test_vm).network_adapters}
    checks.append(Check("the test VM is in the isolated test network", networks == {fo.DEFAULT_TEST_NETWORK},
                        ", ".join(sorted(networks))))
    count = len(d.points(vm))
    time.sleep(0.5)
    d.delta_cycles([vm], stage)
    checks.append(Check(f"{vm} keeps replicating while the test VM exists",
                        len(d.points(vm)) > count and d.state(vm) == "protected", d.state(vm)))
    d.run(lambda: fo.start_test_failover_cleanup(item_id), f"test failover cleanup of {vm}", stage)
    left = [v.name for v in d.hosts[RECOVERY_HOST].list_vms()]
    status = d.latest_record(vm, "test").status
    checks.append(Check("cleanup deleted the test VM", test_vm not in left
                        and status is FailoverStatus.CLEANED_UP, f"{status}; recovery host VMs {left}"))


def stage_failover(d: Deployment, stage: Stage, checks: list[Check]) -> None:
    from workflows import failover as fo

    vm, item_id = FAILOVER_VM, d.vms[FAILOVER_VM].item_id
    primary_host = d.vms[vm].host
    time.sleep(0.5)  # the writer runs: the shutdown stops it and the last writes are shipped
    d.run(lambda: fo.start_planned_failover(item_id), f"planned failover of {vm}", stage)
    record = d.latest_record(vm, "planned")
    recovery_disks = {disk.name: disk.path for disk in d.disks(vm, RECOVERY_HOST)}
    for disk in d.disks(vm):
        ok, detail = compare_disks(disk.path, recovery_disks[disk.name])
        checks.append(Check(f"recovery VM {vm}/{disk.name} equals the primary's final disk", ok, detail))
    checks.append(Check("planned failover verified, primary shut down",
                        bool(record.verified) and not d.hosts[primary_host].workload_running(vm)
                        and d.state(vm) == "failed_over", f"verified={record.verified}, {d.state(vm)}"))
    primary_before = {disk.name: disk_digest(disk.path) for disk in d.disks(vm)}

    d.run(lambda: fo.commit_failover(item_id), f"commit failover of {vm}", stage)
    d.start_writer(vm, RECOVERY_HOST, RECOVERY_WRITER_RATE_MB_S)
    d.console.say(f"  writer running on the recovery VM {vm} at {RECOVERY_HOST}")
    time.sleep(1.0)
    job = d.run(lambda: fo.start_failback(item_id, mode=fo.FailbackMode.MINIMIZE_DOWNTIME),
                f"failback (minimize downtime) of {vm}", stage)
    sent = [s["result"] for s in job["steps"] if s["name"].startswith("Send differences")]
    chunks = f"{sum(r['chunks_sent'] for r in sent)} of {sum(r['chunks_compared'] for r in sent)} chunks sent"
    untouched = {disk.name: disk_digest(disk.path) for disk in d.disks(vm)} == primary_before
    checks.append(Check("failback synchronized while the recovery VM ran, the primary untouched",
                        d.state(vm) == "failback_ready" and untouched
                        and d.hosts[RECOVERY_HOST].workload_running(vm), f"{d.state(vm)}; {chunks}"))
    time.sleep(0.5)
    d.run(lambda: fo.complete_failback(item_id), f"complete failback of {vm}", stage)
    final = {disk.name: disk.path for disk in d.disks(vm, RECOVERY_HOST)}
    for disk in d.disks(vm):
        ok, detail = compare_disks(final[disk.name], disk.path)
        checks.append(Check(f"primary {vm}/{disk.name} equals the recovery VM's disk at its shutdown", ok, detail))
    came_back = {disk.name: disk_digest(disk.path) for disk in d.disks(vm)} != primary_before
    checks.append(Check("the recovery VM's writes came back to the primary", came_back,
                        "primary changed" if came_back else "primary unchanged"))

    d.run(lambda: fo.commit_failback(item_id), f"commit failback of {vm}", stage)
    gone = vm not in [v.name for v in d.hosts[RECOVERY_HOST].list_vms()]
    checks.append(Check("commit deleted the recovery VM", gone, "deleted" if gone else "still there"))
    d.start_writer(vm)
    job = d.run(lambda: fo.start_reverse_replication(item_id), f"reverse replication of {vm}", stage)
    resynced = [s["result"] for s in job["steps"] if s["name"].startswith("Resynchronize disk")]
    size = sum(disk.size for disk in d.disks(vm))
    sent_bytes = sum(r["bytes_sent"] for r in resynced)
    checks.append(Check("reverse replication sent only what differs", sent_bytes < size // 2,
                        f"{sent_bytes} bytes sent for {size // MiB} MiB of disks"))
    d.quiet_cycles([vm], stage)
    d.verify_replicas(vm, checks)
    checks.append(Check(f"{vm} protected again", d.state(vm) == "protected", d.state(vm)))
    d.start_writer(vm)


def stage_plan(d: Deployment, stage: Stage, checks: list[Check]) -> None:
    from models.db import session_scope
    from models.plans import create_plan
    from workflows import failover as fo
    from workflows.plans import start_plan

    members = [vm for _, names in PLAN_GROUPS for vm in names]
    d.quiet_cycles(members, stage)  # the latest points then hold exactly these disks
    copies = {vm: d.copy_disks(vm, "plan") for vm in members}
    marker = d.workdir / "plan-script.log"
    script = [sys.executable, "-c",
              f"import os; open({str(marker)!r}, 'a').write(os.environ['ASR_PLAN_ID'] + '\\n')"]
    groups = []
    for name, vms in PLAN_GROUPS:
        group: dict[str, Any] = {"name": name, "vms": [d.vms[vm].vm_id for vm in vms]}
        if name == PLAN_GROUPS[0][0]:
            group["after"] = [{"kind": "script", "name": "check-data", "command": script, "timeout_s": 30}]
        groups.append(group)
    with session_scope() as session:
        plan_id = create_plan(session, "demo-plan", groups, "the demo's recovery plan").id
    d.console.say("  plan demo-plan: " + "; then ".join(f"group {n} ({', '.join(v)})" for n, v in PLAN_GROUPS)
                  + f"; script check-data after group {PLAN_GROUPS[0][0]}")
    d.run(lambda: start_plan("demo-plan", "test_failover"), "test failover of plan demo-plan", stage)
    ran = marker.read_text().split() if marker.exists() else []
    checks.append(Check("the plan's script action ran once, with the plan's id", ran == [plan_id], f"{ran}"))
    for vm in members:
        drill = d.latest_record(vm, "test")
        for disk in d.disks(drill.target_vm, RECOVERY_HOST):
            ok, detail = compare_disks(copies[vm][disk.name], disk.path)
            checks.append(Check(f"test VM {drill.target_vm}/{disk.name} equals the source at the point", ok, detail))
        checks.append(Check(f"{vm}'s drill verified", bool(drill.verified), f"verified={drill.verified}"))
    cleanups = {d.request(lambda vm=vm: fo.start_test_failover_cleanup(d.vms[vm].item_id),
                          f"test failover cleanup of {vm}", stage): f"cleanup {vm}" for vm in members}
    d.wait(cleanups)
    left = [v.name for v in d.hosts[RECOVERY_HOST].list_vms()]
    checks.append(Check("every test VM cleaned up", left == [], f"recovery host VMs: {left}"))
    for vm in members:
        d.start_writer(vm)


STAGES: tuple[tuple[str, str], ...] = (
    ("start", "Start Redis, the database, workers, beat and Flower"),
    ("register", "Register sites, hosts, networks, a policy; create 4 VMs"),
    ("protect", "Protect every VM with its writer running"),
    ("replicate", "Delta cycles; every replica checked byte for byte"),
    ("drill", f"Test failover of {FAILOVER_VM} to the latest point, cleanup"),
    ("failover", f"Planned failover, failback and reverse replication of {FAILOVER_VM}"),
    ("plan", "Recovery plan test failover of the other VMs, cleanup"),
)


def run_backend(backend: str, workdir: Path, console: Console, report: Report, *, time_scale: float, seed: int,
                inject: str | None) -> None:
    from sites.localservices import ServiceStartError

    stages = [Stage(backend, key, title) for key, title in STAGES]
    report.stages += stages
    deployment = Deployment(workdir, backend, console, time_scale=time_scale, seed=seed)
    actions: dict[str, Callable[[Stage, list[Check]], None]] = {
        "start": lambda stage, checks: checks.extend(deployment.start()),
        "register": lambda stage, checks: checks.extend(deployment.register()),
        "protect": lambda stage, checks: stage_protect(deployment, stage, checks),
        "replicate": lambda stage, checks: stage_replicate(deployment, stage, checks,
                                                           corrupt=inject == "corrupt-replica"),
        "drill": lambda stage, checks: stage_drill(deployment, stage, checks),
        "failover": lambda stage, checks: stage_failover(deployment, stage, checks),
        "plan": lambda stage, checks: stage_plan(deployment, stage, checks),
    }
    try:
        for number, stage in enumerate(stages, 1):
            console.say(f"[{backend}] {number}/{len(stages)} {stage.title}")
            started = time.monotonic()
            try:
                actions[stage.stage](stage, stage.checks)
            except (KeyboardInterrupt, Interrupted):
                stage.status, stage.error = "interrupted", "interrupted"
                stage.seconds = round(time.monotonic() - started, 2)
                raise
            except (DemoError, ServiceStartError) as error:  # says what went wrong: no traceback needed
                stage.error = str(error)
            except Exception as error:  # noqa: BLE001 - reported as the stage's failure, then cleanup
                stage.error = f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=4)}"
            finally:
                stage.seconds = round(time.monotonic() - started, 2)
            stage.status = "passed" if stage.error is None and all(c.ok for c in stage.checks) else "failed"
            for check in stage.checks:
                if not check.ok:
                    console.say(f"  FAIL {check.check}: {check.detail}")
            if stage.error:
                console.say(f"  FAIL {stage.error}")
            console.say(f"[{backend}] {stage.stage}: {stage.status} in {stage.seconds:.1f} s "
                        f"({sum(c.ok for c in stage.checks)}/{len(stage.checks)} checks passed)")
            if not stage.ok:
                console.say(f"[{backend}] stopping here: the remaining stages build on this one")
                break
        if deployment.flower is not None and all(s.ok for s in stages):
            status, tasks = deployment.flower_get("/api/tasks?limit=100000")
            names = sorted({t.get("name") or "?" for t in (tasks or {}).values()})
            report.flower[backend] = {"url": deployment.flower.url, "user": FLOWER_USER,
                                      "tasks_seen": len(tasks or {}), "task_names": names}
            stages[-1].checks.append(Check("Flower saw the run's tasks", status == 200 and bool(tasks),
                                           f"HTTP {status}, {len(tasks or {})} tasks"))
            if not stages[-1].checks[-1].ok:
                stages[-1].status = "failed"
    finally:
        console.say(f"[{backend}] stopping everything the demo started")
        deployment.close()


# ---- leftovers -------------------------------------------------------------------------------------------------
def _ancestors() -> set[int]:
    """This process and its parents (a shell or `timeout` running the demo names the folder too)."""
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    return pids


def processes_under(folder: Path) -> list[tuple[int, str]]:
    """Processes of this user, other than this one and its parents, whose working directory or command
    line is inside `folder` (read from /proc: redis-server rewrites its command line, but it runs in its
    data folder; Celery and the writers run in folders of the work folder too)."""
    folder = folder.resolve()
    skip = _ancestors()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in skip:
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            cwd = os.readlink(entry / "cwd")
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue  # a zombie runs nothing; its parent (this process) reaps it
        except (OSError, IndexError):
            continue  # gone meanwhile, or not ours to read
        if str(folder) in command or cwd == str(folder) or cwd.startswith(f"{folder}/"):
            found.append((int(entry.name), command))
    return found


def _prepare(workdir: Path) -> None:
    """Empty the work folder, but only one the demo made (or an empty or missing one): a mistyped
    --workdir must never cost anyone their files."""
    if workdir.exists():
        if not workdir.is_dir():
            raise click.UsageError(f"--workdir {workdir} is not a folder")
        if any(workdir.iterdir()) and not (workdir / MARKER).exists():
            raise click.UsageError(f"--workdir {workdir} is not empty and was not made by `asr demo`; "
                                   f"choose a new or empty folder")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    (workdir / MARKER).write_text("made by asr demo; emptied by the next run\n")


def _print_report(report: Report, console: Console, as_json: bool, workdir: Path) -> None:
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
        return
    say = console.say
    say("")
    say(f"{'backend':8} {'stage':10} {'result':7} {'checks':>7} {'seconds':>8}  title")
    for s in report.stages:
        say(f"{s.backend:8} {s.stage:10} {s.status:7} {sum(c.ok for c in s.checks):>3}/{len(s.checks):<3} "
            f"{s.seconds:8.1f}  {s.title}")
    for c in report.cleanup:
        say(f"{'':8} {'cleanup':10} {'passed' if c.ok else 'failed':7} {'':>7} {'':>8}  {c.check}: {c.detail}")
    for backend, flower in report.flower.items():
        say(f"[{backend}] Flower ({flower['url']}) saw {flower['tasks_seen']} tasks: {', '.join(flower['task_names'])}")
    for line in report.failed_checks:
        say(f"FAILED {line}")
    logs = ", ".join(dict.fromkeys(str(workdir / s.backend / "logs") for s in report.stages))
    say("demo " + ("succeeded: every check passed" if report.ok
                   else f"FAILED (the work folder is kept; logs in {logs})"))


@click.command("demo")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=Path("demo-work"),
              show_default=True, help="Work folder: hosts, recovery site, database, logs (emptied first; "
                                      "only a folder the demo made, or an empty one).")
@click.option("--backend", type=click.Choice(["local", "azure", "both"]), default="local", show_default=True,
              help="Recovery storage: a local directory, Azure page blobs on an Azurite the demo starts, or both "
                   "one after the other.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout (progress goes to stderr).")
@click.option("--seed", default=7, show_default=True, help="Seed of the VMs' initial data and writers.")
@click.option("--time-scale", default=10.0, show_default=True, type=click.FloatRange(min=1.0),
              help="Divides the engine's delays (a 30 s copy frequency becomes 3 s).")
@click.option("--keep", is_flag=True, help="Keep the work folder after a successful run (a failed run keeps it).")
@click.option("--inject-failure", type=click.Choice(FAILURES), default=None,
              help="Break something on purpose to see a check fail: corrupt-replica overwrites 4 KiB of a "
                   "replica just before the replicas are verified.")
def demo(workdir: Path, backend: str, as_json: bool, seed: int, time_scale: float, keep: bool,
         inject_failure: str | None):
    """Run Site Recovery Engine end to end on this machine and check every disk byte for byte.

    Protects four VMs on two hosts with their writers running, replicates, drills, fails over and back,
    reverse-replicates and runs a recovery plan, then prints a report. Exit status 0 only when every
    check passed."""
    console = Console(to_stderr=as_json)
    workdir = workdir.resolve()
    _prepare(workdir)
    report = Report()
    backends = ("local", "azure") if backend == "both" else (backend,)

    def interrupted(signum, _frame):
        raise Interrupted(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupted)
    # Ctrl-C raises KeyboardInterrupt even when started from a shell that ignores SIGINT for background
    # jobs: the demo must always be stoppable, and always stop what it started.
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    started = time.monotonic()
    try:
        for name in backends:
            run_backend(name, workdir / name, console, report, time_scale=time_scale, seed=seed,
                        inject=inject_failure)
            if not all(s.ok for s in report.stages):
                break
    except (KeyboardInterrupt, Interrupted):
        report.interrupted = True
        console.say("interrupted: everything the demo started has been stopped")
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
    left = processes_under(workdir)
    report.cleanup.append(Check("nothing the demo started is left running", not left,
                                "none" if not left else "; ".join(f"pid {p}: {c[:120]}" for p, c in left)))
    console.say(f"demo finished in {time.monotonic() - started:.0f} s")
    _print_report(report, console, as_json, workdir)
    if report.ok and not keep:
        shutil.rmtree(workdir, ignore_errors=True)
    sys.exit(0 if report.ok else (130 if report.interrupted else 1))
