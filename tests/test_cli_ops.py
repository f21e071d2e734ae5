"""The operator's verbs of `asr`, run as an operator runs them: the installed console script in
subprocesses, against a whole deployment (tests/recovery_site.py: a private redis-server, SQLite, real
Celery workers and beat, a primary host `host1` and a recovery host `dr1`).

Everything the operator registers (a site, a host, VMs, a network mapping, a policy) goes through the
CLI; the test process only creates the VMs' folders on their hosts (what Hyper-V would hold) and reads
the database to check what the CLI did or did not write.
"""
from __future__ import annotations

import io
import json
import os
import pty
import re
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from recovery_site import RecoverySite
from sqlmodel import select

from api.cli import main
from api.cli_output import render_table
from api.cli_progress import ProgressView
from datapath.digest import disk_digest
from models.db import session_scope
from models.fabric import Host as HostRow
from models.fabric import Site, VirtualMachine, verify_host_key
from models.jobs import Job
from models.policy import ReplicationPolicy
from sites.host import Host

# Whole deployments (workers, beat, Redis) or real guests per test: out of the quick loop (-m "not slow").
pytestmark = pytest.mark.slow

ASR = str(Path(sys.executable).with_name("asr"))
DISKS = [("disk0", "8M", "vhd"), ("disk1", "4M", "raw")]
JOB_TIMEOUT = 60  # seconds a followed job may take here (small disks, time scale 10)


def asr(site: RecoverySite, *args: str, check: bool = True, timeout: float = JOB_TIMEOUT + 30
        ) -> subprocess.CompletedProcess:
    """Run `asr ARGS` against the site's database and broker; AssertionError with its output when
    `check` and it exits non-zero."""
    proc = subprocess.run([ASR, *args], capture_output=True, text=True, timeout=timeout, env=site.env)
    if check and proc.returncode != 0:
        raise AssertionError(f"asr {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}{proc.stdout}\n"
                             f"{site.log_tails()}")
    return proc


