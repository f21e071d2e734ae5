"""The durable job engine: jobs of steps in stages, driven by the database, delivered by a dispatcher.

The database is the source of truth; the broker carries messages and Redis live progress only. Every
state change is one conditional UPDATE, so duplicate messages, redeliveries and concurrent reconcilers
are harmless: whoever wins the UPDATE owns the step, everyone else stands back. Nothing here imports
Celery: `workflows/canvas.py` turns stages into Celery canvases, behind `engine.dispatch`.

- `specs.py`: what a job is made of (`StepSpec`), checked before anything is written.
- `jobs.py`: `start_job` writes the job, its steps (the first stage's marked queued) and its locks in one
  transaction, then dispatches its first stage; the success of a stage's last step queues the next stage
  (`queue_next_stage`, in its own transaction, or `advance` after it) and dispatches it; `launch`
  dispatches what may run of the first stage not complete; `cancel`, `resume`, `retry_now`; ending and
  settling jobs, running their hooks; `get_job`.
- `steps.py`: `execute_step` (behind every step task) claims a step, keeps a heartbeat while its action
  runs, and records the outcome.
- `reconciler.py`: `reconcile` (run by beat) re-drives whatever a lost message or a dead worker left
  behind.
- `registry.py`: queue and task names, the registered action implementations and job hooks.
- `statements.py`: the prebuilt conditional statements; `errors.py`; `dispatch.py`.

A step is `queued` once a message for it was sent to the broker; steps of later stages stay `pending`
until the stage before them completes, which is what lets the reconciler tell a lost continuation (the
engine died between a step's commit and sending the next stage) from a slow one. Only work still to do is
ever sent.
"""
from workflows.engine.dispatch import Dispatcher, DispatchError, use_dispatcher
from workflows.engine.errors import (
    AwaitingOperator,
    ItemBusyError,
    JobNotFoundError,
    JobStateError,
    PoisonStepError,
    StepCancelled,
)
from workflows.engine.jobs import (
    cancel,
    get_job,
    launch,
    reopen,
    resume,
    retry_now,
    run_job_hooks,
    start_job,
)
from workflows.engine.reconciler import reconcile
from workflows.engine.registry import (
    HOST_QUEUE_PREFIX,
    ORCHESTRATION_QUEUE,
    RECONCILE_TASK,
    RECOVERY_QUEUE,
    RUN_JOB_HOOKS_TASK,
    RUN_STEP_TASK,
    STEP_TASK_PREFIX,
    action,
    import_action_modules,
    is_step_task,
    job_hook,
    on_action_registered,
    step_task_name,
)
from workflows.engine.specs import StepSpec, validate_queue
from workflows.engine.steps import StepContext, StepOutcome, execute_step, refuse_unknown_step_task
from workflows.settings import EngineSettings

__all__ = [
    "StepSpec", "StepContext", "StepOutcome", "EngineSettings", "Dispatcher", "DispatchError", "use_dispatcher",
    "ItemBusyError", "JobNotFoundError", "JobStateError", "PoisonStepError", "StepCancelled", "AwaitingOperator",
    "action", "job_hook", "import_action_modules", "on_action_registered", "step_task_name", "is_step_task",
    "start_job", "launch", "retry_now", "resume", "reopen", "cancel", "reconcile", "get_job", "validate_queue",
    "execute_step", "run_job_hooks", "refuse_unknown_step_task",
    "ORCHESTRATION_QUEUE", "RECOVERY_QUEUE", "HOST_QUEUE_PREFIX", "RUN_STEP_TASK", "STEP_TASK_PREFIX",
    "RECONCILE_TASK", "RUN_JOB_HOOKS_TASK",
]
