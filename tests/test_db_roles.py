"""Least privilege on PostgreSQL (models/dbroles.py): what a host agent's role and the API's may not do, and
that the host agents still do their work with theirs (every job kind of one VM: protection, delta cycles, a
drill, resync, checks, failovers, failbacks, reverse replication, disabling protection; disks compared byte for
byte), and the REST API with its own.

Roles are the cluster's, not the schema's: every test makes its own with a prefix of its own and drops them.
"""
from __future__ import annotations

import base64
import os
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from recovery_site import RecoverySite
from sqlalchemy.engine import Engine, make_url

from models.db import dispose_engines, get_engine, init_db
from models.dbroles import RoleNames, apply_roles, drop_group_roles, scram_verifier, set_api_role, set_host_role


@dataclass
class Database:
    schema: str
    url: str  # the owner's (the engine's)
    names: RoleNames

    def host_url(self, host_name: str) -> str:
        role = self.names.host(host_name)
        return make_url(self.url).set(username=role, password="unused-with-trust-auth").render_as_string(
            hide_password=False)


@pytest.fixture
def database(postgres_admin: Engine) -> Iterator[Database]:
    """A schema of the test's own at the newest revision, with the roles of a prefix of its own applied."""
    schema = f"asr_test_{uuid.uuid4().hex[:16]}"
    names = RoleNames(prefix=f"t{uuid.uuid4().hex[:10]}")
    with postgres_admin.connect() as connection:
        connection.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    url = make_url(postgres_admin.url).update_query_dict({"options": f"-csearch_path={schema}"})
    url_text = url.render_as_string(hide_password=False)
    try:
        engine = init_db(get_engine(url_text))
        with engine.begin() as connection:
            apply_roles(connection, names)
        yield Database(schema, url_text, names)
    finally:
        dispose_engines()
        with postgres_admin.connect() as connection:
            connection.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
            drop_group_roles(connection, names)


def _connect(url: str) -> psycopg.Connection:
    u = make_url(url)
    return psycopg.connect(host=u.host, port=u.port, dbname=u.database, user=u.username,
                           options=u.query["options"], autocommit=True)


def _insert_job(admin: psycopg.Connection, queues: list[str], lock_key: str | None = None) -> tuple[str, list[str]]:
    """A running job with one stage-0 step per queue (all queued), holding the lock `lock_key` (one of its own
    by default); returns its id and its steps' ids."""
    job_id = str(uuid.uuid4())
    admin.execute("INSERT INTO job (id, kind, lock_keys, state, params, created_at, hook_pending) "
                  "VALUES (%s, 'probe', '[]', 'running', '{}', now(), false)", (job_id,))
    step_ids = []
    for index, queue in enumerate(queues):
        step_id = str(uuid.uuid4())
        admin.execute(
            "INSERT INTO job_step (id, job_id, stage, index, name, action, queue, params, state, attempts, deaths, "
            "interruptions, progress_done, progress_total) VALUES (%s, %s, 0, %s, 'probe', 'probe.act', %s, '{}', "
            "'queued', 0, 0, 0, 0, 0)", (step_id, job_id, index, queue))
        step_ids.append(step_id)
    admin.execute("INSERT INTO job_lock (lock_key, job_id, acquired_at) VALUES (%s, %s, now())",
                  (lock_key or f"item:{job_id}", job_id))
    return job_id, step_ids


def _refused(host: psycopg.Connection, statement: str, *args: object) -> str:
    with pytest.raises(psycopg.errors.InsufficientPrivilege) as refused:
        host.execute(statement, args)
    return str(refused.value)


