"""The Prometheus metrics (GET /api/v1/metrics) scraped from `uvicorn api.rest:app` as a real subprocess while a
real deployment runs (tests/recovery_site.py: redis-server, SQLite, Celery workers and beat): a VM protected, a
delta cycle after known writes, a drill. Every value is parsed with prometheus_client's own text parser and
held to the database and to the disks themselves: the RPO to the latest point's age, jobs to the job table,
step durations to the step rows, bytes of the initial copy to the non-zero blocks of the disks, bytes of logs
and the log backlog to what the trackers held, drills to the failover records.
"""
from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import pytest
from api_server import ApiServer
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from recovery_site import RecoverySite
from sqlmodel import select

from api import service
from api.client import SiteRecoveryClient
from datapath.disk import open_disk
from datapath.manifest import DEFAULT_CHUNK_SIZE
from models.db import as_utc, database_now, init_db, session_scope
from models.fabric import VirtualDisk, VirtualMachine, create_site, register_host
from models.failover import FailoverKind, FailoverRecord, FailoverStatus
from models.jobs import Job, JobState, JobStep, StepState
from models.policy import ReplicationPolicy, create_policy
from models.protection import Health, ProtectedItem, ReplicationState
from workflows import metrics, rpo
from workflows.kinds.test_failover import start as start_drill
from workflows.metrics import STEP_DURATION_BUCKETS_S

DISKS = [("disk0", "8M", "vhd"), ("disk1", "4M", "raw")]
BLOCK = 4096
JOB_TIMEOUT = 90
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RecoverySite, ApiServer, str]]:
    workdir = tmp_path_factory.mktemp("metrics")
    with RecoverySite(workdir, recovery_host_names=("dr1",)) as site:
        reader = service.create_api_key("prometheus", "reader")["key"]
        server = ApiServer({**site.env, "ASR_API_KEY_CACHE_S": "0"}, workdir)
        try:
            yield site, server, reader
        except BaseException:
            print(server.log())
            raise
        finally:
            server.stop()


