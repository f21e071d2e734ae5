"""The operator's verbs of `asr`: sites, hosts, VMs, networks, policies, protection, failover, failback,
recovery plans, recovery points, health and jobs.

Every command is a thin shell over `api.service` (the same functions the REST API serves), imported inside
the commands so that `asr --help` and `asr disk ...` work without a database or broker. Output is an
aligned table or a few `key: value` lines by default and the service's dicts with `--json`. Commands that
start a job print its id; with `--wait` they follow it like `asr jobs watch` and exit 1 unless it
succeeded. Errors are one line on stderr, `asr: error: ...`, and exit status 2.

Exit statuses: 0 done (a followed job succeeded), 1 a followed job failed or was cancelled, 2 the request
was refused (bad input, unknown name, wrong state, nothing changed), 3 `--timeout` ran out while
following a job that is still going, 130 interrupted (the job goes on).
"""
from __future__ import annotations

import json
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from datetime import time as time_of_day
from pathlib import Path
from typing import IO, Any

import click

from api.cli import _fail, _Group, main

EXIT_JOB_FAILED = 1
EXIT_TIMEOUT = 3
EXIT_INTERRUPTED = 130
FINISHED_STATES = ("succeeded", "failed", "cancelled")
STEP_DONE_STATES = ("succeeded", "failed", "skipped", "cancelled")
WATCH_INTERVAL_S = 0.5
# A step's progress counts bytes when it copies disk data and small counts (logs, disks) otherwise; a
# total this large can only be bytes, so it is shown as a size.
BYTES_THRESHOLD = 1 << 20
BAR_WIDTH = 24
NOTHING = "-"


# ---- errors --------------------------------------------------------------------------------------------------
def _service():
    """api.service, imported on first use (it pulls in the models, the engine and Celery)."""
    try:
        from api import service
    except ImportError as exc:  # a broken install, not an operator's mistake; still one readable line
        _fail(f"the service layer cannot be loaded: {exc}")
    return service


def _connection_problem(exc: Exception) -> str | None:
    """A readable line when `exc` says the broker or the database cannot be reached."""
    import os

    import kombu.exceptions
    import redis.exceptions
    import sqlalchemy.exc

    if isinstance(exc, (redis.exceptions.ConnectionError, kombu.exceptions.OperationalError)):
        url = os.environ.get("ASR_BROKER_URL", "redis://127.0.0.1:6379/0 (the default; set ASR_BROKER_URL)")
        return f"cannot reach the broker at {_redact(url)}: {exc}"
    if isinstance(exc, sqlalchemy.exc.OperationalError):
        url = os.environ.get("ASR_DATABASE_URL", "the default database (set ASR_DATABASE_URL)")
        return f"cannot use the database {_redact(url)}: {exc.orig if exc.orig is not None else exc}"
    return None


def _redact(url: str) -> str:
    # A URL may carry a password (postgresql://user:secret@host/db); an error line must not print it.
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


@contextmanager
def _service_errors() -> Iterator[None]:
    """The service's refusals (ServiceError and its kinds) and unreachable services become one line on
    stderr and exit status 2, as the data path's errors do in `_Group`."""
    try:
        yield
    except click.exceptions.ClickException:
        raise
    except (click.exceptions.Exit, click.exceptions.Abort):
        raise
    except Exception as exc:
        service = sys.modules.get("api.service")
        if service is not None and isinstance(exc, service.ServiceError):
            _fail(str(exc))
        problem = _connection_problem(exc)
        if problem is not None:
            _fail(problem)
        raise


class _OpCommand(click.Command):
    def invoke(self, ctx: click.Context) -> Any:
        with _service_errors():
            return super().invoke(ctx)


class _OpGroup(_Group):
    command_class = _OpCommand

    def invoke(self, ctx: click.Context) -> Any:
        with _service_errors():
            return super().invoke(ctx)


_OpGroup.group_class = _OpGroup


def _command(group: click.Group, name: str, **kwargs: Any) -> Callable[[Callable[..., Any]], click.Command]:
    return group.command(name, cls=_OpCommand, **kwargs)


# ---- options shared by many commands -------------------------------------------------------------------------
def json_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (for scripts).")(fn)


def wait_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None, metavar="SECONDS",
                      help="Follow the job at most this long (implies --wait; then exit 3, the job goes on).")(fn)
    return click.option("--wait", is_flag=True,
                        help="Follow the job to its end (progress bars); exit 1 unless it succeeded.")(fn)


def _key_values(option: str, pairs: Iterable[str], *, typed: bool) -> dict[str, Any]:
    """`k=v` pairs as a dict. With `typed`, a value that reads as a JSON number, boolean or null is that
    (storage options such as max_in_flight=8 are numbers); anything else stays text."""
    result: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint=option)
        if key in result:
            raise click.BadParameter(f"{key!r} is given twice", param_hint=option)
        if typed:
            try:
                decoded = json.loads(value)
            except ValueError:
                decoded = value
            value = decoded if isinstance(decoded, (int, float, bool)) or decoded is None else value
        result[key] = value
    return result


# ---- output --------------------------------------------------------------------------------------------------
_ISO_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?([+-]\d\d:\d\d|Z)?$")


def _emit_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=str))


def _parse_time(text: Any) -> datetime | None:
    if not isinstance(text, str) or not _ISO_TIME.match(text):
        return None
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def format_time(value: Any) -> str:
    """An ISO timestamp as `YYYY-MM-DD HH:MM:SS` in UTC (every time the engine keeps is UTC)."""
    moment = _parse_time(value)
    if moment is None:
        return NOTHING if value in (None, "") else str(value)
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def format_duration(seconds: Any) -> str:
    """12.3 s, 4m 05s, 2h 03m."""
    if seconds is None:
        return NOTHING
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def format_size(n: Any) -> str:
    from datapath.disk import format_size as size_text

    return NOTHING if n is None else size_text(int(n))


