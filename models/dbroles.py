"""Least privilege on PostgreSQL: the database roles of the host agents and of the API.

Every process used to connect as the role that owns the schema, so a compromised host could insert plan steps
that run on orchestration, add API keys, or read every other host's work. Here a host's agent connects as its
own login role `<prefix>_host_<name>`, a member of the group role `<prefix>_host`, which holds only what a
host's steps need (`HOST_GRANTS`): reads of the fabric and of what is replicated, the writes its steps make
(replica records, the item's replication state, failover records), and on the engine's tables only the
columns a run of a step changes. It cannot insert or delete jobs or steps, change a step's action, params or
queue, nor read or write API keys, plans or alerts.

Row-level security keeps a host to its own jobs: on `job`, `job_step` and `job_lock` a host's role sees and
changes only the rows of jobs that have a step on its queue `host.<name>` (and on `host` it stamps only its
own row's last_seen_at; on `protected_item` it marks only the items its jobs hold: their replication state
when a resync is needed, their health). Which queue is the role's follows
from the name it logged in as (`current_user`), which the host cannot choose (a password or certificate
proves it), unlike a session setting, which any client can set. A `SET ROLE <prefix>_host` leaves it no
queue at all. A job's other steps stay visible to its hosts because the engine runs on the host too: the
claim checks the earlier stages are done, the step that completes a stage queues the next (whatever its
queue), and a failing step cancels the job's other steps. So on the steps of its jobs not on its queue a
host may only make those changes (state queued, pending or cancelled, or a running step's lease cleared):
it cannot mark another host's step succeeded or give it a result.

The owner of the tables (the role `asr db upgrade` ran as: orchestration, recovery, beat, the operator's
`asr` commands) is not subject to row-level security and sees everything. The API's role `<prefix>_api`
may read and write every table's rows but change no schema; its policies let it see every row. The API's
processes connect as its login role `<prefix>_api_login` (`set_api_role`).

Roles are cluster-wide and outlive a schema; the grants and policies are the schema's, so `apply` runs again
after every `asr db upgrade` (a new table has no grant until then). SQLite has no roles: a SQLite database is
a single machine's development database and stays as it is.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
from dataclasses import dataclass

import sqlalchemy as sa

from models.db import validate_name

_PREFIX = re.compile(r"[a-z][a-z0-9_]{0,15}")
_MAX_ROLE_NAME = 63  # PostgreSQL's NAMEDATALEN - 1: a longer name would be cut, and match another's
_PASSWORD = re.compile(r"[\x21-\x7e]{16,256}")  # printable ASCII, no spaces: SASLprep leaves it as it is
SCRAM_ITERATIONS = 4096  # PostgreSQL's default (scram_iterations)

# The engine's tables: what a run of a step changes, and nothing else (not the action, params, queue, job).
STEP_RUN_COLUMNS = (
    "state", "attempts", "deaths", "interruptions", "broker_lost_at", "started_at", "ended_at", "heartbeat_at",
    "queued_at", "next_attempt_at", "error", "error_class", "instructions", "celery_task_id", "worker", "lease",
    "progress_done", "progress_total", "result",
)
FAILOVER_STEP_COLUMNS = ("details", "expected_roots", "produced_roots", "verified", "vm_up_at", "booted",
                         "boot_check", "boot_detail", "heartbeat_s")
JOB_RUN_COLUMNS = ("state", "started_at", "ended_at", "error", "error_class", "settled_at", "hook_pending")
# What a host's steps change on the protected item they work on: its replication state when a resync is
# needed or starts (tasks/replication.py `_enter_state`, tasks/replica_records.py `require_resync_of`) and
# its health (a step failing recoverably marks it Warning, `item_action`; a quiesce that failed). Never
# its VM, policy, storage, recovery host or schedule.
ITEM_STEP_COLUMNS = ("replication_state", "resync_required_reason", "resync_scheduled_for", "health",
                     "health_errors", "updated_at")

HOST_GRANTS: dict[str, tuple[str, ...]] = {
    # Every process checks the schema's revision when it starts (models/schema.py).
    "alembic_version": ("SELECT",),
    # Claim, heartbeat and outcome of a step; the job's state after it; the next stage queued, the job's other
    # steps cancelled when it fails (row-level security: only jobs with a step on the host's queue).
    "job": ("SELECT", f"UPDATE ({', '.join(JOB_RUN_COLUMNS)})"),
    "job_step": ("SELECT", f"UPDATE ({', '.join(STEP_RUN_COLUMNS)})"),
    # A job that settles on the host (its last step was the host's) releases its locks.
    "job_lock": ("SELECT", "DELETE"),
    # The fabric the steps act on: a host step checks the worker's key against its host's hash
    # (tasks/host_identity.py) and finds VMs, disks and adapters by id.
    "site": ("SELECT",),
    "vmm_server": ("SELECT",),
    "vmm_cloud": ("SELECT",),
    # An agent stamps its own host's last_seen_at (tasks/alerts.py; row-level security: only its own row).
    "host": ("SELECT", "UPDATE (last_seen_at)"),
    "virtual_machine": ("SELECT",),
    "virtual_disk": ("SELECT",),
    "vm_network_adapter": ("SELECT",),
    "network_mapping": ("SELECT",),
    "replication_policy": ("SELECT",),
    # Row-level security: only an item held by a job with a step on the host's queue (its lock).
    "protected_item": ("SELECT", f"UPDATE ({', '.join(ITEM_STEP_COLUMNS)})"),
    "recovery_point": ("SELECT",),
    # Ship logs and Copy disk record what they did to a disk's replica (tasks/replica_records.py).
    "replica_record": ("SELECT", "INSERT", "UPDATE"),
    # The recovery host's failover steps record the NIC placement, the roots they restored, the boot check;
    # the primary's failback steps the staged and swapped disks (tasks/failover*.py, tasks/failback.py). Not
    # the status, the kind or the target: those are orchestration's.
    "failover": ("SELECT", f"UPDATE ({', '.join(FAILOVER_STEP_COLUMNS)})"),
}
"""What the group role of the host agents may do, per table. Tables not named here: nothing (api_key,
recovery_plan, alert)."""

API_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE")
"""The API's role, on every table but `alembic_version` (SELECT only): rows, never the schema."""

