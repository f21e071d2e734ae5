"""The engine's decisions on SQLite alone: no Redis, no Celery, no workers.

A recording dispatcher stands in for the Celery canvas (workflows/canvas.py, tested with real workers in
test_engine.py); the engine core is driven by calling what a worker would call (`execute_step`), and
what the reconciler decides is checked against the rows."""
from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pytest
from sqlmodel import select

from datapath.errors import NonRecoverableError, StorageUnavailableError
from models.db import dispose_engines, init_db, session_scope
from models.jobs import Job, JobState, JobStep, StepState
from workflows import actions, clock
from workflows.engine import (
    DispatchError,
    ItemBusyError,
    JobStateError,
    StepSpec,
    action,
    execute_step,
    get_job,
    reconcile,
    reopen,
    run_job_hooks,
    start_job,
    use_dispatcher,
)
from workflows.engine import steps as engine_steps
from workflows.engine.outages import record_broker_back, record_broker_lost
from workflows.engine.reconciler import relaunch_reason, stale_step_outcome
from workflows.jobkind import JobKind, declare
from workflows.settings import EngineSettings

OK = actions.declare("test.core.ok")
FLAKY = actions.declare("test.core.flaky")
BROKEN = actions.declare("test.core.broken")
HOOK_CALLS: list[tuple[str, str]] = []


@action(OK)
def _ok(ctx, **params):
    return {"ran": ctx.step_name}


@action(FLAKY)
def _flaky(ctx, **params):
    raise StorageUnavailableError("the recovery storage is away")


@action(BROKEN)
def _broken(ctx, **params):
    raise NonRecoverableError("the VM is gone")


def _record_hook(job, session):
    HOOK_CALLS.append((job.id, job.state.value))


KIND = declare(JobKind(
    name="test.core", summary="engine core tests", actions=frozenset({OK, FLAKY, BROKEN}),
    build=lambda request: request, locks=lambda request: [], target=lambda request: None,
    params=lambda request: {}, on_failed=(_record_hook,), on_succeeded=(_record_hook,),
))


@dataclass
class RecordingDispatcher:
    sent: list[list[str]]
    """The step ids of each stage sent, in order."""
    hooks: list[str]
    refuse: bool = False
    messages: list = field(default_factory=list)
    """Every step message sent, as the dispatcher got it."""
    lost_runs: list = field(default_factory=list)
    """(task id, failed, reason) of every dead run the reconciler reported."""

    def send_stage(self, steps: Sequence) -> None:
        if self.refuse:
            raise DispatchError("broker down")
        self.sent.append([step.id for step in steps])
        self.messages.extend(steps)

    def dispatch_hooks(self, job_id: str) -> None:
        self.hooks.append(job_id)

    def report_lost_run(self, task_id: str, *, failed: bool, reason: str) -> None:
        self.lost_runs.append((task_id, failed, reason))


def recording_engine(database_url: str, monkeypatch: pytest.MonkeyPatch,
                     **settings: str) -> Iterator[RecordingDispatcher]:
    """The engine on `database_url` (its schema made), with `settings` (ASR_*), sending through a
    RecordingDispatcher; put back as it was after the test."""
    monkeypatch.setenv("ASR_DATABASE_URL", database_url)
    monkeypatch.setenv("ASR_REDIS_URL", "redis://127.0.0.1:1/0")  # live progress is not part of these tests
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    init_db()
    HOOK_CALLS.clear()
    recording = RecordingDispatcher([], [])
    previous = use_dispatcher(recording)
    yield recording
    use_dispatcher(previous)
    dispose_engines()


@pytest.fixture
def dispatcher(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RecordingDispatcher]:
    yield from recording_engine(f"sqlite:///{tmp_path / 'asr.db'}", monkeypatch, ASR_HEARTBEAT_S="0.2",
                                ASR_TIME_SCALE="600")


def run(step_id: str):
    return execute_step(step_id, task_id=f"task-{step_id}", worker="test-worker", emit_event=lambda **_: None)


def steps(job_id: str) -> list[dict]:
    return get_job(job_id)["steps"]