def cell(value: Any) -> str:
    """One table cell: times shortened, lists joined, nothing as '-'."""
    if value is None or value == "" or value == [] or value == {}:
        return NOTHING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(cell(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={cell(v)}" for k, v in value.items())
    if isinstance(value, str) and _ISO_TIME.match(value):
        return format_time(value)
    return " ".join(str(value).split())  # a cell is one line whatever the value holds


Column = tuple[str, "str | Callable[[Mapping[str, Any]], Any]"]


def _value(row: Mapping[str, Any], getter: str | Callable[[Mapping[str, Any]], Any]) -> Any:
    if callable(getter):
        return getter(row)
    return pick(row, *getter.split("|"))


def pick(row: Mapping[str, Any] | None, *keys: str) -> Any:
    """The first of `keys` that `row` has a value for (dotted keys reach into nested dicts)."""
    if not row:
        return None
    for key in keys:
        value: Any = row
        for part in key.split("."):
            value = value.get(part) if isinstance(value, Mapping) else None
        if value not in (None, ""):
            return value
    return None


def render_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column], *,
                 max_width: int | None = None) -> list[str]:
    """Rows as lines of left-aligned columns under upper-case headers, two spaces apart. Lines are cut to
    `max_width` (when given: a terminal's width) so a long error does not wrap the table."""
    table = [[header.upper() for header, _ in columns]]
    table += [[cell(_value(row, getter)) for _, getter in columns] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    lines = []
    for line in table:
        text = "  ".join(value.ljust(width) for value, width in zip(line, widths)).rstrip()
        if max_width and len(text) > max_width:
            text = text[:max_width - 3] + "..."
        lines.append(text)
    return lines


def print_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column], *, empty: str) -> None:
    if not rows:
        click.echo(empty)
        return
    width = shutil.get_terminal_size((200, 24)).columns if sys.stdout.isatty() else None
    for line in render_table(rows, columns, max_width=width):
        click.echo(line)


def print_fields(row: Mapping[str, Any], fields: Sequence[Column]) -> None:
    """`label  value` lines, labels aligned; fields without a value are left out."""
    shown = [(label, cell(_value(row, getter))) for label, getter in fields]
    shown = [(label, value) for label, value in shown if value != NOTHING]
    width = max((len(label) for label, _ in shown), default=0)
    for label, value in shown:
        click.echo(f"{label.ljust(width)}  {value}")


def _section(title: str) -> None:
    click.echo(f"\n{title}")


# ---- following a job -----------------------------------------------------------------------------------------
def progress_of(step: Mapping[str, Any]) -> tuple[int, int]:
    """(done, total) of a step: its live progress when the snapshot carries it, else the last recorded."""
    live = step.get("progress")
    if isinstance(live, Mapping) and live.get("total") is not None:
        return int(live.get("done") or 0), int(live.get("total") or 0)
    return int(step.get("progress_done") or 0), int(step.get("progress_total") or 0)


def progress_bar(done: int, total: int, width: int = BAR_WIDTH) -> str:
    fraction = min(1.0, done / total) if total > 0 else 0.0
    filled = int(round(fraction * width))
    return "[" + "#" * filled + "-" * (width - filled) + f"] {100 * fraction:5.1f}%"


def progress_amount(done: int, total: int) -> str:
    if total <= 0:
        return ""
    if total >= BYTES_THRESHOLD:
        return f"{format_size(done)} / {format_size(total)}"
    return f"{done}/{total}"


def _seconds_between(start: Any, end: Any) -> float | None:
    a, b = _parse_time(start), _parse_time(end)
    return None if a is None or b is None else max(0.0, (b - a).total_seconds())


