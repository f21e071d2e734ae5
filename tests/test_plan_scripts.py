"""Recovery plans' scripts on a real orchestration worker: only registered scripts run, with no credentials
in their environment, as an unprivileged user, within their time limit, their output bounded and this
worker's secrets blanked out of it.

The steps are the plan kind's own RUN_SCRIPT steps, started with `start_job` (a plan's other steps move VMs,
which the tests of test_failover.py cover); the worker is a real `celery worker` holding real secrets in its
environment, as production workers do.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import tasks  # noqa: F401  (registers the actions start_job checks)
from models.plans import PlanOperation
from sites.deployment import Deployment
from sites.localservices import wait_until
from sites.planscripts import shared_folder, write_registry
from workflows import actions as A
from workflows.engine import ORCHESTRATION_QUEUE, StepSpec, get_job, start_job
from workflows.kinds.recovery_plan import KINDS

KIND = KINDS[PlanOperation.TEST_FAILOVER].name
OUTPUT_CAP = 1024
# Secrets only the worker holds, shaped as the real ones are.
ACCOUNT_KEY = "c2VjcmV0LWFjY291bnQta2V5LW9mLXRoZS13b3JrZXI="
SECRETS = {
    "AZURE_STORAGE_CONNECTION_STRING": f"DefaultEndpointsProtocol=https;AccountName=drsite;AccountKey={ACCOUNT_KEY};",
    "ASR_STORAGE_SAS_TOKEN": "sv=2024-01-01&sig=worker-only-signature-value",
    "ASR_FLOWER_PASSWORD": "flower-password-of-the-worker",
}
SCRIPTS = {
    "whoami": ('#!/bin/sh\nid\necho "uid=$(id -u)"\nenv\n', {"timeout_s": 30, "args": {"mode": "quick|full"}}),
    "sleeper": ('#!/bin/sh\necho $$ > "$ASR_ARG_PIDFILE"\nsleep 60 &\necho $! >> "$ASR_ARG_PIDFILE"\nwait\n',
                {"timeout_s": 600, "args": {"pidfile": "/[A-Za-z0-9_./-]+"}}),
    "chatty": ("#!/bin/sh\nhead -c 1048576 /dev/zero | tr '\\0' 'x'\necho END-OF-OUTPUT\n", {}),
    "show-config": ('#!/bin/sh\ncat "$(dirname "$0")/site.conf"\nexit 3\n', {}),
}


@pytest.fixture(scope="module")
def scripts_dir() -> Iterator[Path]:
    folder = shared_folder("asr-test-scripts-")
    try:
        write_registry(folder, SCRIPTS)
        # A file a script reads that happens to hold a secret of the worker: its output is redacted.
        config = folder / "site.conf"
        config.write_text(f"account_key = {ACCOUNT_KEY}\nsas = {SECRETS['ASR_STORAGE_SAS_TOKEN']}\n")
        config.chmod(0o644)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, scripts_dir: Path) -> Iterator[Deployment]:
    deployment = Deployment(
        tmp_path_factory.mktemp("plan-scripts"), workers={"orchestration": (["orchestration"], 2)}, beat=False,
        appendonly=False,
        settings={"ASR_PLAN_SCRIPTS_DIR": str(scripts_dir), "ASR_HEARTBEAT_S": "1", "ASR_STALE_AFTER_S": "5"},
        worker_settings={**SECRETS, "ASR_PLAN_SCRIPT_OUTPUT_BYTES": str(OUTPUT_CAP)},
    )
    with deployment.start():
        yield deployment


def run_step(params: dict[str, Any], *, timeout: float = 60) -> dict[str, Any]:
    """A plan job of one script step with `params`, run to its end on the worker; the job."""
    job_id = start_job(KIND, lock_key=None, params={"plan_id": "p-1", "plan": "p", "operation": "test_failover",
                                                     "item_ids": []},
                       stages=[[StepSpec("Group g: after action s", A.RUN_SCRIPT, ORCHESTRATION_QUEUE,
                                         {"plan_id": "p-1", "timeout_s": 30.0, **params})]])
    return wait_until(lambda: (job := get_job(job_id))["state"] in ("succeeded", "failed", "cancelled") and job,
                      timeout=timeout, what=f"job {job_id} to end")


def secrets_of(site: Deployment) -> list[str]:
    """Every credential the worker holds: the test's, the database's and the broker's."""
    return [*SECRETS.values(), ACCOUNT_KEY, site.env["ASR_DATABASE_URL"], site.env["ASR_BROKER_URL"]]