RLS_TABLES = ("job", "job_step", "job_lock", "host", "protected_item")


@dataclass(frozen=True)
class RoleNames:
    """The roles' names: `<prefix>_host` (the host agents' group), `<prefix>_host_<name>` (a host's login
    role), `<prefix>_api`. One prefix per deployment sharing a PostgreSQL cluster (roles are the cluster's)."""

    prefix: str = "asr"

    def __post_init__(self) -> None:
        if not _PREFIX.fullmatch(self.prefix):
            raise ValueError(f"invalid role prefix {self.prefix!r}: 1 to 16 lower-case letters, digits or '_', "
                             f"starting with a letter")

    @property
    def host_group(self) -> str:
        return f"{self.prefix}_host"

    @property
    def api(self) -> str:
        return f"{self.prefix}_api"

    @property
    def api_login(self) -> str:
        """The login role the API's processes connect as, a member of `api`."""
        return f"{self.api}_login"

    @property
    def host_role_prefix(self) -> str:
        return f"{self.host_group}_"

    def host(self, host_name: str) -> str:
        """The login role of host `host_name`'s agent; ValueError for a name the role could not carry whole."""
        validate_name(host_name, "host")
        role = self.host_role_prefix + host_name
        if len(role.encode()) > _MAX_ROLE_NAME:
            raise ValueError(f"host name {host_name!r} is too long for a PostgreSQL role: {role!r} has more than "
                             f"{_MAX_ROLE_NAME} characters")
        return role