def asr_when_free(site: RecoverySite, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """`asr ARGS` for a command on a protected VM, again while the scheduler's delta cycle holds the VM
    (refused with "busy", as an operator would see it, and nothing started)."""
    deadline = time.monotonic() + timeout
    while True:
        proc = asr(site, *args, check=False)
        busy = "is busy with job" in proc.stderr or "ended just now" in proc.stderr
        if proc.returncode == 2 and busy and time.monotonic() < deadline:
            time.sleep(0.3)
            continue
        if proc.returncode != 0:
            raise AssertionError(f"asr {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}{proc.stdout}")
        return proc


def asr_on_terminal(site: RecoverySite, *args: str, timeout: float = JOB_TIMEOUT + 30) -> tuple[int, str]:
    """`asr ARGS` with its stdout on a pseudo-terminal, as at an operator's terminal (the progress bars
    are drawn only there); returns the exit status and what the terminal received."""
    leader, follower = pty.openpty()
    received = bytearray()

    def drain() -> None:  # the terminal must be read while the command runs, or its buffer fills
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the command closed its end
                return
            if not chunk:
                return
            received.extend(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        proc = subprocess.run([ASR, *args], stdout=follower, stderr=subprocess.PIPE, text=True, timeout=timeout,
                              env={**site.env, "COLUMNS": "120"})
    finally:
        os.close(follower)
    reader.join(timeout=10)
    os.close(leader)
    return proc.returncode, received.decode(errors="replace") + proc.stderr


def asr_json(site: RecoverySite, *args: str) -> Any:
    return json.loads(asr(site, *args, "--json").stdout)


def asr_many(site: RecoverySite, commands: list[tuple[str, ...]]) -> list[subprocess.CompletedProcess]:
    """Commands whose exit status and output are what a test checks (refusals, listings, shows), one after the
    other in this process through click's CliRunner: the same `asr` code with the site's environment, without
    the second of start-up each installed `asr` spends importing the service (a suite runs hundreds). Every
    test here also runs the installed console script itself (`asr`)."""
    return [asr_in_process(site, *args) for args in commands]


def asr_in_process(site: RecoverySite, *args: str) -> subprocess.CompletedProcess:
    """`asr ARGS` as `asr_many` runs it; an exception other than the CLI's own exit comes back with its
    traceback on stderr (as the installed script would print it)."""
    result = CliRunner().invoke(main, list(args), env=site.env)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "Traceback (in process):\n" + "".join(traceback.format_exception(result.exception))
    return subprocess.CompletedProcess(["asr", *args], result.exit_code, result.stdout, stderr)


def check_refused(proc: subprocess.CompletedProcess, needle: str) -> None:
    """A refusal: exit 2, one `asr: error:` line naming `needle`, no traceback, nothing on stdout."""
    what = f"{' '.join(proc.args)} exited {proc.returncode}: {proc.stderr}{proc.stdout}"
    assert proc.returncode == 2, what
    assert "Traceback" not in proc.stderr and proc.stdout == "", what
    assert needle.lower() in proc.stderr.lower(), what


def refused(site: RecoverySite, *args: str, needle: str) -> None:
    check_refused(asr(site, *args, check=False), needle)


def counts() -> dict[str, int]:
    """How many rows the tables a refused command might have written hold."""
    with session_scope() as session:
        return {"sites": len(session.exec(select(Site)).all()), "hosts": len(session.exec(select(HostRow)).all()),
                "policies": len(session.exec(select(ReplicationPolicy)).all()),
                "jobs": len(session.exec(select(Job)).all())}


def job_id_of(output: str) -> str:
    """The id in the `job ID started: ...` line every job-starting command prints first (`job ID resumed
    from the step where it stopped: ...` for a restart that resumed the job)."""
    first = output.splitlines()[0]
    assert first.startswith("job ") and (" started" in first or " resumed" in first), output
    return first.split()[1]


# ---- one deployment for the module; the operator registers the fabric through the CLI --------------------
@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory):
    with RecoverySite(tmp_path_factory.mktemp("cli"), recovery_host_names=("dr1",)) as deployment:
        yield deployment


@pytest.fixture(scope="module")
def fabric(site: RecoverySite) -> dict[str, Any]:
    """Register through the CLI: a site `branch` with a host `edge` (no agent runs for it), VMs `web1`
    and `broken` on host1 and `lonely` on edge, a network mapping, and a policy `fast`."""
    driver = site.host("host1")
    driver.create_vm("web1", DISKS)
    driver.write_initial_data("web1", seed=7, fraction=0.5)
    driver.create_vm("broken", [("disk0", "4M", "raw")])
    edge_root = site.workdir / "hosts" / "edge"
    edge_root.mkdir(parents=True)
    Host(edge_root, "edge").create_vm("lonely", [("disk0", "4M", "raw")])

    # Writes that do not depend on each other go side by side (SQLite in WAL mode with a busy timeout).
    # No office days: automatic resync may run at any time (none is expected here). 300 s is 30 s at the
    # site's time scale: few delta cycles get in the way of the test's requests.
    for batch in (
        [("site", "add", "branch", "--description", "the branch office"), ("vm", "add", "host1", "web1"),
         ("vm", "add", "host1", "broken"),
         ("policy", "add", "fast", "--copy-frequency", "300", "--retention-hours", "2", "--app-consistent-hours",
          "0", "--office-days", "none")],
        [("host", "add", "edge", str(edge_root), "--site", "branch"),
         ("network", "add", "default", "recovery-branch", "10.30.0.0/24", "--site", "branch")],
        [("vm", "add", "edge", "lonely")],
    ):
        for proc in asr_many(site, batch):
            assert proc.returncode == 0, f"{' '.join(proc.args)}: {proc.stderr}{proc.stdout}"
            if proc.args[1:3] == ["host", "add"]:
                added = proc.stdout
    key = next(line.split(":", 1)[1].strip() for line in added.splitlines() if line.startswith("registration key"))
    return {"registration_key": key, "edge_root": edge_root}


# ---- no deployment needed ---------------------------------------------------------------------------------
def test_every_verb_has_help():
    """Every group and command of the CLI answers --help (walked from the command tree itself, so a verb
    added later is covered too), and the verbs the issue names exist."""
    runner = CliRunner()
    seen = []

    def walk(command, path):
        result = runner.invoke(main, [*path, "--help"])
        assert result.exit_code == 0 and "Usage:" in result.output, (path, result.output)
        seen.append(" ".join(path))
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, [*path, name])

    walk(main, [])
    for verb in ("site add", "site list", "site show", "host add", "host list", "host show", "vm add", "vm list",
                 "vm show", "network add", "network list", "network show", "policy add", "policy list",
                 "policy show", "protect", "unprotect", "resync", "check", "failover test", "failover cleanup",
                 "failover planned", "failover unplanned", "failover complete", "failover commit",
                 "failover cancel", "failback", "reverse", "plan create", "plan show", "plan list",
                 "plan failover", "plan validate", "plan resume", "points", "verify", "health", "jobs list",
                 "jobs show", "jobs watch", "jobs cancel", "jobs restart", "jobs retry"):
        assert verb in seen, f"asr {verb} is missing"