def _steps(snapshot: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return list(snapshot.get("steps") or [])


def _job_id(snapshot: Mapping[str, Any]) -> str:
    return str(pick(snapshot, "id", "job_id") or "?")


def step_line(step: Mapping[str, Any], job_id: str, instructions: str | None = None) -> str:
    """One line for a step whose state is worth a line of its own: started, finished, or waiting."""
    name = step.get("name", "?")
    state = step.get("state")
    if state == "succeeded":
        took = _seconds_between(step.get("started_at"), step.get("ended_at"))
        return f"  done     {name}" + (f" ({format_duration(took)})" if took is not None else "")
    if state == "failed":
        return f"  FAILED   {name}: {step.get('error') or 'failed'}"
    if state == "skipped":
        return f"  skipped  {name}"
    if state == "cancelled":
        return f"  cancelled {name}"
    if state == "waiting_retry":
        return (f"  retry    {name}: attempt {step.get('attempts', '?')} failed: {step.get('error') or '?'}; "
                f"next attempt {format_time(step.get('next_attempt_at'))} (now: asr jobs retry {job_id})")
    if state == "waiting_action":
        return (f"  ACTION   {name}: {instructions or step.get('instructions') or 'an operator must act'} "
                f"(then: asr plan resume {job_id})")
    if state == "running":
        return f"  started  {name}"
    return f"  {state}  {name}"


def active_step_line(step: Mapping[str, Any]) -> str:
    done, total = progress_of(step)
    amount = progress_amount(done, total)
    return f"  {progress_bar(done, total)}  {step.get('name', '?')}" + (f"  {amount}" if amount else "")


class ProgressView:
    """Draws a job's snapshots as they come.

    On a terminal: finished and waiting steps are printed once, as lines that stay, and below them a live
    area is redrawn in place: the job's overall bar and one bar per running step. Elsewhere (a log file,
    a pipe) nothing is redrawn: a line per step event and per quarter of a running step's progress, so a
    log reads top to bottom."""

    def __init__(self, out: IO[str], *, tty: bool, width: int = 100) -> None:
        self.out = out
        self.tty = tty
        self.width = max(40, width)
        self._live_lines = 0
        self._reported: dict[str, tuple[Any, ...]] = {}  # step id -> what was last printed about it
        self._started = time.monotonic()

    def _fit(self, line: str) -> str:
        # On a terminal a wrapped line would break the cursor arithmetic of the live area; a log keeps all.
        return line if not self.tty or len(line) <= self.width else line[:self.width - 3] + "..."

    def _clear_live(self) -> None:
        if self.tty and self._live_lines:
            self.out.write(f"\x1b[{self._live_lines}F\x1b[J")
            self._live_lines = 0

    def update(self, snapshot: Mapping[str, Any]) -> None:
        job_id = _job_id(snapshot)
        # A snapshot names what manual steps ask at the job's level; a full job record has it on the step.
        asks = {w.get("step"): w.get("instructions") for w in snapshot.get("waiting_for") or []}
        events = []
        for step in _steps(snapshot):
            key = str(step.get("id") or f"{step.get('stage')}.{step.get('index')}")
            state = step.get("state")
            done, total = progress_of(step)
            if state in STEP_DONE_STATES or state in ("waiting_retry", "waiting_action"):
                mark: tuple[Any, ...] = (state, step.get("attempts"))
            elif state == "running" and not self.tty:
                quarter = int(4 * done / total) if total > 0 else 0
                mark = (state, min(quarter, 3))
            else:
                mark = (state,)
            if self._reported.get(key) == mark:
                continue
            previous = self._reported.get(key)
            self._reported[key] = mark
            if state in STEP_DONE_STATES or state in ("waiting_retry", "waiting_action"):
                events.append(step_line(step, job_id, asks.get(step.get("name"))))
            elif state == "running" and not self.tty:
                if previous is None or previous[0] != "running":
                    events.append(step_line(step, job_id))
                else:
                    events.append(f"  {done * 100 // total if total else 0:3d}%     {step.get('name', '?')}"
                                  + (f"  {progress_amount(done, total)}" if total else ""))
        self._clear_live()
        for line in events:
            self.out.write(self._fit(line) + "\n")
        if self.tty:
            live = self.live_lines(snapshot)
            for line in live:
                self.out.write(self._fit(line) + "\n")
            self._live_lines = len(live)
        self.out.flush()

    def live_lines(self, snapshot: Mapping[str, Any]) -> list[str]:
        """The redrawn area: the job's bar (steps done of all) and a bar per running step."""
        steps = _steps(snapshot)
        if snapshot.get("state") in FINISHED_STATES:
            return []
        done = sum(1 for step in steps if step.get("state") in ("succeeded", "skipped"))
        elapsed = format_duration(time.monotonic() - self._started)
        lines = [f"{progress_bar(done, len(steps))}  {done}/{len(steps)} steps  "
                 f"{snapshot.get('state', '?')}  {elapsed}"]
        lines += [active_step_line(step) for step in steps if step.get("state") == "running"]
        return lines

    def finish(self, job: Mapping[str, Any]) -> None:
        self._clear_live()
        self.out.write(job_summary(job) + "\n")
        self.out.flush()


def job_summary(job: Mapping[str, Any]) -> str:
    state = job.get("state", "?")
    took = _seconds_between(job.get("started_at") or job.get("created_at"), job.get("ended_at"))
    text = f"job {_job_id(job)} ({job.get('kind', '?')}) {state}"
    if took is not None:
        text += f" in {format_duration(took)}"
    if state != "succeeded" and job.get("error"):
        text += f": {job['error']}"
    return text


def follow_job(job_id: str, *, as_json: bool, timeout: float | None, lines: bool = False) -> int:
    """Follow the job until it ends (or `timeout` runs out); returns the exit status. Without --json:
    progress bars (a terminal) or progress lines, then a summary. With --json: `lines` prints each
    snapshot as one line of JSON as it comes (for `jobs watch`), otherwise only the final job."""
    service = _service()
    tty = sys.stdout.isatty() and not as_json
    view = ProgressView(sys.stdout, tty=tty, width=shutil.get_terminal_size((100, 24)).columns)
    try:
        for snapshot in service.job_events(job_id, interval=WATCH_INTERVAL_S, timeout=timeout):
            if as_json:
                if lines:
                    click.echo(json.dumps(snapshot, default=str))
            else:
                view.update(snapshot)
    except KeyboardInterrupt:
        view._clear_live()
        click.echo(f"asr: stopped following job {job_id}; it goes on (asr jobs watch {job_id})", err=True)
        return EXIT_INTERRUPTED
    job = service.show_job(job_id)  # the record of the end, with the error, whatever the stream carried
    if job.get("state") not in FINISHED_STATES:
        view._clear_live()
        if as_json and not lines:
            _emit_json(job)
        click.echo(f"asr: job {job_id} is still {job.get('state')} after {format_duration(timeout)}; "
                   f"it goes on (asr jobs watch {job_id})", err=True)
        return EXIT_TIMEOUT
    if as_json:
        if not lines:  # (with `lines` the stream's last snapshot, printed already, is the finished job)
            _emit_json(job)
    else:
        view.update(job)
        view.finish(job)
    return 0 if job.get("state") == "succeeded" else EXIT_JOB_FAILED


def started(result: Mapping[str, Any], *, as_json: bool, wait: bool = False, timeout: float | None = None) -> None:
    """What every command that starts a job prints: its id (or the dict); with --wait, the job followed."""
    job_id = str(result.get("job_id"))
    if not as_json:
        what = result.get("kind") or "job"
        target = result.get("vm") or result.get("plan")
        click.echo(f"job {job_id} started: {what}" + (f" of {target}" if target else ""))
    if not wait:
        if as_json:
            _emit_json(dict(result))
        else:
            click.echo(f"follow it with: asr jobs watch {job_id}")
        return
    status = follow_job(job_id, as_json=as_json, timeout=timeout)
    if status:
        sys.exit(status)


def _job_command(group: click.Group, name: str, **kwargs: Any) -> Callable[[Callable[..., Any]], click.Command]:
    """A command that starts a job: --json, --wait and --timeout, and its result printed by `started`."""
    def decorate(fn: Callable[..., Mapping[str, Any]]) -> click.Command:
        def run(as_json: bool, wait: bool, timeout: float | None, **params: Any) -> None:
            started(fn(**params), as_json=as_json, wait=wait or timeout is not None, timeout=timeout)

        run.__name__ = fn.__name__
        run.__doc__ = fn.__doc__
        run.__click_params__ = list(getattr(fn, "__click_params__", []))  # the arguments and options of fn
        return _command(group, name, **kwargs)(json_option(wait_options(run)))

    return decorate


# ---- sites, hosts, VMs, networks, policies --------------------------------------------------------------------
@main.group(cls=_OpGroup)
def site():
    """Sites: the primary (Hyper-V) site and the recovery site hold the hosts."""


@_command(site, "add")
@click.argument("name")
@click.option("--description", default="", help="Free text shown with the site.")
@json_option
def site_add(name: str, description: str, as_json: bool):
    """Register a site called NAME."""
    result = _service().add_site(name, description)
    if as_json:
        return _emit_json(result)
    click.echo(f"site {result.get('name', name)} added (id {result.get('id')})")


SITE_COLUMNS: list[Column] = [("name", "name"), ("hosts", lambda s: _count(s.get("hosts"))),
                              ("description", "description"), ("id", "id")]


def _count(value: Any) -> Any:
    return len(value) if isinstance(value, (list, tuple, dict)) else value


@_command(site, "list")
@json_option
def site_list(as_json: bool):
    """Every site."""
    sites = _service().list_sites()
    if as_json:
        return _emit_json(sites)
    print_table(sites, SITE_COLUMNS, empty="no sites: add one with `asr site add NAME`")


@_command(site, "show")
@click.argument("name")
@json_option
def site_show(name: str, as_json: bool):
    """A site and its hosts."""
    result = _service().show_site(name)
    if as_json:
        return _emit_json(result)
    print_fields(result, [("name", "name"), ("id", "id"), ("description", "description"),
                          ("created", "created_at"), ("hosts", "hosts")])
    mappings = result.get("network_mappings") or []
    if mappings:
        _section("network mappings")
        print_table(mappings, NETWORK_COLUMNS, empty="(none)")


@main.group(cls=_OpGroup)
def host():
    """Hosts: the Hyper-V hosts of a site (each served by its own agent worker, queue host.NAME)."""


@_command(host, "add")
@click.argument("name")
@click.argument("root")
@click.option("--site", "site_name", default=None, help="The site the host belongs to.")
@click.option("--cloud", default=None, help="The VMM cloud the host belongs to (instead of --site).")
@json_option
def host_add(name: str, root: str, site_name: str | None, cloud: str | None, as_json: bool):
    """Register host NAME whose VMs live under the directory ROOT; its registration key is printed once."""
    if (site_name is None) == (cloud is None):
        raise click.UsageError("give exactly one of --site and --cloud")
    result = _service().add_host(name, root, site=site_name, cloud=cloud)
    if as_json:
        return _emit_json(result)
    click.echo(f"host {result.get('name', name)} registered in {site_name or cloud} "
               f"(queue {result.get('queue') or 'host.' + name}, id {result.get('id')})")
    click.echo(f"registration key: {result.get('registration_key')}")
    click.echo("(shown this once: only its hash is kept; the host's agent presents it)")


HOST_COLUMNS: list[Column] = [("name", "name"), ("site", "site|cloud"), ("root", "root"),
                              ("vms", "vm_count"), ("last seen", "last_seen_at"), ("id", "id")]


@_command(host, "list")
@json_option
def host_list(as_json: bool):
    """Every host, with its site and root directory."""
    hosts = _service().list_hosts()
    if as_json:
        return _emit_json(hosts)
    print_table(hosts, HOST_COLUMNS, empty="no hosts: add one with `asr host add NAME ROOT --site SITE`")


@_command(host, "show")
@click.argument("name")
@json_option
def host_show(name: str, as_json: bool):
    """A host and its VMs."""
    result = _service().show_host(name)
    if as_json:
        return _emit_json(result)
    print_fields(result, [("name", "name"), ("id", "id"), ("site", "site"), ("cloud", "cloud"), ("root", "root"),
                          ("queue", "queue"), ("registered", "registered_at"), ("last seen", "last_seen_at"),
                          ("VMs", "vms")])


@main.group(cls=_OpGroup)
def vm():
    """Virtual machines: registered as their host describes them."""


@_command(vm, "add")
@click.argument("host_name", metavar="HOST")
@click.argument("name")
@json_option
def vm_add(host_name: str, name: str, as_json: bool):
    """Register VM NAME of HOST (its disks and network adapters as the host describes them)."""
    result = _service().add_vm(host_name, name)
    if as_json:
        return _emit_json(result)
    disks = result.get("disks") or []
    click.echo(f"VM {result.get('name', name)} registered on {host_name}: {len(disks)} disk"
               f"{'s' if len(disks) != 1 else ''} (id {result.get('id')})")


def _vm_state(row: Mapping[str, Any]) -> Any:
    return pick(row, "protection_state", "protection.state", "state") or "not protected"


VM_COLUMNS: list[Column] = [("name", "name"), ("host", "host"), ("power", "power_state"),
                            ("protection", _vm_state), ("health", "health|protection.health"),
                            ("disks", lambda v: _count(v.get("disks"))), ("id", "id")]


@_command(vm, "list")
@json_option
def vm_list(as_json: bool):
    """Every registered VM and its protection state."""
    vms = _service().list_vms()
    if as_json:
        return _emit_json(vms)
    print_table(vms, VM_COLUMNS, empty="no VMs: register one with `asr vm add HOST NAME`")


def _recovery_copy(disk: Mapping[str, Any]) -> Any:
    if disk.get("recovery_path"):
        return disk["recovery_path"]
    return f"{disk['test_path']} (test)" if disk.get("test_path") else None


DISK_COLUMNS: list[Column] = [("disk", "name"), ("size", lambda d: format_size(d.get("size"))),
                              ("format", "format"), ("primary", "primary_path"), ("replica", "replica"),
                              ("at recovery host", _recovery_copy)]


@_command(vm, "show")
@click.argument("vm_name", metavar="VM")
@json_option
def vm_show(vm_name: str, as_json: bool):
    """A VM: its disks (where they are at the primary, the replica's name on the recovery storage, and the
    disk at the recovery host after a failover), adapters, protection and latest failover."""
    result = _service().show_vm(vm_name)
    if as_json:
        return _emit_json(result)
    print_fields(result, [("name", "name"), ("id", "id"), ("host", "host"), ("power", "power_state"),
                          ("generation", "generation"), ("recovery storage", "recovery_storage")])
    _section("disks")
    print_table(result.get("disks") or [], DISK_COLUMNS, empty="(none)")
    adapters = result.get("adapters") or []
    if adapters:
        _section("network adapters")
        print_table(adapters, [("adapter", "name"), ("network", "vm_network"), ("public ip", "public_ip")],
                    empty="(none)")
    protection = result.get("protection")
    _section("protection")
    if protection:
        print_fields(protection, HEALTH_FIELDS)
    else:
        click.echo("not protected: asr protect VM --policy P --recovery-storage URL")
    failover = result.get("failover")
    if failover:
        _section("latest failover")
        print_fields(failover, FAILOVER_FIELDS)


@main.group(cls=_OpGroup)
def network():
    """Network mappings: which recovery network a VM network lands in on failover."""


@_command(network, "add")
@click.argument("source_network")
@click.argument("recovery_network")
@click.argument("recovery_subnet")
@click.option("--site", "site_name", default=None, help="The site whose VM network this maps.")
@click.option("--cloud", default=None, help="The VMM cloud whose VM network this maps (instead of --site).")
@json_option
def network_add(source_network: str, recovery_network: str, recovery_subnet: str, site_name: str | None,
                cloud: str | None, as_json: bool):
    """Map SOURCE_NETWORK to RECOVERY_NETWORK, whose addresses come from RECOVERY_SUBNET (CIDR)."""
    if (site_name is None) == (cloud is None):
        raise click.UsageError("give exactly one of --site and --cloud")
    result = _service().add_network_mapping(source_network, recovery_network, recovery_subnet,
                                            site=site_name, cloud=cloud)
    if as_json:
        return _emit_json(result)
    click.echo(f"network {source_network} ({site_name or cloud}) -> {recovery_network} {recovery_subnet}")


NETWORK_COLUMNS: list[Column] = [("source network", "source_network"), ("site", "site|cloud"),
                                 ("recovery network", "recovery_network"), ("subnet", "recovery_subnet"),
                                 ("id", "id")]


@_command(network, "list")
@json_option
def network_list(as_json: bool):
    """Every network mapping."""
    mappings = _service().list_network_mappings()
    if as_json:
        return _emit_json(mappings)
    print_table(mappings, NETWORK_COLUMNS,
                empty="no network mappings: add one with `asr network add SOURCE RECOVERY SUBNET --site S`")


@_command(network, "show")
@click.argument("source_network")
@json_option
def network_show(source_network: str, as_json: bool):
    """The mappings of the VM network SOURCE_NETWORK (one per site or cloud that has it)."""
    service = _service()
    mappings = [m for m in service.list_network_mappings() if m.get("source_network") == source_network]
    if not mappings:
        raise service.NotFound(f"no network mapping for VM network {source_network!r}")
    if as_json:
        return _emit_json(mappings)
    print_table(mappings, NETWORK_COLUMNS, empty="(none)")


@main.group(cls=_OpGroup)
def policy():
    """Replication policies: copy frequency, recovery point retention, app-consistent snapshots, office hours."""


def _office_hours(value: str | None) -> tuple[time_of_day, time_of_day] | None:
    if value is None:
        return None
    start, sep, end = value.partition("-")
    try:
        if not sep:
            raise ValueError
        return time_of_day.fromisoformat(start.strip()), time_of_day.fromisoformat(end.strip())
    except ValueError:
        raise click.BadParameter(f"expected START-END such as 08:00-18:00, got {value!r}",
                                 param_hint="--office-hours") from None


def _office_days(value: str | None) -> list[int | str] | None:
    if value is None:
        return None
    if value.strip().lower() in ("", "none"):
        return []
    return [int(day) if day.strip().isdigit() else day.strip() for day in value.split(",")]


_RELATIVE = re.compile(r"^\+(\d+(?:\.\d+)?)([mh])$")


def _moment(value: str | None, option: str) -> datetime | None:
    """An ISO time (UTC unless it says otherwise) or a delay from now: +30m, +2h."""
    if value is None:
        return None
    relative = _RELATIVE.match(value.strip())
    if relative:
        amount, unit = float(relative.group(1)), relative.group(2)
        return datetime.now(UTC) + (timedelta(minutes=amount) if unit == "m" else timedelta(hours=amount))
    try:
        moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(f"expected an ISO time (2030-01-01T22:00) or a delay (+30m, +2h), got {value!r}",
                                 param_hint=option) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@_command(policy, "add")
@click.argument("name")
@click.option("--copy-frequency", type=click.Choice(["30", "300", "900"]), default=None,
              help="Seconds between delta replication cycles (default 300).")
@click.option("--retention-hours", type=click.IntRange(0, 24), default=None,
              help="How long recovery points are kept (default 2).")
@click.option("--app-consistent-hours", type=click.IntRange(0, 12), default=None,
              help="Hours between app-consistent points, 0 for none (default 1; at most the retention).")
@click.option("--initial-replication-at", default=None, metavar="TIME",
              help="Start initial replication later: an ISO time or +30m, +2h (at most 24 h ahead).")
@click.option("--office-hours", default=None, metavar="HH:MM-HH:MM",
              help="When automatic resync must not run (default 08:00-18:00).")
@click.option("--office-days", default=None, metavar="DAYS",
              help="Weekdays with office hours: mon,tue,... or 0-6 numbers, 'none' for none (default mon-fri).")
@click.option("--timezone", "office_timezone", default=None, help="IANA zone of the office hours (default UTC).")
@json_option
def policy_add(name: str, copy_frequency: str | None, retention_hours: int | None,
               app_consistent_hours: int | None, initial_replication_at: str | None, office_hours: str | None,
               office_days: str | None, office_timezone: str | None, as_json: bool):
    """Create replication policy NAME; options left out take their defaults."""
    options: dict[str, Any] = {
        "copy_frequency_s": int(copy_frequency) if copy_frequency else None,
        "recovery_point_retention_h": retention_hours,
        "app_consistent_frequency_h": app_consistent_hours,
        "initial_replication_at": _moment(initial_replication_at, "--initial-replication-at"),
        "office_hours": _office_hours(office_hours),
        "office_days": _office_days(office_days),
        "office_timezone": office_timezone,
    }
    result = _service().add_policy(name, **{k: v for k, v in options.items() if v is not None})
    if as_json:
        return _emit_json(result)
    click.echo(f"policy {result.get('name', name)} created (id {result.get('id')})")
    print_fields(result, POLICY_FIELDS[2:])


def _hours(row: Mapping[str, Any]) -> Any:
    hours = row.get("office_hours")
    if isinstance(hours, (list, tuple)) and len(hours) == 2:
        return f"{hours[0]}-{hours[1]}"
    return hours


def _days(row: Mapping[str, Any]) -> Any:
    days = row.get("office_days")
    names = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
    if isinstance(days, list):
        return ",".join(names[d] if isinstance(d, int) and 0 <= d <= 6 else str(d)[:3] for d in days) or "none"
    return days


POLICY_FIELDS: list[Column] = [
    ("name", "name"), ("id", "id"), ("copy frequency (s)", "copy_frequency_s"),
    ("retention (h)", "recovery_point_retention_h"), ("app-consistent (h)", "app_consistent_frequency_h"),
    ("initial replication", "initial_replication_at"), ("office hours", _hours), ("office days", _days),
    ("timezone", "office_timezone"), ("protected VMs", "protected_vms"),
]
POLICY_COLUMNS: list[Column] = [("name", "name"), ("copy s", "copy_frequency_s"),
                                ("retention h", "recovery_point_retention_h"),
                                ("app-consistent h", "app_consistent_frequency_h"), ("office hours", _hours),
                                ("days", _days), ("tz", "office_timezone")]


@_command(policy, "list")
@json_option
def policy_list(as_json: bool):
    """Every replication policy."""
    policies = _service().list_policies()
    if as_json:
        return _emit_json(policies)
    print_table(policies, POLICY_COLUMNS, empty="no policies: add one with `asr policy add NAME`")


@_command(policy, "show")
@click.argument("name")
@json_option
def policy_show(name: str, as_json: bool):
    """A replication policy's settings."""
    result = _service().show_policy(name)
    if as_json:
        return _emit_json(result)
    print_fields(result, POLICY_FIELDS)


# ---- protection ------------------------------------------------------------------------------------------------
@_job_command(main, "protect")
@click.argument("vm_name", metavar="VM")
@click.option("--policy", "policy_name", required=True, help="The replication policy.")
@click.option("--recovery-storage", required=True, metavar="URL",
              help="Where the replicas go: file:///DIR or azure:CONTAINER.")
@click.option("--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE",
              help="A storage setting, repeatable, e.g. connection_string_env=AZ_CONN (the NAME of the "
                   "workers' variable holding the secret, never the secret).")
@click.option("--recovery-host", default=None, help="The recovery-site host failovers use by default.")
def protect(vm_name: str, policy_name: str, recovery_storage: str, storage_options: tuple[str, ...],
            recovery_host: str | None):
    """Enable protection of VM: replicate its disks to the recovery storage under POLICY."""
    options = _key_values("--storage-option", storage_options, typed=True)
    return _service().protect(vm_name, policy=policy_name, recovery_storage=recovery_storage,
                              storage_options=options or None, recovery_host=recovery_host)


@_job_command(main, "unprotect")
@click.argument("vm_name", metavar="VM")
def unprotect(vm_name: str):
    """Disable protection of VM: stop tracking, delete its replicas, logs and recovery points."""
    return _service().disable_protection(vm_name)


@_job_command(main, "resync")
@click.argument("vm_name", metavar="VM")
def resync(vm_name: str):
    """Resynchronize VM now: compare the disks with their replicas and send only what differs."""
    return _service().resync(vm_name)


# ---- failover, failback, reverse replication --------------------------------------------------------------------
@main.group(cls=_OpGroup)
def failover():
    """Failover of a protected VM: drills (test, cleanup), planned and unplanned failover, then commit,
    cancel, or complete (a minimize-downtime failback)."""


POINT_HELP = "Recovery point: latest_processed, latest_app_consistent, latest, or a point id."


def _public_ips(pairs: tuple[str, ...]) -> dict[str, str] | None:
    return _key_values("--public-ip", pairs, typed=False) or None


@_job_command(failover, "test")
@click.argument("vm_name", metavar="VM")
@click.option("--point", default="latest_processed", show_default=True, help=POINT_HELP)
@click.option("--recovery-host", default=None, help="The recovery-site host to start the test VM on.")
@click.option("--test-network", default=None, help="An isolated network for the test VM (default: its own).")
def failover_test(vm_name: str, point: str, recovery_host: str | None, test_network: str | None):
    """A drill: start a test copy of VM at the recovery site from a recovery point; replication goes on."""
    return _service().test_failover(vm_name, point=point, recovery_host=recovery_host, test_network=test_network)


@_job_command(failover, "cleanup")
@click.argument("vm_name", metavar="VM")
def failover_cleanup(vm_name: str):
    """End VM's drill: delete its test VM."""
    return _service().test_failover_cleanup(vm_name)


@_job_command(failover, "planned")
@click.argument("vm_name", metavar="VM")
@click.option("--recovery-host", default=None, help="The recovery-site host to start the VM on.")
@click.option("--public-ip", "public_ips", multiple=True, metavar="NIC=ADDRESS",
              help="A public address for an adapter at the recovery site, repeatable: nic0=203.0.113.5.")
def failover_planned(vm_name: str, recovery_host: str | None, public_ips: tuple[str, ...]):
    """Shut VM down, replicate its last changes, start it at the recovery site: no data loss."""
    return _service().planned_failover(vm_name, recovery_host=recovery_host, public_ips=_public_ips(public_ips))


@_job_command(failover, "unplanned")
@click.argument("vm_name", metavar="VM")
@click.option("--point", default="latest_processed", show_default=True, help=POINT_HELP)
@click.option("--recovery-host", default=None, help="The recovery-site host to start the VM on.")
@click.option("--public-ip", "public_ips", multiple=True, metavar="NIC=ADDRESS",
              help="A public address for an adapter at the recovery site, repeatable: nic0=203.0.113.5.")
def failover_unplanned(vm_name: str, point: str, recovery_host: str | None, public_ips: tuple[str, ...]):
    """The primary is lost: start VM at the recovery site from a recovery point it already has."""
    return _service().unplanned_failover(vm_name, point=point, recovery_host=recovery_host,
                                         public_ips=_public_ips(public_ips))


@_job_command(failover, "complete")
@click.argument("vm_name", metavar="VM")
def failover_complete(vm_name: str):
    """Finish a minimize-downtime failback of VM: stop it at the recovery site, send the rest, start it home."""
    return _service().complete_failover(vm_name)


@_job_command(failover, "commit")
@click.argument("vm_name", metavar="VM")
def failover_commit(vm_name: str):
    """Make VM's failover (or failback) final: its recovery points are no longer needed to go back."""
    return _service().commit_failover(vm_name)


@_job_command(failover, "cancel")
@click.argument("vm_name", metavar="VM")
def failover_cancel(vm_name: str):
    """Undo VM's failover (or failback) that is not committed: it runs where it ran before."""
    return _service().cancel_failover(vm_name)


FAILBACK_MODES = {"minimize-downtime": "minimize_downtime", "full-download": "full_download"}


@_job_command(main, "failback")
@click.argument("vm_name", metavar="VM")
@click.option("--mode", type=click.Choice(sorted(FAILBACK_MODES)), default="minimize-downtime", show_default=True,
              help="minimize-downtime: synchronize while the VM runs at the recovery site, then "
                   "`asr failover complete VM`; full-download: copy whole disks with it off.")
@click.option("--create-vm", is_flag=True, help="Create the VM on the primary host if it is gone.")
@click.option("--host", "host_name", default=None, help="Fail back to this host instead of the original one.")
def failback(vm_name: str, mode: str, create_vm: bool, host_name: str | None):
    """Bring a failed-over VM (committed) back to the primary site."""
    return _service().failback(vm_name, mode=FAILBACK_MODES[mode], create_vm=create_vm, host=host_name)


@_job_command(main, "reverse")
@click.argument("vm_name", metavar="VM")
def reverse(vm_name: str):
    """Reverse replication: protect VM again from where it runs now."""
    return _service().reverse_replication(vm_name)


# ---- recovery plans ------------------------------------------------------------------------------------------
@main.group(cls=_OpGroup)
def plan():
    """Recovery plans: VMs in ordered groups, with scripts and manual actions around each group."""


def _load_plan_file(path: Path) -> tuple[list[dict], str | None]:
    """The groups (and description) in a plan file: JSON, or YAML when PyYAML is installed. The file holds
    either the list of groups or {"groups": [...], "description": "..."}."""
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise click.UsageError(f"{path} is YAML, but PyYAML is not installed: pip install pyyaml, "
                                   f"or give the plan as JSON") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise click.BadParameter(f"{path} is not valid YAML: {exc}", param_hint="--file") from None
    else:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise click.BadParameter(f"{path} is not valid JSON: {exc}", param_hint="--file") from None
    if isinstance(data, Mapping):
        if "groups" not in data:
            raise click.BadParameter(f"{path} has no \"groups\"", param_hint="--file")
        return data["groups"], data.get("description")
    return data, None


@_command(plan, "create")
@click.argument("name")
@click.option("--file", "plan_file", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help='The groups, as JSON (or YAML): [{"name", "vms": [...], "before": [...], "after": [...]}].')
@click.option("--description", default=None, help="Free text (overrides the file's).")
@json_option
def plan_create(name: str, plan_file: Path, description: str | None, as_json: bool):
    """Create recovery plan NAME from a file of groups; every problem in it is reported at once."""
    groups, file_description = _load_plan_file(plan_file)
    result = _service().create_plan(name, groups, description if description is not None else file_description or "")
    if as_json:
        return _emit_json(result)
    click.echo(f"recovery plan {result.get('name', name)} created: {len(result.get('groups') or groups)} groups "
               f"(id {result.get('id')})")


def _plan_vms(row: Mapping[str, Any]) -> int:
    return sum(len(group.get("vms") or []) for group in row.get("groups") or [] if isinstance(group, Mapping))


@_command(plan, "list")
@json_option
def plan_list(as_json: bool):
    """Every recovery plan."""
    plans = _service().list_plans()
    if as_json:
        return _emit_json(plans)
    print_table(plans, [("name", "name"), ("groups", lambda p: _count(p.get("groups"))), ("vms", _plan_vms),
                        ("description", "description"), ("id", "id")],
                empty="no recovery plans: create one with `asr plan create NAME --file plan.json`")


def _action_text(action: Mapping[str, Any]) -> str:
    if action.get("kind") == "script":
        command = action.get("command") or []
        return f"script {action.get('name')}: {' '.join(map(str, command))} (timeout {action.get('timeout_s')} s)"
    return f"manual {action.get('name')}: {action.get('instructions')}"


@_command(plan, "show")
@click.argument("name")
@json_option
def plan_show(name: str, as_json: bool):
    """A recovery plan: its groups in failover order, their VMs and actions."""
    result = _service().show_plan(name)
    if as_json:
        return _emit_json(result)
    print_fields(result, [("name", "name"), ("id", "id"), ("description", "description"),
                          ("created", "created_at"), ("updated", "updated_at")])
    for number, group in enumerate(result.get("groups") or [], 1):
        _section(f"group {number}: {group.get('name', '')}".rstrip(": "))
        for action in group.get("before") or []:
            click.echo(f"  before  {_action_text(action)}")
        vms = [(f"{v.get('host')}/{v.get('name')}" if v.get("name") else f"{v.get('id')} (gone)")
               if isinstance(v, Mapping) else str(v) for v in group.get("vms") or []]
        click.echo(f"  VMs     {', '.join(vms) or NOTHING}")
        for action in group.get("after") or []:
            click.echo(f"  after   {_action_text(action)}")


PLAN_KINDS = {"test": "test_failover", "planned": "planned_failover", "unplanned": "unplanned_failover",
              "failback": "failback"}


@_job_command(plan, "failover")
@click.argument("name")
@click.option("--kind", required=True, type=click.Choice(list(PLAN_KINDS)), help="Which operation to run.")
@click.option("--point", default=None, help=POINT_HELP + " Default latest_processed (test, unplanned).")
@click.option("--recovery-host", default=None, help="The recovery-site host for every VM (failovers).")
@click.option("--test-network", default=None, help="The isolated network of a test failover.")
@click.option("--mode", type=click.Choice(sorted(FAILBACK_MODES)), default=None,
              help="Failback mode (default minimize-downtime).")
@click.option("--create-vm", is_flag=True, help="Failback: create VMs gone from the primary.")
def plan_failover(name: str, kind: str, point: str | None, recovery_host: str | None, test_network: str | None,
                  mode: str | None, create_vm: bool):
    """Run recovery plan NAME: group after group, the VMs of a group in parallel, actions around them."""
    options: dict[str, Any] = {"point": point, "recovery_host": recovery_host, "test_network": test_network,
                               "mode": FAILBACK_MODES[mode] if mode else None, "create_vm": create_vm or None}
    result = _service().run_plan(name, PLAN_KINDS[kind], **{k: v for k, v in options.items() if v is not None})
    return {"plan": name, **result}


@_command(plan, "resume")
@click.argument("job_id")
@click.option("--note", default="", help="What was done (kept with the step's result).")
@json_option
@wait_options
def plan_resume(job_id: str, note: str, as_json: bool, wait: bool, timeout: float | None):
    """Resume plan job JOB_ID waiting on a manual action: the operator did what it asked."""
    result = _service().resume_job(job_id, note)
    if wait or timeout is not None:
        status = follow_job(job_id, as_json=as_json, timeout=timeout)
        if status:
            sys.exit(status)
    elif as_json:
        _emit_json(result)
    else:
        click.echo(f"job {job_id} resumed; follow it with: asr jobs watch {job_id}")


# ---- recovery points, verification, health --------------------------------------------------------------------
@main.command("points", cls=_OpCommand)
@click.argument("vm_name", metavar="VM")
@json_option
def points(vm_name: str, as_json: bool):
    """VM's recovery points, oldest first: the ids --point takes."""
    result = _service().recovery_points(vm_name)
    if as_json:
        return _emit_json(result)
    print_table(result, [("id", "id"), ("created", "created_at"), ("kind", "kind"),
                         ("disks", lambda p: _count(p.get("versions")))],
                empty=f"VM {vm_name} has no recovery points yet")


@_job_command(main, "verify")
@click.argument("vm_name", metavar="VM")
@click.option("--point", default=None, help="A recovery point id (default: the latest).")
def verify(vm_name: str, point: str | None):
    """Check VM's replica at a recovery point against the checksums the point recorded (a job)."""
    return _service().verify(vm_name, point=point)


HEALTH_FIELDS: list[Column] = [
    ("state", "state"), ("health", "health"), ("errors", "errors"), ("RPO", lambda r: _rpo(r)),
    ("last point", "last_recovery_point_at"),
    ("recovery points", "recovery_points"), ("next delta", "next_delta_at"),
    ("resync reason", "resync_required_reason"), ("resync at", "resync_scheduled_for"),
    ("active job", lambda r: _active_job(r)),
]


def _rpo(row: Mapping[str, Any]) -> Any:
    value = pick(row, "rpo_s")
    return format_duration(value) if isinstance(value, (int, float)) else value


def _active_job(row: Mapping[str, Any]) -> Any:
    job = row.get("active_job")
    if isinstance(job, Mapping):
        return f"{job.get('kind')} {job.get('state')} ({job.get('id')})"
    return job


FAILOVER_FIELDS: list[Column] = [
    ("kind", "kind"), ("status", "status"), ("point", "point_id|point_choice"), ("point time", "point_created_at"),
    ("point kind", "point_kind"), ("verified", "verified"), ("target host", "target_host"),
    ("target VM", "target_vm"), ("network", "network"),
    ("started", "started_at"), ("VM up", "vm_up_at"), ("ended", "ended_at"), ("RTO", lambda r: _seconds(r, "rto_s")),
    ("RPO", lambda r: _seconds(r, "rpo_s")), ("job", "job_id"), ("error", "error"),
]


def _seconds(row: Mapping[str, Any], key: str) -> Any:
    value = row.get(key)
    return format_duration(value) if isinstance(value, (int, float)) else value


@main.command("health", cls=_OpCommand)
@json_option
def health(as_json: bool):
    """Replication health of every protected VM: state, health and errors, RPO, last recovery point."""
    result = _service().health()
    if as_json:
        return _emit_json(result)
    print_table(result, [("vm", "vm"), ("host", "host"), ("state", "state"), ("health", "health"),
                         ("rpo", _rpo), ("last point", "last_recovery_point_at"),
                         ("errors", "errors")],
                empty="no protected VMs")


# ---- jobs ------------------------------------------------------------------------------------------------------
@main.group(cls=_OpGroup)
def jobs():
    """Jobs: every operation as a durable job of steps; list, show, follow, cancel, retry, restart."""


def _job_progress(job: Mapping[str, Any]) -> str:
    if job.get("steps_total") is not None:
        return f"{job.get('steps_done', 0)}/{job['steps_total']}"
    steps = _steps(job)
    done = sum(1 for step in steps if step.get("state") in ("succeeded", "skipped"))
    return f"{done}/{len(steps)}" if steps else NOTHING


JOB_COLUMNS: list[Column] = [("id", "id"), ("kind", "kind"), ("vm", "vm|plan|target"), ("state", "state"),
                             ("steps", _job_progress), ("created", "created_at"), ("ended", "ended_at"),
                             ("error", "error")]


@_command(jobs, "list")
@click.option("--state", default=None, help="Only jobs in this state (queued, running, waiting_retry, "
                                            "waiting_action, succeeded, failed, cancelled).")
@click.option("--kind", default=None, help="Only jobs of this kind (enable_protection, test_failover, ...).")
@click.option("--vm", "vm_name", default=None, help="Only jobs of this VM.")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True, help="At most this many.")
@json_option
def jobs_list(state: str | None, kind: str | None, vm_name: str | None, limit: int, as_json: bool):
    """Jobs, newest first."""
    result = _service().list_jobs(state=state, kind=kind, vm=vm_name, limit=limit)
    if as_json:
        return _emit_json(result)
    print_table(result, JOB_COLUMNS, empty="no jobs")