def two_stage_job(first: str = OK, second: str = OK) -> str:
    return start_job(KIND.name, lock_key="item:x", stages=[
        [StepSpec("A", first, "orchestration"), StepSpec("B", OK, "host.h1")],
        [StepSpec("C", second, "recovery")],
    ])


def test_start_job_records_steps_and_locks_then_dispatches_its_first_stage(dispatcher):
    job_id = two_stage_job()
    recorded = steps(job_id)
    assert [(s["name"], s["state"]) for s in recorded] == [("A", "queued"), ("B", "queued"), ("C", "pending")]
    assert dispatcher.sent == [[recorded[0]["id"], recorded[1]["id"]]]
    with pytest.raises(Exception, match="busy"):
        two_stage_job()


@pytest.mark.parametrize(("kind", "stage", "message"), [
    ("no.such.kind", [StepSpec("A", OK, "orchestration")], "no job kind 'no.such.kind' is declared"),
    (KIND.name, [StepSpec("A", actions.COPY_DISK, "orchestration")], "is not one the test.core job kind"),
    (KIND.name, [StepSpec("A", OK, "host.../etc")], "stage 0 step 0"),
])
def test_a_job_its_kind_does_not_allow_is_refused_and_nothing_is_written(dispatcher, kind, stage, message):
    with pytest.raises(ValueError, match=message):
        start_job(kind, lock_key="item:y", stages=[stage])
    with session_scope() as session:
        assert session.exec(select(Job)).all() == []
    assert dispatcher.sent == []


def test_steps_succeed_stage_by_stage_and_the_last_one_settles_the_job_and_its_hooks(dispatcher):
    job_id = two_stage_job()
    first, second, last = (s["id"] for s in steps(job_id))
    assert run(last).advance is False, "a step whose earlier stage is not done is not claimed"
    assert run(first).advance is True
    assert dispatcher.sent[1:] == [], "the stage is not complete yet"
    assert run(first).state is StepState.succeeded, "a redelivered message finds the step done and lets it go on"
    assert run(second).advance is True
    assert dispatcher.sent[1:] == [[last]], "the step that completed the stage sent the next one, once"
    assert run(second).state is StepState.succeeded and dispatcher.sent[1:] == [[last]]
    assert run(last).state is StepState.succeeded
    job = get_job(job_id)
    assert job["state"] == "succeeded" and job["hook_pending"] is True
    assert dispatcher.hooks == [job_id]
    assert run_job_hooks(job_id) is True and HOOK_CALLS == [(job_id, "succeeded")]
    assert run_job_hooks(job_id) is False, "hooks run once"


def test_a_recoverable_failure_waits_for_the_schedule_and_the_reconciler_relaunches_it_when_due(
        dispatcher, monkeypatch):
    # The first retry 10 s away (60 s scaled by 6), not the fixture's 0.1 s: a busy machine took longer
    # than that between the failure and the check that it is not due yet. The test makes it due itself.
    monkeypatch.setenv("ASR_TIME_SCALE", "6")
    job_id = two_stage_job(first=FLAKY)
    flaky, sibling, _ = (s["id"] for s in steps(job_id))
    assert run(sibling).state is StepState.succeeded
    outcome = run(flaky)
    assert outcome.state is StepState.waiting_retry and outcome.advance is False
    step = steps(job_id)[0]
    assert get_job(job_id)["state"] == "waiting_retry" and "storage is away" in step["error"]
    assert reconcile() == {}, "the retry is not due yet"
    with session_scope() as session:
        row = session.get(JobStep, flaky)
        row.next_attempt_at = clock.now() - timedelta(seconds=1)
        session.add(row)
    assert reconcile() == {"retry_due": 1}
    assert dispatcher.sent[-1] == [flaky], "only the step still to do is sent"
    assert run(flaky).state is StepState.waiting_retry, "claimed again once due, and failing again"


