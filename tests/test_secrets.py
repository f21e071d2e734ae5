"""Secrets stay secret (issue 11): a whole run (protect, a delta cycle, a drill and its cleanup, on Azure
storage served by Azurite, with every host's agent on its own broker user) leaves none of the deployment's
secrets in what others read: the database (job records, step results and errors, every other table), the
processes' logs, and the command line of any process on the machine (what `ps` shows to every user).

The secrets: the storage account's key, each host's registration key, the key-encryption key of the
recovery storage, and the broker users' passwords. Each is looked for as it is written (and the account key
also as the base64 it is), so a secret copied into a record, a log line or an argument is found.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import sqlalchemy as sa
from recovery_site import RecoverySite

from models.db import get_engine
from sites.deployment import AZURE_CONNECTION_ENV
from sites.localservices import AzuriteProcess
from workflows import kinds

JOB_TIMEOUT = 90


def deployment_secrets(site: RecoverySite) -> dict[str, str]:
    """{what: secret} of the running site."""
    secrets = {}
    account_key = re.search(r"AccountKey=([^;]+)", site.deployment.settings[AZURE_CONNECTION_ENV])
    assert account_key, "the Azure connection string names its account key"
    secrets["storage account key"] = account_key.group(1)
    for name in (*site.host_names, *site.recovery_host_names):
        secrets[f"registration key of {name}"] = site.deployment.worker_env[f"host-{name}"]["ASR_HOST_KEY"]
    kek = (site.workdir / "storage.kek").read_text().split()
    secrets["key-encryption key"] = kek[-1]
    passwords = sorted((site.workdir / "broker-users").glob("*.password"))
    assert len(passwords) == 1 + len(site.host_names) + len(site.recovery_host_names), passwords
    for path in passwords:
        secrets[f"broker password of {path.stem}"] = path.read_text().strip()
    assert all(len(secret) >= 16 for secret in secrets.values()), "a secret too short to look for"
    return secrets


def found_in(text: str, secrets: dict[str, str]) -> list[str]:
    return [what for what, secret in secrets.items() if secret in text]


def database_text() -> dict[str, str]:
    """{table: every row of it, as text}."""
    engine = get_engine()
    tables = {}
    with engine.connect() as connection:
        for table in sa.inspect(engine).get_table_names():
            rows = connection.execute(sa.text(f'SELECT * FROM "{table}"')).all()
            tables[table] = "\n".join(repr(tuple(row)) for row in rows)
    return tables


def command_lines() -> dict[int, str]:
    """{pid: command line} of every process on the machine, as `ps` shows them to any user."""
    lines = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                lines[int(entry)] = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(
                    errors="replace")
            except OSError:
                pass  # ended meanwhile
    return lines


@pytest.mark.azure
def test_a_whole_run_leaves_no_secret_in_records_logs_or_command_lines(tmp_path: Path,
                                                                        azurite: AzuriteProcess) -> None:
    with RecoverySite(tmp_path, backend="azure", azurite=azurite, recovery_host_names=("dr1",),
                      broker_acl=True) as site:
        secrets = deployment_secrets(site)
        vm_id = site.create_vm("host1", "app01", [("disk0", "8M", "vhd")], seed=7)
        site.wait_job(site.protect(vm_id), timeout=JOB_TIMEOUT)
        item_id = site.item_id(vm_id)
        site.final_cycle(vm_id)
        site.wait_job(kinds.test_failover.start(item_id), timeout=JOB_TIMEOUT)
        site.wait_job(kinds.test_failover_cleanup.start(item_id), timeout=JOB_TIMEOUT)

        tables = database_text()
        assert tables["job"] and tables["job_step"], "the run left job records to look in"
        leaks = {table: found_in(text, secrets) for table, text in tables.items()}
        assert not any(leaks.values()), {table: what for table, what in leaks.items() if what}

        ps = {pid: found_in(line, secrets) for pid, line in command_lines().items()}
        assert not any(ps.values()), {pid: what for pid, what in ps.items() if what}

        logs = [path for path in tmp_path.rglob("*.log") if path.is_file()]
        assert {"worker-orchestration.log", "worker-host-host1.log", "worker-host-dr1.log", "beat.log"} <= {
            path.name for path in logs}
        leaks_in_logs = {str(path): found_in(path.read_text(errors="replace"), secrets) for path in logs}
        assert not any(leaks_in_logs.values()), {path: what for path, what in leaks_in_logs.items() if what}