def _step_progress(step: Mapping[str, Any]) -> str:
    done, total = progress_of(step)
    if total <= 0:
        return NOTHING
    amount = progress_amount(done, total)
    return f"{100 * min(done, total) // total}% {amount}"


STEP_COLUMNS: list[Column] = [
    ("#", lambda s: f"{s.get('stage')}.{s.get('index')}"), ("step", "name"), ("state", "state"),
    ("tries", "attempts"), ("progress", _step_progress), ("queue", "queue"),
    ("took", lambda s: format_duration(_seconds_between(s.get("started_at"), s.get("ended_at")))
     if s.get("ended_at") else None),
    ("next attempt", "next_attempt_at"), ("error", "error"),
]


@_command(jobs, "show")
@click.argument("job_id")
@json_option
def jobs_show(job_id: str, as_json: bool):
    """A job: its state, error, and every step with its state, attempts, progress and next attempt."""
    job = _service().show_job(job_id)
    if as_json:
        return _emit_json(job)
    print_fields(job, [("job", "id"), ("kind", "kind"), ("vm", "vm"), ("plan", "plan"), ("target", "target"),
                       ("state", "state"), ("progress", lambda j: f"{j['percent']:g}%" if "percent" in j else None),
                       ("created", "created_at"), ("started", "started_at"), ("ended", "ended_at"),
                       ("next attempt", "next_attempt_at"), ("error", "error")])
    _section("steps")
    steps = _steps(job)
    print_table(steps, STEP_COLUMNS, empty="(none)")
    for step in steps:
        if step.get("state") == "waiting_action":
            click.echo(f"\nwaiting for an operator at {step.get('name')}: {step.get('instructions')}\n"
                       f"when done: asr plan resume {job.get('id', job_id)} --note '...'")