def test_a_due_retry_is_sent_once_by_two_reconcilers_that_both_saw_it_due(dispatcher, monkeypatch):
    """Before: `launch` sent a step that was `queued` again, so of two reconcilers that both read a retry as due
    (beat sends one every ASR_RECONCILE_S; two orchestration processes run them side by side) the second sent
    the step again after the first had queued it: two messages for one attempt (test_flower saw two tasks of
    attempt 2 succeed under load). Now a queued step is sent again only when its message stalled."""
    from workflows.engine.jobs import launch

    monkeypatch.setenv("ASR_TIME_SCALE", "6")
    job_id = two_stage_job(first=FLAKY)
    flaky, sibling, _ = (s["id"] for s in steps(job_id))
    assert run(sibling).state is StepState.succeeded
    assert run(flaky).state is StepState.waiting_retry
    with session_scope() as session:
        row = session.get(JobStep, flaky)
        row.next_attempt_at = clock.now() - timedelta(seconds=1)
        session.add(row)
    sent_before = len(dispatcher.sent)
    assert launch(job_id) == [flaky]
    assert launch(job_id) == [], "the second reconciler's launch finds the retry queued already"
    assert dispatcher.sent[sent_before:] == [[flaky]]
    # A message stalled past the limit is sent again (the reconciler's queued_stalled).
    with session_scope() as session:
        row = session.get(JobStep, flaky)
        row.queued_at = clock.now() - timedelta(hours=1)
        session.add(row)
    assert reconcile() == {"queued_stalled": 1} and dispatcher.sent[-1] == [flaky]
    assert len(dispatcher.sent) == sent_before + 2


def test_a_non_recoverable_failure_fails_the_job_cancels_the_rest_and_runs_the_failure_hooks(dispatcher):
    job_id = two_stage_job(first=BROKEN)
    first, second, last = (s["id"] for s in steps(job_id))
    assert run(first).state is StepState.failed
    job = get_job(job_id)
    assert job["state"] == "failed" and "the VM is gone" in job["error"]
    assert [s["state"] for s in job["steps"]] == ["failed", "cancelled", "cancelled"]
    assert run(second).state is StepState.cancelled, "a step of a failed job is never claimed"
    assert dispatcher.hooks == [job_id]
    run_job_hooks(job_id)
    assert HOOK_CALLS == [(job_id, "failed")]


def test_every_step_message_says_what_it_is_and_every_outcome_whose_it_is(dispatcher, monkeypatch):
    """What the worker turns into Flower's kwargs and the task's end state (tasks/steps.py): the job's kind,
    VM, step name and attempt on each message; a failure or a retry as the outcome of the message that ran
    it (and of that very message redelivered), not of a duplicate that found it so."""
    monkeypatch.setenv("ASR_TIME_SCALE", "6")  # the first retry 10 s away: not due during the test
    job_id = start_job(KIND.name, lock_key="item:m", params={"vm": "web01"}, stages=[
        [StepSpec("Ship logs", FLAKY, "host.h1"), StepSpec("Copy disk disk0", BROKEN, "host.h1")],
    ])
    flaky, broken = (s["id"] for s in steps(job_id))
    assert [m.describe() for m in dispatcher.messages] == [
        {"job": KIND.name, "vm": "web01", "step": "Ship logs", "attempt": 1, "job_id": job_id},
        {"job": KIND.name, "vm": "web01", "step": "Copy disk disk0", "attempt": 1, "job_id": job_id},
    ]
    assert [(m.id, m.queue, m.action) for m in dispatcher.messages] == [(flaky, "host.h1", FLAKY),
                                                                        (broken, "host.h1", BROKEN)]
    waiting = run(flaky)
    assert (waiting.state, waiting.own, waiting.step_name) == (StepState.waiting_retry, True, "Ship logs")
    assert "storage is away" in waiting.error and waiting.next_attempt_at > clock.now()
    duplicate = execute_step(flaky, task_id="another-message", worker="w", emit_event=lambda **_: None)
    assert (duplicate.state, duplicate.own) == (StepState.waiting_retry, False)
    failed = run(broken)
    assert (failed.state, failed.own, failed.error) == (StepState.failed, True, "the VM is gone")
    assert run(broken).own is True, "the same message redelivered: the failure is still its own"
    assert execute_step(broken, task_id="another-message", worker="w", emit_event=lambda **_: None).own is False
    # A retry the reconciler sends is the step's next attempt; a job without a VM names none.
    dispatcher.messages.clear()
    retried_job = start_job(KIND.name, lock_key="item:n", stages=[[StepSpec("Flaky", FLAKY, "orchestration")]])
    (retried,) = (s["id"] for s in steps(retried_job))
    assert run(retried).state is StepState.waiting_retry
    with session_scope() as session:
        row = session.get(JobStep, retried)
        row.next_attempt_at = clock.now() - timedelta(seconds=1)
        session.add(row)
    assert reconcile() == {"retry_due": 1}
    assert [m.describe() for m in dispatcher.messages] == [
        {"job": KIND.name, "step": "Flaky", "attempt": attempt, "job_id": retried_job} for attempt in (1, 2)
    ]