def require_postgresql(connection: sa.Connection) -> None:
    if connection.dialect.name != "postgresql":
        raise ValueError(f"database roles are PostgreSQL's; this database is {connection.dialect.name} (a SQLite "
                         f"database is one machine's: every process on it has the same file access)")


def scram_verifier(password: str, *, salt: bytes | None = None, iterations: int = SCRAM_ITERATIONS) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for `password` (RFC 5802/7677): the server is given this,
    never the password itself, so neither its statement log nor pg_stat_activity can show the password."""
    if not _PASSWORD.fullmatch(password):
        raise ValueError("a role's password must be 16 to 256 printable ASCII characters without spaces")
    salt = os.urandom(16) if salt is None else salt
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode()

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(hashlib.sha256(client_key).digest())}:{b64(server_key)}"


def _ident(connection: sa.Connection, name: str) -> str:
    return connection.dialect.identifier_preparer.quote_identifier(name)


def _role_exists(connection: sa.Connection, role: str) -> bool:
    return connection.execute(sa.text("SELECT 1 FROM pg_roles WHERE rolname = :role"), {"role": role}).first() \
        is not None


def _ensure_group(connection: sa.Connection, role: str) -> None:
    if not _role_exists(connection, role):
        connection.execute(sa.text(f"CREATE ROLE {_ident(connection, role)} NOLOGIN"))


def _execute_formatted(connection: sa.Connection, template: str, *args: str) -> None:
    """Run `template` with its %I / %L filled in by the server's format(): quoting done where it is defined."""
    placeholders = ", ".join(f"CAST(:a{i} AS text)" for i in range(len(args)))
    statement = connection.execute(sa.text(f"SELECT format('{template}', {placeholders})"),
                                   {f"a{i}": arg for i, arg in enumerate(args)}).scalar_one()
    connection.exec_driver_sql(statement)  # no parameters: nothing in it is taken for one


def apply_roles(connection: sa.Connection, names: RoleNames = RoleNames()) -> list[str]:
    """Create the group roles if missing and (re)set their grants and the row-level security of the schema
    `connection` works in (its current schema). Safe to run again. Returns what was done, one line each."""
    require_postgresql(connection)
    q = lambda name: _ident(connection, name)  # noqa: E731
    schema = connection.execute(sa.text("SELECT current_schema()")).scalar_one()
    tables = set(sa.inspect(connection).get_table_names(schema=schema))
    missing = sorted({*HOST_GRANTS, *RLS_TABLES} - tables)
    if missing:
        raise ValueError(f"schema {schema!r} lacks the tables {', '.join(missing)}: run `asr db upgrade` first")
    host, api = names.host_group, names.api
    done = []
    for role in (host, api):
        _ensure_group(connection, role)
        connection.execute(sa.text(f"GRANT USAGE ON SCHEMA {q(schema)} TO {q(role)}"))
        for table in sorted(tables):
            connection.execute(sa.text(f"REVOKE ALL ON {q(schema)}.{q(table)} FROM {q(role)}"))
    for table, privileges in HOST_GRANTS.items():
        for privilege in privileges:
            connection.execute(sa.text(f"GRANT {privilege} ON {q(schema)}.{q(table)} TO {q(host)}"))
    granted = ", ".join(f"{table} ({'/'.join(privileges)})" for table, privileges in HOST_GRANTS.items())
    done.append(f"{host}: {granted}")
    for table in sorted(tables):
        privileges = ("SELECT",) if table == "alembic_version" else API_PRIVILEGES
        connection.execute(sa.text(f"GRANT {', '.join(privileges)} ON {q(schema)}.{q(table)} TO {q(api)}"))
    done.append(f"{api}: rows of every table, no schema change")
    done.extend(_apply_row_security(connection, schema, names))
    return done


