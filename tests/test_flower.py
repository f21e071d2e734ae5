"""Flower against a real deployment: `asr flower` (a real subprocess) on the site's private Redis, with
basic auth, while real workers protect a VM; the job's tasks and the workers are found through Flower's
HTTP API, which refuses requests without the credentials. Every wait is bounded.
"""
from __future__ import annotations

import ast
import base64
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import engine_actions  # noqa: F401  (declares the test job kinds start_job checks)
from engine_harness import ACTION_MODULES
from recovery_site import RecoverySite

from sites.deployment import Deployment
from sites.localservices import LOCALHOST, WaitTimeout, free_port, port_answers, wait_until
from workflows.engine import StepSpec, get_job, start_job, step_task_name

ASR = str(Path(sys.executable).with_name("asr"))
COPY_DISK = "replication.copy_disk"
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
SMALL_VM = [("disk0", "8M", "raw"), ("disk1", "4M", "vhd")]


class AsrFlower:
    """`asr flower` on 127.0.0.1 and a free port, logging to a file; `stop()` is bounded."""

    def __init__(self, env: Mapping[str, str], workdir: Path, user: str, password: str) -> None:
        self.port = free_port()
        self.user, self.password = user, password
        self.log_path = workdir / "flower.log"
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [ASR, "flower", "--port", str(self.port), "--address", LOCALHOST],
                env={**env, "ASR_FLOWER_USER": user, "ASR_FLOWER_PASSWORD": password},
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not port_answers(self.port):
            assert self.process.poll() is None, f"asr flower exited {self.process.returncode}:\n{self.log()}"
            assert time.monotonic() < deadline, f"Flower did not listen within {timeout:g} s:\n{self.log()}"
            time.sleep(0.1)

    def get(self, path: str, *, auth: tuple[str, str] | None = ("default", "")) -> tuple[int, Any]:
        """GET `path`; (status, parsed JSON or text). auth: the process's credentials by default, None
        for none, or (user, password)."""
        request = urllib.request.Request(f"http://{LOCALHOST}:{self.port}{path}")
        if auth is not None:
            user, password = (self.user, self.password) if auth == ("default", "") else auth
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                status, body = response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            status, body = error.code, error.read().decode(errors="replace")
        try:
            return status, json.loads(body)
        except json.JSONDecodeError:
            return status, body

    def stop(self, timeout: float = 10) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


def node_of(name: str, workers: Mapping[str, Any]) -> str | None:
    """The Celery node (`<name>@<hostname>`) among `workers` whose name part is `name`."""
    return next((node for node in workers if node.split("@", 1)[0] == name), None)


def event_count(metrics: str, **labels: str) -> float:
    """The value of Flower's Prometheus counter flower_events_total with exactly these labels (0 if absent)."""
    for line in metrics.splitlines():
        match = re.fullmatch(r"flower_events_total\{(.*)\} (\S+)", line)
        if match and dict(re.findall(r'(\w+)="([^"]*)"', match.group(1))) == labels:
            return float(match.group(2))
    return 0.0


