"""The engine's Prometheus metrics, computed from the database at each scrape (`DatabaseCollector`).

Nothing is counted inside a process: every value comes from the rows all workers write (protected items,
jobs and their steps, failover records), so a scrape of any API process is true for the whole deployment,
however many worker machines run the steps, and an API restart loses nothing. docs/operations.md
("Metrics") lists every metric, its labels and its meaning.

The step history (step durations, bytes replicated, each item's latest Ship logs) grows with every cycle, so
it is read incrementally: steps that ended more than `RESCAN_S` before the database's now are folded once
into totals this process keeps; only the steps of the last `RESCAN_S` are read again at each scrape (a step
is committed a moment after the ended_at its worker stamped, so the recent past is never taken as final).
"""
from __future__ import annotations

import bisect
import copy
import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from sqlmodel import Session, select

from models.db import as_utc, database_now, session_scope
from models.fabric import Host, VirtualDisk, VirtualMachine
from models.failover import FailoverKind, FailoverRecord, FailoverStatus
from models.jobs import Job, JobState, JobStep, StepState
from models.policy import ReplicationPolicy
from models.protection import Health, ProtectedItem, ReplicationState
from workflows import actions as A
from workflows import rpo

RESCAN_S = 3600.0
"""Steps that ended within this many seconds of the database's now are read again at every scrape."""
STEP_DURATION_BUCKETS_S = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0)
ENDED_STEP_STATES = (StepState.succeeded, StepState.failed)
REPLICATED_PHASES = {A.COPY_DISK: ("initial_copy", "bytes_written"), A.RESYNC_DISK: ("resync", "bytes_sent"),
                     A.CHECK_DISK: ("repair", "bytes_sent")}
"""The steps that send disk data to the recovery storage: the phase they count as, the result field with
their bytes (Ship logs sends logs: `shipped_bytes` of each of its disks, the phase `logs`)."""
VM_LABELS = ("vm", "host")


# ---- the step history ---------------------------------------------------------------------------------------
@dataclass
class _Durations:
    """One histogram's observations: how many fell in each bucket (the last is +Inf), their sum."""

    buckets: list[int] = field(default_factory=lambda: [0] * (len(STEP_DURATION_BUCKETS_S) + 1))
    total_s: float = 0.0

    def observe(self, seconds: float) -> None:
        self.buckets[bisect.bisect_left(STEP_DURATION_BUCKETS_S, seconds)] += 1
        self.total_s += seconds

    def cumulative(self) -> list[tuple[str, int]]:
        counts, running = [], 0
        for bound, count in zip((*STEP_DURATION_BUCKETS_S, float("inf")), self.buckets, strict=True):
            running += count
            counts.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return counts


@dataclass
class StepHistory:
    """What ended steps add up to: durations by (job kind, action, state), bytes sent to the recovery
    storage by (item id, phase), and each item's latest succeeded Ship logs (when, and its disks)."""

    durations: dict[tuple[str, str, str], _Durations] = field(default_factory=dict)
    replicated: Counter[tuple[str, str]] = field(default_factory=Counter)
    latest_ship: dict[str, tuple[datetime, dict[str, Any]]] = field(default_factory=dict)

    def add(self, kind: str, action: str, state: str, started_at: datetime | None, ended_at: datetime,
            params: Mapping[str, Any] | None, result: Mapping[str, Any] | None) -> None:
        if started_at is not None:
            seconds = max(0.0, (as_utc(ended_at) - as_utc(started_at)).total_seconds())
            self.durations.setdefault((kind, action, state), _Durations()).observe(seconds)
        item_id = (params or {}).get("item_id")
        if state != StepState.succeeded or not isinstance(item_id, str) or not isinstance(result, Mapping):
            return
        if action == A.SHIP_LOGS:
            disks = result.get("disks") if isinstance(result.get("disks"), Mapping) else {}
            self.replicated[(item_id, "logs")] += sum(_count(disk.get("shipped_bytes")) for disk in disks.values()
                                                      if isinstance(disk, Mapping))
            latest = self.latest_ship.get(item_id)
            if latest is None or as_utc(latest[0]) <= as_utc(ended_at):
                self.latest_ship[item_id] = (ended_at, dict(disks))
        elif action in REPLICATED_PHASES:
            phase, field_name = REPLICATED_PHASES[action]
            self.replicated[(item_id, phase)] += _count(result.get(field_name))


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