def _apply_row_security(connection: sa.Connection, schema: str, names: RoleNames) -> list[str]:
    q = lambda name: _ident(connection, name)  # noqa: E731
    host, api = q(names.host_group), q(names.api)
    host_queue = f"{q(schema)}.{q(names.prefix + '_host_queue')}"
    host_job = f"{q(schema)}.{q(names.prefix + '_host_job')}"
    role_prefix = names.host_role_prefix
    # The queue of the role logged in, or NULL for any other role (SET ROLE to the group included). Not
    # SECURITY DEFINER: current_user must be the caller's.
    connection.execute(sa.text(f"""
        CREATE OR REPLACE FUNCTION {host_queue}() RETURNS text LANGUAGE sql STABLE AS $$
            SELECT CASE WHEN starts_with(current_user, '{role_prefix}')
                        AND length(current_user) > {len(role_prefix)}
                   THEN 'host.' || substr(current_user, {len(role_prefix) + 1}) END
        $$"""))
    # Whether the job has a step on the queue. SECURITY DEFINER (runs as the owner, who bypasses row-level
    # security): a policy on job_step reading job_step as the host would recurse into itself.
    connection.execute(sa.text(f"""
        CREATE OR REPLACE FUNCTION {host_job}(job text, queue text) RETURNS boolean
        LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, {q(schema)} AS $$
            SELECT EXISTS (SELECT 1 FROM {q(schema)}.job_step s WHERE s.job_id = $1 AND s.queue = $2)
        $$"""))
    for function in (f"{host_queue}()", f"{host_job}(text, text)"):
        connection.execute(sa.text(f"REVOKE ALL ON FUNCTION {function} FROM PUBLIC"))
        connection.execute(sa.text(f"GRANT EXECUTE ON FUNCTION {function} TO {host}"))
    mine = f"{host_job}(%s, {host_queue}())"
    policies = {
        "job": [
            ("host_reads", "SELECT", host, mine % "id", None),
            ("host_runs", "UPDATE", host, mine % "id", "true"),
        ],
        "job_step": [
            ("host_reads", "SELECT", host, mine % "job_id", None),
            # Its own steps: what a run changes. The job's other steps: only what the engine does to them from
            # here (the next stage queued, or pending again when sending failed; cancelled, or a running one's
            # lease taken, when the job fails) - never succeeded, never a result. (Only a step that succeeded
            # has a result, and those the engine never moves back.)
            ("host_runs", "UPDATE", host, mine % "job_id",
             f"queue = {host_queue}() OR (state IN ('pending', 'queued', 'cancelled') AND result IS NULL) "
             f"OR (state = 'running' AND lease IS NULL)"),
        ],
        "job_lock": [
            ("host_reads", "SELECT", host, mine % "job_id", None),
            # Released only by a job that has settled (settle: settled_at set in the same transaction).
            ("host_releases", "DELETE", host,
             f"{mine % 'job_id'} AND EXISTS (SELECT 1 FROM {q(schema)}.job j WHERE j.id = job_lock.job_id "
             f"AND j.settled_at IS NOT NULL)", None),
        ],
    }
    # The item a job of the host's holds (its lock `item:<id>`, models.protection.item_lock_key, released
    # when the job settles): a host marks only the items it is working on now, not every host's.
    item_held = (f"EXISTS (SELECT 1 FROM {q(schema)}.job_lock l WHERE l.lock_key = 'item:' || protected_item.id "
                 f"AND {mine % 'l.job_id'})")
    policies["protected_item"] = [
        ("host_reads", "SELECT", host, "true", None),
        ("host_marks", "UPDATE", host, item_held, item_held),
    ]
    policies["host"] = [
        # Every host's row is read (a failback step drives the recovery host and the primary), only its own
        # stamped: an agent cannot keep another host looking alive.
        ("host_reads", "SELECT", host, "true", None),
        ("host_stamps", "UPDATE", host, f"queue = {host_queue}()", f"queue = {host_queue}()"),
    ]
    done = []
    for table, table_policies in policies.items():
        target = f"{q(schema)}.{q(table)}"
        connection.execute(sa.text(f"ALTER TABLE {target} ENABLE ROW LEVEL SECURITY"))
        existing = connection.execute(sa.text(
            "SELECT policyname FROM pg_policies WHERE schemaname = :schema AND tablename = :table"),
            {"schema": schema, "table": table}).scalars().all()
        for name in existing:
            connection.execute(sa.text(f"DROP POLICY {q(name)} ON {target}"))
        connection.execute(sa.text(f"CREATE POLICY api_all ON {target} FOR ALL TO {api} USING (true) "
                                   f"WITH CHECK (true)"))
        for name, command, role, using, check in table_policies:
            check_clause = f" WITH CHECK ({check})" if check else ""
            connection.execute(sa.text(f"CREATE POLICY {q(name)} ON {target} FOR {command} TO {role} "
                                       f"USING ({using}){check_clause}"))
        mine = {"host": "its own host's row to update",
                "protected_item": "only the items its jobs hold to update"}.get(
            table, "only the rows of jobs with a step on its queue")
        done.append(f"{table}: row-level security on; {names.host_group} {mine}; {names.api} every row")
    return done


