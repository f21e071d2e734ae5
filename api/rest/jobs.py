"""Routes of jobs: list and show them, follow one as server-sent events, cancel, retry, restart or resume it."""
from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, NamedTuple

import anyio
from fastapi import APIRouter, Depends, Query, Response
from fastapi.sse import EventSourceResponse, ServerSentEvent
from pydantic import Field

from api import service

from .common import ACCEPTED, JSON_ERRORS, QUALIFIED_NAME_CHARS, QUALIFIED_NAME_PATTERN, JobIdPath, _Body, _started
from .roles import OPERATOR, READER

router = APIRouter()


# ---- request bodies ----------------------------------------------------------------------------------------
class ResumeIn(_Body):
    note: str = Field("", max_length=4096)


# ---- routes ------------------------------------------------------------------------------------------------
@router.get("/jobs", dependencies=[READER], tags=["jobs"], summary="List jobs, newest first")
def list_jobs(state: Annotated[str | None, Query(max_length=32, description="A job state, e.g. running")] = None,
              kind: Annotated[str | None, Query(max_length=64, description="A job kind, e.g. test_failover")] = None,
              vm: Annotated[str | None, Query(max_length=QUALIFIED_NAME_CHARS, pattern=QUALIFIED_NAME_PATTERN,
                                              description="VM name, 'host/name' or id")] = None,
              plan: Annotated[str | None, Query(max_length=64, description="A recovery plan's runs")] = None,
              limit: Annotated[int, Query(ge=1, le=service.MAX_JOB_LIMIT)] = 50) -> list[dict[str, Any]]:
    return service.list_jobs(state=state, kind=kind, vm=vm, plan=plan, limit=limit)


@router.get("/jobs/{job_id}", dependencies=[READER], tags=["jobs"],
            summary="A job: steps, progress, errors, next attempt times, manual instructions")
def show_job(job_id: JobIdPath) -> dict[str, Any]:
    return service.show_job(job_id)


class _Watch(NamedTuple):
    job_id: str
    first: dict[str, Any]
    interval: float
    timeout: float | None


async def _watch(
    job_id: JobIdPath,
    interval: Annotated[float, Query(ge=0.05, le=60, description="Seconds between polls")] = 0.5,
    timeout: Annotated[float | None, Query(gt=0, le=service.MAX_WATCH_S,
                                           description="Stop after this many seconds")] = None,
) -> _Watch:
    # A dependency, so an unknown job is a 404 before the stream starts.
    service.check_watch(interval, timeout)
    return _Watch(job_id, await anyio.to_thread.run_sync(service.job_snapshot, job_id), interval, timeout)


@router.get("/jobs/{job_id}/events", dependencies=[READER], tags=["jobs"], response_class=EventSourceResponse,
            responses=JSON_ERRORS,  # the stream's errors (unknown job, bad interval) are JSON, as everywhere
            summary="Server-sent events of the job until it ends",
            description=("Each event's data is a snapshot of the job (state, percent, steps with progress), sent "
                         "when it changes. Event 'progress' while it runs, 'end' for the last snapshot once it has "
                         "finished, 'timeout' if the timeout passed first. Comments keep a quiet stream alive."))
async def job_events(watch: Annotated[_Watch, Depends(_watch)]) -> AsyncIterator[ServerSentEvent]:
    # Polled here, not through service.job_events: a watcher then holds a worker thread only while it reads
    # the job, not for the whole life of its stream.
    deadline = None if watch.timeout is None else time.monotonic() + watch.timeout
    current, number = watch.first, 0
    yield ServerSentEvent(data=current, id="0", event="end" if current["finished"] else "progress")
    while not current["finished"]:
        if deadline is not None and time.monotonic() >= deadline:
            yield ServerSentEvent(data=current, event="timeout")
            return
        await anyio.sleep(watch.interval)
        latest = await anyio.to_thread.run_sync(service.job_snapshot, watch.job_id)
        if latest != current:
            current, number = latest, number + 1
            yield ServerSentEvent(data=current, id=str(number), event="end" if current["finished"] else "progress")


@router.post("/jobs/{job_id}/cancel", dependencies=[OPERATOR], tags=["jobs"], summary="Cancel a job")
def cancel_job(job_id: JobIdPath) -> dict[str, Any]:
    return service.cancel_job(job_id)


@router.post("/jobs/{job_id}/retry", dependencies=[OPERATOR], tags=["jobs"], status_code=202,
             summary="Run the steps waiting for a retry now")
def retry_job(job_id: JobIdPath, response: Response) -> dict[str, Any]:
    return _started(response, service.retry_job(job_id))


@router.post("/jobs/{job_id}/restart", dependencies=[OPERATOR], tags=["jobs"],
             summary="The way out of a failed or cancelled job: resume it where it stopped, or start it again",
             **ACCEPTED)
def restart_job(job_id: JobIdPath, response: Response) -> dict[str, Any]:
    return _started(response, service.restart_job(job_id))


@router.post("/jobs/{job_id}/resume", dependencies=[OPERATOR], tags=["jobs"], status_code=202,
             summary="Resume a job waiting on a manual action")
def resume_job(job_id: JobIdPath, response: Response, body: ResumeIn | None = None) -> dict[str, Any]:
    return _started(response, service.resume_job(job_id, note=body.note if body else ""))
