"""`asr demo`: the whole Site Recovery Engine on this machine, every disk checked byte for byte.

One command starts a deployment of its own (a private redis-server on a free port, a SQLite database in
the work folder, Celery workers for orchestration and recovery and for each host, beat, Flower with
basic authentication, and Azurite for the Azure backend), then runs what an operator does, through the
same workflows the API and the CLI call:

1. register a primary site with two hosts, a recovery site with one host, network mappings, a policy
   (app-consistent points on); create four VMs (two per host, two disks each) with initial data;
2. protect them all while their writers run;
3. run delta cycles; pause the writers, verify every replica against its source;
4. drill one VM to the latest point and clean up, replication going on meanwhile;
5. planned failover of that VM, commit, a writer on the recovery VM, failback (minimize downtime),
   complete, commit, reverse replication;
6. a recovery plan of the other VMs (two groups and a script action) for a test failover, cleaned up;
7. a report of every stage with its checks and timings (`--json`: as JSON).

Everything it started is stopped at the end, on Ctrl-C, on SIGTERM and on failure; the exit status is 0
only when every check passed. A stage that fails ends the run (later stages would build on broken
state); `--inject-failure corrupt-replica` damages a replica before its check, to prove the checks fail.

This module is the entry point (options, the work folder, signals, what is left running); the stages are
in api/demo_stages.py, the deployment they run on in api/demo_site.py, the report in api/demo_report.py.
"""
from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from pathlib import Path

import click

from api.demo_report import Check, Console, Report, print_report

MARKER = ".asr-demo"
"""A file in the work folder saying the demo made it, so the demo only ever empties its own folders."""
FAILURES = ("corrupt-replica",)


# ---- leftovers -------------------------------------------------------------------------------------------------
def _ancestors() -> set[int]:
    """This process and its parents (a shell or `timeout` running the demo names the folder too)."""
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    return pids


def processes_under(folder: Path) -> list[tuple[int, str]]:
    """Processes of this user, other than this one and its parents, whose working directory or command
    line is inside `folder` (read from /proc: redis-server rewrites its command line, but it runs in its
    data folder; Celery and the writers run in folders of the work folder too)."""
    folder = folder.resolve()
    skip = _ancestors()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in skip:
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            cwd = os.readlink(entry / "cwd")
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue  # a zombie runs nothing; its parent (this process) reaps it
        except (OSError, IndexError):
            continue  # gone meanwhile, or not ours to read
        if str(folder) in command or cwd == str(folder) or cwd.startswith(f"{folder}/"):
            found.append((int(entry.name), command))
    return found


def _prepare(workdir: Path) -> None:
    """Empty the work folder, but only one the demo made (or an empty or missing one): a mistyped
    --workdir must never cost anyone their files."""
    if workdir.exists():
        if not workdir.is_dir():
            raise click.UsageError(f"--workdir {workdir} is not a folder")
        if any(workdir.iterdir()) and not (workdir / MARKER).exists():
            raise click.UsageError(f"--workdir {workdir} is not empty and was not made by `asr demo`; "
                                   f"choose a new or empty folder")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    (workdir / MARKER).write_text("made by asr demo; emptied by the next run\n")


def _kept_paths(report: Report) -> list[Path]:
    """What a successful run keeps for inspection: the real guest's disks and the recovery storage folder."""
    paths = report.paths
    kept = [*paths.get("source_disks", []), *paths.get("recovery_disks", [])]
    root = paths.get("storage_root")
    if root and Path(root).is_absolute():
        kept.append(root)
    return [Path(p).resolve() for p in kept]


def _remove_except(folder: Path, kept: list[Path]) -> None:
    """Remove everything under `folder` but the `kept` paths (and the folders leading to them)."""
    if not kept:
        shutil.rmtree(folder, ignore_errors=True)
        return
    for entry in folder.iterdir():
        path = entry.resolve()
        if path in kept or any(path.is_relative_to(k) for k in kept) or path.name == MARKER:
            continue
        if entry.is_dir() and not entry.is_symlink() and any(k.is_relative_to(path) for k in kept):
            _remove_except(entry, kept)
        elif entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _stay_up(held, report: Report, console: Console, as_json: bool, workdir: Path, started: float) -> None:
    """--stay: the report, then the deployment left running for a person to click through until Ctrl-C (or
    SIGTERM); then it is stopped, and the report's cleanup check is made as without --stay."""
    from api.demo_site import FLOWER_USER
    from api.demo_stages import Interrupted

    def interrupted(signum, _frame):
        raise Interrupted(f"signal {signum}")

    console.say(f"demo finished in {time.monotonic() - started:.0f} s")
    print_report(report, console, as_json, workdir)
    sys.stdout.flush()
    flower = held.flower.url if held.flower is not None else None
    console.say(f"--stay: the deployment keeps running. Web console: {held.console_url} (API key "
                f"{held.console_key}); Flower: {flower} (user {FLOWER_USER}, password {held.flower_password}). "
                f"Ctrl-C stops it.")
    previous = signal.signal(signal.SIGTERM, interrupted)
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        while True:
            signal.pause()
    except (KeyboardInterrupt, Interrupted):
        console.say("stopping the deployment kept up by --stay")
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
        held.close()


