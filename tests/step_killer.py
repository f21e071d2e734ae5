"""Kill -9 of the worker process running a chosen action: how tests make any job kind's step a poison step.

Workers import this module through ASR_ACTION_MODULES (after the product's actions). It wraps every action
registered in the process: when a step of the action named in the file `ASR_TEST_KILL_ACTION_FILE` starts,
the process running it sends itself SIGKILL, exactly what a crash or an operator's `kill -9` does, after the
engine has claimed the step and before the action touches anything. The test writes the action's name into
the file to arm it and empties the file to disarm it; nothing else of the product is changed.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from workflows.engine import registry

KILL_FILE_SETTING = "ASR_TEST_KILL_ACTION_FILE"


def armed_action() -> str | None:
    path = os.environ.get(KILL_FILE_SETTING)
    if not path:
        return None
    try:
        return Path(path).read_text().strip() or None
    except FileNotFoundError:
        return None


def _wrap(name: str) -> None:
    action = registry.registered_actions[name]
    if getattr(action, "killer_wrapped", False):
        return

    def run(ctx: Any, **params: Any) -> Any:
        if armed_action() == name:
            os.kill(os.getpid(), signal.SIGKILL)
        return action(ctx, **params)

    run.killer_wrapped = True  # type: ignore[attr-defined]
    registry.registered_actions[name] = run


registry.on_action_registered(_wrap)