def test_progress_view_redraws_bars_on_a_terminal_and_writes_lines_elsewhere():
    steps = [
        {"id": "a", "stage": 0, "index": 0, "name": "Prerequisites check", "state": "succeeded",
         "started_at": "2030-01-01T00:00:00+00:00", "ended_at": "2030-01-01T00:00:01.5+00:00"},
        {"id": "b", "stage": 1, "index": 0, "name": "Copy disk disk0", "state": "running",
         "progress_done": 6 << 20, "progress_total": 24 << 20},
        {"id": "c", "stage": 2, "index": 0, "name": "Ship logs", "state": "pending"},
    ]
    first = {"id": "J", "kind": "enable_protection", "state": "running", "steps": steps}
    later = {**first, "steps": [steps[0], {**steps[1], "progress_done": 18 << 20}, steps[2]]}

    terminal = io.StringIO()
    view = ProgressView(terminal, tty=True, width=120)
    view.update(first)
    view.update(later)
    view.finish({**later, "state": "failed", "error": "disk gone"})
    text = terminal.getvalue()
    assert text.count("done     Prerequisites check (1.5 s)") == 1  # a finished step is printed once
    assert "[######------------------]  25.0%  Copy disk disk0  6.0 MiB / 24.0 MiB" in text
    assert "[##################------]  75.0%  Copy disk disk0  18.0 MiB / 24.0 MiB" in text
    assert "\x1b[2F\x1b[J" in text  # the two live lines (job bar, step bar) are redrawn in place
    assert text.rstrip().endswith("job J (enable_protection) failed: disk gone")

    log = io.StringIO()
    view = ProgressView(log, tty=False)
    view.update(first)
    view.update(later)
    assert "\x1b" not in log.getvalue()
    assert log.getvalue().splitlines() == ["  done     Prerequisites check (1.5 s)", "  started  Copy disk disk0",
                                           "   75%     Copy disk disk0  18.0 MiB / 24.0 MiB"]


def test_tables_align_columns():
    lines = render_table([{"name": "a", "size": None, "at": "2030-01-02T03:04:05.678+00:00"},
                          {"name": "longer", "size": [1, 2], "at": True}],
                         [("name", "name"), ("size", "size"), ("at", "at")])
    assert lines == ["NAME    SIZE  AT", "a       -     2030-01-02 03:04:05", "longer  1, 2  yes"]


