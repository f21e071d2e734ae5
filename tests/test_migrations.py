"""Schema migrations (Alembic): a new database is created at the newest revision and matches the models; a
database made by the first landed release (tests/first_release_schema/, no migrations then) is refused by
the processes, upgraded by `asr db upgrade` with its rows kept, and then replicates and fails over like a
new one. SQLite and PostgreSQL; the end-to-end run with real Redis, Celery workers and storage.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from recovery_site import RecoverySite
from sqlmodel import SQLModel

import migrations
import models
from api import service
from datapath.digest import disk_digest
from models import schema
from models.db import get_engine, init_db
from models.schema import SchemaOutOfDateError

FIRST_RELEASE = Path(__file__).parent / "first_release_schema"
ASR = [sys.executable, "-c", "from api.cli import main; main()"]
NOW = datetime(2026, 11, 25, 8, 0, tzinfo=UTC).replace(tzinfo=None)

# What a database of the first release held: a VM protected and replicated, a recovery point, a finished
# enable-protection job that held the item's lock (then `lock_key`, one per job).
LEGACY_ROWS = [
    ("site", {"id": "s-legacy", "name": "legacy", "description": "", "created_at": NOW}),
    ("host", {"id": "h-legacy", "name": "oldhost", "site_id": "s-legacy", "cloud_id": None, "root": "/srv/oldhost",
              "queue": "host.oldhost", "key_hash": "scrypt$x", "registered_at": NOW, "last_seen_at": NOW}),
    ("virtual_machine", {"id": "vm-legacy", "host_id": "h-legacy", "name": "oldvm",
                         "vm_uuid": "0f5c2a7e-1111-4222-8333-444455556666", "generation": 2, "state": "running",
                         "created_at": NOW}),
    ("virtual_disk", {"id": "d-legacy", "vm_id": "vm-legacy", "name": "disk0", "file_name": "disk0.vhd",
                      "size": 16 << 20, "format": "vhd", "disk_uuid": "7d1e0c55-aaaa-4bbb-8ccc-ddddeeeeffff"}),
    ("replication_policy", {"id": "p-legacy", "name": "legacy-policy", "copy_frequency_s": 300,
                            "recovery_point_retention_h": 24, "app_consistent_frequency_h": 0,
                            "initial_replication_at": None, "office_hours_start": "08:00:00.000000",
                            "office_hours_end": "18:00:00.000000", "office_days": "[0, 1, 2, 3, 4]",
                            "office_timezone": "UTC", "created_at": NOW}),
    ("protected_item", {"id": "i-legacy", "vm_id": "vm-legacy", "policy_id": "p-legacy",
                        "recovery_storage": "file:///srv/recovery", "storage_options": "{}",
                        "replication_state": "protected", "health": "Healthy", "health_errors": "[]",
                        "resync_required_reason": None, "resync_scheduled_for": None, "current_rpo_s": 12,
                        "last_recovery_point_at": NOW, "unsent_ratio": 0.0, "next_delta_at": NOW,
                        "initial_replication_at": NOW, "created_at": NOW, "updated_at": NOW}),
    ("recovery_point", {"id": "rp-legacy", "item_id": "i-legacy",
                        "generations": '{"7d1e0c55-aaaa-4bbb-8ccc-ddddeeeeffff": 4}', "created_at": NOW,
                        "kind": "crash_consistent",
                        "manifest_roots": '{"7d1e0c55-aaaa-4bbb-8ccc-ddddeeeeffff": "ab"}'}),
    ("job", {"id": "j-legacy", "kind": "enable_protection", "target": "i-legacy", "lock_key": "item:i-legacy",
             "state": "succeeded", "params": '{"item_id": "i-legacy"}', "created_at": NOW, "started_at": NOW,
             "ended_at": NOW, "error": None, "error_class": None, "settled_at": NOW, "hook_pending": False,
             "hook_error": None}),
]


def first_release_database(url: str) -> sa.Engine:
    """A database as the first release left it: its schema, filled with LEGACY_ROWS."""
    engine = get_engine(url)
    ddl = (FIRST_RELEASE / f"{engine.dialect.name}.sql").read_text()
    with engine.begin() as connection:
        for statement in ddl.split(";"):
            if statement.strip():
                connection.exec_driver_sql(statement)
        for table, row in LEGACY_ROWS:
            columns = ", ".join(f'"{name}"' for name in row)
            values = ", ".join(f":{name}" for name in row)
            connection.execute(sa.text(f"INSERT INTO {table} ({columns}) VALUES ({values})"), row)
    return engine


def schema_differences(engine: sa.Engine) -> list:
    """What Alembic's autogenerate would change to make the database match the models: nothing, when the
    revisions and the models agree."""
    with engine.connect() as connection:
        return compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}),
                                SQLModel.metadata)


def asr(url: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ASR_DATABASE_URL": url}
    return subprocess.run([*ASR, *args], env=env, capture_output=True, text=True, timeout=120)


# ---- a new database ----------------------------------------------------------------------------------------
def test_a_new_database_is_created_at_the_newest_revision_and_matches_the_models(db_url: str) -> None:
    engine = get_engine(db_url)
    assert schema.current_revision(engine) is None
    init_db(engine)
    assert schema.current_revision(engine) == schema.head_revision()
    assert schema_differences(engine) == []
    init_db(engine)  # a second process starting: nothing to do
    assert schema.current_revision(engine) == schema.head_revision()


def test_the_head_a_process_checks_without_alembic_is_alembics_head() -> None:
    """migrations.HEAD lets a process at start find its database current with one query; a revision added
    without moving it would make every process take the slow path, and one at HEAD skip a needed upgrade."""
    assert migrations.HEAD == schema.head_revision(), "set migrations.HEAD to the newest revision in versions/"


def test_a_process_at_the_newest_revision_imports_no_alembic(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'asr.db'}"
    init_db(get_engine(url))
    probe = ("import sys; from models import get_engine, init_db; init_db(get_engine(sys.argv[1])); "
             "print(sorted(name for name in sys.modules if name.split('.')[0] in ('alembic', 'mako')))")
    result = subprocess.run([sys.executable, "-c", probe, url], capture_output=True, text=True, timeout=60,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_every_revision_downgrades_and_upgrades_again(db_url: str) -> None:
    engine = get_engine(db_url)
    schema.upgrade(engine)
    revisions = [script.revision for script in ScriptDirectory.from_config(schema.alembic_config()).walk_revisions()]
    with engine.begin() as connection:
        command.downgrade(schema.alembic_config(connection), "base")
    with engine.connect() as connection:
        assert set(sa.inspect(connection).get_table_names()) <= {"alembic_version"}
    for revision in reversed(revisions):  # oldest first, one at a time
        assert schema.upgrade(engine, revision).to_revision == revision
    assert schema_differences(engine) == []


def test_api_keys_of_before_roles_become_admin(db_url: str) -> None:
    """Revision 0007 gives every existing API key the admin role (they could do everything before), keeps them
    working, and its downgrade takes the column away again."""
    engine = get_engine(db_url)
    assert schema.upgrade(engine, "0006").to_revision == "0006"
    key = "asr_0123456789_an-old-key"
    with engine.begin() as connection:
        connection.execute(sa.text(
            "INSERT INTO api_key (id, name, prefix, key_hash, created_at) VALUES ('k1', 'old', '0123456789', :hash, "
            ":now)"), {"hash": models.apikeys.hash_key(key), "now": NOW})
    schema.upgrade(engine)
    assert schema_differences(engine) == []
    with models.session_scope(engine) as session:
        row = models.apikeys.verify_api_key(session, key)
        assert row is not None and (row.name, row.role) == ("old", "admin")
        assert models.apikeys.create_api_key(session, "new")[0].role == "reader"
    with engine.begin() as connection:
        command.downgrade(schema.alembic_config(connection), "0006")
    with engine.connect() as connection:
        assert "role" not in {column["name"] for column in sa.inspect(connection).get_columns("api_key")}


# ---- the first release's database ------------------------------------------------------------------------------
def test_processes_refuse_a_database_of_the_first_release_and_say_how_to_upgrade(db_url: str) -> None:
    engine = first_release_database(db_url)
    assert schema.current_revision(engine) == schema.PRE_MIGRATION
    with pytest.raises(SchemaOutOfDateError, match=r"this release needs \w+\. Stop every process .* `asr db upgrade`"):
        init_db(engine)
    answer = asr(db_url, "db", "current", "--json")
    assert answer.returncode == 1, answer.stderr
    assert json.loads(answer.stdout) | {"database": None} == {
        "database": None, "revision": "pre-migration", "needed": schema.head_revision(), "up_to_date": False}
    # The worker launcher refuses to start, with the same step, before starting Celery.
    answer = asr(db_url, "worker", "orchestration")
    assert answer.returncode == 2 and "asr db upgrade" in answer.stderr, answer.stderr
    assert schema.current_revision(engine) == schema.PRE_MIGRATION  # refusing changed nothing


def test_asr_db_upgrade_brings_a_first_release_database_to_the_models_and_keeps_its_rows(db_url: str) -> None:
    engine = first_release_database(db_url)
    answer = asr(db_url, "db", "upgrade")
    assert answer.returncode == 0, answer.stderr
    assert "adopted a database from before migrations: added column job.lock_keys" in answer.stdout
    assert f"upgraded from pre-migration to revision {schema.head_revision()}" in answer.stdout
    assert schema_differences(engine) == []
    again = asr(db_url, "db", "upgrade")
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stdout + again.stderr

    init_db(engine)  # a process of this release now starts
    with models.session_scope(engine) as session:
        item = session.get(models.ProtectedItem, "i-legacy")
        assert (item.replication_state, item.health, item.policy_id) == ("protected", "Healthy", "p-legacy")
        assert item.recovery_host_id is None and item.replica_folder is None
        [point] = session.exec(sa.select(models.RecoveryPoint)).scalars()
        assert (point.item_id, point.versions) == ("i-legacy", {})
        assert point.generations == {"7d1e0c55-aaaa-4bbb-8ccc-ddddeeeeffff": 4}
        job = session.get(models.jobs.Job, "j-legacy")
        assert (job.state, job.lock_keys, job.params) == ("succeeded", ["item:i-legacy"], {"item_id": "i-legacy"})
        disk = session.get(models.VirtualDisk, "d-legacy")
        assert (disk.vm_id, disk.size) == ("vm-legacy", 16 << 20)


def test_an_upgraded_first_release_database_replicates_and_fails_over(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'asr.db'}"
    first_release_database(url)
    answer = asr(url, "db", "upgrade")
    assert answer.returncode == 0, answer.stderr

    with RecoverySite(tmp_path, recovery_host_names=("dr1",), database_url=url) as site:
        vm_id = site.create_vm("host1", "app01", [("disk0", "16M", "vhd")], seed=7)
        site.wait_job(site.protect(vm_id), timeout=90)
        cycle = site.delta_cycle(vm_id)
        assert cycle["state"] == "succeeded", site.describe_job(cycle)
        site.verify_replica(vm_id)

        site.final_cycle(vm_id)  # the writer stopped: the latest point holds the primary's bytes
        primary = disk_digest(site.host("host1").get_vm("app01").disks[0].path)
        drill = service.test_failover("app01")
        job = site.wait_job(drill["job_id"], timeout=90)
        assert job["state"] == "succeeded", site.describe_job(job)
        [disk] = service.show_vm("app01")["disks"]
        assert disk_digest(disk["test_path"]) == primary

        # The first release's VM is still there beside the new one.
        assert {(vm["host"], vm["name"]) for vm in service.list_vms()} >= {("oldhost", "oldvm"), ("host1", "app01")}
