"""A whole Site Recovery Engine deployment on this machine, for one test: `RecoverySite`.

(Not named `site.py`: the standard library's `site` module is loaded before any test, so
`from site import RecoverySite` would find that one.)

A private redis-server, a SQLite database file, real Celery workers (one orchestration+recovery worker,
one agent worker per protected host) and beat (reconciler and replication scheduler), a Hyper-V site
with its hosts (directory trees under the test's tmp_path), a replication policy, and a recovery
storage (a local directory, or a container of its own in the session's Azurite). The test process
points its own database and Celery app at the same Redis and database, so it can call
`workflows.protection` and read jobs directly.

Times are scaled (`ASR_TIME_SCALE`, default 10): a 30 s copy frequency is a 3 s cycle. The default
policy has office hours all day, every day, so automatic resynchronization never starts behind a test's
back, and RPO thresholds of a minute and two of real time, so a cycle slowed by a busy machine does not turn
an item Warning either; a test that wants either creates a policy of its own (`create_policy`).
"""
from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from datetime import time as time_of_day
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from sqlmodel import select

import tasks  # noqa: F401  (registers every action start_job validates)
import tasks.replication as replication_actions
from datapath.compare import first_difference
from datapath.disk import open_disk
from models.db import session_scope
from models.fabric import Host as HostRow
from models.fabric import VirtualMachine as VmRow
from models.fabric import add_network_mapping, create_site, import_vm_manifest, register_host, vm_disks
from models.jobs import Job
from models.policy import create_policy
from models.protection import ProtectedItem
from sites.deployment import AZURE_CONNECTION_ENV, Deployment
from sites.host import Host
from sites.localservices import AzuriteProcess, CeleryProcess, RedisServer, wait_until
from sites.pki import DeploymentCertificates
from sites.storage.base import RecoveryStorage
from workflows.engine import ItemBusyError, get_job
from workflows.items import item_status, load_item
from workflows.kinds.delta_replication import start as start_delta_replication
from workflows.kinds.enable_protection import start as enable_protection

T = TypeVar("T")
DEFAULT_TIME_SCALE = 10
ALL_DAY = (time_of_day(0, 0), time_of_day(23, 59, 59, 999999))
EVERY_DAY = (0, 1, 2, 3, 4, 5, 6)
FINISHED_JOB_STATES = ("succeeded", "failed", "cancelled")
RECOVERY_SUBNETS = {"default": "10.10.0.0/24", "backend": "10.20.0.0/24"}
LOG_TAIL_CHARS = 3000
# Beat's per-second tasks, received and succeeded, in a worker's log.
ROUTINE_LOG_LINE = re.compile(
    r"Task asr\.(replication\.tick|engine\.reconcile)\[[0-9a-f-]+\] (received|succeeded)"
)
QUIET_RPO_S = (60, 120)
"""The default policies' RPO warning and critical thresholds, in real seconds (whatever the time scale)."""