def scrape(server: ApiServer, key: str) -> Samples:
    """Every sample of GET /api/v1/metrics, by (sample name, labels), parsed by prometheus_client."""
    response = httpx.get(f"{server.url}/api/v1/metrics", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4"), response.headers
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def now() -> datetime:
    with session_scope() as session:
        return database_now(session)


def copied_bytes(path: Path) -> int:
    """What an initial copy writes of a disk to a fresh replica: of each 1 MiB chunk holding data, from its
    first to its last non-zero 4 KiB block (datapath/copy.py); all-zero chunks and holes nothing."""
    total = 0
    with open_disk(path) as disk:
        for offset in range(0, disk.size, DEFAULT_CHUNK_SIZE):
            chunk = bytearray(min(DEFAULT_CHUNK_SIZE, disk.size - offset))
            assert disk.read_into(offset, memoryview(chunk)) == len(chunk)
            blocks = [i for i in range(0, len(chunk), BLOCK) if any(chunk[i:i + BLOCK])]
            if blocks:
                total += min(blocks[-1] + BLOCK, len(chunk)) - blocks[0]
    return total


def step_rows(kind: str, action: str) -> list[JobStep]:
    with session_scope() as session:
        return list(session.exec(select(JobStep).join(Job, Job.id == JobStep.job_id).where(
            Job.kind == kind, JobStep.action == action, JobStep.state == "succeeded")).all())


def test_metrics_follow_a_protected_vm_through_a_delta_cycle_and_a_drill(deployment) -> None:
    site, server, reader = deployment
    vm = {"vm": "web01", "host": "host1"}
    # No delta cycle of the scheduler's between the test's own: a 15 minute copy frequency (90 s scaled).
    policy_id = site.create_policy("quiet", copy_frequency_s=900)
    vm_id = site.create_vm("host1", "web01", DISKS, fill=0.5, seed=5)
    disk_paths = {disk.name: disk.path for disk in site.host("host1").get_vm("web01").disks}
    expected_copy = sum(copied_bytes(path) for path in disk_paths.values())

    # Without a key, nothing; a reader key is enough, and the typed client reads the same text.
    assert httpx.get(f"{server.url}/api/v1/metrics", timeout=10).status_code == 401
    with SiteRecoveryClient(server.url, reader) as client:
        assert "# TYPE asr_jobs gauge" in client.metrics()
    before = scrape(server, reader)
    assert value(before, "asr_replicated_bytes_total", **vm, phase="initial_copy") is None

    site.wait_job(site.protect(vm_id, policy_id=policy_id), timeout=JOB_TIMEOUT)
    protected = scrape(server, reader)
    # The initial copy sent exactly the data of the disks, as the copy steps recorded it.
    assert value(protected, "asr_replicated_bytes_total", **vm, phase="initial_copy") == expected_copy > 0
    assert sum(step.result["bytes_written"] for step in step_rows("enable_protection", "replication.copy_disk")) \
        == expected_copy
    assert value(protected, "asr_vm_replication_state", **vm, state="protected") == 1
    logs_before = value(protected, "asr_replicated_bytes_total", **vm, phase="logs")

    # Known writes through the trackers: what the next Ship logs finds unsent, and sends.
    unsent: dict[str, int] = {}
    for number, name in enumerate(disk_paths):
        with site.host("host1").tracker("web01", name) as tracker:
            tracker.write(BLOCK * (number + 1), bytes([number + 1]) * (3 * BLOCK * (number + 1)))
            unsent[name] = tracker.unsent_bytes()
    site.delta_cycle(vm_id, timeout=JOB_TIMEOUT)
    cycled = scrape(server, reader)
    for name, held in unsent.items():
        assert value(cycled, "asr_vm_unsent_log_bytes", **vm, disk=name) == held > 3 * BLOCK
    (ship,) = step_rows("delta_replication", "replication.ship_logs")
    shipped = sum(disk["shipped_bytes"] for disk in ship.result["disks"].values())
    assert shipped >= sum(unsent.values())  # the sealed logs: what was unsent, and each log's seal
    assert value(cycled, "asr_replicated_bytes_total", **vm, phase="logs") == logs_before + shipped

    site.wait_job(start_drill(site.item_id(vm_id)), timeout=JOB_TIMEOUT)
    before_scrape = now()
    drilled = scrape(server, reader)
    after_scrape = now()

    with session_scope() as session:
        item = session.exec(select(ProtectedItem).where(ProtectedItem.vm_id == vm_id)).one()
        policy = session.get(ReplicationPolicy, policy_id)
        (drill,) = session.exec(select(FailoverRecord).where(FailoverRecord.item_id == item.id)).all()
        jobs: dict[tuple[str, str], int] = {}
        for job in session.exec(select(Job)).all():
            jobs[(job.kind, job.state.value)] = jobs.get((job.kind, job.state.value), 0) + 1

    # RPO: the latest point's age on the database's clock, at the moment of the scrape; its thresholds the policy's.
    point_at = as_utc(item.last_recovery_point_at)
    rpo_s = value(drilled, "asr_vm_rpo_seconds", **vm)
    assert rpo.rpo_s(point_at, before_scrape) <= rpo_s <= rpo.rpo_s(point_at, after_scrape), rpo_s
    assert value(drilled, "asr_vm_last_recovery_point_timestamp_seconds", **vm) == point_at.timestamp()
    limits = rpo.thresholds(policy)
    assert value(drilled, "asr_vm_rpo_warning_seconds", **vm) == limits.warning_s
    assert value(drilled, "asr_vm_rpo_critical_seconds", **vm) == limits.critical_s
    assert {health: value(drilled, "asr_vm_health", **vm, health=health)
            for health in ("Healthy", "Warning", "Critical")} == {
        health: float(health == item.health.value) for health in ("Healthy", "Warning", "Critical")}
    assert value(drilled, "asr_vm_unsent_ratio", **vm) == item.unsent_ratio

    # Jobs by kind and state: the job table's counts, every state of every kind (zeros included).
    for (kind, state), count in jobs.items():
        assert value(drilled, "asr_jobs", kind=kind, state=state) == count, (kind, state)
    assert value(drilled, "asr_jobs", kind="delta_replication", state="failed") == 0
    assert jobs[("test_failover", "succeeded")] == 1 and jobs[("delta_replication", "succeeded")] == 1

    # Step durations: the histogram of the step rows' runs (claim to outcome).
    copies = step_rows("enable_protection", "replication.copy_disk")
    durations = [(as_utc(s.ended_at) - as_utc(s.started_at)).total_seconds() for s in copies]
    labels = {"kind": "enable_protection", "action": "replication.copy_disk", "state": "succeeded"}
    assert value(drilled, "asr_step_duration_seconds_count", **labels) == len(durations) == 2
    assert value(drilled, "asr_step_duration_seconds_sum", **labels) == pytest.approx(sum(durations))
    for bound in STEP_DURATION_BUCKETS_S:
        assert value(drilled, "asr_step_duration_seconds_bucket", **labels, le=str(bound)) == sum(
            1 for seconds in durations if seconds <= bound), bound
    assert value(drilled, "asr_step_duration_seconds_bucket", **labels, le="+Inf") == 2

    # The drill: one, passed; the age of its test VM's coming up at the scrape.
    assert drill.vm_up_at is not None and drill.verified is True
    assert value(drilled, "asr_drills_total", **vm) == 1
    assert value(drilled, "asr_drills_passed_total", **vm) == 1
    up_at = as_utc(drill.vm_up_at)
    assert value(drilled, "asr_vm_last_passed_drill_timestamp_seconds", **vm) == up_at.timestamp()
    age = value(drilled, "asr_vm_last_passed_drill_age_seconds", **vm)
    assert (before_scrape - up_at).total_seconds() <= age <= (after_scrape - up_at).total_seconds()


def test_step_history_folded_long_ago_counts_once(deployment) -> None:
    """Steps ended more than RESCAN_S ago are folded into the process's totals once and never read again: a
    year later, the first scrape folds every step and the next reads none, and both show the database's totals.
    (Runs after the test above, on its steps: the module's tests share one deployment, in file order.)"""
    history = metrics._IncrementalHistory()
    with session_scope() as session:
        today = database_now(session)
        whole = history.read(session, today)
        next_year = today + timedelta(days=365)
        folding = history.read(session, next_year)
        folded = history.read(session, next_year)
    assert whole.replicated and history.folded_until == next_year - timedelta(seconds=metrics.RESCAN_S)
    for view in (folding, folded):
        assert view.replicated == whole.replicated
        assert view.latest_ship.keys() == whole.latest_ship.keys()
        assert {key: (d.buckets, round(d.total_s, 6)) for key, d in view.durations.items()} == {
            key: (d.buckets, round(d.total_s, 6)) for key, d in whole.durations.items()}


# ---- the collector on rows of known values, on SQLite and PostgreSQL ---------------------------------------------
def collect(collector: metrics.DatabaseCollector) -> Samples:
    registry = CollectorRegistry()
    registry.register(collector)
    samples: Samples = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def test_the_collector_reads_known_rows_on_both_databases(db_url: str, monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: Path) -> None:
    monkeypatch.setenv("ASR_DATABASE_URL", db_url)
    monkeypatch.setenv("ASR_TIME_SCALE", "1")
    init_db()
    with session_scope() as session:
        t = database_now(session)
        site = create_site(session, "primary")
        host, _key = register_host(session, "host1", str(tmp_path), site=site)
        policy = create_policy(session, "p30", copy_frequency_s=30)
        items = {}
        for name, state in (("web01", ReplicationState.PROTECTED), ("old01", ReplicationState.DISABLED)):
            vm = VirtualMachine(host_id=host.id, name=name, vm_uuid=str(uuid.uuid4()))
            session.add(vm)
            session.flush()
            session.add(VirtualDisk(vm_id=vm.id, name="disk0", file_name="disk0.raw", size=8 << 20, format="raw",
                                    disk_uuid=f"{name}-d0"))
            item = ProtectedItem(vm_id=vm.id, policy_id=policy.id, recovery_storage="file:///r",
                                 replication_state=state, health=Health.WARNING, unsent_ratio=0.25,
                                 last_recovery_point_at=t - timedelta(seconds=100))
            session.add(item)
            session.flush()
            items[name] = item.id
        job = Job(kind="delta_replication", state=JobState.succeeded, target=items["web01"])
        session.add(job)
        session.flush()

        def step(index: int, action: str, state: StepState, ended_ago_s: float, seconds: float,
                 result: dict | None = None, item: str = "web01") -> None:
            ended = t - timedelta(seconds=ended_ago_s)
            session.add(JobStep(job_id=job.id, stage=index, index=0, name=action, action=action, queue="host.host1",
                                params={"item_id": items[item]}, state=state, ended_at=ended, result=result,
                                started_at=ended - timedelta(seconds=seconds)))

        ship = "replication.ship_logs"
        step(0, ship, StepState.succeeded, 7200, 3.0,
             {"disks": {"web01-d0": {"name": "disk0", "unsent_bytes": 4096, "shipped_bytes": 5000}}})
        step(1, ship, StepState.succeeded, 10, 0.25,
             {"disks": {"web01-d0": {"name": "disk0", "unsent_bytes": 8192, "shipped_bytes": 700}}})
        step(2, "replication.copy_disk", StepState.succeeded, 7000, 40.0, {"bytes_written": 1_000_000})
        step(3, "replication.resync_disk", StepState.failed, 5, 7.0, {"bytes_sent": 999})
        step(4, ship, StepState.succeeded, 20, 1.0,
             {"disks": {"old01-d0": {"name": "disk0", "unsent_bytes": 1, "shipped_bytes": 11}}}, item="old01")
        for status, up_ago_s, verified in ((FailoverStatus.CLEANED_UP, 3600, True), (FailoverStatus.FAILED, None, None),
                                           (FailoverStatus.IN_PROGRESS, None, None)):
            session.add(FailoverRecord(item_id=items["web01"], kind=FailoverKind.TEST, status=status, verified=verified,
                                       vm_up_at=None if up_ago_s is None else t - timedelta(seconds=up_ago_s)))
        session.add(FailoverRecord(item_id=items["web01"], kind=FailoverKind.PLANNED, status=FailoverStatus.SUCCEEDED,
                                   verified=True, vm_up_at=t))

    collector = metrics.DatabaseCollector()
    web, old = {"vm": "web01", "host": "host1"}, {"vm": "old01", "host": "host1"}
    for scrape_no in range(2):  # the second scrape reads the step of two hours ago from the folded totals
        got = collect(collector)
        assert 100 <= value(got, "asr_vm_rpo_seconds", **web) < 130, scrape_no
        assert value(got, "asr_vm_rpo_warning_seconds", **web) == 60
        assert value(got, "asr_vm_rpo_critical_seconds", **web) == 120
        assert [value(got, "asr_vm_health", **web, health=h) for h in ("Healthy", "Warning", "Critical")] == [0, 1, 0]
        assert value(got, "asr_vm_replication_state", **web, state="protected") == 1
        assert value(got, "asr_vm_unsent_ratio", **web) == 0.25
        assert value(got, "asr_vm_unsent_log_bytes", **web, disk="disk0") == 8192, "the latest Ship logs'"
        assert value(got, "asr_replicated_bytes_total", **web, phase="logs") == 5700
        assert value(got, "asr_replicated_bytes_total", **web, phase="initial_copy") == 1_000_000
        assert value(got, "asr_replicated_bytes_total", **web, phase="resync") is None, "a failed step sent nothing"
        # A VM whose protection was disabled: its counters stay, its gauges go.
        assert value(got, "asr_replicated_bytes_total", **old, phase="logs") == 11
        assert value(got, "asr_vm_health", **old, health="Warning") is None
        assert value(got, "asr_vm_unsent_log_bytes", **old, disk="disk0") is None
        assert value(got, "asr_jobs", kind="delta_replication", state="succeeded") == 1
        assert value(got, "asr_jobs", kind="delta_replication", state="running") == 0
        labels = {"kind": "delta_replication", "action": ship, "state": "succeeded"}
        assert value(got, "asr_step_duration_seconds_count", **labels) == 3
        assert value(got, "asr_step_duration_seconds_sum", **labels) == pytest.approx(4.25)
        assert value(got, "asr_step_duration_seconds_bucket", **labels, le="0.1") == 0
        assert value(got, "asr_step_duration_seconds_bucket", **labels, le="0.5") == 1
        assert value(got, "asr_step_duration_seconds_bucket", **labels, le="1.0") == 2
        assert value(got, "asr_step_duration_seconds_bucket", **labels, le="2.5") == 2
        assert value(got, "asr_step_duration_seconds_bucket", **labels, le="5.0") == 3
        copy = {"kind": "delta_replication", "action": "replication.copy_disk", "state": "succeeded"}
        assert value(got, "asr_step_duration_seconds_bucket", **copy, le="30.0") == 0
        assert value(got, "asr_step_duration_seconds_bucket", **copy, le="60.0") == 1
        failed = {"kind": "delta_replication", "action": "replication.resync_disk", "state": "failed"}
        assert value(got, "asr_step_duration_seconds_sum", **failed) == pytest.approx(7.0)
        assert value(got, "asr_drills_total", **web) == 2 and value(got, "asr_drills_passed_total", **web) == 1
        assert 3600 <= value(got, "asr_vm_last_passed_drill_age_seconds", **web) < 3630
    assert collector._history.folded_until is not None
    assert collector._history.folded.replicated[(items["web01"], "logs")] == 5000, "only the step of 2 h ago"