def test_flower_shows_the_jobs_tasks_and_workers_behind_basic_auth(tmp_path: Path) -> None:
    password = secrets.token_urlsafe(16)
    # Flower's worker pages ask the workers through remote control (off by default): on, read-only, as compose.yaml
    # sets it for the engine's workers.
    with RecoverySite(tmp_path, env={"ASR_WORKER_REMOTE_CONTROL": "inspect"}) as site:
        flower = AsrFlower(site.env, tmp_path, "operator", password)
        try:
            flower.wait_listening(timeout=30)
            # The process started by `asr flower` is Flower itself (exec'd), not a parent waiting on it.
            cmdline = Path(f"/proc/{flower.process.pid}/cmdline").read_bytes().split(b"\0")
            assert b"flower" in cmdline and b"celery" in cmdline, cmdline

            # Flower follows the workers' events before the job starts: its tasks are then all seen.
            def both_workers_alive() -> bool:
                status, alive = flower.get("/api/workers?status=1")
                return (status == 200 and node_of("orchestration", alive) is not None
                        and node_of("host-host1", alive) is not None and all(alive.values()))

            wait_until(both_workers_alive, timeout=30, interval=0.25,
                       what="Flower to see both workers alive through their events")

            # Authentication on: the API and the pages refuse a request without, or with wrong, credentials.
            for path in ("/api/tasks", "/api/workers", "/api/task/types", "/workers?json=1", "/"):
                assert flower.get(path, auth=None)[0] == 401, path
                assert flower.get(path, auth=("operator", password + "x"))[0] == 401, path
                assert flower.get(path, auth=("intruder", password))[0] == 401, path

            vm_id = site.create_vm("host1", "app01", SMALL_VM, fill=0.5, seed=11)
            job = site.wait_job(site.protect(vm_id), timeout=60)
            steps = {step["id"]: step for step in job["steps"]}

            def run_step_tasks() -> dict[str, dict[str, Any]] | None:
                status, tasks = flower.get("/api/tasks?limit=1000")
                assert status == 200, (status, tasks)
                found = {}
                for uuid, task in tasks.items():
                    ids = [i for i in UUID.findall(str(task.get("args"))) if i in steps]
                    if ids and task.get("state") == "SUCCESS":
                        found[ids[0]] = task | {"uuid": uuid}
                return found if set(found) == set(steps) else None

            tasks = wait_until(run_step_tasks, timeout=30, interval=0.25,
                               what=f"Flower to list a succeeded run_step task for each of the {len(steps)} steps")
            for step_id, task in tasks.items():
                step = steps[step_id]
                assert task["uuid"] == step["celery_task_id"], (step["name"], task)
                assert task["worker"] == step["worker"], (step["name"], task["worker"], step["worker"])
                expected_node = "host-host1" if step["queue"] == "host.host1" else "orchestration"
                assert task["worker"].split("@")[0] == expected_node, (step["name"], step["queue"], task)
                # The readable task name, its action's, for every step: also those that reported progress.
                assert task["name"] == step_task_name(step["action"]), (step["name"], task["name"])
                # What the step is about, as the task's kwargs: the job, its VM, the step and its attempt.
                assert ast.literal_eval(task["kwargs"]) == {
                    "job": "enable_protection", "vm": "app01", "step": step["name"], "attempt": 1, "job_id": job["id"],
                }, task["kwargs"]
            assert {s["queue"] for s in steps.values()} == {"host.host1", "orchestration", "recovery"}

            # Filtering by the readable name finds them too (what an operator types in Flower).
            copies = {task["uuid"] for step_id, task in tasks.items() if steps[step_id]["action"] == COPY_DISK}
            status, named = flower.get(f"/api/tasks?taskname={step_task_name(COPY_DISK)}&limit=1000")
            assert status == 200 and copies and copies == set(named), (status, copies, sorted(named))
            # and so does searching for the VM, as an operator would in Flower's search box.
            status, found = flower.get("/api/tasks?search=kwargs:vm=app01&limit=1000")
            assert status == 200 and {task["uuid"] for task in tasks.values()} <= set(found), (status, sorted(found))
            assert all(set(UUID.findall(str(task["args"]))) & set(steps) for task in found.values()), found
            status, types = flower.get("/api/task/types")
            assert status == 200 and step_task_name(COPY_DISK) in types["task-types"], types

            # The workers through inspect (what /api/workers answers), with the queues each consumes.
            status, workers = flower.get("/api/workers?refresh=1")
            assert status == 200, workers
            host_node, orchestration_node = node_of("host-host1", workers), node_of("orchestration", workers)
            assert host_node and orchestration_node, sorted(workers)
            queues = {node: sorted(q["name"] for q in workers[node]["active_queues"])
                      for node in (host_node, orchestration_node)}
            assert queues == {host_node: ["host.host1"], orchestration_node: ["orchestration", "recovery"]}, queues

            # Progress events: the copy steps' task-progress events reach Flower, counted per worker.
            status, page = flower.get("/workers?json=1")
            assert status == 200, page
            counters = {worker["hostname"]: worker for worker in page["data"]}
            assert counters[host_node].get("task-progress", 0) >= 2, counters[host_node]

            # Flower 2.2.0 serves these two without credentials (docs/operations.md says so): the
            # health check compose uses, and the Prometheus counters, task-progress events among them.
            assert flower.get("/healthcheck", auth=None) == (200, "OK")
            status, metrics = flower.get("/metrics", auth=None)
            assert status == 200
            progress_count = event_count(metrics, worker=host_node, type="task-progress",
                                         task=step_task_name(COPY_DISK))
            assert progress_count >= 2, metrics[-3000:]
        finally:
            flower.stop()
        assert flower.process.returncode is not None