class RecoverySite:
    """A deployment for one test; use as a context manager (or call `close()`)."""

    def __init__(
        self,
        tmp_path: Path,
        *,
        backend: str = "local",
        azurite: AzuriteProcess | None = None,
        appendonly: bool = False,
        host_names: Iterable[str] = ("host1",),
        recovery_host_names: Iterable[str] = (),
        time_scale: float = DEFAULT_TIME_SCALE,
        env: Mapping[str, str] | None = None,
        start_workers: bool = True,
        policy_options: Mapping[str, Any] | None = None,
        host_concurrency: int = 3,
        database_url: str | None = None,
        tls: bool | DeploymentCertificates = False,
        broker_acl: bool = False,
    ) -> None:
        """`tls`: a deployment with TLS on every connection (sites/deployment.py); without it, plain text,
        allowed explicitly (ASR_INSECURE_TRANSPORT=1 in the site's processes). `broker_acl`: every host's agent
        reaches Redis as its own ACL user (sites/brokeracl.py), the other processes as the engine's."""
        if backend not in ("local", "azure"):
            raise ValueError(f"backend must be 'local' or 'azure', got {backend!r}")
        if backend == "azure" and azurite is None:
            raise ValueError("the azure backend needs the session's AzuriteProcess (fixture `azurite`)")
        self.workdir = Path(tmp_path)
        self.backend = backend
        self.azurite = azurite
        self.host_names = tuple(host_names)
        self.recovery_host_names = tuple(recovery_host_names)
        """Compute hosts of the recovery site (failovers create VMs there); the first is every item's
        default recovery host."""
        self.host_concurrency = host_concurrency
        self.time_scale = time_scale
        self.vm_hosts: dict[str, str] = {}  # vm id -> host name
        self._hosts: dict[str, Host] = {}
        self._closed = False

        settings = {
            "ASR_HEARTBEAT_S": "1",
            "ASR_STALE_AFTER_S": "3",
            "ASR_RECONCILE_S": "1",
            "ASR_TICK_S": "1",
            "ASR_TIME_SCALE": str(time_scale),
            # The administrator's allow-list of local recovery storage (sites/storage/policy.py): this site's.
            "ASR_STORAGE_ROOTS": str(self.workdir),
        }
        if backend == "azure":
            self.container = f"site-{uuid.uuid4().hex[:20]}"
            self.recovery_storage = f"azure:{self.container}"
            self.storage_options: dict[str, Any] = {"connection_string_env": AZURE_CONNECTION_ENV}
        else:
            self.recovery_dir = self.workdir / "recovery-site"
            self.recovery_storage = f"file://{self.recovery_dir}"
            self.storage_options = {}
        settings.update(env or {})
        # tasks/__init__ imports these already; named so that no other test actions are loaded into this
        # deployment's workers (unless `env` names more). For the workers only.
        action_modules = settings.pop("ASR_ACTION_MODULES", replication_actions.__name__)
        workers = {"orchestration": (["orchestration", "recovery"], 2)}
        workers |= {f"host-{name}": ([f"host.{name}"], host_concurrency)
                    for name in (*self.host_names, *self.recovery_host_names)}
        self.deployment = Deployment(
            self.workdir, workers=workers, appendonly=appendonly, azurite=azurite if backend == "azure" else False,
            database_url=database_url, tls=tls, broker_acl=broker_acl,
            settings=settings, worker_settings={"ASR_ACTION_MODULES": action_modules},
        )
        self.deployment.start(processes=False)
        try:
            self._register_fabric(policy_options or {})
            if start_workers:
                self.deployment.start_processes()
        except BaseException:
            self.close()
            raise

    # ---- lifecycle ------------------------------------------------------------------------------
    def __enter__(self) -> RecoverySite:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Stop workloads, workers, beat and Redis (each bounded); restore this process's settings.
        Every VM's workload on every host of the site: a test may start one on a recovery host's VM.
        The Celery processes are killed, not shut down warm: the site is thrown away, and a warm shutdown
        cost the suite about 2.5 s of CPU per site (tests of shutdown itself start their own processes)."""
        if self._closed:
            return
        self._closed = True
        try:
            for host_name in (*self.host_names, *self.recovery_host_names):
                host = self.host(host_name)
                try:
                    vms = host.list_vms()
                except Exception:  # noqa: BLE001 - closing must go on to stop everything else
                    continue
                for vm in vms:
                    try:
                        host.stop_workload(vm, timeout=5)
                    except Exception:  # noqa: BLE001
                        pass
        finally:
            self.deployment.close(hard=True)

    @property
    def redis(self) -> RedisServer:
        return self.deployment.redis

    @property
    def env(self) -> dict[str, str]:
        """The environment of the workers and beat (and of any other process of this site)."""
        return self.deployment.env

    @property
    def database_url(self) -> str:
        return self.deployment.database_url

    @property
    def workers(self) -> dict[str, CeleryProcess]:
        """The running processes by name ("orchestration", "host-host1", "beat")."""
        return self.deployment.workers

    @property
    def processes(self) -> list[CeleryProcess]:
        return self.deployment.processes

    def start_orchestration_worker(self, *, name: str = "orchestration", concurrency: int = 2,
                                   wait: bool = True) -> CeleryProcess:
        """A worker on the orchestration and recovery queues."""
        return self.deployment.add_worker(name, ["orchestration", "recovery"], concurrency=concurrency, wait=wait)

    def start_host_worker(self, host_name: str, *, concurrency: int | None = None, wait: bool = True,
                          env: Mapping[str, str] | None = None) -> CeleryProcess:
        """The agent worker of a host: it serves the queue host.<name> (`env`: variables added to the site's)."""
        return self.deployment.add_worker(f"host-{host_name}", [f"host.{host_name}"],
                                          concurrency=concurrency or self.host_concurrency, wait=wait,
                                          env={**self.env, **self.deployment.worker_env.get(f"host-{host_name}", {}),
                                               **(env or {})})

    def start_beat(self, *, wait: bool = True) -> CeleryProcess:
        """Beat: the reconciler every ASR_RECONCILE_S and the replication scheduler every ASR_TICK_S."""
        return self.deployment.start_beat(wait=wait)

    def stop_process(self, name: str, *, kill: bool = False) -> None:
        """Stop one of the processes by its name ("orchestration", "host-host1", "beat")."""
        self.deployment.stop_process(name, kill=kill)

    # ---- fabric ---------------------------------------------------------------------------------
    def _register_fabric(self, policy_options: Mapping[str, Any]) -> None:
        with session_scope() as session:
            site = create_site(session, "primary")
            for name in self.host_names:
                root = self.workdir / "hosts" / name
                root.mkdir(parents=True)
                self._host_agent(name, register_host(session, name, str(root), site=site)[1])
            # Every VM network a test uses lands in one recovery network.
            for network in ("default", "backend"):
                add_network_mapping(session, network, f"recovery-{network}", RECOVERY_SUBNETS[network], site=site)
            if self.recovery_host_names:
                recovery = create_site(session, "recovery")
                for name in self.recovery_host_names:
                    root = self.workdir / "hosts" / name
                    root.mkdir(parents=True)
                    self._host_agent(name, register_host(session, name, str(root), site=recovery)[1])
        self.policy_id = self.create_policy("default", **policy_options)

    def _host_agent(self, name: str, key: str) -> None:
        # The agent proves it is this host at every host step (tasks/host_identity.py), as `asr worker host`
        # starts it: with the host's name and registration key.
        self.deployment.worker_env[f"host-{name}"] = {"ASR_HOST_NAME": name, "ASR_HOST_KEY": key}

    def create_policy(self, name: str, **options: Any) -> str:
        """A replication policy; defaults: 30 s copy frequency, office hours all day every day (no
        automatic resync), RPO thresholds of QUIET_RPO_S real seconds (at least 2x and 4x the copy frequency;
        None for the policy's own defaults). Returns its id."""
        settings: dict[str, Any] = {"copy_frequency_s": 30, "office_hours": ALL_DAY, "office_days": EVERY_DAY}
        settings.update(options)
        frequency = settings["copy_frequency_s"]
        if isinstance(frequency, int):
            settings.setdefault("rpo_warning_s", max(2 * frequency, round(QUIET_RPO_S[0] * self.time_scale)))
            settings.setdefault("rpo_critical_s", max(4 * frequency, round(QUIET_RPO_S[1] * self.time_scale)))
        with session_scope() as session:
            return create_policy(session, name, **settings).id

    def host(self, name: str) -> Host:
        """The host driver of a host of this site (one per name, so it can stop workloads it started)."""
        if name not in self._hosts:
            if name not in (*self.host_names, *self.recovery_host_names):
                raise ValueError(f"host {name!r} is not one of this site's hosts "
                                 f"{(*self.host_names, *self.recovery_host_names)}")
            self._hosts[name] = Host(self.workdir / "hosts" / name, name)
        return self._hosts[name]

    def create_vm(self, host: str, name: str, disks: Iterable[tuple[str, int | str, str]], *,
                  fill: float = 0.5, seed: int = 1, networks: Iterable[str] = ("default",)) -> str:
        """Create a VM on the host (sparse disks filled to `fill` with data from `seed`), register it in
        the database; returns its id there."""
        driver = self.host(host)
        vm = driver.create_vm(name, list(disks), networks=tuple(networks))
        if fill:
            driver.write_initial_data(name, seed, fill)
        with session_scope() as session:
            host_row = session.exec(select(HostRow).where(HostRow.name == host)).one()
            vm_id = import_vm_manifest(session, host_row, vm.to_manifest()).id
        self.vm_hosts[vm_id] = host
        return vm_id

    def vm_name(self, vm_id: str) -> str:
        with session_scope() as session:
            return session.get(VmRow, vm_id).name

    # ---- protection -----------------------------------------------------------------------------
    def protect(self, vm_id: str, *, policy_id: str | None = None,
                storage_options: Mapping[str, Any] | None = None) -> str:
        """Enable protection of the VM on this site's recovery storage; returns the job id."""
        return enable_protection(
            vm_id, policy_id or self.policy_id, recovery_storage=self.recovery_storage,
            storage_options=dict(self.storage_options if storage_options is None else storage_options),
            recovery_host=self.recovery_host_names[0] if self.recovery_host_names else None,
        )

    def item_id(self, vm_id: str) -> str:
        with session_scope() as session:
            item = session.exec(select(ProtectedItem).where(ProtectedItem.vm_id == vm_id)).first()
        if item is None:
            raise AssertionError(f"VM {vm_id} has no protected item")
        return item.id

    def item(self, vm_id: str) -> dict[str, Any]:
        """The protected item's status (workflows.protection.item_status)."""
        return item_status(self.item_id(vm_id))

    def jobs(self, vm_id: str, kind: str | None = None) -> list[Job]:
        """The jobs of the VM's protected item (of `kind` when given), oldest first."""
        query = select(Job).where(Job.target == self.item_id(vm_id))
        if kind is not None:
            query = query.where(Job.kind == kind)
        with session_scope() as session:
            return list(session.exec(query.order_by(Job.created_at)).all())

    def wait_job(self, job_id: str, timeout: float, states: Iterable[str] = ("succeeded",)) -> dict[str, Any]:
        """Wait (at most `timeout` s) until the job is in one of `states`; AssertionError with the job's
        steps and the tail of every worker log when it ends otherwise or time runs out."""
        wanted = tuple(states)
        deadline = time.monotonic() + timeout
        while True:
            job = get_job(job_id)
            # A finished job settles once none of its steps runs any more, and its hooks (item state and health)
            # run just after that: wait for both (a failed job may still have a parallel step running).
            if job["state"] in wanted and (job["state"] not in FINISHED_JOB_STATES or self._hooks_ran(job_id)):
                return job
            if (job["state"] in FINISHED_JOB_STATES and job["state"] not in wanted) or time.monotonic() > deadline:
                what = "ended" if job["state"] in FINISHED_JOB_STATES and job["state"] not in wanted \
                    else f"timed out after {timeout:g} s"
                raise AssertionError(
                    f"job {job_id} ({job['kind']}) {what} in state {job['state']}, expected {wanted}; "
                    f"error: {job['error']}\n{self.describe_job(job)}\n{self.log_tails()}"
                )
            time.sleep(0.1)

    @staticmethod
    def _hooks_ran(job_id: str) -> bool:
        with session_scope() as session:
            job = session.get(Job, job_id)
            return job.settled_at is not None and not job.hook_pending

    def wait_idle(self, vm_id: str, timeout: float) -> None:
        """Wait until no job holds the VM's protected item."""
        wait_until(lambda: self.item(vm_id)["active_job"] is None, timeout=timeout,
                   what=f"the protected item of VM {vm_id} to be free of jobs")

    def when_free(self, start: Callable[..., T], *args: Any, timeout: float = 90, **kwargs: Any) -> T:
        """`start(*args, **kwargs)`, again while it is refused because beat's delta cycle holds the item
        (every 3 s at the default policy and time scale: a job started on a replicating item can meet
        one, the more often the busier the machine); any other refusal is raised at once."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return start(*args, **kwargs)
            except ItemBusyError as error:
                # (A cycle that ends between the refusal and the look for its holder reads "... ended just now":
                # the lock was let go meanwhile.)
                busy_now = ("(delta_replication, ", "ended just now")
                if not any(why in str(error) for why in busy_now) \
                        or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def delta_cycle(self, vm_id: str, timeout: float = 60) -> dict[str, Any]:
        """Run one delta replication of the VM now (waiting for a job the scheduler started first);
        returns the finished job."""
        item_id = self.item_id(vm_id)
        deadline = time.monotonic() + timeout

        def started() -> str | None:
            try:
                return start_delta_replication(item_id)
            except ItemBusyError:
                return None

        job_id = wait_until(started, timeout=timeout, interval=0.1,
                            what=f"a delta replication of VM {vm_id} to start")
        return self.wait_job(job_id, max(1.0, deadline - time.monotonic()))

    def final_cycle(self, vm_id: str, timeout: float = 60) -> dict[str, Any]:
        """Stop the VM's workload, then run one more delta cycle: the replica then equals the source."""
        self.host(self.vm_hosts[vm_id]).stop_workload(self.vm_name(vm_id), timeout=10)
        return self.delta_cycle(vm_id, timeout)

    # ---- the recovery side ----------------------------------------------------------------------
    def storage(self) -> RecoveryStorage:
        """The recovery storage, opened in this process (the caller closes it)."""
        return replication_actions.open_recovery_storage(self.recovery_storage, self.storage_options)

    def verify_replica(self, vm_id: str) -> None:
        """Every disk of the VM equals its replica byte for byte (AssertionError naming the disk and the
        first differing offset otherwise). Quiesce first: `final_cycle`."""
        host_name = self.vm_hosts[vm_id]
        vm = self.host(host_name).get_vm(self.vm_name(vm_id))
        with session_scope() as session:
            view = load_item(session, self.item_id(vm_id))
        storage = self.storage()
        try:
            for disk in vm.disks:
                name = replication_actions.replica_of(view, storage, disk.name).name
                with open_disk(disk.path) as source:
                    replica = storage.open_disk(name)
                    try:
                        assert replica.size == source.size, (
                            f"disk {disk.name} of VM {vm.name}: replica {name} is {replica.size} bytes, "
                            f"the source {source.size}"
                        )
                        offset = first_difference(source, replica)
                    finally:
                        replica.close()
                assert offset is None, (
                    f"disk {disk.name} of VM {vm.name}: replica {name} differs from the source first at "
                    f"offset {offset}"
                )
        finally:
            storage.close()

    def disk_ids(self, vm_id: str) -> dict[str, str]:
        """{disk name: the disk's uuid} as registered."""
        with session_scope() as session:
            return {disk.name: disk.disk_uuid for disk in vm_disks(session, session.get(VmRow, vm_id))}

    # ---- diagnostics ----------------------------------------------------------------------------
    @staticmethod
    def describe_job(job: Mapping[str, Any]) -> str:
        lines = [f"steps of job {job['id']} ({job['kind']}, {job['state']}):"]
        for step in job["steps"]:
            lines.append(
                f"  [{step['stage']}.{step['index']}] {step['name']}: {step['state']} attempts={step['attempts']} "
                f"deaths={step['deaths']} progress={step['progress_done']}/{step['progress_total']} "
                f"error={step['error']}"
            )
        return "\n".join(lines)

    def log_tails(self) -> str:
        """What the broker holds for each worker, then the tail of each worker's log without the lines beat's
        routine tasks write every second (they would fill the tail and hide what matters)."""
        lines = [self.broker_queues()]
        for name, process in self.deployment.workers.items():
            log = [line for line in process.log().splitlines() if not ROUTINE_LOG_LINE.search(line)]
            lines.append(f"--- tail of {name} ({process.log_path}) ---\n" + "\n".join(log)[-LOG_TAIL_CHARS:])
        return "\n".join(lines)

    def broker_queues(self) -> str:
        """Messages waiting in each queue of the broker, and those delivered but not acknowledged yet."""
        try:
            client = self.redis.client()
            waiting = {key.decode(): client.llen(key) for key in client.scan_iter(_type="list")
                       if not key.startswith(b"_kombu")}
            unacked = client.hlen("unacked")
        except Exception as error:  # noqa: BLE001 - a report on a failure must not fail in turn
            return f"--- broker: unreadable ({error}) ---"
        return f"--- broker: waiting {waiting or 'nothing'}, delivered and unacknowledged {unacked} ---"