def test_the_next_stage_sent_when_a_stage_completes_is_described_as_the_first_is(dispatcher):
    """`advance` describes the messages of the stage it sends in its own transaction (not through _messages)."""
    job_id = start_job(KIND.name, lock_key="item:d", params={"vm": "web02"}, stages=[
        [StepSpec("Seal", OK, "orchestration")], [StepSpec("Ship logs", OK, "host.h1")],
    ])
    first, second = (s["id"] for s in steps(job_id))
    dispatcher.messages.clear()
    assert run(first).state is StepState.succeeded
    assert [(m.id, m.queue, m.action, m.describe()) for m in dispatcher.messages] == [
        (second, "host.h1", OK, {"job": KIND.name, "vm": "web02", "step": "Ship logs", "attempt": 1,
                                 "job_id": job_id}),
    ]


def test_a_job_the_broker_refused_is_recorded_and_the_reconciler_launches_it_later(dispatcher, monkeypatch):
    monkeypatch.setenv("ASR_STALE_AFTER_S", "0.2")
    dispatcher.refuse = True
    job_id = two_stage_job()
    assert [s["state"] for s in steps(job_id)] == ["pending", "pending", "pending"]
    dispatcher.refuse = False
    with session_scope() as session:
        job = session.get(Job, job_id)
        job.created_at = clock.now() - timedelta(seconds=5)
        session.add(job)
    assert reconcile() == {"continuation_lost": 1}
    assert [s["state"] for s in steps(job_id)] == ["queued", "queued", "pending"]


def test_a_step_whose_worker_died_is_relaunched_then_fails_as_poison(dispatcher, monkeypatch):
    monkeypatch.setenv("ASR_STALE_AFTER_S", "0.2")
    monkeypatch.setenv("ASR_MAX_STEP_DEATHS", "2")
    job_id = start_job(KIND.name, lock_key=None, stages=[[StepSpec("A", OK, "orchestration")]])
    step_id = steps(job_id)[0]["id"]

    def die_while_running(task_id: str) -> None:
        with session_scope() as session:
            row = session.get(JobStep, step_id)
            row.state, row.heartbeat_at, row.lease = StepState.running, clock.now() - timedelta(seconds=5), "dead"
            row.celery_task_id = task_id
            session.add(row)

    die_while_running("first-run")
    assert reconcile() == {"relaunched_stale": 1}
    assert steps(job_id)[0]["deaths"] == 1
    die_while_running("second-run")
    assert reconcile() == {"poisoned": 1}
    job = get_job(job_id)
    assert job["state"] == "failed" and "worker died 2 times" in job["error"]
    assert job["error_class"] == "workflows.engine.errors.PoisonStepError"
    # Each dead run's task is reported as ended: retried while the step runs again, then failed.
    assert [(task, failed) for task, failed, _ in dispatcher.lost_runs] == [("first-run", False), ("second-run", True)]
    assert "worker died 2 times" in dispatcher.lost_runs[1][2]