class _IncrementalHistory:
    """The step history kept in this process: steps ended before `folded_until` are in `folded` (read once);
    each scrape reads those ended since, and folds the ones now older than RESCAN_S."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.folded = StepHistory()
        self.folded_until: datetime | None = None

    def read(self, session: Session, now: datetime) -> StepHistory:
        with self._lock:
            query = (select(Job.kind, JobStep.action, JobStep.state, JobStep.started_at, JobStep.ended_at,
                            JobStep.params, JobStep.result)
                     .join(Job, Job.id == JobStep.job_id)
                     .where(JobStep.state.in_(ENDED_STEP_STATES), JobStep.ended_at.is_not(None)))
            if self.folded_until is not None:
                query = query.where(JobStep.ended_at >= self.folded_until)
            rows = session.exec(query).all()
            fold_before = as_utc(now) - timedelta(seconds=RESCAN_S)
            if self.folded_until is not None and fold_before <= as_utc(self.folded_until):
                fold_before = as_utc(self.folded_until)
            current = copy.deepcopy(self.folded)
            for kind, action, state, started_at, ended_at, params, result in rows:
                current.add(kind, action, str(state), started_at, ended_at, params, result)
                if as_utc(ended_at) < fold_before:
                    self.folded.add(kind, action, str(state), started_at, ended_at, params, result)
            self.folded_until = fold_before
            return current


# ---- the collector ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _ItemRow:
    item: ProtectedItem
    vm: str
    host: str
    policy: ReplicationPolicy
    disk_names: dict[str, str]


class DatabaseCollector(Collector):
    """Every metric of docs/operations.md ("Metrics"), read from the database when Prometheus scrapes."""

    def __init__(self) -> None:
        self._history = _IncrementalHistory()

    def describe(self) -> Iterable[Metric]:
        return []  # registering must not query the database

    def collect(self) -> Iterator[Metric]:
        with session_scope() as session:
            now = database_now(session)
            items = _items(session)
            jobs = session.exec(select(Job.kind, Job.state, sa.func.count()).group_by(Job.kind, Job.state)).all()
            drills = session.exec(select(FailoverRecord.item_id, FailoverRecord.status, FailoverRecord.vm_up_at,
                                         FailoverRecord.verified).where(FailoverRecord.kind == FailoverKind.TEST)).all()
            history = self._history.read(session, now)
        yield from _item_metrics(items, now)
        yield from _log_backlog(items, history)
        yield _jobs(jobs)
        yield _step_durations(history)
        yield _replicated(items, history)
        yield from _drills(items, drills, now)


def _items(session: Session) -> list[_ItemRow]:
    rows = session.exec(
        select(ProtectedItem, VirtualMachine.name, Host.name, ReplicationPolicy)
        .join(VirtualMachine, VirtualMachine.id == ProtectedItem.vm_id)
        .join(Host, Host.id == VirtualMachine.host_id)
        .join(ReplicationPolicy, ReplicationPolicy.id == ProtectedItem.policy_id)
        .order_by(Host.name, VirtualMachine.name)
    ).all()
    disks: dict[str, dict[str, str]] = {}
    for vm_id, disk_uuid, name in session.exec(select(VirtualDisk.vm_id, VirtualDisk.disk_uuid, VirtualDisk.name)):
        disks.setdefault(vm_id, {})[disk_uuid] = name
    return [_ItemRow(item, vm, host, policy, disks.get(item.vm_id, {})) for item, vm, host, policy in rows]


def _gauge(name: str, documentation: str, labels: Iterable[str] = VM_LABELS) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, labels=list(labels))


def _item_metrics(items: list[_ItemRow], now: datetime) -> Iterator[Metric]:
    rpo_now = _gauge("asr_vm_rpo_seconds", "Seconds of writes a failover now would lose: the database's now minus "
                     "the latest recovery point's time (replicating VMs with a point)")
    warning = _gauge("asr_vm_rpo_warning_seconds", "The RPO from which the VM is Warning (its policy's threshold)")
    critical = _gauge("asr_vm_rpo_critical_seconds", "The RPO from which the VM is Critical (its policy's threshold)")
    health = _gauge("asr_vm_health", "1 for the VM's health (Healthy, Warning, Critical), 0 for the others",
                    (*VM_LABELS, "health"))
    state = _gauge("asr_vm_replication_state", "1 for the VM's replication state (protected, resync_required, ...)",
                   (*VM_LABELS, "state"))
    unsent = _gauge("asr_vm_unsent_ratio", "The largest share, over the VM's disks, of tracked changes not yet "
                    "sent, at its last Ship logs step")
    last_point = _gauge("asr_vm_last_recovery_point_timestamp_seconds", "The latest recovery point's time (Unix)")
    for row in items:
        if row.item.replication_state is ReplicationState.DISABLED:
            continue
        labels = [row.vm, row.host]
        for value in Health:
            health.add_metric([*labels, value.value], 1.0 if row.item.health is value else 0.0)
        state.add_metric([*labels, row.item.replication_state.value], 1.0)
        unsent.add_metric(labels, float(row.item.unsent_ratio))
        if row.item.last_recovery_point_at is not None:
            last_point.add_metric(labels, as_utc(row.item.last_recovery_point_at).timestamp())
        if row.item.replication_state not in rpo.MEASURED_STATES:
            continue
        limits = rpo.thresholds(row.policy)
        warning.add_metric(labels, limits.warning_s)
        critical.add_metric(labels, limits.critical_s)
        seconds = rpo.rpo_s(row.item.last_recovery_point_at, now)
        if seconds is not None:
            rpo_now.add_metric(labels, seconds)
    yield from (rpo_now, warning, critical, health, state, unsent, last_point)


def _log_backlog(items: list[_ItemRow], history: StepHistory) -> Iterator[Metric]:
    backlog = _gauge("asr_vm_unsent_log_bytes", "Bytes of replication logs the host held unsent for the disk "
                     "when the VM's last Ship logs step began (before its seal): what piled up in one cycle",
                     (*VM_LABELS, "disk"))
    for row in items:
        latest = history.latest_ship.get(row.item.id)
        if row.item.replication_state is ReplicationState.DISABLED or latest is None:
            continue
        for disk_uuid, disk in sorted(latest[1].items()):
            if isinstance(disk, Mapping) and isinstance(disk.get("unsent_bytes"), int):
                name = row.disk_names.get(disk_uuid) or str(disk.get("name", disk_uuid))
                backlog.add_metric([row.vm, row.host, name], float(disk["unsent_bytes"]))
    yield backlog


def _jobs(rows: Iterable[tuple[str, JobState, int]]) -> Metric:
    family = _gauge("asr_jobs", "Jobs in the database by kind and state (every state of every kind that has jobs)",
                    ("kind", "state"))
    counts = {(kind, JobState(state)): count for kind, state, count in rows}
    for kind in sorted({kind for kind, _ in counts}):
        for state in JobState:
            family.add_metric([kind, state.value], float(counts.get((kind, state), 0)))
    return family


def _step_durations(history: StepHistory) -> Metric:
    family = HistogramMetricFamily(
        "asr_step_duration_seconds", "How long steps ran (their last run, claim to outcome), by job kind, action "
        "and outcome (succeeded, failed)", labels=["kind", "action", "state"])
    for (kind, action, state), durations in sorted(history.durations.items()):
        family.add_metric([kind, action, state], durations.cumulative(), durations.total_s)
    return family


def _replicated(items: list[_ItemRow], history: StepHistory) -> Metric:
    family = CounterMetricFamily(
        "asr_replicated_bytes", "Bytes sent to the recovery storage by succeeded steps, by VM and phase "
        "(initial_copy, logs, resync, repair)", labels=[*VM_LABELS, "phase"])
    by_item = {row.item.id: row for row in items}
    for (item_id, phase), count in sorted(history.replicated.items()):
        row = by_item.get(item_id)
        if row is not None:
            family.add_metric([row.vm, row.host, phase], float(count))
    return family


def drill_passed(status: FailoverStatus, vm_up_at: datetime | None, verified: bool | None) -> bool:
    """A drill passed when its test VM came up (the record's vm_up_at, kept through cleanup) from disks whose
    manifest roots were those of the point; one that failed or was cancelled never had a VM up."""
    return vm_up_at is not None and verified is True and status is not FailoverStatus.IN_PROGRESS


def _drills(items: list[_ItemRow], drills: Iterable[tuple[str, FailoverStatus, datetime | None, bool | None]],
            now: datetime) -> Iterator[Metric]:
    ended = CounterMetricFamily("asr_drills", "Test failovers (drills) that ended, passed or not", labels=VM_LABELS)
    passed = CounterMetricFamily("asr_drills_passed", "Drills whose test VM came up from disks matching the "
                                 "point's manifest roots", labels=VM_LABELS)
    last = _gauge("asr_vm_last_passed_drill_timestamp_seconds", "When the VM's latest passed drill had its test VM "
                  "up (Unix time)")
    age = _gauge("asr_vm_last_passed_drill_age_seconds", "Seconds since the VM's latest passed drill had its test "
                 "VM up (the database's now)")
    ended_count: Counter[str] = Counter()
    passed_count: Counter[str] = Counter()
    latest: dict[str, datetime] = {}
    for item_id, status, vm_up_at, verified in drills:
        if status is FailoverStatus.IN_PROGRESS:
            continue
        ended_count[item_id] += 1
        if drill_passed(status, vm_up_at, verified):
            passed_count[item_id] += 1
            if item_id not in latest or as_utc(vm_up_at) > as_utc(latest[item_id]):
                latest[item_id] = vm_up_at
    for row in items:
        labels = [row.vm, row.host]
        ended.add_metric(labels, float(ended_count[row.item.id]))
        passed.add_metric(labels, float(passed_count[row.item.id]))
        if row.item.id in latest:
            last.add_metric(labels, as_utc(latest[row.item.id]).timestamp())
            age.add_metric(labels, max(0.0, (as_utc(now) - as_utc(latest[row.item.id])).total_seconds()))
    yield from (ended, passed, last, age)


# ---- the exposition -----------------------------------------------------------------------------------------
_registry: CollectorRegistry | None = None
_registry_lock = threading.Lock()


def exposition() -> tuple[bytes, str]:
    """The metrics in the Prometheus text format, and its content type."""
    global _registry
    with _registry_lock:
        if _registry is None:
            _registry = CollectorRegistry()
            _registry.register(DatabaseCollector())
    # The classic text format (0.0.4), which every Prometheus version reads; the names are all plain ASCII.
    return generate_latest(_registry), CONTENT_TYPE_PLAIN_0_0_4