# ---- against the deployment -------------------------------------------------------------------------------
def test_registration_through_the_cli(site: RecoverySite, fabric: dict[str, Any]):
    (site_list, site_show, host_show, host_list, vm_list, vm_show, network_show, policy_show,
     policy_list) = asr_many(site, [
        ("site", "list", "--json"), ("site", "show", "branch"), ("host", "show", "edge", "--json"),
        ("host", "list"), ("vm", "list"), ("vm", "show", "web1", "--json"),
        ("network", "show", "default", "--json"), ("policy", "show", "fast", "--json"), ("policy", "list"),
    ])
    assert {"primary", "recovery", "branch"} <= {row["name"] for row in json.loads(site_list.stdout)}
    assert "the branch office" in site_show.stdout and "edge" in site_show.stdout

    # The registration key was printed once; only its hash is kept, and it is the edge host's key.
    assert fabric["registration_key"] not in host_show.stdout
    assert json.loads(host_show.stdout)["vms"] == ["lonely"]
    with session_scope() as session:
        row = session.exec(select(HostRow).where(HostRow.name == "edge")).one()
        assert verify_host_key(row, fabric["registration_key"])
    hosts = host_list.stdout.splitlines()
    assert hosts[0].split()[:2] == ["NAME", "SITE"] and any(line.split()[:2] == ["edge", "branch"] for line in hosts)

    assert "web1" in vm_list.stdout and "lonely" in vm_list.stdout and "not protected" in vm_list.stdout
    web1 = json.loads(vm_show.stdout)
    assert [(disk["name"], disk["size"], disk["format"]) for disk in web1["disks"]] == [
        ("disk0", 8 << 20, "vhd"), ("disk1", 4 << 20, "raw")]

    assert any(m["recovery_network"] == "recovery-branch" and m["recovery_subnet"] == "10.30.0.0/24"
               and m["site"] == "branch" for m in json.loads(network_show.stdout))

    fast = json.loads(policy_show.stdout)
    assert fast["copy_frequency_s"] == 300 and fast["app_consistent_frequency_h"] == 0
    assert fast["office_days"] == []
    assert any(line.split()[:2] == ["fast", "300"] for line in policy_list.stdout.splitlines())


def test_bad_input_is_refused_and_changes_nothing(site: RecoverySite, fabric: dict[str, Any]):
    before = counts()
    storage = site.recovery_storage
    cases = [
        (("site", "add", "a/b"), "a/b"),  # names with path separators
        (("site", "add", ".."), ".."),
        (("host", "add", "x\\y", str(site.workdir), "--site", "branch"), "x\\\\y"),  # the repr of x\\y
        (("host", "add", "nowhere", "relative/root", "--site", "branch"), "absolute"),
        (("host", "add", "nowhere", str(site.workdir), "--site", "no-such-site"), "no-such-site"),
        (("host", "add", "h2", str(site.workdir)), "--site"),  # neither --site nor --cloud
        (("policy", "add", "slow", "--copy-frequency", "60"), "60"),
        (("policy", "add", "slow", "--office-hours", "18:00-08:00"), "office hours"),
        (("policy", "add", "fast"), "already exists"),
        (("vm", "show", "no-such-vm"), "no-such-vm"),
        (("vm", "add", "host1", "no-such-vm"), "no-such-vm"),
        (("protect", "no-such-vm", "--policy", "fast", "--recovery-storage", storage), "no-such-vm"),
        (("protect", "web1", "--policy", "no-such-policy", "--recovery-storage", storage), "no-such-policy"),
        (("protect", "web1", "--policy", "fast", "--recovery-storage", storage, "--storage-option", "x"),
         "KEY=VALUE"),
        (("failover", "test", "lonely"), "not protected"),
        (("failback", "web1", "--mode", "sideways"), "sideways"),
        (("jobs", "show", "no-such-job"), "no-such-job"),
        (("jobs", "watch", "no-such-job"), "no-such-job"),
    ]
    for proc, (_args, needle) in zip(asr_many(site, [args for args, _ in cases]), cases, strict=True):
        check_refused(proc, needle)
    assert counts() == before


