"""Flower against a real deployment: `asr flower` (a real subprocess) on the site's private Redis, with
basic auth, while real workers protect a VM; the job's tasks and the workers are found through Flower's
HTTP API, which refuses requests without the credentials. Every wait is bounded.
"""
from __future__ import annotations

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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from recovery_site import RecoverySite

from sites.localservices import LOCALHOST, free_port, port_answers, wait_until
from workflows.engine import step_task_name

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
    with RecoverySite(tmp_path) as site:
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
            assert {s["queue"] for s in steps.values()} == {"host.host1", "orchestration", "recovery"}

            # Filtering by the readable name finds them too (what an operator types in Flower).
            copies = {task["uuid"] for step_id, task in tasks.items() if steps[step_id]["action"] == COPY_DISK}
            status, named = flower.get(f"/api/tasks?taskname={step_task_name(COPY_DISK)}&limit=1000")
            assert status == 200 and copies and copies == set(named), (status, copies, sorted(named))
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
