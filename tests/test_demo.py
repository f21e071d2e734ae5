"""`asr demo` as `make demo` runs it: the installed console script in a subprocess, with everything real
(its own redis-server, Celery workers, beat, Flower, host trees, writers), checked from the outside:
the JSON report, the exit status, and /proc for anything left running in its work folder."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

# Whole deployments (workers, beat, Redis) or real guests per test: out of the quick loop (-m "not slow").
pytestmark = pytest.mark.slow

ASR = str(Path(sys.executable).with_name("asr"))
STAGES = ["start", "register", "protect", "replicate", "drill", "failover", "plan", "real-vm"]
DEMO_TIMEOUT_S = 300


def run_demo(*args: str, timeout: float = DEMO_TIMEOUT_S) -> tuple[int, str, str]:
    """Run `asr demo ARGS`; on timeout it gets Ctrl-C (so it still stops what it started) and the test fails."""
    process = subprocess.Popen([ASR, "demo", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGINT)
        try:
            stdout, stderr = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        raise AssertionError(f"asr demo {' '.join(args)} ran over {timeout} s:\n{stderr[-4000:]}") from None
    return process.returncode, stdout, stderr


def left_running(folder: Path) -> list[str]:
    """Live processes whose working directory or command line is inside `folder`: redis-server runs in
    its data folder (it rewrites its command line), Celery and the writers in folders of the work folder."""
    folder = folder.resolve()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(entry / "cwd")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and (str(folder) in command or cwd == str(folder) or cwd.startswith(f"{folder}/")):
            found.append(f"pid {entry.name} (cwd {cwd}): {command}")
    return found


def run_demo_and_stay(workdir: Path, *args: str) -> tuple[int, str, str, dict[str, object]]:
    """`asr demo --stay ARGS`: once it says the deployment keeps running, its console is used as a person would
    (over HTTPS, verified with the deployment's CA: log in with the printed key, read the dashboard); then
    Ctrl-C. Returns the exit status, stdout, stderr and what the console showed."""
    process = subprocess.Popen([ASR, "demo", "--stay", "--workdir", str(workdir), *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    out: list[str] = []
    err: list[str] = []
    readers = [threading.Thread(target=lambda: out.append(process.stdout.read()), daemon=True),
               threading.Thread(target=lambda: err.extend(process.stderr), daemon=True)]
    for reader in readers:
        reader.start()
    seen: dict[str, object] = {}
    deadline = time.monotonic() + DEMO_TIMEOUT_S
    try:
        while time.monotonic() < deadline and process.poll() is None:
            staying = re.search(r"--stay: the deployment keeps running\. Web console: (\S+) \(API key (\S+)\)",
                                "".join(err))
            if staying:
                seen.update(console_seen(staying.group(1), staying.group(2), workdir / "local" / "tls" / "ca.pem"))
                seen["processes_while_kept"] = len(left_running(workdir))
                break
            time.sleep(0.5)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        for reader in readers:
            reader.join(timeout=30)
    return process.returncode, "".join(out), "".join(err), seen


def console_seen(url: str, key: str, ca_file: Path) -> dict[str, object]:
    origin = url.split("/console/")[0]
    with httpx.Client(verify=str(ca_file), timeout=30, follow_redirects=False) as client:
        login = client.post(f"{origin}/console/login", data={"api_key": key, "next": "/console/"},
                            headers={"Origin": origin})
        dashboard = client.get(f"{origin}/console/")
    return {"url": url, "login": login.status_code, "dashboard": dashboard.status_code, "page": dashboard.text}


def test_demo_runs_every_stage_and_stops_everything(tmp_path):
    """The demo as `make demo` runs it, with --stay: every stage passes, the report is printed, then the
    deployment stays up with its web console open (a person logs in with the key it printed and sees the
    VMs), and Ctrl-C stops everything."""
    workdir = tmp_path / "work"
    code, stdout, stderr, console = run_demo_and_stay(workdir, "--json", "--keep")
    assert code == 0, stderr[-6000:]
    report = json.loads(stdout)  # stdout is the report alone; progress went to stderr
    assert console["url"].startswith("https://127.0.0.1:") and console["login"] == 303, console
    assert console["dashboard"] == 200 and all(f">{vm}</a>" in console["page"] for vm in ("app01", "db01")), \
        str(console)[:3000]
    assert console["processes_while_kept"] > 0
    assert "stopping the deployment kept up by --stay" in stderr
    assert "cleanup passed: nothing the demo started is left running" in stderr
    assert report["ok"] is True and report["failed_checks"] == []
    assert [s["stage"] for s in report["stages"]] == STAGES
    for stage in report["stages"]:
        assert stage["status"] == "passed" and stage["checks"], stage
        assert all(check["ok"] for check in stage["checks"]), stage
        assert stage["seconds"] > 0
    checks = {check["check"] for stage in report["stages"] for check in stage["checks"]}
    # Every disk is checked byte for byte at each stage.
    for vm in ("app01", "app02", "db01", "web01"):
        assert {f"replica of {vm}/disk0 equals its source", f"replica of {vm}/disk1 equals its source"} <= checks
    assert "recovery VM app01/disk0 equals the primary's final disk" in checks
    assert "primary app01/disk1 equals the recovery VM's disk at its shutdown" in checks
    assert "test VM app01-test/disk0 equals the source at the point" in checks
    assert {f"test VM {vm}-test/disk1 equals the source at the point" for vm in ("app02", "db01", "web01")} <= checks
    assert report["flower"]["local"]["tasks_seen"] > 0 and report["flower"]["local"]["task_names"]
    jobs = [job for stage in report["stages"] for job in stage["jobs"]]
    assert len(jobs) == len(set(jobs)) > 20
    # Progress while it ran: a line per job with its id, Flower's address.
    assert f"job {jobs[0]}" in stderr and "Flower: https://127.0.0.1:" in stderr  # the demo serves Flower over HTTPS
    # With --stay the report is printed before the kept-up deployment stops: its cleanup check comes after, on
    # stderr.
    assert report["cleanup"] == []
    assert left_running(workdir) == []
    assert (workdir / "local" / "logs" / "worker-orchestration.log").exists()
    # The real guest: booted at the recovery site with its own check passing; its files are kept.
    assert {"guest01 booted at dr1 and its own check of its files passed",
            "e2fsck -fn of the recovery disk passes after the guest's shutdown",
            "replica of guest01/data equals its source"} <= checks
    paths = report["paths"]
    assert Path(paths["storage_root"]).is_dir()
    assert paths["source_disks"] and all(Path(p).is_file() for p in paths["source_disks"] + paths["recovery_disks"])


def test_a_successful_run_keeps_only_the_real_guests_files(tmp_path):
    """Without --keep a successful run removes its work folder but for what the report's paths name."""
    from api.demo import _remove_except

    workdir = tmp_path / "work"
    kept_disk = workdir / "local" / "hosts" / "host1" / "vms" / "guest01" / "data.raw"
    storage = workdir / "local" / "recovery-site"
    for path in (kept_disk, storage / "host1" / "guest01" / "data.vhd", workdir / "local" / "asr.db",
                 workdir / "local" / "hosts" / "host1" / "vms" / "app01" / "disk0.vhd"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    _remove_except(workdir, [kept_disk, storage])
    assert kept_disk.exists() and (storage / "host1" / "guest01" / "data.vhd").exists()
    assert not (workdir / "local" / "asr.db").exists()
    assert not (workdir / "local" / "hosts" / "host1" / "vms" / "app01").exists()


def test_a_corrupted_replica_fails_the_demo_and_names_the_check(tmp_path):
    workdir = tmp_path / "work"
    code, stdout, stderr = run_demo("--json", "--workdir", str(workdir), "--inject-failure", "corrupt-replica")
    assert code == 1, stderr[-6000:]
    report = json.loads(stdout)
    assert report["ok"] is False
    assert len(report["failed_checks"]) == 1, report["failed_checks"]
    failed = report["failed_checks"][0]
    assert "replicate: replica of app02/disk1 equals its source: first difference at offset" in failed
    statuses = {s["stage"]: s["status"] for s in report["stages"]}
    assert statuses == {"start": "passed", "register": "passed", "protect": "passed", "replicate": "failed",
                        "drill": "skipped", "failover": "skipped", "plan": "skipped", "real-vm": "skipped"}
    assert left_running(workdir) == []
    assert (workdir / "local" / "logs").is_dir(), "a failed run keeps its logs"


def test_ctrl_c_stops_everything_the_demo_started(tmp_path):
    workdir = tmp_path / "work"
    process = subprocess.Popen([ASR, "demo", "--workdir", str(workdir)], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    seen = []
    try:
        deadline = time.monotonic() + 120
        for line in process.stdout:  # the protect stage: writers, workers and jobs all running
            seen.append(line)
            if "enable protection of app01: job" in line or time.monotonic() > deadline:
                break
        assert left_running(workdir), "the demo should be running its processes by now"
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=90)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, "".join(seen) + output
    assert "interrupted: everything the demo started has been stopped" in output
    assert left_running(workdir) == []


def test_a_folder_the_demo_did_not_make_is_refused_and_left_alone(tmp_path):
    workdir = tmp_path / "mine"
    workdir.mkdir()
    (workdir / "notes.txt").write_text("precious")
    code, stdout, stderr = run_demo("--workdir", str(workdir), timeout=60)
    assert code == 2
    assert "is not empty and was not made by `asr demo`" in stderr
    assert [p.name for p in workdir.iterdir()] == ["notes.txt"]
    assert (workdir / "notes.txt").read_text() == "precious"
