"""Broker outages, as the engine counts them: a run that ends because its worker lost the broker is an
interruption, not a death.

A worker whose broker connection drops marks the steps it is running (`broker_lost_at`, by the Celery
task ids of its active requests) and clears the mark when it reconnects with them still running. A run
that vanishes while marked (its worker was restarted, or died, during the outage) is then counted in
`interruptions` by the reconciler or by the claim of its redelivered message, never in `deaths`: three
Redis restarts must not make a long copy look like a poison message.
"""
from __future__ import annotations

import logging
from collections.abc import Collection
from datetime import datetime

import sqlalchemy as sa

from models.db import get_engine
from models.jobs import JobStep, StepState
from workflows import clock
from workflows.engine.statements import update_rows

logger = logging.getLogger(__name__)


def record_broker_lost(task_ids: Collection[str], *, at: datetime | None = None) -> int:
    """The worker running the Celery tasks `task_ids` lost its broker connection `at` (now): mark their
    running steps (a mark already there, from the same outage, is kept). Returns how many it marked."""
    marked = _mark(task_ids, JobStep.broker_lost_at.is_(None), at or clock.now(), "mark lost")
    if marked:
        logger.warning("broker connection lost while running %d step(s): if their runs end before it is "
                       "back, they count as interruptions, not deaths", marked)
    return marked


def record_broker_back(task_ids: Collection[str]) -> int:
    """The worker running `task_ids` has its broker connection again and the steps still run: their runs
    came through the outage, so a later death of theirs is a death. Returns how many it cleared."""
    cleared = _mark(task_ids, JobStep.broker_lost_at.is_not(None), None, "clear")
    if cleared:
        logger.info("broker connection back; %d running step(s) came through the outage", cleared)
    return cleared


def _mark(task_ids: Collection[str], unless_done: sa.ColumnElement[bool], value: datetime | None, what: str) -> int:
    if not task_ids:
        return 0
    try:
        with get_engine().begin() as connection:
            return connection.execute(update_rows(JobStep).where(
                JobStep.celery_task_id.in_(list(task_ids)), JobStep.state == StepState.running, unless_done,
            ).values(broker_lost_at=value)).rowcount
    except sa.exc.SQLAlchemyError as exc:
        # Called from the worker's consumer: a database out of reach costs the mark, never the worker.
        logger.warning("could not %s the broker outage of %d running task(s): %s", what, len(task_ids), exc)
        return 0