def test_a_step_whose_worker_vanished_during_broker_outages_is_interrupted_never_poisoned(dispatcher, monkeypatch):
    monkeypatch.setenv("ASR_STALE_AFTER_S", "0.2")
    monkeypatch.setenv("ASR_MAX_STEP_DEATHS", "2")
    job_id = start_job(KIND.name, lock_key=None, stages=[[StepSpec("A", OK, "orchestration")]])
    step_id = steps(job_id)[0]["id"]

    def vanish_while_running(*, broker_lost: bool, task_id: str = "lost-task") -> None:
        with session_scope() as session:
            row = session.get(JobStep, step_id)
            row.state, row.heartbeat_at, row.lease = StepState.running, clock.now() - timedelta(seconds=5), "dead"
            row.celery_task_id, row.broker_lost_at = task_id, None  # as its claim left it
            session.add(row)
        if broker_lost:
            assert record_broker_lost([task_id, "a task of another step"]) == 1

    for outage in range(1, 4):  # more outages than the deaths that poison
        vanish_while_running(broker_lost=True)
        assert reconcile() == {"relaunched_interrupted": 1}
        assert (steps(job_id)[0]["deaths"], steps(job_id)[0]["interruptions"]) == (0, outage)
    # A redelivered message claiming the vanished run's step counts it the same way.
    vanish_while_running(broker_lost=True, task_id=f"task-{step_id}")
    assert run(step_id).state is StepState.succeeded
    step = steps(job_id)[0]
    assert (step["deaths"], step["interruptions"], step["broker_lost_at"]) == (0, 4, None)


def test_a_run_that_came_through_an_outage_dies_as_a_death(dispatcher, monkeypatch):
    monkeypatch.setenv("ASR_STALE_AFTER_S", "0.2")
    job_id = start_job(KIND.name, lock_key=None, stages=[[StepSpec("A", OK, "orchestration")]])
    step_id = steps(job_id)[0]["id"]
    with session_scope() as session:
        row = session.get(JobStep, step_id)
        row.state, row.heartbeat_at, row.lease, row.celery_task_id = StepState.running, clock.now(), "alive", "t1"
        session.add(row)
    assert record_broker_lost(["t1"]) == 1
    assert record_broker_back(["t1"]) == 1  # its worker reconnected with the step still running
    with session_scope() as session:
        row = session.get(JobStep, step_id)
        row.heartbeat_at = clock.now() - timedelta(seconds=5)
        session.add(row)
    assert reconcile() == {"relaunched_stale": 1}
    assert (steps(job_id)[0]["deaths"], steps(job_id)[0]["interruptions"]) == (1, 0)


@pytest.mark.parametrize("order", ["first, then second", "second, then first"])
def test_the_next_stage_starts_when_the_last_step_of_a_re_driven_stage_finishes_whatever_the_order(
        dispatcher, monkeypatch, order):
    """Both steps of a two-disk stage lost their worker and were re-driven (the chaos case): the next stage
    is sent by whichever finishes last, at once, without waiting for the reconciler."""
    monkeypatch.setenv("ASR_STALE_AFTER_S", "0.2")
    job_id = two_stage_job()
    first, second, last = (s["id"] for s in steps(job_id))
    with session_scope() as session:
        for step_id in (first, second):
            row = session.get(JobStep, step_id)
            row.state, row.heartbeat_at, row.lease = StepState.running, clock.now() - timedelta(seconds=5), "dead"
            session.add(row)
    assert reconcile() == {"relaunched_stale": 2}
    runs = (first, second) if order == "first, then second" else (second, first)
    assert run(runs[0]).state is StepState.succeeded and last not in sum(dispatcher.sent, [])
    assert run(runs[1]).state is StepState.succeeded
    assert dispatcher.sent[-1] == [last]
    assert steps(job_id)[2]["state"] == "queued"
    assert run(last).state is StepState.succeeded and get_job(job_id)["state"] == "succeeded"