def test_a_host_role_cannot_create_work_read_keys_or_touch_other_hosts_steps(database: Database) -> None:
    with _connect(database.url) as admin:
        set_host_role_now(database, "host1")
        set_host_role_now(database, "host2")
        own_job, [own_step, dr_step, orchestration_step] = _insert_job(
            admin, ["host.host1", "host.dr1", "orchestration"])
        other_job, [other_step] = _insert_job(admin, ["host.host2"])
        site_id = str(uuid.uuid4())
        admin.execute("INSERT INTO site (id, name, description, created_at) VALUES (%s, 'primary', '', now())",
                      (site_id,))
        for name in ("host1", "host2"):
            admin.execute("INSERT INTO host (id, name, site_id, root, queue, key_hash, registered_at) "
                          "VALUES (%s, %s, %s, '/srv', %s, 'hash', now())",
                          (str(uuid.uuid4()), name, site_id, f"host.{name}"))
        admin.execute("INSERT INTO api_key (id, name, prefix, key_hash, role, created_at) "
                      "VALUES ('k1', 'probe', 'asr_abcd', 'hash', 'admin', now())")

    with _connect(database.host_url("host1")) as host:
        # Nothing new to run, on orchestration or anywhere: no job, no step, no lock of its own making.
        _refused(host, "INSERT INTO job (id, kind, lock_keys, state, params, created_at, hook_pending) "
                       "VALUES ('forged', 'probe', '[]', 'queued', '{}', now(), false)")
        _refused(host, "INSERT INTO job_step (id, job_id, stage, index, name, action, queue, params, state, "
                       "attempts, deaths, interruptions, progress_done, progress_total) VALUES ('forged', %s, 1, 0, "
                       "'x', 'plans.run_script', 'orchestration', '{}', 'pending', 0, 0, 0, 0, 0)", own_job)
        _refused(host, "INSERT INTO job_lock (lock_key, job_id, acquired_at) VALUES ('item:x', %s, now())", own_job)
        # No API key read or made; no plan, no alert.
        _refused(host, "SELECT key_hash FROM api_key")
        _refused(host, "INSERT INTO api_key (id, name, prefix, key_hash, role, created_at) "
                       "VALUES ('k2', 'forged', 'asr_efgh', 'hash', 'admin', now())")
        _refused(host, "SELECT * FROM recovery_plan")
        _refused(host, "SELECT * FROM alert")
        # What a step does is not the host's to change, even on its own step.
        _refused(host, "UPDATE job_step SET action = 'plans.run_script', queue = 'orchestration' WHERE id = %s",
                 own_step)
        _refused(host, "UPDATE job_step SET params = '{\"script\": \"x\"}' WHERE id = %s", own_step)
        _refused(host, "DELETE FROM job_step WHERE id = %s", own_step)
        _refused(host, "UPDATE job SET params = '{}', kind = 'x' WHERE id = %s", own_job)

        # Its own heartbeat only: no keeping another host looking alive.
        assert host.execute("UPDATE host SET last_seen_at = now() WHERE name = 'host1'").rowcount == 1
        assert host.execute("UPDATE host SET last_seen_at = now() WHERE name = 'host2'").rowcount == 0
        _refused(host, "UPDATE host SET key_hash = 'forged' WHERE name = 'host1'")
        # Another host's job: invisible, and unchanged by an UPDATE.
        assert host.execute("SELECT id FROM job_step WHERE job_id = %s", (other_job,)).fetchall() == []
        assert host.execute("SELECT count(*) FROM job WHERE id = %s", (other_job,)).fetchone() == (0,)
        assert host.execute("SELECT count(*) FROM job_lock WHERE job_id = %s", (other_job,)).fetchone() == (0,)
        assert host.execute("UPDATE job_step SET state = 'cancelled' WHERE id = %s", (other_step,)).rowcount == 0
        assert host.execute("UPDATE job SET state = 'failed' WHERE id = %s", (other_job,)).rowcount == 0
        assert host.execute("DELETE FROM job_lock WHERE job_id = %s", (other_job,)).rowcount == 0
        # Its own job's steps are all visible (the claim checks the earlier stages; the last step queues the next).
        visible = {row[0] for row in host.execute("SELECT id FROM job_step").fetchall()}
        assert visible == {own_step, dr_step, orchestration_step}
        # Its own step: a run's changes. Another host's step of the same job: never succeeded, never a result.
        assert host.execute("UPDATE job_step SET state = 'running', lease = 'l1', result = '{\"a\": 1}' "
                            "WHERE id = %s", (own_step,)).rowcount == 1
        for forged in ("state = 'succeeded'", "result = '{\"root\": \"forged\"}'",
                       "state = 'running', lease = 'mine'"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
                host.execute(f"UPDATE job_step SET {forged} WHERE id = %s", (dr_step,))
        assert host.execute("UPDATE job_step SET state = 'cancelled' WHERE id = %s", (dr_step,)).rowcount == 1
        # A lock is released only by a job that has settled.
        assert host.execute("DELETE FROM job_lock WHERE job_id = %s", (own_job,)).rowcount == 0
        host.execute("UPDATE job SET state = 'failed', settled_at = now() WHERE id = %s", (own_job,))
        assert host.execute("DELETE FROM job_lock WHERE job_id = %s", (own_job,)).rowcount == 1
        # The group role it may SET ROLE to has no queue: it sees no job at all.
        host.execute(f'SET ROLE "{database.names.host_group}"')
        assert host.execute("SELECT count(*) FROM job_step").fetchone() == (0,)

    # The owner (the engine's processes) is not held by row-level security.
    with _connect(database.url) as admin:
        assert admin.execute("SELECT count(*) FROM job_step").fetchone() == (4,)
        assert admin.execute("SELECT state FROM job_step WHERE id = %s", (other_step,)).fetchone() == ("queued",)


def test_a_host_role_marks_only_the_items_its_jobs_hold(tmp_path: Path, database: Database) -> None:
    """A host's steps mark the item they work on (a resync needed, a retry's warning), and no other: not an
    item another host's job holds, not its own once the job has settled; never the item's storage or policy."""
    from models.db import session_scope
    from models.fabric import add_vm, create_site, register_host
    from models.policy import create_policy
    from models.protection import ProtectedItem

    items = {}
    with session_scope(get_engine(database.url)) as session:
        site = create_site(session, "primary")
        policy = create_policy(session, "default")
        for name in ("host1", "host2"):
            host, _key = register_host(session, name, str(tmp_path / name), site=site)
            vm = add_vm(session, host, f"vm-{name}",
                        [{"name": "disk0", "file": "disk0.raw", "size": 1 << 20, "format": "raw"}], [])
            item = ProtectedItem(vm_id=vm.id, policy_id=policy.id, recovery_storage="file:///srv/recovery")
            session.add(item)
            session.flush()
            items[name] = item.id
    set_host_role_now(database, "host1")
    with _connect(database.url) as admin:
        for name, item_id in items.items():
            _insert_job(admin, [f"host.{name}"], lock_key=f"item:{item_id}")

    marked = ("UPDATE protected_item SET replication_state = 'resync_required', health = 'Warning', "
              "health_errors = '[]', updated_at = now() WHERE id = %s")
    with _connect(database.host_url("host1")) as host:
        assert host.execute("SELECT count(*) FROM protected_item").fetchone() == (2,)
        assert host.execute(marked, (items["host1"],)).rowcount == 1
        assert host.execute(marked, (items["host2"],)).rowcount == 0
        _refused(host, "UPDATE protected_item SET recovery_storage = 'file:///forged' WHERE id = %s", items["host1"])
        _refused(host, "UPDATE protected_item SET policy_id = policy_id WHERE id = %s", items["host1"])
        _refused(host, "DELETE FROM protected_item WHERE id = %s", items["host1"])
    with _connect(database.url) as admin:
        admin.execute("DELETE FROM job_lock WHERE lock_key = %s", (f"item:{items['host1']}",))
        assert admin.execute("SELECT replication_state, health FROM protected_item WHERE id = %s",
                             (items["host2"],)).fetchone() == ("enabling_protection", "Healthy")
    with _connect(database.host_url("host1")) as host:
        assert host.execute(marked, (items["host1"],)).rowcount == 0


def test_the_api_role_sees_every_row_but_cannot_change_the_schema(database: Database) -> None:
    with _connect(database.url) as admin:
        job_id, _steps = _insert_job(admin, ["host.host1", "orchestration"])
    with admin_connection(database) as connection:
        role = set_api_role(connection, secrets.token_urlsafe(24), database.names)
    assert role == database.names.api_login
    api_url = make_url(database.url).set(username=role).render_as_string(hide_password=False)
    with _connect(api_url) as api:
        assert api.execute("SELECT count(*) FROM job_step WHERE job_id = %s", (job_id,)).fetchone() == (2,)
        assert api.execute("UPDATE job SET state = 'cancelled' WHERE id = %s", (job_id,)).rowcount == 1
        _refused_schema_changes(api)


def _refused_schema_changes(api: psycopg.Connection) -> None:
    """The API's role changes rows, never the schema, the row-level security or the schema's revision."""
    _refused(api, "CREATE TABLE forged (id int)")
    _refused(api, "ALTER TABLE job_step DISABLE ROW LEVEL SECURITY")
    _refused(api, "ALTER TABLE api_key ADD COLUMN forged text")
    _refused(api, "DROP POLICY host_reads ON job")
    _refused(api, "UPDATE alembic_version SET version_num = '0001'")


def test_apply_is_safe_to_run_again(database: Database) -> None:
    engine = get_engine(database.url)
    with engine.begin() as connection:
        apply_roles(connection, database.names)
    with engine.connect() as connection:
        policies = connection.execute(sa.text(
            "SELECT tablename, policyname FROM pg_policies WHERE schemaname = :schema ORDER BY 1, 2"),
            {"schema": database.schema}).all()
    assert [tuple(row) for row in policies] == [
        ("host", "api_all"), ("host", "host_reads"), ("host", "host_stamps"),
        ("job", "api_all"), ("job", "host_reads"), ("job", "host_runs"),
        ("job_lock", "api_all"), ("job_lock", "host_reads"), ("job_lock", "host_releases"),
        ("job_step", "api_all"), ("job_step", "host_reads"), ("job_step", "host_runs"),
        ("protected_item", "api_all"), ("protected_item", "host_marks"), ("protected_item", "host_reads"),
    ]


def test_the_scram_verifier_is_what_postgresql_makes_of_the_password(database: Database) -> None:
    """The verifier we send for a password lets a client log in with that password (checked by the server's
    own SCRAM exchange, over a connection that asks for it; the test server trusts local users otherwise)."""
    password = secrets.token_urlsafe(24)
    salt = bytes(range(16))
    verifier = scram_verifier(password, salt=salt)
    assert verifier.startswith("SCRAM-SHA-256$4096:AAECAwQFBgcICQoLDA0ODw==$")
    set_host_role_now(database, "host1", password)
    with _connect(database.url) as admin:
        stored = admin.execute("SELECT rolpassword FROM pg_authid WHERE rolname = %s",
                               (database.names.host("host1"),)).fetchone()[0]
    assert stored.startswith("SCRAM-SHA-256$4096:") and stored != password
    # Recomputed with the stored salt, our verifier is the stored one: the server would accept the password.
    stored_salt = base64.b64decode(stored.split("$")[1].split(":")[1])
    assert scram_verifier(password, salt=stored_salt) == stored
    with pytest.raises(ValueError, match="printable"):
        scram_verifier("short pass word")


def admin_connection(database: Database) -> sa.Connection:
    return get_engine(database.url).connect().execution_options(isolation_level="AUTOCOMMIT")


def set_host_role_now(database: Database, host_name: str, password: str | None = None) -> str:
    with admin_connection(database) as connection:
        return set_host_role(connection, host_name, password or secrets.token_urlsafe(24), database.names)


def _site_with_agents_on_their_roles(tmp_path: Path, database: Database) -> RecoverySite:
    """A deployment on the test's schema whose host agents (host1, dr1) connect as their own login roles; the
    orchestration worker, beat and this process as the owner."""
    site = RecoverySite(tmp_path, recovery_host_names=("dr1",), database_url=database.url, start_workers=False,
                        env={"ASR_HOST_HEARTBEAT_S": "0.5"})
    try:
        for host_name in ("host1", "dr1"):
            set_host_role_now(database, host_name)
            site.deployment.worker_env[f"host-{host_name}"]["ASR_DATABASE_URL"] = database.host_url(host_name)
        site.deployment.start_processes()
    except BaseException:
        site.close()
        raise
    return site


def _assert_agents_ran_on_their_roles(site: RecoverySite, database: Database, jobs: list[dict],
                                      hosts: tuple[str, ...] = ("host1", "dr1")) -> None:
    """The jobs have steps on the agents of `hosts`, both agents were connected as their own roles (and no
    other process as a host role), and no agent was refused anything."""
    queues = {step["queue"] for job in jobs for step in job["steps"]}
    assert {f"host.{name}" for name in hosts} <= queues, queues
    with _connect(database.url) as admin:
        users = {row[0] for row in admin.execute(
            "SELECT usename FROM pg_stat_activity WHERE query NOT LIKE '%%pg_stat_activity%%' "
            "AND usename LIKE %s", (f"{database.names.host_group}%",)).fetchall()}
    assert users == {database.names.host("host1"), database.names.host("dr1")}, users
    for name in ("host-host1", "host-dr1"):
        log = site.workers[name].log()
        for refusal in ("permission denied", "row-level security", "InsufficientPrivilege"):
            assert refusal not in log, f"{name}: {refusal}\n{log[-3000:]}"


def _when_free(start, vm: str, timeout: float = 90) -> dict:
    """`start(vm)` (an api.service operation), again while beat's delta cycle holds the VM's item."""
    from api import service

    deadline = time.monotonic() + timeout
    while True:
        try:
            return start(vm)
        except service.Conflict as error:
            # (A cycle that ends between the refusal and the look for its holder reads "... ended just now":
            # the lock was let go meanwhile.)
            busy_now = ("(delta_replication, ", "ended just now")
            if not any(why in str(error) for why in busy_now) \
                    or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.mark.slow  # a whole deployment through every replication kind: 12-28 s on a loaded machine
def test_host_agents_protect_replicate_and_drill_with_their_own_roles(tmp_path: Path, database: Database) -> None:
    from api import service
    from workflows import kinds

    with _site_with_agents_on_their_roles(tmp_path, database) as site:
        vm_id = site.create_vm("host1", "app01", [("disk0", "16M", "vhd"), ("disk1", "8M", "raw")], seed=7)
        protect = site.wait_job(site.protect(vm_id), timeout=120)
        assert protect["state"] == "succeeded", site.describe_job(protect)
        cycle = site.delta_cycle(vm_id)
        assert cycle["state"] == "succeeded", site.describe_job(cycle)
        site.verify_replica(vm_id)
        jobs = [protect, cycle]
        for start in (service.test_failover, service.test_failover_cleanup, service.verify, service.preview_resync,
                      service.resync, service.consistency_check):
            jobs.append(site.wait_job(_when_free(start, "app01")["job_id"], timeout=120))
            assert site.item(vm_id)["state"] == "protected" and site.item(vm_id)["health"] == "Healthy", jobs[-1]
        assert "app01-test" not in [vm.name for vm in site.host("dr1").list_vms()]
        jobs.append(site.final_cycle(vm_id))
        site.verify_replica(vm_id)
        jobs.append(site.wait_job(_when_free(service.disable_protection, "app01")["job_id"], timeout=120))
        assert not [vm for vm in service.health() if vm["vm"] == "app01"]
        # A scheduled initial replication, started now: its snapshot step on host1 moves the item's state.
        later = site.create_policy("later", initial_replication_at=datetime.now(UTC) + timedelta(hours=6))
        other = site.create_vm("host1", "app02", [("disk0", "8M", "vhd")], seed=8)
        jobs.append(site.wait_job(site.protect(other, policy_id=later), timeout=120))
        assert site.item(other)["state"] == "initial_replication_pending"
        jobs.append(site.wait_job(kinds.initial_replication.start(site.item_id(other)), timeout=120))
        assert site.item(other)["state"] == "protected"
        jobs.append(site.final_cycle(other))
        site.verify_replica(other)
        # Each agent stamps its own host's heartbeat (tasks/alerts.py).
        with _connect(database.url) as admin:
            seen = admin.execute("SELECT name FROM host WHERE last_seen_at IS NOT NULL").fetchall()
        assert {row[0] for row in seen} == {"host1", "dr1"}
        _assert_agents_ran_on_their_roles(site, database, jobs)


def _vm_digests(site: RecoverySite, host: str, vm: str) -> dict[str, str]:
    from datapath.digest import disk_digest

    return {disk.name: disk_digest(disk.path) for disk in site.host(host).get_vm(vm).disks}


@pytest.mark.slow
def test_host_agents_fail_over_fail_back_and_reverse_replicate_with_their_own_roles(
        tmp_path: Path, database: Database) -> None:
    """The primary's and the recovery host's steps of every way out and back, each agent on its own role:
    unplanned failover and its cancel, planned failover, commit, failback (minimize downtime), its completion
    and commit, reverse replication; then a failback cancelled and one by full download; the disks byte for
    byte where data moves."""
    from workflows import kinds
    from workflows.failover_request import FailbackMode

    timeout = 90
    with _site_with_agents_on_their_roles(tmp_path, database) as site:
        vm_id = site.create_vm("host1", "app01", [("disk0", "16M", "vhd"), ("disk1", "8M", "raw")], seed=11)
        jobs = [site.wait_job(site.protect(vm_id), timeout=120)]
        item_id = site.item_id(vm_id)

        # Unplanned failover to the latest point (the primary quiet: the point is its disks), then cancelled.
        jobs.append(site.final_cycle(vm_id))
        at_point = _vm_digests(site, "host1", "app01")
        jobs.append(site.wait_job(site.when_free(kinds.unplanned_failover.start, item_id), timeout))
        assert _vm_digests(site, "dr1", "app01") == at_point
        assert site.item(vm_id)["state"] == "failed_over"
        jobs.append(site.wait_job(site.when_free(kinds.cancel_failover.start, item_id), timeout))
        assert site.item(vm_id)["state"] == "protected"
        assert "app01" not in [vm.name for vm in site.host("dr1").list_vms()]

        # Planned failover while the primary writes: the shutdown stops it, its last changes are shipped.
        site.host("host1").start_workload("app01", rate_mb_s=1.0, seed=3)
        time.sleep(0.5)
        jobs.append(site.wait_job(site.when_free(kinds.planned_failover.start, item_id), timeout))
        primary = _vm_digests(site, "host1", "app01")
        assert _vm_digests(site, "dr1", "app01") == primary, "the recovery VM must hold the primary's last bytes"
        jobs.append(site.wait_job(kinds.commit_failover.start(item_id), timeout))
        assert site.item(vm_id)["state"] == "failover_committed"

        # Failback, minimize downtime: the recovery VM's writes come back to the primary.
        site.host("dr1").start_workload("app01", rate_mb_s=0.2, seed=9)
        time.sleep(1.0)
        jobs.append(site.wait_job(kinds.failback.start(item_id), timeout))
        assert site.item(vm_id)["state"] == "failback_ready"
        assert _vm_digests(site, "host1", "app01") == primary, "nothing touches the primary before the swap"
        jobs.append(site.wait_job(kinds.failback_completion.start(item_id), timeout))
        recovery_final = _vm_digests(site, "dr1", "app01")
        assert _vm_digests(site, "host1", "app01") == recovery_final != primary
        assert site.item(vm_id)["state"] == "failed_back"
        jobs.append(site.wait_job(kinds.commit_failback.start(item_id), timeout))
        assert "app01" not in [vm.name for vm in site.host("dr1").list_vms()]

        # Reverse replication: protected again, the replica equal to the primary.
        jobs.append(site.wait_job(kinds.reverse_replication.start(item_id), timeout))
        assert site.item(vm_id)["state"] == "protected"
        jobs.append(site.final_cycle(vm_id))
        site.verify_replica(vm_id)

        # Again: a failback cancelled (its staging discarded on the primary), then one by full download, the
        # primary's disks replaced whole by the recovery VM's.
        jobs.append(site.wait_job(site.when_free(kinds.planned_failover.start, item_id), timeout))
        jobs.append(site.wait_job(kinds.commit_failover.start(item_id), timeout))
        site.host("dr1").start_workload("app01", rate_mb_s=0.2, seed=13)
        time.sleep(0.5)
        jobs.append(site.wait_job(kinds.failback.start(item_id), timeout))
        jobs.append(site.wait_job(kinds.cancel_failback.start(item_id), timeout))
        assert site.item(vm_id)["state"] == "failover_committed"
        assert recovery_final == _vm_digests(site, "host1", "app01"), "a cancelled failback leaves the primary"
        jobs.append(site.wait_job(kinds.failback.start(item_id, mode=FailbackMode.FULL_DOWNLOAD), timeout))
        assert site.item(vm_id)["state"] == "failed_back"
        assert _vm_digests(site, "host1", "app01") == _vm_digests(site, "dr1", "app01") != recovery_final
        jobs.append(site.wait_job(kinds.commit_failback.start(item_id), timeout))
        jobs.append(site.wait_job(kinds.reverse_replication.start(item_id), timeout))
        jobs.append(site.final_cycle(vm_id))
        site.verify_replica(vm_id)
        _assert_agents_ran_on_their_roles(site, database, jobs)


def _asr(database: Database, *args: str) -> subprocess.CompletedProcess:
    """`asr db roles ARGS --prefix PREFIX` as the owner."""
    env = {**os.environ, "ASR_DATABASE_URL": database.url}
    command = [sys.executable, "-c", "from api.cli import main; main()", "db", "roles", *args]
    return subprocess.run([*command, "--prefix", database.names.prefix], env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.slow
def test_the_rest_api_serves_on_its_own_role(tmp_path: Path, database: Database) -> None:
    """`asr api` connected as the API's login role (`asr db roles api`), on a schema the owner upgraded, the
    host agents on theirs: an admin's requests add a site, a host and a policy, list the VMs and protect one,
    and the agents carry the protection out."""
    from api import service
    from api.client import SiteRecoveryClient
    from sites.localservices import start_api, stop_all

    password_file = tmp_path / "api.db-password"
    made = _asr(database, "api", "--password-file", str(password_file))
    assert made.returncode == 0, made.stderr
    assert password_file.stat().st_mode & 0o777 == 0o600
    password = password_file.read_text().strip()
    assert password not in made.stdout + made.stderr
    url = make_url(made.stdout.strip())
    assert (url.username, url.password) == (database.names.api_login, "PASSWORD")
    api_url = url.set(password=password).render_as_string(hide_password=False)
    with _connect(api_url) as api:
        _refused_schema_changes(api)

    with _site_with_agents_on_their_roles(tmp_path, database) as site:
        site.create_vm("host1", "app01", [("disk0", "8M", "vhd")], seed=5)
        key = service.create_api_key("roles", "admin")["key"]
        # As a deployment hands it over: the URL names the role, the password is in a file only the API reads.
        server = start_api({**site.env, "ASR_DATABASE_URL": url.set(password=None).render_as_string(),
                            "ASR_DATABASE_PASSWORD_FILE": str(password_file)}, tmp_path)
        try:
            with SiteRecoveryClient(server.url, key, timeout=30) as client:
                assert client.add_site("annex")["name"] == "annex"
                (tmp_path / "annex1").mkdir()
                assert "registration_key" in client.add_host("annex1", str(tmp_path / "annex1"), site="annex")
                client.add_policy("quiet", copy_frequency_s=900, office_hours=["00:00", "23:59"],
                                  office_days=["mon", "tue", "wed", "thu", "fri", "sat", "sun"])
                assert "app01" in [vm["name"] for vm in client.list_vms()]
                started = client.protect("app01", policy="quiet", recovery_storage=site.recovery_storage,
                                         recovery_host="dr1")
                job = client.wait_job(started["job_id"], timeout=90)
                assert job["state"] == "succeeded", job
                assert client.show_vm("app01")["protection"]["state"] == "protected"
            with _connect(database.url) as admin:
                users = {row[0] for row in admin.execute(
                    "SELECT DISTINCT usename FROM pg_stat_activity WHERE usename LIKE %s",
                    (f"{database.names.prefix}_%",)).fetchall()}
            assert users == {database.names.api_login, database.names.host("host1"), database.names.host("dr1")}, \
                users
        finally:
            stop_all([server])
        log = server.log()
        assert "permission denied" not in log and "row-level security" not in log, log[-3000:]
        _assert_agents_ran_on_their_roles(site, database, [job], hosts=("host1",))


def test_asr_db_roles_apply_host_and_drop_host(tmp_path: Path, database: Database) -> None:
    def asr(*args: str) -> subprocess.CompletedProcess:
        return _asr(database, *args)

    applied = asr("apply")
    assert applied.returncode == 0, applied.stderr
    assert "job_step: row-level security on" in applied.stdout

    password_file = tmp_path / "host1.db-password"
    made = asr("host", "host1", "--password-file", str(password_file))
    assert made.returncode == 0, made.stderr
    assert password_file.stat().st_mode & 0o777 == 0o600
    password = password_file.read_text().strip()
    assert password not in made.stdout + made.stderr
    role = database.names.host("host1")
    url = make_url(made.stdout.strip())
    assert (url.username, url.password, url.host, url.database) == (role, "PASSWORD", "127.0.0.1", "test")
    assert url.query["options"] == f"-csearch_path={database.schema}"
    with _connect(made.stdout.strip()) as host:
        _refused(host, "SELECT * FROM api_key")
        assert host.execute("SELECT count(*) FROM job_step").fetchone() == (0,)
    # Run again: the same password (read from the file), the role given it again.
    again = asr("host", "host1", "--password-file", str(password_file))
    assert again.returncode == 0, again.stderr
    assert password_file.read_text().strip() == password

    refused = asr("host", "../etc", "--password-file", str(tmp_path / "x"))
    assert refused.returncode != 0 and "invalid host name" in refused.stderr
    assert not (tmp_path / "x").exists()

    dropped = asr("drop-host", "host1")
    assert dropped.returncode == 0 and f"{role} dropped" in dropped.stdout, dropped.stderr
    with _connect(database.url) as admin:
        assert admin.execute("SELECT count(*) FROM pg_roles WHERE rolname = %s", (role,)).fetchone() == (0,)


def test_a_database_url_without_its_password_takes_it_from_the_password_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ASR_DATABASE_PASSWORD_FILE (and ASR_BROKER_PASSWORD_FILE for the Redis URLs) complete a URL that names
    a user without a password; one with a password, or without a user, is left alone; a missing or empty file
    is one clear error naming the setting."""
    from models.db import database_url
    from workflows import settings

    secret = tmp_path / "db-password"
    secret.write_text("p@ss/word:1\n")
    monkeypatch.setenv("ASR_DATABASE_URL", "postgresql://asr_host_h1@db.example:5432/asr?sslmode=verify-full")
    monkeypatch.setenv("ASR_DATABASE_PASSWORD_FILE", str(secret))
    assert make_url(database_url()).password == "p@ss/word:1"
    assert make_url(database_url()).query == {"sslmode": "verify-full"}
    monkeypatch.setenv("ASR_DATABASE_URL", "postgresql://asr:given@db.example/asr")
    assert make_url(database_url()).password == "given"
    monkeypatch.setenv("ASR_INSECURE_TRANSPORT", "1")
    monkeypatch.setenv("ASR_BROKER_URL", "redis://asr-host-h1@127.0.0.1:6379/0")
    monkeypatch.setenv("ASR_BROKER_PASSWORD_FILE", str(secret))
    assert settings.broker_url() == "redis://asr-host-h1:p%40ss%2Fword%3A1@127.0.0.1:6379/0"
    assert settings.progress_redis_url() == settings.broker_url()
    # Without the file the URL is used as it is (trust or certificate authentication, a `nopass` user).
    monkeypatch.delenv("ASR_BROKER_PASSWORD_FILE")
    assert settings.broker_url() == "redis://asr-host-h1@127.0.0.1:6379/0"
    monkeypatch.setenv("ASR_DATABASE_URL", "postgresql://asr_host_h1@db.example/asr")
    monkeypatch.setenv("ASR_DATABASE_PASSWORD_FILE", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="ASR_DATABASE_PASSWORD_FILE=.*cannot read the password"):
        database_url()
    (tmp_path / "empty").write_text("\n")
    monkeypatch.setenv("ASR_DATABASE_PASSWORD_FILE", str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="is empty"):
        database_url()


def test_the_owners_password_is_made_once_in_its_file(tmp_path: Path) -> None:
    """`asr db roles owner --password-file FILE` (compose.yaml's db-owner service, before PostgreSQL starts):
    a new password in FILE, 0600, never printed, and kept at every later start; nothing connects."""
    from click.testing import CliRunner

    from api.cli import main

    password_file = tmp_path / "owner" / "db-password"
    made = CliRunner().invoke(main, ["db", "roles", "owner", "--password-file", str(password_file)])
    assert made.exit_code == 0, made.output
    password = password_file.read_text().strip()
    assert len(password) >= 24 and password_file.stat().st_mode & 0o777 == 0o600
    assert password not in made.output
    again = CliRunner().invoke(main, ["db", "roles", "owner", "--password-file", str(password_file)])
    assert again.exit_code == 0 and password_file.read_text().strip() == password, again.output


def test_apply_sets_a_deployments_login_roles_in_one_command(tmp_path: Path, database: Database) -> None:
    """`asr db roles apply --host NAME=FILE ... --api-password-file FILE` (compose.yaml's db-roles service): the
    grants and every login role, passwords made once in their files and kept when run again."""
    files = {name: tmp_path / name / "db-password" for name in ("host1", "dr1", "api")}
    arguments = ["apply", "--host", f"host1={files['host1']}", "--host", f"dr1={files['dr1']}",
                 "--api-password-file", str(files["api"])]
    applied = _asr(database, *arguments)
    assert applied.returncode == 0, applied.stderr
    assert "job_step: row-level security on" in applied.stdout
    assert f"{database.names.host('host1')}: host host1's agent" in applied.stdout, applied.stdout
    passwords = {name: path.read_text().strip() for name, path in files.items()}
    assert all(path.stat().st_mode & 0o777 == 0o600 for path in files.values())
    assert not any(password in applied.stdout + applied.stderr for password in passwords.values())
    with _connect(database.url) as admin:
        members = dict(admin.execute(
            "SELECT m.rolname, g.rolname FROM pg_auth_members a JOIN pg_roles m ON m.oid = a.member "
            "JOIN pg_roles g ON g.oid = a.roleid WHERE m.rolname = ANY(%s)",
            ([database.names.host("host1"), database.names.host("dr1"), database.names.api_login],)).fetchall())
    assert members == {database.names.host("host1"): database.names.host_group,
                       database.names.host("dr1"): database.names.host_group,
                       database.names.api_login: database.names.api}, members
    again = _asr(database, *arguments)
    assert again.returncode == 0, again.stderr
    assert {name: path.read_text().strip() for name, path in files.items()} == passwords
    for bad in (["--host", "host1"], ["--host", "host1=a", "--host", "host1=b"], ["--host", "../x=f"]):
        refused = _asr(database, "apply", *bad)
        assert refused.returncode == 2, (bad, refused.stdout, refused.stderr)
