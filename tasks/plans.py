"""The actions of recovery plans: a group's scripts and manual actions (the VMs' own steps are the
failover actions of tasks/failover.py)."""
from __future__ import annotations

import os
import subprocess
from typing import Any

from datapath.errors import NonRecoverableError
from workflows import actions as A
from workflows.engine import AwaitingOperator, StepContext, action

# What the job records of a script's output: enough to see why it failed.
OUTPUT_TAIL_CHARS = 2000


@action(A.RUN_SCRIPT)
def run_script(ctx: StepContext, *, plan_id: str, command: list[str], timeout_s: float) -> dict[str, Any]:
    """Run a plan's script on this orchestration worker; a non-zero exit or a timeout fails the plan.
    The script sees the plan and job in ASR_PLAN_ID and ASR_JOB_ID."""
    env = {**os.environ, "ASR_PLAN_ID": plan_id, "ASR_JOB_ID": ctx.job_id}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env, check=False)
    except FileNotFoundError:
        raise NonRecoverableError(f"{ctx.step_name}: program {command[0]!r} not found on this worker") from None
    except subprocess.TimeoutExpired:
        raise NonRecoverableError(f"{ctx.step_name}: {command[0]!r} did not finish within {timeout_s:g} s") from None
    if done.returncode != 0:
        raise NonRecoverableError(
            f"{ctx.step_name}: {command[0]!r} exited with code {done.returncode}: "
            f"{(done.stderr or done.stdout)[-OUTPUT_TAIL_CHARS:].strip()}"
        )
    return {"exit_code": 0, "stdout": done.stdout[-OUTPUT_TAIL_CHARS:]}


@action(A.MANUAL_ACTION)
def manual_action(ctx: StepContext, *, plan_id: str, instructions: str) -> dict[str, Any]:
    """Pause the plan until an operator resumes it (`asr plan resume`, workflows.engine.resume)."""
    raise AwaitingOperator(instructions)