def test_protect_drill_and_jobs(site: RecoverySite, fabric: dict[str, Any]):
    proc = asr(site, "protect", "web1", "--policy", "fast", "--recovery-storage", site.recovery_storage,
               "--recovery-host", "dr1", "--wait")
    protect_job = job_id_of(proc.stdout)
    assert f"job {protect_job} (enable_protection) succeeded" in proc.stdout
    assert "done     Finalize protection" in proc.stdout  # the steps were followed as they finished

    # A second request while protected is refused with a clear message, and starts no job.
    jobs_before = counts()["jobs"]
    refused(site, "protect", "web1", "--policy", "fast", "--recovery-storage", site.recovery_storage,
            needle="web1")
    assert counts()["jobs"] == jobs_before

    points = asr_json(site, "points", "web1")
    assert points and {"id", "created_at", "kind"} <= set(points[0])
    assert points[0]["id"] in asr(site, "points", "web1").stdout

    verify = asr_when_free(site, "verify", "web1", "--point", points[0]["id"], "--wait")
    assert re.search(r"^job \S+ \(verify_recovery_point\) succeeded", verify.stdout, re.M), verify.stdout
    # Then what it checked: the point, and each disk's version and manifest root.
    assert f"recovery point {points[0]['id']}: every disk matches" in verify.stdout, verify.stdout
    assert re.search(r"^  disk0: replica version \d+, manifest root [0-9a-f]{32}$", verify.stdout, re.M), verify.stdout

    drill = json.loads(asr_when_free(site, "failover", "test", "web1", "--wait", "--json").stdout)
    assert drill["state"] == "succeeded" and drill["kind"] == "test_failover", drill
    assert all(step["state"] == "succeeded" for step in drill["steps"])

    # vm show --json: where every disk is at the primary, on the recovery storage, and at the recovery host.
    shown = asr_json(site, "vm", "show", "web1")
    vm = site.host("host1").get_vm("web1")
    storage = site.storage()
    try:
        for disk in shown["disks"]:
            assert Path(disk["primary_path"]) == vm.disk(disk["name"]).path
            assert disk["replica"].endswith(".vhd")
            replica = storage.open_disk(disk["replica"])  # the name is the one the storage holds
            replica.close()
            assert Path(disk["replica_path"]) == site.recovery_dir / disk["replica"]
            # The drill's test VM runs on dr1 from its own copy of the disk; nothing is failed over.
            assert disk["test_path"] and Path(disk["test_path"]).is_file(), disk
            assert disk["recovery_host"] is None and disk["recovery_path"] is None, disk
    finally:
        storage.close()
    assert shown["protection"]["state"] == "protected"
    assert "disk0" in asr(site, "vm", "show", "web1").stdout

    # At a terminal the job is drawn as a live area redrawn in place (cursor up, clear), then its summary.
    deadline = time.monotonic() + 30
    while True:
        status, screen = asr_on_terminal(site, "failover", "cleanup", "web1", "--wait")
        busy = "is busy with job" in screen or "ended just now" in screen
        if not (status == 2 and busy and time.monotonic() < deadline):
            break
        time.sleep(0.3)
    assert status == 0, screen
    # A job this short can end before the first frame is drawn (the redraw itself is checked by
    # test_progress_view_redraws_bars_on_a_terminal_and_writes_lines_elsewhere): the steps stay as lines,
    # and a live frame, when there was one, is cleared before the summary.
    assert "done     Delete test VM" in screen, screen
    assert ("steps" not in screen) or "F\x1b[J" in screen, screen
    # The last line, but for the warning a plain-text broker allowed by ASR_INSECURE_TRANSPORT logs once.
    lines = [line for line in screen.splitlines() if line.strip() and not line.startswith("INSECURE TRANSPORT")]
    assert "(test_failover_cleanup) succeeded" in lines[-1], screen

    listed = asr_json(site, "jobs", "list", "--vm", "web1")
    kinds = [job["kind"] for job in listed]
    assert {"enable_protection", "verify_recovery_point", "test_failover", "test_failover_cleanup"} <= set(kinds)
    drill_id = next(job["id"] for job in listed if job["kind"] == "test_failover")
    table = asr(site, "jobs", "list", "--kind", "test_failover").stdout.splitlines()
    assert table[0].split()[:3] == ["ID", "KIND", "VM"] and any(drill_id in line for line in table[1:])

    shown_job = asr(site, "jobs", "show", protect_job).stdout
    assert "Copy disk disk0" in shown_job and "Copy disk disk1" in shown_job and "succeeded" in shown_job
    watched = asr(site, "jobs", "watch", protect_job)  # a finished job: its steps, its end, exit 0
    assert watched.stdout.splitlines()[-1].startswith(f"job {protect_job} (enable_protection) succeeded")

    health = asr_json(site, "health")
    web1 = next(row for row in health if row["vm"] == "web1")
    assert web1["health"] == "Healthy" and web1["state"] == "protected", web1
    assert "web1" in asr(site, "health").stdout

    # The replica the CLI set up equals its source, byte for byte (the test's own check, not the CLI's).
    site.vm_hosts[shown["id"]] = "host1"
    site.wait_idle(shown["id"], JOB_TIMEOUT)
    site.delta_cycle(shown["id"])
    site.verify_replica(shown["id"])