def test_a_script_sees_no_credentials_and_runs_as_an_unprivileged_user(site: Deployment) -> None:
    job = run_step({"script": "whoami", "args": {"mode": "quick"}})
    assert job["state"] == "succeeded", job
    result = job["steps"][0]["result"]
    output = result["output"]
    env = dict(line.split("=", 1) for line in output.splitlines()[2:] if "=" in line)
    if os.geteuid() == 0:
        assert "uid=0" not in output.splitlines()[1] and result["user"] == "nobody", output
    assert output.splitlines()[1] == f"uid={int(output.splitlines()[1].split('=')[1])}"
    assert int(output.splitlines()[1].split("=")[1]) != 0
    assert env["ASR_ARG_MODE"] == "quick" and env["ASR_PLAN_ID"] == "p-1" and env["ASR_JOB_ID"] == job["id"]
    # Nothing of the worker's own environment: only what the runner gives (and what sh adds itself).
    assert set(env) <= {"PATH", "LANG", "ASR_PLAN_ID", "ASR_JOB_ID", "ASR_ARG_MODE", "PWD", "SHLVL", "_"}, env
    record = json.dumps(job)
    for secret in secrets_of(site):
        assert secret not in record, secret


def test_secrets_a_script_prints_are_redacted_and_a_failure_says_so(site: Deployment) -> None:
    job = run_step({"script": "show-config"})
    assert job["state"] == "failed"
    assert "script 'show-config' exited with code 3" in job["error"]
    assert "account_key = [REDACTED]" in job["error"] and "sas = [REDACTED]" in job["error"], job["error"]
    record = json.dumps(job)
    for secret in secrets_of(site):
        assert secret not in record, secret


def test_unregistered_scripts_and_command_lines_never_run(site: Deployment, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    job = run_step({"command": ["/bin/sh", "-c", f"touch {marker}"]})
    assert job["state"] == "failed" and "command lines do not run" in job["error"], job["error"]
    job = run_step({"script": "../../bin/sh", "args": {}})
    assert job["state"] == "failed" and "script '../../bin/sh' is not registered on this worker" in job["error"]
    # Arguments are checked again by the worker, whatever the database says.
    job = run_step({"script": "whoami", "args": {"mode": "quick; touch x"}})
    assert job["state"] == "failed" and "argument 'mode' must match 'quick|full'" in job["error"], job["error"]
    job = run_step({"script": "whoami", "args": {"mode": "full"}, "timeout_s": 31.0})
    assert job["state"] == "failed" and "above the script's limit of 30 s" in job["error"], job["error"]
    assert not marker.exists()


def test_a_script_past_its_time_limit_is_killed_with_its_children(site: Deployment, scripts_dir: Path) -> None:
    pidfile = scripts_dir / f"pids-{os.getpid()}"
    pidfile.touch()
    pidfile.chmod(0o666)  # the script, running as nobody, writes its pids here
    try:
        started = time.monotonic()
        job = run_step({"script": "sleeper", "args": {"pidfile": str(pidfile)}, "timeout_s": 2.0})
        assert job["state"] == "failed" and "script 'sleeper' did not finish within 2 s and was killed" in job["error"]
        assert time.monotonic() - started < 30
        pids = [int(line) for line in pidfile.read_text().split()]
        assert len(pids) == 2
        for pid in pids:  # the script and the sleep it started: the whole process group
            wait_until(lambda pid=pid: not _alive(pid), timeout=5, what=f"pid {pid} to be gone")
    finally:
        pidfile.unlink(missing_ok=True)


def test_the_output_a_job_keeps_is_bounded(site: Deployment) -> None:
    job = run_step({"script": "chatty"})
    assert job["state"] == "succeeded", job
    result = job["steps"][0]["result"]
    assert result["output_bytes"] == (1 << 20) + len("END-OF-OUTPUT\n")
    assert result["truncated"] is True
    assert len(result["output"].encode()) == OUTPUT_CAP
    assert result["output"].endswith("x" * 100 + "END-OF-OUTPUT\n")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def test_secret_values_cover_every_secret_setting_of_a_worker() -> None:
    """What a script's output is redacted of: the key-encryption key (ASR_STORAGE_KEK, named neither KEY nor
    SECRET) as well as passwords, connection strings' keys and URLs' passwords; plain settings are not."""
    from sites.childprocess import secret_values

    kek = "q3v1Yk8m0Zt8x2YH1xJc4m5k3Kc9Q1f7pP0aW2sR6nE="
    assert secret_values({"ASR_STORAGE_KEK": kek}) == [kek]
    assert secret_values({"ASR_DATABASE_URL": "postgresql://asr:hunter22@db/asr"}) == [
        "postgresql://asr:hunter22@db/asr", "hunter22"]
    assert secret_values({"ASR_AZURE_CONNECTION_STRING": "AccountName=a;AccountKey=c2VjcmV0;"}) == [
        "AccountName=a;AccountKey=c2VjcmV0;", "c2VjcmV0"]
    assert secret_values({"ASR_HOME": "/var/lib/asr", "ASR_STORAGE_ENCRYPTION": "on"}) == []