def test_a_next_stage_the_broker_refused_is_sent_by_the_reconciler_later(dispatcher, monkeypatch):
    monkeypatch.setenv("ASR_STALE_AFTER_S", "0.2")
    job_id = two_stage_job()
    first, second, last = (s["id"] for s in steps(job_id))
    run(first)
    dispatcher.refuse = True
    assert run(second).state is StepState.succeeded, "the step is recorded even though the next stage waits"
    assert steps(job_id)[2]["state"] == "pending"
    dispatcher.refuse = False
    with session_scope() as session:
        for step_id in (first, second):
            row = session.get(JobStep, step_id)
            row.ended_at = clock.now() - timedelta(seconds=5)
            session.add(row)
    assert reconcile() == {"continuation_lost": 1}
    assert dispatcher.sent[-1] == [last]


def test_a_poisoned_job_resumes_from_the_step_where_it_stopped_as_the_same_job(dispatcher, monkeypatch):
    monkeypatch.setenv("ASR_STALE_AFTER_S", "0.2")
    monkeypatch.setenv("ASR_MAX_STEP_DEATHS", "1")
    job_id = two_stage_job()
    first, second, last = (s["id"] for s in steps(job_id))
    assert run(second).state is StepState.succeeded
    with session_scope() as session:
        row = session.get(JobStep, first)
        row.state, row.heartbeat_at, row.lease = StepState.running, clock.now() - timedelta(seconds=5), "dead"
        session.add(row)
    assert reconcile() == {"poisoned": 1}
    assert get_job(job_id)["state"] == "failed" and run_job_hooks(job_id)
    with pytest.raises(JobStateError, match="only a failed or cancelled job"):
        reopen(two_stage_job_on("item:other"))
    blocker = start_job(KIND.name, lock_key="item:x", stages=[[StepSpec("Hold", OK, "orchestration")]])
    with pytest.raises(ItemBusyError, match=f"held by job {blocker}"):
        reopen(job_id)
    assert get_job(job_id)["state"] == "failed", "a refused resume changes nothing"
    run(steps(blocker)[0]["id"])
    assert reopen(job_id) == [first], "only the step that stopped is sent; the one that succeeded is kept"
    resumed = get_job(job_id)
    assert resumed["state"] == "queued" and resumed["error"] is None
    assert [(s["state"], s["deaths"]) for s in resumed["steps"]] == [("queued", 0), ("succeeded", 0), ("pending", 0)]
    assert run(first).state is StepState.succeeded and dispatcher.sent[-1] == [last]
    assert run(last).state is StepState.succeeded and get_job(job_id)["state"] == "succeeded"


def two_stage_job_on(lock: str) -> str:
    return start_job(KIND.name, lock_key=lock, stages=[[StepSpec("A", OK, "orchestration")]])


# ---- the reconciler's pure decisions ------------------------------------------------------------------
SETTINGS = EngineSettings(heartbeat_s=1, stale_after_s=3, max_step_deaths=3, queued_stall_s=60)


def _step(stage: int, state: StepState, **fields) -> JobStep:
    return JobStep(job_id="j", stage=stage, index=0, name="s", action=OK, queue="orchestration", state=state,
                   **fields)


@pytest.mark.parametrize(("rows", "expected"), [
    ([_step(0, StepState.succeeded), _step(1, StepState.pending)], "continuation_lost"),
    ([_step(0, StepState.succeeded, ended_at="recent"), _step(1, StepState.pending)], None),
    ([_step(0, StepState.queued, queued_at="long ago")], "queued_stalled"),
    ([_step(0, StepState.queued, queued_at="recent")], None),
    ([_step(0, StepState.waiting_retry, next_attempt_at="long ago"), _step(1, StepState.pending)], "retry_due"),
    ([_step(0, StepState.waiting_retry, next_attempt_at="later"), _step(1, StepState.pending)], None),
    ([_step(0, StepState.waiting_action), _step(1, StepState.pending)], None),
    ([_step(0, StepState.running), _step(1, StepState.pending)], None),
])
def test_relaunch_reason(rows, expected):
    now = clock.now()
    moments = {"recent": now - timedelta(seconds=1), "long ago": now - timedelta(seconds=600),
               "later": now + timedelta(seconds=60)}
    for row in rows:
        for name in ("ended_at", "queued_at", "next_attempt_at"):
            if isinstance(getattr(row, name), str):
                setattr(row, name, moments[getattr(row, name)])
        if row.state is StepState.succeeded and row.ended_at is None:
            row.ended_at = moments["long ago"]
    job = Job(kind=KIND.name, state=JobState.running, created_at=moments["long ago"])
    assert relaunch_reason(job, rows, now, SETTINGS) == expected