# The engine tests' scaled clock (tests/test_engine.py): the first retry 0.1 s after a recoverable failure, a
# dead run found after 3 s, a step poisoned at its third death.
ENGINE_SETTINGS = {"ASR_TIME_SCALE": "600", "ASR_HEARTBEAT_S": "1", "ASR_STALE_AFTER_S": "3",
                   "ASR_RECONCILE_S": "0.25", "ASR_MAX_STEP_DEATHS": "3", "ASR_QUEUED_STALL_S": "600"}


def test_flower_names_each_steps_vm_and_attempt_and_counts_retried_failed_and_poisoned_steps(tmp_path: Path) -> None:
    """A step that fails recoverably ends its task RETRY (and its next attempt, a new task, SUCCESS); one
    that fails for good ends FAILURE; a poison step's dead runs end RETRY and the last FAILURE: Flower's
    task list, search and counters show what the job records say, each task naming its VM, step and attempt."""
    password = secrets.token_urlsafe(16)
    workers = {"orchestration": (["orchestration", "recovery"], 2), "host-h1": (["host.h1"], 2),
               "host-poisoned": (["host.poisoned"], 1)}
    with Deployment(tmp_path, workers=workers, settings=ENGINE_SETTINGS,
                    worker_settings={"ASR_ACTION_MODULES": ACTION_MODULES}) as cluster:
        flower = AsrFlower(cluster.env, tmp_path, "operator", password)
        try:
            flower.wait_listening(timeout=30)

            def workers_alive() -> bool:
                status, alive = flower.get("/api/workers?status=1")
                return status == 200 and all(node_of(name, alive) for name in workers) and all(alive.values())

            wait_until(workers_alive, timeout=30, interval=0.25, what="Flower to see every worker alive")

            delta = start_job("test.delta_replication", lock_key=f"item:{uuid.uuid4()}", params={"vm": "web01"},
                              stages=[[StepSpec("Ship logs", "test.flaky", "host.h1",
                                                {"log": str(tmp_path / "flaky.log"), "failing_attempts": 1})],
                                      [StepSpec("Apply logs", "test.broken_chain", "orchestration",
                                                {"log": str(tmp_path / "broken.log"), "disk": "disk0"})]])
            poisoned = start_job("test.enable_protection", lock_key=f"item:{uuid.uuid4()}", params={"vm": "db01"},
                                 stages=[[StepSpec("Copy disk disk0", "test.kill_own_worker", "host.poisoned",
                                                   {"log": str(tmp_path / "poison.log")})]])
            finished = ("succeeded", "failed", "cancelled")
            delta_job = wait_until(lambda: (job := get_job(delta))["state"] in finished and job, timeout=30,
                                   what="the delta job to end")
            poison_job = wait_until(lambda: (job := get_job(poisoned))["state"] in finished and job, timeout=60,
                                    what="the poisoned job to end")
            ship, apply = delta_job["steps"]
            assert (delta_job["state"], ship["state"], ship["attempts"], apply["state"]) == (
                "failed", "succeeded", 2, "failed"), delta_job
            (copy,) = poison_job["steps"]
            assert (poison_job["state"], copy["deaths"]) == ("failed", 3), poison_job
            assert "poison message" in copy["error"]

            def tasks_of(vm: str, expected: int) -> dict[str, dict[str, Any]] | None:
                status, found = flower.get(f"/api/tasks?search=kwargs:vm={vm}&limit=1000")
                assert status == 200, (status, found)
                settled = {uuid_: task for uuid_, task in found.items()
                           if task["state"] in ("SUCCESS", "FAILURE", "RETRY")}
                return settled if len(settled) >= expected else None

            # The delta job: Ship logs failed once (RETRY) then succeeded as a new task; Apply logs failed.
            delta_tasks = wait_until(lambda: tasks_of("web01", 3), timeout=20, interval=0.25,
                                     what="Flower to list the delta job's three ended tasks")
            described = {uuid_: ast.literal_eval(task["kwargs"]) for uuid_, task in delta_tasks.items()}
            by_state = sorted((task["state"], described[uuid_]["step"], described[uuid_]["attempt"])
                              for uuid_, task in delta_tasks.items())
            assert by_state == [("FAILURE", "Apply logs", 1), ("RETRY", "Ship logs", 1), ("SUCCESS", "Ship logs", 2)]
            assert all(kwargs["job"] == "test.delta_replication" and kwargs["job_id"] == delta
                       for kwargs in described.values()), described
            assert delta_tasks[apply["celery_task_id"]]["state"] == "FAILURE"
            assert "broken VHD chain" in delta_tasks[apply["celery_task_id"]]["exception"]
            assert delta_tasks[ship["celery_task_id"]]["state"] == "SUCCESS"
            retried = next(task for task in delta_tasks.values() if task["state"] == "RETRY")
            assert "recovery storage unreachable (attempt 1)" in retried["exception"], retried

            # The poison step: each dead run's task is ended by the reconciler, RETRY until the last, FAILURE.
            # (A killed run's message is also redelivered at once and ignored, its step still running: should
            # that come after the reconciler's report, Flower shows the task STARTED again. The events count.)
            listed: dict[str, dict[str, Any]] = {}

            def poison_tasks() -> dict[str, dict[str, Any]] | None:
                status, found = flower.get("/api/tasks?search=kwargs:vm=db01&limit=1000")
                assert status == 200, (status, found)
                listed.clear()
                listed.update(found)
                last = found.get(copy["celery_task_id"], {})
                return found if len(found) == 3 and last.get("state") == "FAILURE" else None

            try:
                poisoned_tasks = wait_until(poison_tasks, timeout=20, interval=0.25,
                                            what="Flower to list the poisoned step's three tasks, the last FAILURE")
            except WaitTimeout as timeout:
                states = {uuid_: task.get("state") for uuid_, task in listed.items()}
                raise AssertionError(f"{timeout}: Flower listed {states}; the last run is {copy['celery_task_id']}; "
                                     f"the job's steps: {poison_job['steps']}") from None
            assert "poison message" in poisoned_tasks[copy["celery_task_id"]]["exception"]
            # (PENDING and REJECTED too: Celery's event state lets any event that comes after a RETRY replace it.
            # The sent event of a run, published by another process, can reach Flower after the reconciler's
            # report; so can the worker's own task-rejected, sent when it hands a killed run's message back to the
            # queue (task_reject_on_worker_lost). The counters below count the events themselves.)
            assert {task["state"] for uuid_, task in poisoned_tasks.items() if uuid_ != copy["celery_task_id"]} <= {
                "RETRY", "STARTED", "PENDING", "REJECTED"}, poisoned_tasks
            assert {ast.literal_eval(task["kwargs"])["step"] for task in poisoned_tasks.values()} == {"Copy disk disk0"}

            # Flower's counters agree: failures and retries are counted as such, per worker and task name.
            status, failed = flower.get("/api/tasks?state=FAILURE&limit=1000")
            assert status == 200 and {apply["celery_task_id"], copy["celery_task_id"]} <= set(failed)
            status, metrics = flower.get("/metrics", auth=None)
            status, alive = flower.get("/api/workers?status=1")
            orchestration, host = node_of("orchestration", alive), node_of("host-h1", alive)
            assert event_count(metrics, worker=orchestration, type="task-failed",
                               task=step_task_name("test.broken_chain")) == 1, metrics[-3000:]
            assert event_count(metrics, worker=host, type="task-retried",
                               task=step_task_name("test.flaky")) == 1, metrics[-3000:]
            assert event_count(metrics, worker=orchestration, type="task-failed",
                               task=step_task_name("test.kill_own_worker")) == 1, metrics[-3000:]
            assert event_count(metrics, worker=orchestration, type="task-retried",
                               task=step_task_name("test.kill_own_worker")) == 2, metrics[-3000:]
            status, page = flower.get("/workers?json=1")
            counters = {worker["hostname"]: worker for worker in page["data"]}
            assert counters[orchestration].get("task-failed", 0) == 2, counters[orchestration]
            assert counters[orchestration].get("task-retried", 0) == 2, counters[orchestration]
            assert counters[host].get("task-retried", 0) == 1 and counters[host].get("task-failed", 0) == 0
        finally:
            flower.stop()
