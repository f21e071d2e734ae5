"""The report of `asr demo`: every stage's checks and timings, printed as a table or as JSON, and the
byte-for-byte comparison the checks rest on."""
from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click

MiB = 1 << 20


@dataclass
class Check:
    check: str
    ok: bool
    detail: str


@dataclass
class Stage:
    backend: str
    stage: str
    title: str
    status: str = "skipped"  # passed | failed | interrupted | skipped
    seconds: float = 0.0
    checks: list[Check] = field(default_factory=list)
    jobs: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "passed"


@dataclass
class Report:
    stages: list[Stage] = field(default_factory=list)
    flower: dict[str, dict[str, Any]] = field(default_factory=dict)
    """By backend: Flower's address and the tasks it saw."""
    cleanup: list[Check] = field(default_factory=list)
    interrupted: bool = False
    paths: dict[str, Any] = field(default_factory=dict)
    """Where the real-VM stage's files are kept: storage_root, source_disks, recovery_disks."""

    @property
    def failed_checks(self) -> list[str]:
        named = [f"[{s.backend}] {s.stage}: {c.check}: {c.detail}" for s in self.stages for c in s.checks if not c.ok]
        named += [f"[{s.backend}] {s.stage}: {s.error}" for s in self.stages if s.error]
        return named + [f"cleanup: {c.check}: {c.detail}" for c in self.cleanup if not c.ok]

    @property
    def ok(self) -> bool:
        return (not self.interrupted and bool(self.stages) and all(s.ok for s in self.stages)
                and all(c.ok for c in self.cleanup))

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "interrupted": self.interrupted, "failed_checks": self.failed_checks,
            "flower": self.flower, "paths": self.paths,
            "stages": [{**asdict(s), "ok": s.ok} for s in self.stages],
            "cleanup": [asdict(c) for c in self.cleanup],
        }


class Console:
    """Progress lines: on stdout, or on stderr with --json so stdout holds the JSON report alone."""

    def __init__(self, to_stderr: bool) -> None:
        self.to_stderr = to_stderr

    def say(self, text: str) -> None:
        click.echo(text, err=self.to_stderr)


# ---- byte-for-byte comparison ---------------------------------------------------------------------------
def compare_disks(a, b) -> tuple[bool, str]:
    """Open disk endpoints (or paths) `a` and `b`: equal content, or where they first differ."""
    from datapath.compare import first_difference
    from datapath.disk import open_disk

    with _endpoint(a, open_disk) as left, _endpoint(b, open_disk) as right:
        if left.size != right.size:
            return False, f"sizes differ: {left.size} and {right.size} bytes"
        offset = first_difference(left, right)
        if offset is None:
            return True, f"{left.size // MiB} MiB identical"
        return False, f"first difference at offset {offset}"


@contextmanager
def _endpoint(disk, open_disk) -> Iterator[Any]:
    if isinstance(disk, (str, Path)):
        with open_disk(disk) as opened:
            yield opened
    else:
        yield disk


# ---- printing ----------------------------------------------------------------------------------------------
def print_report(report: Report, console: Console, as_json: bool, workdir: Path) -> None:
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
        return
    say = console.say
    say("")
    say(f"{'backend':8} {'stage':10} {'result':7} {'checks':>7} {'seconds':>8}  title")
    for s in report.stages:
        say(f"{s.backend:8} {s.stage:10} {s.status:7} {sum(c.ok for c in s.checks):>3}/{len(s.checks):<3} "
            f"{s.seconds:8.1f}  {s.title}")
    for c in report.cleanup:
        say(f"{'':8} {'cleanup':10} {'passed' if c.ok else 'failed':7} {'':>7} {'':>8}  {c.check}: {c.detail}")
    for backend, flower in report.flower.items():
        say(f"[{backend}] Flower ({flower['url']}) saw {flower['tasks_seen']} tasks: {', '.join(flower['task_names'])}")
    if report.paths:
        say(f"kept for inspection: recovery storage {report.paths.get('storage_root')}; the real guest's disks "
            f"{', '.join(report.paths.get('source_disks', []))} (primary) and "
            f"{', '.join(report.paths.get('recovery_disks', []))} (recovery host)")
    for line in report.failed_checks:
        say(f"FAILED {line}")
    logs = ", ".join(dict.fromkeys(str(workdir / s.backend / "logs") for s in report.stages))
    say("demo " + ("succeeded: every check passed" if report.ok
                   else f"FAILED (the work folder is kept; logs in {logs})"))
