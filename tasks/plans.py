"""The actions of recovery plans: a group's scripts and manual actions (the VMs' own steps are the
failover actions of tasks/failover.py)."""
from __future__ import annotations

from typing import Any

from datapath.errors import NonRecoverableError
from sites.childprocess import minimal_env, redact, run_child, secret_values, unprivileged_user
from sites.planscripts import ScriptRegistryError, check_arguments, load_registry
from workflows import actions as A
from workflows import settings
from workflows.engine import AwaitingOperator, StepContext, action


@action(A.RUN_SCRIPT)
def run_script(ctx: StepContext, *, plan_id: str, timeout_s: float, script: str | None = None,
               args: dict[str, str] | None = None, command: list[str] | None = None) -> dict[str, Any]:
    """Run a script registered on this worker (ASR_PLAN_SCRIPTS_DIR) with the plan's checked arguments: with
    nothing of this worker's environment (PATH, LANG, ASR_PLAN_ID, ASR_JOB_ID and its ASR_ARG_* only), as
    ASR_PLAN_SCRIPT_USER when the worker is root, killed with its whole process group at `timeout_s`. The
    job record keeps the last ASR_PLAN_SCRIPT_OUTPUT_BYTES of its output, this worker's secrets blanked out.
    A non-zero exit or a timeout fails the plan.

    Checked again here, whatever the plan said: the step's parameters come from the database, which more
    processes than the API can write. A step of a plan stored before scripts were registered (`command`)
    never runs."""
    if command is not None or script is None:
        raise NonRecoverableError(f"{ctx.step_name}: this step holds a command line from before plan scripts "
                                  f"were registered, and command lines do not run; create the plan again with a "
                                  f"registered script")
    try:
        registered = load_registry(settings.plan_scripts_dir()).get(script)
    except ScriptRegistryError as exc:
        raise NonRecoverableError(f"{ctx.step_name}: {exc}") from None
    if registered is None:
        raise NonRecoverableError(f"{ctx.step_name}: script {script!r} is not registered on this worker "
                                  f"(ASR_PLAN_SCRIPTS_DIR)")
    problems = check_arguments(registered, args, ctx.step_name)
    if not 0 < timeout_s <= registered.timeout_s:
        problems.append(f"{ctx.step_name}: timeout_s {timeout_s:g} is above the script's limit of "
                        f"{registered.timeout_s:g} s")
    if problems:
        raise NonRecoverableError("; ".join(problems))
    try:
        user = unprivileged_user(settings.plan_script_user())
    except ValueError as exc:
        raise NonRecoverableError(f"{ctx.step_name}: {exc}") from None
    secrets = secret_values()
    env = minimal_env({"ASR_PLAN_ID": plan_id, "ASR_JOB_ID": ctx.job_id, **registered.environment(args or {})})
    try:
        run = run_child([str(registered.path)], env=env, timeout_s=timeout_s,
                        output_cap=settings.plan_script_output_bytes(), secrets=secrets, user=user)
    except OSError as exc:
        raise NonRecoverableError(f"{ctx.step_name}: script {script!r} could not be started: "
                                  f"{redact(str(exc), secrets)}") from None
    if run.timed_out:
        raise NonRecoverableError(f"{ctx.step_name}: script {script!r} did not finish within {timeout_s:g} s and "
                                  f"was killed: {run.output.strip()[-500:] or '(no output)'}")
    if run.exit_code != 0:
        raise NonRecoverableError(f"{ctx.step_name}: script {script!r} exited with code {run.exit_code}: "
                                  f"{run.output.strip() or '(no output)'}")
    return {"script": script, "exit_code": 0, "output": run.output, "output_bytes": run.output_bytes,
            "truncated": run.truncated, "user": user.pw_name if user is not None else None}


@action(A.MANUAL_ACTION)
def manual_action(ctx: StepContext, *, plan_id: str, instructions: str) -> dict[str, Any]:
    """Pause the plan until an operator resumes it (`asr plan resume`, workflows.engine.resume)."""
    raise AwaitingOperator(instructions)