def _set_login_role(connection: sa.Connection, role: str, group: str, password: str) -> None:
    """Create login role `role` (or give it this password), a member of `group`, which must exist
    (`apply_roles`). The server gets the password's SCRAM verifier only."""
    require_postgresql(connection)
    if not _role_exists(connection, group):
        raise ValueError(f"the group role {group} does not exist: run `asr db roles apply` first")
    verifier = scram_verifier(password)
    verb = "ALTER" if _role_exists(connection, role) else "CREATE"
    _execute_formatted(connection, f"{verb} ROLE %I LOGIN PASSWORD %L", role, verifier)
    _execute_formatted(connection, "GRANT %I TO %I", group, role)


def set_host_role(connection: sa.Connection, host_name: str, password: str,
                  names: RoleNames = RoleNames()) -> str:
    """Create host `host_name`'s login role (or give it this password), a member of the host group, which
    must exist (`apply_roles`). The server gets the password's SCRAM verifier only. Returns the role."""
    role = names.host(host_name)
    _set_login_role(connection, role, names.host_group, password)
    return role


def set_api_role(connection: sa.Connection, password: str, names: RoleNames = RoleNames()) -> str:
    """Create the API's login role `<prefix>_api_login` (or give it this password), a member of `<prefix>_api`,
    which must exist (`apply_roles`): every API process of the deployment connects as it. Returns the role."""
    _set_login_role(connection, names.api_login, names.api, password)
    return names.api_login


def drop_host_role(connection: sa.Connection, host_name: str, names: RoleNames = RoleNames()) -> bool:
    """Drop host `host_name`'s login role (a host taken out of service); False if there was none. Its open
    sessions go on until they end: terminate them (pg_terminate_backend) to cut the host off now."""
    require_postgresql(connection)
    role = names.host(host_name)
    if not _role_exists(connection, role):
        return False
    connection.execute(sa.text(f"DROP ROLE {_ident(connection, role)}"))
    return True


def drop_group_roles(connection: sa.Connection, names: RoleNames = RoleNames()) -> None:
    """Drop the group roles and what they hold in this database (grants, policies naming them); every host
    login role of the prefix and the API's login role first. Other databases' grants to them must be dropped
    there first."""
    require_postgresql(connection)
    members = connection.execute(sa.text(
        "SELECT rolname FROM pg_roles WHERE starts_with(rolname, :prefix)"),
        {"prefix": names.host_role_prefix}).scalars().all()
    for role in (*members, names.api_login, names.host_group, names.api):
        if _role_exists(connection, role):
            connection.execute(sa.text(f"DROP OWNED BY {_ident(connection, role)}"))
            connection.execute(sa.text(f"DROP ROLE {_ident(connection, role)}"))