def test_a_failed_job_exits_1(site: RecoverySite, fabric: dict[str, Any]):
    # The disk the VM was registered with is gone from its host: the prerequisites check fails the job.
    disk = site.host("host1").get_vm("broken").disk("disk0").path
    disk.unlink()
    proc = asr(site, "protect", "broken", "--policy", "fast", "--recovery-storage", site.recovery_storage,
               "--wait", check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    job_id = job_id_of(proc.stdout)
    assert "FAILED   Prerequisites check" in proc.stdout
    assert proc.stdout.splitlines()[-1].startswith(f"job {job_id} (enable_protection) failed")

    assert asr(site, "jobs", "watch", job_id, check=False).returncode == 1
    snapshots = [json.loads(line) for line in asr(site, "jobs", "watch", job_id, "--json", check=False)
                 .stdout.splitlines()]
    assert snapshots and snapshots[-1]["state"] == "failed"
    assert json.loads(asr(site, "jobs", "show", job_id, "--json").stdout)["error"]

    # Restarting resumes the same job from the step where it stopped (the way out its kind declares),
    # which fails the same way while the disk is gone.
    again = asr(site, "jobs", "restart", job_id, "--wait", check=False)
    assert again.returncode == 1, again.stdout + again.stderr
    assert "resumed from the step where it stopped" in again.stdout, again.stdout
    assert job_id_of(again.stdout) == job_id and "FAILED   Prerequisites check" in again.stdout


def test_follow_times_out_then_cancel(site: RecoverySite, fabric: dict[str, Any]):
    # No agent serves host `edge`: the job's first step stays queued, so following it runs out of time.
    started = time.monotonic()
    proc = asr(site, "protect", "lonely", "--policy", "fast", "--recovery-storage", site.recovery_storage,
               "--wait", "--timeout", "2", check=False)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert time.monotonic() - started < 20
    job_id = job_id_of(proc.stdout)
    assert "still" in proc.stderr and job_id in proc.stderr

    assert f"job {job_id} cancelled" in asr(site, "jobs", "cancel", job_id).stdout
    watched = asr(site, "jobs", "watch", job_id, check=False)
    assert watched.returncode == 1 and "cancelled" in watched.stdout.splitlines()[-1]
    assert asr(site, "jobs", "cancel", job_id).returncode == 0  # cancelling again changes nothing
    refused(site, "jobs", "retry", job_id, needle="nothing to retry")
    assert any(job["id"] == job_id for job in asr_json(site, "jobs", "list", "--state", "cancelled"))


def test_recovery_plan_definitions(site: RecoverySite, fabric: dict[str, Any], tmp_path: Path):
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps({"description": "web first, then the branch", "groups": [
        {"name": "web", "vms": ["web1"]},
        {"name": "branch", "vms": ["edge/lonely"],
         "before": [{"kind": "manual", "name": "call-branch", "instructions": "phone the branch office"}]},
    ]}))
    created = json.loads(asr(site, "plan", "create", "dr-drill", "--file", str(plan_file), "--json").stdout)
    assert [group["name"] for group in created["groups"]] == ["web", "branch"]

    shown = asr(site, "plan", "show", "dr-drill").stdout
    assert "host1/web1" in shown and "edge/lonely" in shown and "phone the branch office" in shown
    assert "dr-drill" in asr(site, "plan", "list").stdout

    # Every problem of a bad plan at once; nothing is created. A plan whose VM is not protected does not run.
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"name": "g", "vms": ["no-such-vm"]}, {"name": "g", "vms": []}]))
    jobs_before = operator_jobs()
    refusals = asr_many(site, [("plan", "create", "bad", "--file", str(bad)),
                               ("plan", "failover", "dr-drill", "--kind", "test"),
                               ("plan", "show", "bad"),
                               ("plan", "validate", "dr-drill", "--kind", "test")])
    check_refused(refusals[0], "no-such-vm")
    assert "used twice" in refusals[0].stderr and "non-empty list of VMs" in refusals[0].stderr
    check_refused(refusals[1], "lonely")
    check_refused(refusals[2], "bad")
    check_refused(refusals[3], "lonely")  # the dry run refuses as the run does
    assert operator_jobs() == jobs_before

    # A plan never carries a command line: only scripts registered on the workers (none are, here).
    leak = tmp_path / "leak.json"
    leak.write_text(json.dumps([{"name": "g", "vms": ["web1"],
                                 "after": [{"kind": "script", "name": "s", "command": ["sh", "-c", "id; env"]}]}]))
    refusals = asr_many(site, [("plan", "create", "leak", "--file", str(leak)), ("plan", "scripts")])
    check_refused(refusals[0], "a command line (command) is not accepted")
    assert refusals[1].returncode == 0 and "no plan scripts are registered" in refusals[1].stdout, refusals[1]