@_command(jobs, "watch")
@click.argument("job_id")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None, metavar="SECONDS",
              help="Stop watching after this long (exit 3; the job goes on).")
@click.option("--json", "as_json", is_flag=True, help="Print each snapshot of the job as a line of JSON.")
def jobs_watch(job_id: str, timeout: float | None, as_json: bool):
    """Follow a job to its end: a progress bar per running step; exit 0 if it succeeded, 1 if it failed
    or was cancelled."""
    status = follow_job(job_id, as_json=as_json, timeout=timeout, lines=True)
    if status:
        sys.exit(status)


def _job_action(name: str, service_name: str, done: str, doc: str) -> None:
    def command(job_id: str, as_json: bool, wait: bool, timeout: float | None):
        result = getattr(_service(), service_name)(job_id)
        new_id = result.get("job_id") if isinstance(result, Mapping) else None
        if new_id and new_id != job_id:  # restart starts a new job: it is the one to follow
            return started(result, as_json=as_json, wait=wait or timeout is not None, timeout=timeout)
        if wait or timeout is not None:
            status = follow_job(job_id, as_json=as_json, timeout=timeout)
            if status:
                sys.exit(status)
            return
        if as_json:
            return _emit_json(result)
        click.echo(f"job {job_id} {done}")

    command.__doc__ = doc  # before the decorators: click reads the help from it
    command.__name__ = f"jobs_{name}"
    _command(jobs, name)(click.argument("job_id")(json_option(wait_options(command))))


