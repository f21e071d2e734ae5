"""The alerts route: GET /api/v1/alerts, for a reader key (docs/operations.md, "Alerts")."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query

from api import service

from .roles import READER

router = APIRouter()


@router.get("/alerts", dependencies=[READER], tags=["alerts"], summary="Alerts raised and resolved, newest first",
            description=("Each raise or resolution of a condition (vm_critical, rpo_threshold, host_silent, "
                         "operation_failed, drill_overdue) and its delivery to the webhook (delivered, pending, "
                         "given up, not sent)."))
def alerts(active: bool = Query(False, description="Only conditions that still hold"),
           limit: int = Query(100, ge=1, le=1000)) -> list[dict[str, Any]]:
    return service.list_alerts(active=active, limit=limit)