def operator_jobs() -> list[str]:
    """The ids of the jobs not started by beat's replication scheduler (which may start a delta cycle, a
    resync or a consistency check at any moment while a test runs)."""
    scheduled = {"delta_replication", "initial_replication", "resynchronize", "consistency_check"}
    with session_scope() as session:
        return sorted(job.id for job in session.exec(select(Job)).all() if job.kind not in scheduled)


def disk_digests(site: RecoverySite, host: str, vm: str) -> dict[str, str]:
    return {disk.name: disk_digest(disk.path) for disk in site.host(host).get_vm(vm).disks}


def test_failovers_a_plan_waiting_for_input_failback_and_reverse(site: RecoverySite, fabric: dict[str, Any],
                                                                 tmp_path: Path):
    """Every failover verb on web1 (protected, drilled above), each job followed to its end through the CLI
    and the item's state read back with `vm show`: an unplanned failover then cancelled; a planned one run by
    a plan that waits for an operator (`plan resume`), committed; a failback that waits for `failover
    complete`, committed; `reverse`. The disks are compared byte for byte at each landing."""
    with session_scope() as session:  # read here: each `asr` costs a second or two of imports
        vm_id = session.exec(select(VirtualMachine.id).where(VirtualMachine.name == "web1")).one()
    site.vm_hosts[vm_id] = "host1"
    site.wait_idle(vm_id, JOB_TIMEOUT)
    primary = disk_digests(site, "host1", "web1")  # no workload runs: the primary's bytes stay these

    def followed(*args: str, kind: str, when_free: bool = False) -> dict[str, Any]:
        proc = (asr_when_free if when_free else asr)(site, *args, "--wait", "--json")
        job = json.loads(proc.stdout)
        assert (job["kind"], job["state"]) == (kind, "succeeded"), job
        return job

    def shown() -> dict[str, Any]:
        return asr_json(site, "vm", "show", "web1")

    # An unplanned failover starts web1 on dr1 from its replica; cancelled, web1 is protected again on host1.
    followed("failover", "unplanned", "web1", kind="unplanned_failover", when_free=True)
    assert disk_digests(site, "dr1", "web1") == primary
    vm = shown()
    assert vm["protection"]["state"] == "failed_over", vm["protection"]
    assert (vm["failover"]["kind"], vm["failover"]["status"]) == ("unplanned", "succeeded"), vm["failover"]
    assert {disk["recovery_host"] for disk in vm["disks"]} == {"dr1"}, vm["disks"]
    followed("failover", "cancel", "web1", kind="cancel_failover")
    vm = shown()
    assert vm["protection"]["state"] == "protected" and vm["failover"]["status"] == "cancelled", vm
    assert "web1" not in [each.name for each in site.host("dr1").list_vms()]

    # A planned failover run by a plan whose group waits for an operator; `plan resume` lets it go on.
    plan_file = tmp_path / "move-web.json"
    plan_file.write_text(json.dumps([{"name": "web", "vms": ["web1"], "before": [
        {"kind": "manual", "name": "announce", "instructions": "tell web1's users it moves"}]}]))
    asr(site, "plan", "create", "move-web", "--file", str(plan_file))
    plan_job = job_id_of(asr_when_free(site, "plan", "failover", "move-web", "--kind", "planned").stdout)
    site.wait_job(plan_job, JOB_TIMEOUT, states=("waiting_action",))
    assert site.item(vm_id)["state"] == "protected"  # nothing failed over before the operator's word
    resumed = asr(site, "plan", "resume", plan_job, "--note", "users told", "--wait")
    assert re.search(rf"^job {plan_job} \(plan_planned_failover\) succeeded", resumed.stdout, re.M), resumed.stdout
    job, vm = (json.loads(proc.stdout) for proc in asr_many(site, [("jobs", "show", plan_job, "--json"),
                                                                  ("vm", "show", "web1", "--json")]))
    announce = next(step for step in job["steps"] if step["name"] == "Group web: before action announce")
    assert announce["state"] == "succeeded" and announce["result"]["note"] == "users told", announce
    assert disk_digests(site, "dr1", "web1") == primary
    assert vm["protection"]["state"] == "failed_over" and vm["failover"]["kind"] == "planned", vm
    followed("failover", "commit", "web1", kind="commit_failover")

    # The recovery VM writes; failback stages the difference on host1 and waits; `complete` swaps it in.
    site.host("dr1").start_workload("web1", rate_mb_s=0.2, seed=9)
    time.sleep(1.0)
    followed("failback", "web1", kind="failback")
    assert site.item(vm_id)["state"] == "failback_ready"
    assert disk_digests(site, "host1", "web1") == primary, "nothing touches the primary before the swap"
    followed("failover", "complete", "web1", kind="failback_completion")
    came_back = disk_digests(site, "dr1", "web1")
    assert disk_digests(site, "host1", "web1") == came_back != primary, "the recovery VM's writes come back"
    vm = shown()
    assert vm["protection"]["state"] == "failed_back" and vm["failover"]["kind"] == "failback", vm
    followed("failover", "commit", "web1", kind="commit_failback")

    # Reverse replication protects web1 again from host1: its replica equals its disks.
    followed("reverse", "web1", kind="reverse_replication")
    assert site.item(vm_id)["state"] == "protected"
    site.final_cycle(vm_id)
    site.verify_replica(vm_id)


