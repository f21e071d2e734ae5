"""The Prometheus metrics route: GET /api/v1/metrics, for a reader key (docs/operations.md, "Metrics")."""
from __future__ import annotations

from fastapi import APIRouter, Response

from api import service

from .roles import READER

router = APIRouter()


@router.get("/metrics", dependencies=[READER], tags=["metrics"], response_class=Response,
            responses={200: {"content": {"text/plain": {}}, "description": "The Prometheus text format"}},
            summary="Prometheus metrics of the whole deployment, read from the database",
            description=("Per-VM RPO, its thresholds, health and replication state, unsent logs; jobs by kind and "
                         "state; step durations; bytes replicated; drills and the age of the last passed one. "
                         "Computed from the database at each scrape, so any API process answers for every worker. "
                         "Scrape with a reader key (`authorization: {credentials: <key>}` in Prometheus)."))
def metrics() -> Response:
    body, content_type = service.metrics()
    return Response(body, media_type=content_type)