@click.command("demo")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=Path("demo-work"),
              show_default=True, help="Work folder: hosts, recovery site, database, logs (emptied first; "
                                      "only a folder the demo made, or an empty one).")
@click.option("--backend", type=click.Choice(["local", "azure", "both"]), default="local", show_default=True,
              help="Recovery storage: a local directory, Azure page blobs on an Azurite the demo starts, or both "
                   "one after the other.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout (progress goes to stderr).")
@click.option("--seed", default=7, show_default=True, help="Seed of the VMs' initial data and writers.")
@click.option("--time-scale", default=10.0, show_default=True, type=click.FloatRange(min=1.0),
              help="Divides the engine's delays (a 30 s copy frequency becomes 3 s).")
@click.option("--keep", is_flag=True, help="Keep the whole work folder after a successful run (a failed run keeps "
                                           "it; a successful one keeps the real guest's disks and the recovery "
                                           "storage).")
@click.option("--inject-failure", type=click.Choice(FAILURES), default=None,
              help="Break something on purpose to see a check fail: corrupt-replica overwrites 4 KiB of a "
                   "replica just before the replicas are verified.")
@click.option("--stay", is_flag=True, help="After a successful run and its report, keep the (last backend's) "
                                           "deployment running, its web console and Flower open to click "
                                           "through, until Ctrl-C.")
def demo(workdir: Path, backend: str, as_json: bool, seed: int, time_scale: float, keep: bool,
         inject_failure: str | None, stay: bool):
    """Run Site Recovery Engine end to end on this machine and check every disk byte for byte.

    Protects four VMs on two hosts with their writers running, replicates, drills, fails over and back,
    reverse-replicates and runs a recovery plan, then prints a report. Exit status 0 only when every
    check passed."""
    # The deployment and the stages only when the demo runs: `asr` loads this module for every command.
    from api.demo_stages import Interrupted, run_backend

    console = Console(to_stderr=as_json)
    workdir = workdir.resolve()
    _prepare(workdir)
    report = Report()
    backends = ("local", "azure") if backend == "both" else (backend,)

    def interrupted(signum, _frame):
        raise Interrupted(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupted)
    # Ctrl-C raises KeyboardInterrupt even when started from a shell that ignores SIGINT for background
    # jobs: the demo must always be stoppable, and always stop what it started.
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    started = time.monotonic()
    held = None
    try:
        for number, name in enumerate(backends, 1):
            held = run_backend(name, workdir / name, console, report, time_scale=time_scale, seed=seed,
                               inject=inject_failure, keep_up=stay and number == len(backends))
            if not all(s.ok for s in report.stages):
                break
    except (KeyboardInterrupt, Interrupted):
        report.interrupted = True
        console.say("interrupted: everything the demo started has been stopped")
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
    if held is not None:
        _stay_up(held, report, console, as_json, workdir, started)
    left = processes_under(workdir)
    report.cleanup.append(Check("nothing the demo started is left running", not left,
                                "none" if not left else "; ".join(f"pid {p}: {c[:120]}" for p, c in left)))
    if held is None:
        console.say(f"demo finished in {time.monotonic() - started:.0f} s")
        print_report(report, console, as_json, workdir)
    else:  # the report was printed before the deployment was kept up: only what stopping it found
        cleanup = report.cleanup[-1]
        console.say(f"cleanup {'passed' if cleanup.ok else 'FAILED'}: {cleanup.check}: {cleanup.detail}")
    if report.ok and not keep:
        _remove_except(workdir, _kept_paths(report))
    sys.exit(0 if report.ok else (130 if report.interrupted else 1))
