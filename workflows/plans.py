"""Transitional names of the recovery plan workflows (now workflows/kinds/recovery_plan.py); removed once
every caller imports the kind directly."""
from workflows.engine import resume as _resume
from workflows.kinds.recovery_plan import PLAN_OPTIONS, plan_lock_key, start_plan  # noqa: F401


def resume_plan(job_id: str, note: str = "") -> list[str]:
    return _resume(job_id, note=note)