@pytest.mark.parametrize(("finished", "deaths", "broker_lost", "expected"), [
    (True, 1, False, "stopped"), (False, 1, False, "relaunched_stale"), (False, 2, False, "relaunched_stale"),
    (False, 3, False, "poisoned"), (True, 3, True, "stopped"), (False, 3, True, "relaunched_interrupted"),
])
def test_stale_step_outcome(finished, deaths, broker_lost, expected):
    assert stale_step_outcome(finished, deaths, SETTINGS, broker_lost=broker_lost) == expected


@pytest.fixture
def dispatcher_on_postgresql(db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[RecordingDispatcher]:
    """`dispatcher`, on a PostgreSQL schema of the test's own: two transactions there run side by side, each
    reading what was committed when its statement started (SQLite runs one writer at a time)."""
    yield from recording_engine(db_url, monkeypatch)


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_the_last_two_steps_finishing_at_once_still_finish_the_job(dispatcher_on_postgresql, monkeypatch):
    """Two parallel steps of the last stage succeed at the same moment on PostgreSQL: each transaction's check
    for the job's end sees the other step still running, so neither ends the job in its transaction. The one
    that looks after both committed must end it (a job otherwise stays running for ever, every step done)."""
    job_id = start_job(KIND.name, lock_key="item:z", stages=[
        [StepSpec("A", OK, "orchestration"), StepSpec("B", OK, "host.h1")],
    ])
    first, second = (s["id"] for s in steps(job_id))
    both_checked = threading.Barrier(2, timeout=20)
    checked_in_transaction = engine_steps.finish_if_complete

    def side_by_side(connection, job, now):
        settled = checked_in_transaction(connection, job, now)
        both_checked.wait()  # neither commits before the other has made its check
        return settled

    monkeypatch.setattr(engine_steps, "finish_if_complete", side_by_side)
    with ThreadPoolExecutor(max_workers=2) as pool:
        outcomes = list(pool.map(run, (first, second)))
    assert [outcome.state for outcome in outcomes] == [StepState.succeeded, StepState.succeeded]
    job = get_job(job_id)
    assert (job["state"], job["hook_pending"]) == ("succeeded", True), job
    assert dispatcher_on_postgresql.hooks == [job_id]


def test_the_reconciler_ends_an_active_job_whose_every_step_is_done(dispatcher):
    """What the steps' own ends would miss (their worker gone between the step's commit and the look at the
    job), the reconciler makes good: the job ends succeeded and its hooks become due, once."""
    job_id = start_job(KIND.name, lock_key="item:w", stages=[[StepSpec("A", OK, "orchestration")]])
    (step_id,) = (s["id"] for s in steps(job_id))
    with session_scope() as session:
        row = session.get(JobStep, step_id)
        row.state, row.ended_at = StepState.succeeded, clock.now()
        session.add(row)
    assert get_job(job_id)["state"] == "queued"
    assert reconcile() == {"finished": 1}
    job = get_job(job_id)
    assert (job["state"], job["hook_pending"]) == ("succeeded", True)
    assert dispatcher.hooks == [job_id]
    assert reconcile() == {}, "ended once"


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_two_steps_of_a_stage_finishing_at_once_send_the_next_stage_once(dispatcher_on_postgresql, monkeypatch):
    """The stage's last open step queues the next stage in its own success transaction. Two steps of one stage
    succeeding at the same moment each see the other still open there, so neither queues it in its
    transaction: the one that looks after both committed sends it, once."""
    job_id = two_stage_job()
    first, second, last = (s["id"] for s in steps(job_id))
    both_checked = threading.Barrier(2, timeout=20)
    queued_in_transaction = engine_steps.queue_next_stage
    seen_in_transaction = []

    def side_by_side(connection, job, stage):
        queued = queued_in_transaction(connection, job, stage)
        seen_in_transaction.append(queued)
        both_checked.wait()  # neither commits before the other has looked at the stage
        return queued

    monkeypatch.setattr(engine_steps, "queue_next_stage", side_by_side)
    with ThreadPoolExecutor(max_workers=2) as pool:
        outcomes = list(pool.map(run, (first, second)))
    assert [outcome.state for outcome in outcomes] == [StepState.succeeded, StepState.succeeded]
    assert seen_in_transaction == [None, None], "each saw the other step open in its transaction"
    assert sum(dispatcher_on_postgresql.sent, []).count(last) == 1
    assert steps(job_id)[2]["state"] == "queued"


def test_a_step_that_completes_its_stage_commits_twice_and_sends_the_next_stage(dispatcher):
    """The claim is one transaction; the success, the job's end check and the next stage's queueing are the
    second (the engine's overhead over a bare Celery chain, docs/benchmarks.md). The stage is sent after it."""
    import sqlalchemy as sa

    from models.db import get_engine

    job_id = start_job(KIND.name, lock_key="item:c", stages=[
        [StepSpec("Seal", OK, "orchestration")], [StepSpec("Ship logs", OK, "host.h1")],
    ])
    first, second = (s["id"] for s in steps(job_id))
    commits = []

    def count(_connection):
        commits.append(1)

    sa.event.listen(get_engine(), "commit", count)
    try:
        assert run(first).state is StepState.succeeded
    finally:
        sa.event.remove(get_engine(), "commit", count)
    assert len(commits) == 2, commits
    assert dispatcher.sent[-1] == [second] and steps(job_id)[1]["state"] == "queued"


def test_a_step_whose_queue_the_worker_may_not_serve_is_left_as_it_was(dispatcher):
    """`may_run` (the host identity check of tasks/host_identity.py) gets the claimed step's queue inside the
    claim; a refusal rolls the claim back: the step stays queued, no attempt counted, nothing ran."""
    job_id = two_stage_job()
    first, second, _ = (s["id"] for s in steps(job_id))
    asked = []

    def refuse_host_queues(queue):
        asked.append(queue)
        return "not this host's agent" if queue.startswith("host.") else None

    def run_checked(step_id):
        return execute_step(step_id, task_id=f"task-{step_id}", worker="impostor", emit_event=lambda **_: None,
                            may_run=refuse_host_queues)

    before = steps(job_id)[1]
    refused = run_checked(second)
    assert (refused.refused, refused.state, refused.own, refused.advance) == ("not this host's agent", None,
                                                                              False, False)
    assert steps(job_id)[1] == before, "the refused claim changed the step"
    assert run_checked(first).state is StepState.succeeded
    assert asked == ["host.h1", "orchestration"]


def test_a_step_whose_message_came_on_another_queue_is_left_as_it_was(dispatcher):
    """Whoever may push to a queue can push any step's id there: a host's agent fed the id of a recovery
    step on its own queue refuses it in the claim (misdelivered: the message is dropped), the step stays as
    it was; on its own queue it runs."""
    job_id = two_stage_job()

    def delivered(step_id, queue):
        return execute_step(step_id, task_id=f"task-{queue}", worker="host-h1", emit_event=lambda **_: None,
                            delivered_on=queue, may_run=lambda _: None)

    first, second = (s["id"] for s in steps(job_id)[:2])
    assert delivered(first, "orchestration").state is StepState.succeeded
    assert delivered(second, "host.h1").state is StepState.succeeded
    later = steps(job_id)[2]
    assert (later["queue"], later["state"]) == ("recovery", "queued")
    refused = delivered(later["id"], "host.h1")
    assert (refused.misdelivered, refused.state, refused.own, refused.advance) == (True, None, False, False)
    assert "belongs to queue 'recovery', not to 'host.h1'" in refused.refused, refused.refused
    assert steps(job_id)[2] == later, "the refused claim changed the step"
    assert delivered(later["id"], "recovery").state is StepState.succeeded
