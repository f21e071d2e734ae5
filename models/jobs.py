"""Jobs, their steps, and the locks that keep one workflow at a time on a protected item.

A job is what the Jobs tab lists ("Enable protection", "Resynchronize", ...). Its steps run in stages:
stages one after another, the steps of a stage in parallel. The rows here are the source of truth the
engine (workflows/engine.py) drives; Redis only carries the messages that wake workers up.
"""
from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from models.db import UtcDateTime, clock_now, new_id, string_enum

__all__ = [
    "JobState", "StepState", "Job", "JobStep", "JobLock",
    "ACTIVE_JOB_STATES", "FINISHED_JOB_STATES", "DONE_STEP_STATES",
]


class JobState(enum.StrEnum):
    queued = "queued"
    running = "running"
    waiting_retry = "waiting_retry"
    # A manual action waits for someone to do it and resume the job; the job keeps its locks meanwhile.
    waiting_action = "waiting_action"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


class StepState(enum.StrEnum):
    pending = "pending"  # no message for it is on the broker yet (a later stage, or a launch not sent)
    queued = "queued"  # a message for it was sent at queued_at
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    waiting_retry = "waiting_retry"  # failed recoverably; due again at next_attempt_at
    waiting_action = "waiting_action"  # a manual action: done when an operator resumes the job
    skipped = "skipped"
    cancelled = "cancelled"


ACTIVE_JOB_STATES = (JobState.queued, JobState.running, JobState.waiting_retry, JobState.waiting_action)
FINISHED_JOB_STATES = (JobState.succeeded, JobState.failed, JobState.cancelled)
# A stage is complete when every step in it is in one of these; the next stage may then start.
DONE_STEP_STATES = (StepState.succeeded, StepState.skipped)


class Job(SQLModel, table=True):
    __tablename__ = "job"

    id: str = Field(default_factory=new_id, primary_key=True, max_length=36)
    kind: str = Field(index=True, max_length=64)
    target: str | None = Field(default=None, index=True, max_length=255)
    # The job's lock when it holds exactly one (the usual case: one protected item); lock_keys lists
    # every key it holds, one or many (a recovery plan holds the lock of each of its items).
    lock_key: str | None = Field(default=None, max_length=255)
    lock_keys: list[str] = Field(default_factory=list, sa_type=sa.JSON)
    state: JobState = Field(default=JobState.queued, sa_type=string_enum(JobState), index=True)
    params: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON)
    created_at: datetime = Field(default_factory=clock_now, sa_type=UtcDateTime)
    started_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    ended_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    error: str | None = Field(default=None, sa_type=sa.Text)
    error_class: str | None = Field(default=None, max_length=255)
    # Set once the job has finished and no step of it is still running: its lock is released then, and
    # its hooks become due (hook_pending) until one run of them commits.
    settled_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    hook_pending: bool = Field(default=False, index=True)
    hook_error: str | None = Field(default=None, sa_type=sa.Text)


class JobStep(SQLModel, table=True):
    __tablename__ = "job_step"
    __table_args__ = (sa.UniqueConstraint("job_id", "stage", "index"),)

    id: str = Field(default_factory=new_id, primary_key=True, max_length=36)
    job_id: str = Field(foreign_key="job.id", index=True, max_length=36)
    stage: int
    index: int
    name: str = Field(max_length=255)
    action: str = Field(max_length=255)
    queue: str = Field(max_length=255)
    params: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON)
    state: StepState = Field(default=StepState.pending, sa_type=string_enum(StepState), index=True)
    attempts: int = 0
    # Runs whose worker vanished while running it: a step that keeps killing its worker is a poison message
    # (ASR_MAX_STEP_DEATHS). Runs ended by a broker outage are not its fault and count as interruptions.
    deaths: int = 0
    interruptions: int = 0
    # Set by the worker running the step when its broker connection dropped; cleared when it reconnects,
    # when the run ends by itself, and at the next claim. If the run vanishes meanwhile, the outage ended
    # it, not the step.
    broker_lost_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    started_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    ended_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    heartbeat_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    queued_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    next_attempt_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    error: str | None = Field(default=None, sa_type=sa.Text)
    error_class: str | None = Field(default=None, max_length=255)
    # What a manual action asks the operator to do (shown while it waits, kept after the resume).
    instructions: str | None = Field(default=None, sa_type=sa.Text)
    celery_task_id: str | None = Field(default=None, max_length=64)
    worker: str | None = Field(default=None, max_length=255)
    lease: str | None = Field(default=None, max_length=36)
    progress_done: int = 0
    progress_total: int = 0
    result: dict[str, Any] | None = Field(default=None, sa_type=sa.JSON)


class JobLock(SQLModel, table=True):
    """One row per locked key (e.g. "item:<id>"): inserting a second row for a key fails, which is the
    lock. A job may hold several keys, all taken when it is created; it deletes them when it settles."""

    __tablename__ = "job_lock"

    lock_key: str = Field(primary_key=True, max_length=255)
    job_id: str = Field(foreign_key="job.id", index=True, max_length=36)
    acquired_at: datetime = Field(default_factory=clock_now, sa_type=UtcDateTime)