_job_action("cancel", "cancel_job", "cancelled",
            "Cancel a job: steps not started never start, running ones stop at their next heartbeat.")
_job_action("retry", "retry_job", "retried: its steps waiting for a retry run now",
            "Run the job's steps that wait for a retry now instead of at their next attempt time.")
_job_action("restart", "restart_job", "restarted",
            "Start a failed or cancelled job's operation again, as a new job with the same parameters.")


# ---- API keys ---------------------------------------------------------------------------------------------
@main.group(cls=_OpGroup)
def apikey():
    """Keys of the REST API: created here, shown once, kept only as salted hashes."""


@_command(apikey, "create")
@click.argument("name")
@json_option
def apikey_create(name: str, as_json: bool):
    """Create a key called NAME and print it (this is the only time it is shown)."""
    result = _service().create_api_key(name)
    if as_json:
        return _emit_json(result)
    click.echo(f"API key {name}: {result['key']}")
    click.echo("store it now: only its hash is kept")


@_command(apikey, "list")
@json_option
def apikey_list(as_json: bool):
    """Every key: name, prefix, when created, last used, revoked (never the key)."""
    keys = _service().list_api_keys()
    if as_json:
        return _emit_json(keys)
    print_table(keys, [("name", "name"), ("prefix", "prefix"), ("created", "created_at"),
                       ("last used", "last_used_at"), ("revoked", "revoked_at")],
                empty="no API keys: create one with `asr apikey create NAME`")


@_command(apikey, "revoke")
@click.argument("name")
@json_option
def apikey_revoke(name: str, as_json: bool):
    """Revoke the key called NAME: requests carrying it get 401."""
    result = _service().revoke_api_key(name)
    if as_json:
        return _emit_json(result)
    click.echo(f"API key {name} revoked")