def test_api_keys_are_created_shown_once_listed_without_the_key_and_revoked(tmp_path):
    """`asr apikey`: the printed key is accepted by the API's check, never listed, refused once revoked."""
    import os

    from sqlalchemy import create_engine
    from sqlmodel import Session

    from models.apikeys import verify_api_key
    from models.db import init_db

    url = f"sqlite:///{tmp_path / 'keys.db'}"
    env = {**os.environ, "ASR_DATABASE_URL": url}
    init_db(create_engine(url))

    def run(*args: str, code: int = 0) -> subprocess.CompletedProcess:
        proc = subprocess.run([ASR, "apikey", *args], capture_output=True, text=True, timeout=60, env=env)
        assert proc.returncode == code, proc.stderr
        return proc

    key = json.loads(run("create", "ops", "--json").stdout)["key"]
    engine = create_engine(url)
    with Session(engine) as session:
        assert verify_api_key(session, key) is not None
    listed = run("list").stdout
    assert "ops" in listed and key not in listed
    assert "already exists" in run("create", "ops", code=2).stderr
    run("revoke", "ops")
    with Session(engine) as session:
        assert verify_api_key(session, key) is None

    # Roles: reader unless told; the role is listed; an unknown role is refused.
    assert json.loads(run("create", "viewer", "--json").stdout)["role"] == "reader"
    created = run("create", "boss", "--role", "admin").stdout
    assert "API key boss (admin): asr_" in created
    with Session(engine) as session:
        assert verify_api_key(session, created.split(": ")[1].split()[0]).role == "admin"
    assert "admin" in run("list").stdout
    assert "root" in run("create", "x", "--role", "root", code=2).stderr
    # A key for ASR_API_KEY_HASHES: its entry carries the role and the key's id; nothing is stored.
    from models.apikeys import env_key_role, key_id

    made = json.loads(run("create-env", "--role", "operator", "--json").stdout)
    assert made["entry"].startswith(f"operator:{key_id(made['key'])}:scrypt$")
    assert env_key_role(made["key"], made["entry"]) == "operator"

    # Disabling protection asks first (no answer: nothing done), or takes --yes.
    proc = subprocess.run([ASR, "unprotect", "ghost"], capture_output=True, text=True, timeout=60, env=env,
                          input="")
    assert proc.returncode == 1 and "Disable protection of ghost?" in proc.stdout + proc.stderr, proc
    proc = subprocess.run([ASR, "unprotect", "ghost", "--yes"], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2 and "ghost" in proc.stderr and "not found" in proc.stderr, proc
