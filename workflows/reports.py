"""Reports read from the records the workflows keep."""
from __future__ import annotations

from typing import Any

from datapath.errors import NonRecoverableError
from models.db import session_scope
from models.failover import FailoverKind, FailoverRecord, FailoverStatus


def failover_report(record_id: str) -> dict[str, Any]:
    """A failover's record as plain JSON: the drill report (point, roots and their check, RTO, RPO)."""
    with session_scope() as session:
        record = session.get(FailoverRecord, record_id)
        if record is None:
            raise NonRecoverableError(f"no failover record {record_id}")
        plain = record.model_dump()
    return {key: (value.isoformat() if hasattr(value, "isoformat") else
                  str(value) if isinstance(value, (FailoverKind, FailoverStatus)) else value)
            for key, value in plain.items()}
