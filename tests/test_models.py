"""The state models on a real SQLite file and a real PostgreSQL server.

Every test that touches the database runs on both: SQLite in a temporary file, PostgreSQL in a schema of
its own (created for the test, dropped after) in the `test` database at 127.0.0.1:5432, or wherever
ASR_TEST_POSTGRES_URL points.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from datetime import UTC, datetime, timedelta, timezone
from datetime import time as clock_time
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from datapath.errors import NonRecoverableError
from models import fabric, protection
from models import policy as policies
from models.db import database_url, dispose_engines, get_engine, init_db, session_scope
from models.fabric import (
    AmbiguousVmError,
    Host,
    NetworkMapping,
    Site,
    VirtualDisk,
    VirtualMachine,
    VmmCloud,
    VmmServer,
    VmNetworkAdapter,
    VmNotFoundError,
)
from models.jobs import Job, JobLock
from models.policy import ReplicationPolicy
from models.protection import (
    ALLOWED_TRANSITIONS,
    Health,
    InvalidStateError,
    ProtectedItem,
    RecoveryPoint,
    RecoveryPointKind,
    ReplicationState,
)
from sites.host import Host as HostTree

REPO_ROOT = Path(__file__).resolve().parent.parent
MY_TABLES = (
    Site, VmmServer, VmmCloud, Host, VirtualMachine, VirtualDisk, VmNetworkAdapter, NetworkMapping,
    ReplicationPolicy, ProtectedItem, RecoveryPoint,
)
# A Friday, in winter (no daylight saving anywhere in Europe).
FRIDAY = datetime(2026, 1, 16, tzinfo=UTC)
SUBPROCESS_TIMEOUT_S = 60


# ---- databases ------------------------------------------------------------------------------------
def row_counts(engine: Engine) -> dict[str, int]:
    with Session(engine) as session:
        return {
            table.__tablename__: session.exec(select(sa.func.count()).select_from(table)).one()
            for table in MY_TABLES
        }


def make_site_host(session: Session, host_name: str = "hv01") -> tuple[Site, Host]:
    site = fabric.create_site(session, "branch-office")
    host, _key = fabric.register_host(session, host_name, f"/srv/hosts/{host_name}", site=site)
    return site, host


def make_item(session: Session, *, retention_h: int = 2) -> ProtectedItem:
    _site, host = make_site_host(session)
    disk = {"name": "disk0", "file": "disk0.vhd", "size": 8 << 20, "format": "vhd"}
    vm = fabric.add_vm(session, host, "app01", [disk], [])
    policy = policies.create_policy(
        session, f"policy-{retention_h}h", recovery_point_retention_h=retention_h,
        app_consistent_frequency_h=min(1, retention_h),
    )
    return protection.protect_vm(session, vm, policy, recovery_storage="file:///srv/recovery")


# ---- engines and sessions -------------------------------------------------------------------------
def test_default_url_is_a_sqlite_file_in_asr_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ASR_DATABASE_URL", raising=False)
    monkeypatch.setenv("ASR_HOME", str(tmp_path / "home"))
    assert database_url() == f"sqlite:///{tmp_path / 'home' / 'asr.db'}"
    monkeypatch.setenv("ASR_DATABASE_URL", "postgresql://someone@db.example/asr")
    assert database_url() == "postgresql://someone@db.example/asr"
    # A plain postgresql:// URL would pick psycopg2, which is not installed.
    assert get_engine().url.drivername == "postgresql+psycopg"
    dispose_engines()


def test_sqlite_runs_in_wal_mode_with_a_busy_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASR_SQLITE_BUSY_TIMEOUT_S", "12.5")
    engine = init_db(get_engine(f"sqlite:///{tmp_path / 'wal.db'}"))
    try:
        with engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 12500
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert get_engine(f"sqlite:///{tmp_path / 'wal.db'}") is engine
    finally:
        dispose_engines()


def test_session_scope_commits_or_rolls_back(engine: Engine) -> None:
    with session_scope(engine) as session:
        site = fabric.create_site(session, "committed")
    assert site.name == "committed"  # still readable after the scope: no expiry on commit
    with pytest.raises(RuntimeError):
        with session_scope(engine) as session:
            fabric.create_site(session, "rolled-back")
            raise RuntimeError("boom")
    with session_scope(engine) as session:
        assert [s.name for s in session.exec(select(Site))] == ["committed"]


def test_timestamps_come_back_as_aware_utc(engine: Engine) -> None:
    plus_two = timezone(timedelta(hours=2))
    with session_scope(engine) as session:
        item = make_item(session)
        item.next_delta_at = datetime(2026, 3, 1, 14, 0, tzinfo=plus_two)
        item.resync_scheduled_for = datetime(2026, 3, 1, 12, 30)  # naive: taken as UTC
        item_id = item.id
    with session_scope(engine) as session:
        item = session.get(ProtectedItem, item_id)
        assert item.next_delta_at == datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
        assert item.next_delta_at.tzinfo == UTC
        assert item.resync_scheduled_for == datetime(2026, 3, 1, 12, 30, tzinfo=UTC)
        assert item.created_at.tzinfo == UTC
        assert abs(item.created_at - datetime.now(UTC)) < timedelta(minutes=1)
        # Comparisons in SQL see the same instants.
        found = session.exec(select(ProtectedItem).where(
            ProtectedItem.next_delta_at == datetime(2026, 3, 1, 13, 0, tzinfo=timezone(timedelta(hours=1)))
        )).all()
        assert [i.id for i in found] == [item_id]


# ---- the fabric ---------------------------------------------------------------------------------------
def test_hyperv_site_shape(engine: Engine) -> None:
    with session_scope(engine) as session:
        site = fabric.create_site(session, "contoso-hq", "head office")
        host, key = fabric.register_host(session, "hv01", "/srv/hosts/hv01", site=site)
        vm = fabric.add_vm(
            session, host, "app01",
            [
                {"name": "disk0", "file": "disk0.vhd", "size": 40 << 30, "format": "vhd"},
                {"id": "6f1c0a8e-2f0b-4a57-9d55-2d8f4b0e3c11", "name": "data", "file": "data.raw",
                 "size": 5 << 40, "format": "raw"},
            ],
            [{"name": "nic0", "vm_network": "corp"}, {"name": "nic1", "network": "backup"}],
            generation=2, state="running",
        )
        mapping = fabric.add_network_mapping(session, "corp", "recovery-corp", "10.20.0.0/24", site=site)
    with session_scope(engine) as session:
        host = session.exec(select(Host).where(Host.name == "hv01")).one()
        assert (host.site_id, host.cloud_id, host.queue, host.root) == (site.id, None, "host.hv01", "/srv/hosts/hv01")
        assert host.registered_at.tzinfo == UTC and host.last_seen_at is None
        vm = fabric.get_vm(session, "app01", host)
        assert (vm.generation, vm.state, vm.host_id) == (2, "running", host.id)
        uuid.UUID(vm.vm_uuid)
        disks = fabric.vm_disks(session, vm)
        # In the order given (a guest's first drive is its first disk), not by name.
        assert [(d.name, d.file_name, d.size, d.format, d.position) for d in disks] == [
            ("disk0", "disk0.vhd", 40 << 30, "vhd", 0), ("data", "data.raw", 5 << 40, "raw", 1),
        ]
        assert disks[1].disk_uuid == "6f1c0a8e-2f0b-4a57-9d55-2d8f4b0e3c11"
        assert [(a.name, a.vm_network, a.public_ip) for a in fabric.vm_adapters(session, vm)] == [
            ("nic0", "corp", None), ("nic1", "backup", None),
        ]
        stored = session.get(NetworkMapping, mapping.id)
        assert (stored.site_id, stored.cloud_id, stored.source_network) == (site.id, None, "corp")
        assert (stored.recovery_network, stored.recovery_subnet) == ("recovery-corp", "10.20.0.0/24")
        assert fabric.verify_host_key(host, key)


def test_vmm_cloud_shape_and_manifest_import(engine: Engine, tmp_path: Path) -> None:
    # A real host tree writes the vm.json that is imported.
    tree = HostTree(tmp_path / "hv-cloud-01", "hv-cloud-01")
    created = tree.create_vm("sql01", [("os", "8M", "vhd"), ("logs", "16M", "raw")], networks=("prod", "mgmt"))
    manifest = json.loads((created.path / "vm.json").read_text())
    with session_scope(engine) as session:
        server = fabric.create_vmm_server(session, "vmm01.contoso.local")
        cloud = fabric.create_cloud(session, server, "gold")
        fabric.create_cloud(session, fabric.create_vmm_server(session, "vmm02"), "gold")  # same name, other server
        host, _key = fabric.register_host(session, "hv-cloud-01", str(tree.root), cloud=cloud)
        vm = fabric.import_vm_manifest(session, host, manifest)
        fabric.add_network_mapping(session, "prod", "azure-prod", "10.30.0.0/16", cloud=cloud)
        # The same source network may be mapped again in another scope.
        lab = fabric.create_site(session, "lab")
        fabric.add_network_mapping(session, "prod", "dr-prod", "192.168.5.0/24", site=lab)
    with session_scope(engine) as session:
        host = session.exec(select(Host).where(Host.name == "hv-cloud-01")).one()
        assert (host.site_id, host.cloud_id, host.queue) == (None, cloud.id, "host.hv-cloud-01")
        vm = fabric.get_vm(session, "sql01")
        assert (vm.vm_uuid, vm.generation, vm.state) == (created.id, created.generation, created.state)
        assert {(d.disk_uuid, d.name, d.file_name, d.size, d.format) for d in fabric.vm_disks(session, vm)} == {
            (d["id"], d["name"], d["file"], d["size"], d["format"]) for d in manifest["disks"]
        } == {(d.id, d.name, d.path.name, d.size, d.format) for d in created.disks}
        assert {(a.name, a.vm_network) for a in fabric.vm_adapters(session, vm)} == {
            (a.name, a.vm_network) for a in created.network_adapters
        } == {("nic0", "prod"), ("nic1", "mgmt")}
        assert session.exec(select(sa.func.count()).select_from(VmmCloud)).one() == 2


def test_manifest_import_is_idempotent_and_follows_changes(engine: Engine) -> None:
    disk_a, disk_b, disk_c = (str(uuid.uuid4()) for _ in range(3))
    manifest = {
        "name": "web01", "id": str(uuid.uuid4()), "generation": 1, "state": "off",
        "disks": [
            {"id": disk_a, "name": "disk0", "file": "disk0.vhd", "size": 8 << 20, "format": "vhd"},
            {"id": disk_b, "name": "disk1", "file": "disk1.raw", "size": 16 << 20, "format": "raw"},
        ],
        "adapters": [{"name": "nic0", "network": "dmz"}, {"name": "nic1", "network": "corp"}],
    }
    with session_scope(engine) as session:
        _site, host = make_site_host(session)
        vm = fabric.import_vm_manifest(session, host, manifest)
        vm_id = vm.id
        session.flush()
        first_disk_rows = {d.disk_uuid: d.id for d in fabric.vm_disks(session, vm)}
    with session_scope(engine) as session:
        host = session.exec(select(Host)).one()
        assert fabric.import_vm_manifest(session, host, manifest).id == vm_id
        vm = session.get(VirtualMachine, vm_id)
        assert {d.disk_uuid: d.id for d in fabric.vm_disks(session, vm)} == first_disk_rows
    assert row_counts(engine)["virtual_disk"] == 2 and row_counts(engine)["vm_network_adapter"] == 2
    # The two disks swap names, one grows, a third appears; an adapter leaves; "networks" spelling.
    changed = {
        "name": "web01", "id": manifest["id"], "generation": 1, "state": "running",
        "disks": [
            {"id": disk_a, "name": "disk1", "file": "disk0.vhd", "size": 8 << 20, "format": "vhd"},
            {"id": disk_b, "name": "disk0", "file": "disk1.raw", "size": 32 << 20, "format": "raw"},
            {"id": disk_c, "name": "disk2", "file": "disk2.raw", "size": 8 << 20, "format": "raw"},
        ],
        "networks": [{"name": "nic1", "vm_network": "corp-v2"}],
    }
    with session_scope(engine) as session:
        fabric.import_vm_manifest(session, session.exec(select(Host)).one(), changed)
    with session_scope(engine) as session:
        vm = session.get(VirtualMachine, vm_id)
        assert vm.state == "running"
        disks = {d.disk_uuid: d for d in fabric.vm_disks(session, vm)}
        assert {u: (d.name, d.size) for u, d in disks.items()} == {
            disk_a: ("disk1", 8 << 20), disk_b: ("disk0", 32 << 20), disk_c: ("disk2", 8 << 20),
        }
        assert disks[disk_a].id == first_disk_rows[disk_a]  # the same rows, updated
        assert [(a.name, a.vm_network) for a in fabric.vm_adapters(session, vm)] == [("nic1", "corp-v2")]
    # Another VM id under the same name is refused, and nothing changes.
    before = row_counts(engine)
    with pytest.raises(ValueError, match="registered with id"):
        with session_scope(engine) as session:
            fabric.import_vm_manifest(session, session.exec(select(Host)).one(), {**changed, "id": str(uuid.uuid4())})
    assert row_counts(engine) == before


def test_host_belongs_to_exactly_one_site_or_cloud(engine: Engine) -> None:
    with session_scope(engine) as session:
        site = fabric.create_site(session, "s1")
        cloud = fabric.create_cloud(session, fabric.create_vmm_server(session, "vmm01"), "c1")
    before = row_counts(engine)
    for scope in ({"site": site, "cloud": cloud}, {}):
        with pytest.raises(ValueError, match="exactly one site or one VMM cloud"):
            with session_scope(engine) as session:
                fabric.register_host(session, "hv09", "/srv/hv09", **scope)
    assert row_counts(engine) == before
    # The database enforces it too, whatever code writes the row.
    for site_id, cloud_id in ((site.id, cloud.id), (None, None)):
        with pytest.raises(sa.exc.IntegrityError):
            with session_scope(engine) as session:
                session.add(Host(
                    name="rogue", root="/srv/rogue", queue="host.rogue", key_hash="x", site_id=site_id,
                    cloud_id=cloud_id,
                ))
    assert row_counts(engine) == before
    with pytest.raises(ValueError, match="not saved"):
        with session_scope(engine) as session:
            fabric.register_host(session, "hv10", "/srv/hv10", site=Site(name="unsaved"))
    for root in ("relative/path", "", None):
        with pytest.raises(ValueError, match="absolute path"):
            with session_scope(engine) as session:
                fabric.register_host(session, "hv11", root, site=site)
    assert row_counts(engine) == before


def test_host_key_is_stored_hashed_and_verifies(engine: Engine, db_url: str) -> None:
    with session_scope(engine) as session:
        site = fabric.create_site(session, "s1")
        host, key = fabric.register_host(session, "hv01", "/srv/hv01", site=site)
        other, other_key = fabric.register_host(session, "hv02", "/srv/hv02", site=site)
    assert len(key) >= 40 and key != other_key
    with engine.connect() as connection:
        raw_rows = [tuple(map(str, row)) for row in connection.execute(sa.text("SELECT * FROM host"))]
    assert len(raw_rows) == 2
    for row in raw_rows:
        assert not any(key in value or other_key in value for value in row)
    assert host.key_hash.startswith("scrypt$") and host.key_hash != other.key_hash
    with session_scope(engine) as session:
        stored = session.get(Host, host.id)
        assert fabric.verify_host_key(stored, key)
        assert not fabric.verify_host_key(stored, other_key)
        assert not fabric.verify_host_key(stored, key[:-1] + ("A" if key[-1] != "A" else "B"))
        assert not fabric.verify_host_key(stored, "")
        stored.key_hash = "plain-text-key"
        with pytest.raises(ValueError, match="hv01.*malformed"):
            fabric.verify_host_key(stored, key)
        session.rollback()


def test_duplicates_are_refused_and_nothing_written(engine: Engine) -> None:
    with session_scope(engine) as session:
        site, host = make_site_host(session)
        server = fabric.create_vmm_server(session, "vmm01")
        cloud = fabric.create_cloud(session, server, "gold")
        fabric.add_vm(session, host, "app01", [{"name": "d", "file": "d.raw", "size": 1 << 20, "format": "raw"}], [])
        fabric.add_network_mapping(session, "corp", "rec", "10.0.0.0/24", site=site)
        policies.create_policy(session, "every-5-min")
    before = row_counts(engine)
    attempts = [
        (lambda s: fabric.create_site(s, "branch-office"), "site 'branch-office' already exists"),
        (lambda s: fabric.create_vmm_server(s, "vmm01"), "VMM server 'vmm01' already exists"),
        (lambda s: fabric.create_cloud(s, server, "gold"), "already has a cloud 'gold'"),
        (lambda s: fabric.register_host(s, "hv01", "/elsewhere", site=site), "host 'hv01' is already registered"),
        (lambda s: fabric.add_vm(s, host, "app01", [{"name": "d", "file": "d.raw", "size": 1, "format": "raw"}], []),
         "VM 'app01' already exists on host 'hv01'"),
        (lambda s: fabric.add_network_mapping(s, "corp", "other", "10.9.0.0/24", site=site), "already mapped to 'rec'"),
        (lambda s: policies.create_policy(s, "every-5-min"), "already exists"),
    ]
    for attempt, message in attempts:
        with pytest.raises(ValueError, match=message):
            with session_scope(engine) as session:
                attempt(session)
    assert row_counts(engine) == before
    with session_scope(engine) as session:  # the same network in a cloud is another scope
        fabric.add_network_mapping(session, "corp", "rec", "10.0.0.0/24", cloud=cloud)


BAD_NAMES = ["", ".hidden", "-dash", "a/b", "..", "has space", "x" * 65, "tab\t", "newline\n", "üñí", None, 7]


def test_bad_names_are_refused_and_nothing_written(engine: Engine) -> None:
    with session_scope(engine) as session:
        site, host = make_site_host(session)
    before = row_counts(engine)
    for bad in BAD_NAMES:
        _refuse_bad_name(engine, site, host, bad)
    assert row_counts(engine) == before


def _refuse_bad_name(engine: Engine, site: Site, host: Host, bad: object) -> None:
    disk = {"name": "disk0", "file": "disk0.raw", "size": 1 << 20, "format": "raw"}
    attempts = [
        (lambda s: fabric.create_site(s, bad), "invalid site name"),
        (lambda s: fabric.create_vmm_server(s, bad), "invalid VMM server name"),
        (lambda s: fabric.register_host(s, bad, "/srv/x", site=site), "invalid host name"),
        (lambda s: fabric.add_vm(s, host, bad, [disk], []), "invalid VM name"),
        (lambda s: fabric.add_vm(s, host, "vm1", [disk, {**disk, "name": bad, "file": "d1.raw"}], []), "invalid disk"),
        (lambda s: fabric.add_vm(s, host, "vm1", [{**disk, "file": bad}], []), "invalid disk file"),
        (lambda s: fabric.add_vm(s, host, "vm1", [disk], [{"name": "nic0", "network": bad}]), "invalid VM network"),
        (lambda s: fabric.import_vm_manifest(s, host, {
            "name": "vm1", "id": str(uuid.uuid4()), "disks": [{**disk, "id": str(uuid.uuid4())}],
            "network_adapters": [{"name": bad, "vm_network": "corp"}],
        }), "invalid network adapter"),
        (lambda s: fabric.add_network_mapping(s, bad, "rec", "10.0.0.0/24", site=site), "invalid source network"),
        (lambda s: fabric.add_network_mapping(s, "corp", bad, "10.0.0.0/24", site=site), "invalid recovery network"),
        (lambda s: policies.create_policy(s, bad), "invalid replication policy name"),
    ]
    for attempt, message in attempts:
        with pytest.raises(ValueError, match=message) as raised:
            with session_scope(engine) as session:
                attempt(session)
        assert repr(bad) in str(raised.value)


def test_bad_vm_specs_are_refused_with_the_reason(engine: Engine) -> None:
    with session_scope(engine) as session:
        _site, host = make_site_host(session)
    before = row_counts(engine)
    disk = {"name": "disk0", "file": "disk0.raw", "size": 1 << 20, "format": "raw"}
    cases = [
        ([], [], "non-empty list of disks"),
        ([{**disk, "size": 0}], [], "size must be a positive"),
        ([{**disk, "size": "1G"}], [], "size must be a positive"),
        ([{**disk, "format": "vhdx"}], [], "format must be one of"),
        ([{**disk, "id": "not-a-uuid"}], [], "id must be a UUID"),
        ([disk, {**disk, "file": "other.raw"}], [], "duplicate disk names: disk0"),
        ([disk], [{"name": "nic0", "network": "a"}, {"name": "nic0", "network": "b"}], "duplicate adapter names: nic0"),
        (["disk0"], [], "each disk must be an object"),
    ]
    for disks, adapters, message in cases:
        with pytest.raises(ValueError, match=message) as raised:
            with session_scope(engine) as session:
                fabric.add_vm(session, host, "vm1", disks, adapters)
        assert "VM 'vm1' on host 'hv01'" in str(raised.value)
    identified = {**disk, "id": str(uuid.uuid4())}
    for manifest, message in [
        ({"name": "vm1", "disks": [disk]}, "lacks 'id' or 'disks'"),
        ({"name": "vm1", "id": str(uuid.uuid4()), "disks": [disk]}, "every disk needs its 'id'"),
        ({"name": "vm1", "id": str(uuid.uuid4()), "disks": [identified], "generation": 3}, "generation must be one of"),
        ({"name": "vm1", "id": str(uuid.uuid4()), "disks": [identified], "state": "paused"}, "state must be one of"),
        ([disk], "must be a JSON object"),
    ]:
        with pytest.raises(ValueError, match=message):
            with session_scope(engine) as session:
                fabric.import_vm_manifest(session, host, manifest)
    with pytest.raises(ValueError, match="not a network in CIDR form"):
        with session_scope(engine) as session:
            fabric.add_network_mapping(session, "corp", "rec", "10.0.0.1/24", site=session.exec(select(Site)).one())
    assert row_counts(engine) == before


def test_unknown_vm_is_a_non_recoverable_error_naming_it(engine: Engine) -> None:
    with session_scope(engine) as session:
        site, host = make_site_host(session)
        other, _key = fabric.register_host(session, "hv02", "/srv/hv02", site=site)
        disk = {"name": "d", "file": "d.raw", "size": 1 << 20, "format": "raw"}
        fabric.add_vm(session, host, "app01", [disk], [])
        fabric.add_vm(session, host, "dup", [disk], [])
        fabric.add_vm(session, other, "dup", [disk], [])
    with session_scope(engine) as session:
        with pytest.raises(VmNotFoundError, match="VM 'ghost' not found") as raised:
            fabric.get_vm(session, "ghost")
        assert isinstance(raised.value, NonRecoverableError)
        with pytest.raises(VmNotFoundError, match="VM 'app01' not found on host 'hv02'"):
            fabric.get_vm(session, "app01", "hv02")
        with pytest.raises(AmbiguousVmError, match="'dup' exists on hosts hv01, hv02"):
            fabric.get_vm(session, "dup")
        assert fabric.get_vm(session, "dup", "hv02").host_id == other.id
        assert fabric.get_vm(session, "app01").host_id == host.id


# ---- replication policies ---------------------------------------------------------------------------
def test_policy_defaults_follow_the_reference(engine: Engine) -> None:
    with session_scope(engine) as session:
        created = policies.create_policy(session, "default")
    with session_scope(engine) as session:
        policy = session.get(ReplicationPolicy, created.id)
        assert policy.copy_frequency_s == 300
        assert (policy.recovery_point_retention_h, policy.app_consistent_frequency_h) == (2, 1)
        assert policy.initial_replication_at is None
        assert (policy.office_hours_start, policy.office_hours_end) == (clock_time(8), clock_time(18))
        assert policy.office_days == [0, 1, 2, 3, 4] and policy.office_timezone == "UTC"


def policy_refusals(now: datetime) -> list[tuple[dict, str]]:
    """Settings a policy refuses, with the message (a regex) it refuses them with: when created or changed."""
    return [
        ({"copy_frequency_s": 60}, "copy frequency \\(seconds\\) must be one of 30, 300, 900, got 60"),
        ({"copy_frequency_s": True}, "copy frequency"),
        ({"recovery_point_retention_h": 25}, "retention \\(hours\\) must be a whole number from 0 to 24, got 25"),
        ({"recovery_point_retention_h": -1}, "retention"),
        ({"recovery_point_retention_h": 24, "app_consistent_frequency_h": 13}, "from 0 to 12, got 13"),
        ({"recovery_point_retention_h": 2, "app_consistent_frequency_h": 4}, "would not survive a 2 h retention"),
        ({"initial_replication_at": now + timedelta(hours=24, minutes=5)}, "at most 24 hours ahead"),
        ({"initial_replication_at": now - timedelta(minutes=5)}, "in the past"),
        ({"initial_replication_at": "tomorrow"}, "must be a datetime"),
        ({"office_hours": (clock_time(18), clock_time(8))}, "must start before they end"),
        ({"office_hours": (clock_time(9), clock_time(9))}, "must start before they end"),
        ({"office_hours": ("08:00", "18:00")}, "local times"),
        ({"office_days": [0, 7]}, "office day 7 is not a weekday"),
        ({"office_days": ["mon", "funday"]}, "'funday' is not a weekday"),
        ({"office_days": [0, "monday"]}, "repeat a weekday"),
        ({"office_days": "mon-fri"}, "list of weekdays"),
        ({"office_timezone": "Mars/Olympus"}, "unknown office time zone 'Mars/Olympus'"),
        ({"consistency_check_interval_h": 169}, "consistency check interval \\(hours\\) must be a whole number from 0 "
                                                 "to 168, got 169"),
        ({"consistency_check_interval_h": -1}, "consistency check interval"),
        ({"consistency_check_off_hours": "yes"}, "consistency_check_off_hours must be true or false"),
    ]


def test_policy_validation(engine: Engine) -> None:
    now = datetime.now(UTC)
    before = row_counts(engine)
    cases = policy_refusals(now)
    for settings, message in cases:
        with pytest.raises(ValueError, match=message) as raised:
            with session_scope(engine) as session:
                policies.create_policy(session, "gold", **settings)
        assert "replication policy 'gold'" in str(raised.value)
    assert row_counts(engine) == before
    with session_scope(engine) as session:
        start_at = now + timedelta(hours=23)
        policy = policies.create_policy(
            session, "gold", copy_frequency_s=30, recovery_point_retention_h=24, app_consistent_frequency_h=12,
            initial_replication_at=start_at, office_days=["Sat", "sunday", 2], office_timezone="Europe/Berlin",
            consistency_check_interval_h=0,
        )
        default = policies.create_policy(session, "silver")
    with session_scope(engine) as session:
        stored = session.get(ReplicationPolicy, policy.id)
        assert stored.initial_replication_at == start_at.replace(microsecond=start_at.microsecond)
        assert stored.office_days == [2, 5, 6]
        assert (stored.consistency_check_interval_h, stored.consistency_check_off_hours) == (0, True)
        stored = session.get(ReplicationPolicy, default.id)
        assert (stored.consistency_check_interval_h, stored.consistency_check_off_hours) == (24, True)


def test_policy_update_is_validated_as_creation_and_keeps_what_it_is_not_given(engine: Engine) -> None:
    with session_scope(engine) as session:
        created = policies.create_policy(session, "bronze", rpo_critical_s=2000)
    def snapshot() -> dict:
        """The policy's row as stored: what a refused change must leave as it was."""
        with Session(engine) as session:
            return session.get(ReplicationPolicy, created.id).model_dump()

    before = snapshot()
    for settings, message in policy_refusals(datetime.now(UTC)):
        with pytest.raises(ValueError, match=message) as raised:
            with session_scope(engine) as session:
                policies.update_policy(session, session.get(ReplicationPolicy, created.id), **settings)
        assert "replication policy 'bronze'" in str(raised.value)
    with pytest.raises(ValueError, match="unknown setting.*colour"):
        with session_scope(engine) as session:
            policies.update_policy(session, session.get(ReplicationPolicy, created.id), colour="blue")
    # The policy as it would be is checked whole: a critical threshold set before bounds the new warning.
    with pytest.raises(ValueError, match="copy frequency < warning < critical, got 300 s < 2500 s < 2000 s"):
        with session_scope(engine) as session:
            policies.update_policy(session, session.get(ReplicationPolicy, created.id), rpo_warning_s=2500)
    assert snapshot() == before

    with session_scope(engine) as session:
        policies.update_policy(session, session.get(ReplicationPolicy, created.id), copy_frequency_s=30,
                               office_days=["sat"], recovery_point_retention_h=5)
    after = snapshot()
    changed = {key for key in before if before[key] != after[key]}
    assert changed == {"copy_frequency_s", "office_days", "recovery_point_retention_h"}
    assert (after["copy_frequency_s"], after["office_days"], after["rpo_warning_s"]) == (30, [5], None)
    with Session(engine) as session:  # a warning never set follows the copy frequency
        assert session.get(ReplicationPolicy, created.id).rpo_thresholds_s() == (60, 2000)


def test_office_hours_and_resync_slots_across_a_weekend(engine: Engine) -> None:
    with session_scope(engine) as session:
        policy = policies.create_policy(session, "weekdays")
        every_day = policies.create_policy(session, "every-day", office_days=range(7))
        berlin = policies.create_policy(session, "berlin", office_timezone="Europe/Berlin")
    friday = FRIDAY
    assert friday.weekday() == 4
    at = lambda day, hour, minute=0: friday + timedelta(days=day, hours=hour, minutes=minute)  # noqa: E731
    assert policy.in_office_hours(at(0, 8)) and policy.in_office_hours(at(0, 17, 59))
    assert not policy.in_office_hours(at(0, 7, 59)) and not policy.in_office_hours(at(0, 18))
    # Friday afternoon waits for the evening; the weekend is free all day; Monday morning waits again.
    assert policy.next_resync_slot(at(0, 14)) == at(0, 18)
    assert policy.next_resync_slot(at(0, 19)) == at(0, 19)
    for weekend_moment in (at(1, 10), at(1, 12, 30), at(2, 9), at(2, 23, 59)):
        assert not policy.in_office_hours(weekend_moment)
        assert policy.next_resync_slot(weekend_moment) == weekend_moment
    assert policy.next_resync_slot(at(3, 7, 59)) == at(3, 7, 59)
    assert policy.next_resync_slot(at(3, 8)) == at(3, 18)  # Monday
    # With office hours on every day, Saturday noon waits for Saturday evening.
    assert every_day.next_resync_slot(at(1, 12)) == at(1, 18)
    # Office hours are local time: 08:00-18:00 in Berlin is 07:00-17:00 UTC in winter, 06:00-16:00 in summer.
    assert berlin.in_office_hours(at(0, 7, 30)) and not berlin.in_office_hours(at(0, 17, 30))
    assert berlin.next_resync_slot(at(0, 12)) == at(0, 17)
    summer_monday = datetime(2026, 7, 13, 12, 0, tzinfo=UTC)
    assert summer_monday.weekday() == 0
    assert berlin.next_resync_slot(summer_monday) == summer_monday.replace(hour=16)
    # Naive datetimes are UTC.
    assert policy.next_resync_slot(at(0, 14).replace(tzinfo=None)) == at(0, 18)
    # The policy read back from the database behaves the same.
    with session_scope(engine) as session:
        stored = session.get(ReplicationPolicy, berlin.id)
        assert stored.next_resync_slot(at(0, 12)) == at(0, 17)


# ---- protected items --------------------------------------------------------------------------------
def test_replication_state_transitions(engine: Engine) -> None:
    assert set(ALLOWED_TRANSITIONS) == set(ReplicationState)
    S = ReplicationState
    walk = [
        S.INITIAL_REPLICATION_PENDING, S.INITIAL_REPLICATION, S.PROTECTED, S.RESYNC_REQUIRED, S.RESYNCHRONIZING,
        S.PROTECTED, S.FAILING_OVER, S.PROTECTED, S.FAILING_OVER, S.FAILED_OVER, S.FAILING_OVER, S.FAILED_OVER,
        S.PROTECTED, S.FAILING_OVER, S.FAILED_OVER, S.FAILOVER_COMMITTED, S.FAILING_BACK, S.FAILBACK_READY,
        S.FAILING_BACK, S.FAILOVER_COMMITTED, S.FAILING_BACK, S.FAILED_BACK, S.FAILBACK_COMMITTED,
        S.RESYNCHRONIZING, S.PROTECTED, S.FAILING_OVER, S.FAILED_OVER,
        S.DISABLING_PROTECTION, S.DISABLED, S.ENABLING_PROTECTION,
    ]
    with session_scope(engine) as session:
        item = make_item(session)
        item_id = item.id
        assert item.replication_state is S.ENABLING_PROTECTION and item.health is Health.HEALTHY
    for state in walk:
        with session_scope(engine) as session:
            item = session.get(ProtectedItem, item_id)
            assert protection.transition(item, state) is True
        with session_scope(engine) as session:
            assert session.get(ProtectedItem, item_id).replication_state is state
    disallowed = [
        (S.ENABLING_PROTECTION, S.PROTECTED), (S.ENABLING_PROTECTION, S.FAILING_OVER),
        (S.INITIAL_REPLICATION, S.FAILING_OVER), (S.PROTECTED, S.INITIAL_REPLICATION),
        (S.PROTECTED, S.FAILED_OVER), (S.FAILOVER_COMMITTED, S.PROTECTED), (S.DISABLED, S.PROTECTED),
        (S.FAILED_BACK, S.FAILOVER_COMMITTED), (S.FAILBACK_COMMITTED, S.PROTECTED), (S.PROTECTED, S.FAILING_BACK),
        (S.DISABLING_PROTECTION, S.PROTECTED), (S.RESYNC_REQUIRED, S.PROTECTED),
    ]
    for current, target in disallowed:
        assert target not in ALLOWED_TRANSITIONS[current]
        with session_scope(engine) as session:
            item = session.get(ProtectedItem, item_id)
            item.replication_state = current
        with session_scope(engine) as session:
            item = session.get(ProtectedItem, item_id)
            refusal = f"invalid replica state: .*VM 'app01'.* cannot move from {current} to {target}"
            with pytest.raises(InvalidStateError, match=refusal) as raised:
                protection.transition(item, target)
            assert isinstance(raised.value, NonRecoverableError)
            assert item.replication_state is current
    with session_scope(engine) as session:
        item = session.get(ProtectedItem, item_id)
        assert protection.transition(item, item.replication_state) is False  # a rerun step repeats its move
        with pytest.raises(InvalidStateError, match="'sleeping' is not a replication state"):
            protection.transition(item, "sleeping")


def test_resync_is_scheduled_outside_office_hours_and_cleared_when_protected(engine: Engine) -> None:
    with session_scope(engine) as session:
        item = make_item(session)
        policy = session.get(ReplicationPolicy, item.policy_id)
        for state in (ReplicationState.INITIAL_REPLICATION, ReplicationState.PROTECTED):
            protection.transition(item, state)
        reason = "replication log of disk0 is corrupt"
        slot = protection.require_resync(session, item, reason, policy, FRIDAY + timedelta(hours=10))
        assert slot == FRIDAY + timedelta(hours=18)
        item_id = item.id
    with session_scope(engine) as session:
        item = session.get(ProtectedItem, item_id)
        assert item.replication_state is ReplicationState.RESYNC_REQUIRED
        assert (item.resync_required_reason, item.resync_scheduled_for) == (reason, slot)
        protection.transition(item, ReplicationState.RESYNCHRONIZING)
        protection.transition(item, ReplicationState.PROTECTED)
    with session_scope(engine) as session:
        item = session.get(ProtectedItem, item_id)
        assert (item.resync_required_reason, item.resync_scheduled_for) == (None, None)


def test_health_records_errors_and_takes_the_worst(engine: Engine) -> None:
    with session_scope(engine) as session:
        item_id = make_item(session).id

    def reload(session: Session) -> ProtectedItem:
        return session.get(ProtectedItem, item_id)

    with session_scope(engine) as session:
        protection.mark_warning(session, reload(session), "RpoExceeded", "RPO of 16 min exceeds 15 min")
    with session_scope(engine) as session:
        item = reload(session)
        assert item.health is Health.WARNING
        assert [(e["code"], e["severity"]) for e in item.health_errors] == [("RpoExceeded", "Warning")]
        started = datetime.now(UTC)
        protection.mark_critical(session, item, "LogCorrupt", "log of disk0 failed its checksum at record 7")
    with session_scope(engine) as session:
        item = reload(session)
        assert item.health is Health.CRITICAL
        critical = item.health_errors[-1]
        assert (critical["code"], critical["message"], critical["severity"]) == (
            "LogCorrupt", "log of disk0 failed its checksum at record 7", "Critical",
        )
        assert abs(datetime.fromisoformat(critical["at"]) - started) < timedelta(minutes=1)
        # A warning does not lower Critical; the same code again replaces its entry.
        protection.mark_warning(session, item, "RpoExceeded", "RPO of 20 min exceeds 15 min")
        protection.mark_critical(session, item, "LogCorrupt", "record 9 this time")
    with session_scope(engine) as session:
        item = reload(session)
        assert item.health is Health.CRITICAL
        assert [(e["code"], e["message"]) for e in item.health_errors] == [
            ("RpoExceeded", "RPO of 20 min exceeds 15 min"), ("LogCorrupt", "record 9 this time"),
        ]
        protection.mark_healthy(session, item, "LogCorrupt")
    with session_scope(engine) as session:
        item = reload(session)
        assert item.health is Health.WARNING and [e["code"] for e in item.health_errors] == ["RpoExceeded"]
        protection.mark_healthy(session, item)
    with session_scope(engine) as session:
        item = reload(session)
        assert (item.health, item.health_errors) == (Health.HEALTHY, [])
        with pytest.raises(ValueError, match="non-empty code"):
            protection.mark_critical(session, item, "", "no code")


@pytest.fixture(autouse=True)
def storage_allow_list(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the administrator allows as recovery storage (sites/storage/policy.py)."""
    monkeypatch.setenv("ASR_STORAGE_ROOTS", "/srv/recovery:/srv/other")
    monkeypatch.setenv("ASR_STORAGE_ACCOUNT_URLS", "https://drsite.blob.core.windows.net")


def test_protecting_a_vm(engine: Engine) -> None:
    with session_scope(engine) as session:
        _site, host = make_site_host(session)
        disk = {"name": "d", "file": "d.vhd", "size": 8 << 20, "format": "vhd"}
        vm = fabric.add_vm(session, host, "app01", [disk], [])
        policy = policies.create_policy(session, "p")
    before = row_counts(engine)
    bad = [
        ({"recovery_storage": "s3://bucket"}, "must be 'file:///absolute/dir' or 'azure:<container>'"),
        ({"recovery_storage": "file://relative"}, "must be 'file:///absolute/dir'"),
        ({"recovery_storage": "azure:Bad_Container"}, "protection of VM 'app01': invalid Azure container name"),
        ({"recovery_storage": "azure:replicas", "storage_options": {
            "connection_string": "DefaultEndpointsProtocol=https;AccountName=a;AccountKey=c2VjcmV0;"}},
         "contain a credential"),
        ({"recovery_storage": "azure:replicas", "storage_options": {"when": datetime.now()}}, "must be JSON values"),
        # The allow-list (sites/storage/policy.py): no SSRF, no other secret of the workers, no folder anywhere.
        ({"recovery_storage": "azure:replicas", "storage_options": {"account_url": "https://evil.example.net"}},
         "account_url https://evil.example.net is not a storage account allowed here"),
        ({"recovery_storage": "azure:replicas", "storage_options": {"account_url": "http://drsite.blob.core.windows.net"}},
         "account_url must be an https:// address"),
        ({"recovery_storage": "azure:replicas", "storage_options": {"connection_string_env": "ASR_DATABASE_URL"}},
         "connection_string_env must name a storage variable of the workers"),
        ({"recovery_storage": "azure:replicas", "storage_options": {"connection_string_env": "HOME"}},
         "connection_string_env must name a storage variable"),
        ({"recovery_storage": "azure:replicas", "storage_options": {"credential": "x", "account_url":
                                                                     "https://drsite.blob.core.windows.net"}},
         "unknown storage option.s. credential for azure: storage"),
        ({"recovery_storage": "azure:replicas",
          "storage_options": {"connection_string_env": "ASR_STORAGE_CONNECTION_STRING", "parallelism": 99}},
         "parallelism must be"),
        ({"recovery_storage": "azure:replicas", "storage_options": {}}, "needs exactly one of connection_string_env"),
        ({"recovery_storage": "file:///etc"}, "/etc is not inside a recovery storage root allowed here"),
        ({"recovery_storage": "file:///srv/recovery/../../etc"}, "without '..'"),
        ({"recovery_storage": "file:///srv/recovery-evil"}, "is not inside a recovery storage root"),
        ({"recovery_storage": "file:///srv/recovery", "storage_options": {"container": "x"}},
         "unknown storage option.s. container for file:// storage"),
    ]
    for arguments, message in bad:
        with pytest.raises(ValueError, match=message):
            with session_scope(engine) as session:
                protection.protect_vm(session, vm, policy, **arguments)
    assert row_counts(engine) == before
    options = {"connection_string_env": "ASR_AZURE_CONNECTION_STRING", "parallelism": 8}
    with session_scope(engine) as session:
        item = protection.protect_vm(session, vm, policy, recovery_storage="azure:replicas", storage_options=options)
    with session_scope(engine) as session:
        stored = session.get(ProtectedItem, item.id)
        assert (stored.vm_id, stored.policy_id, stored.recovery_storage, stored.storage_options) == (
            vm.id, policy.id, "azure:replicas", options,
        )
        assert (stored.replication_state, stored.health, stored.health_errors, stored.unsent_ratio) == (
            ReplicationState.ENABLING_PROTECTION, Health.HEALTHY, [], 0.0,
        )
        with pytest.raises(ValueError, match="VM 'app01' is already protected"):
            protection.protect_vm(session, vm, policy, recovery_storage="file:///srv/other")
        # Once disabled, protecting again re-enables the same item with the new target.
        for state in (ReplicationState.DISABLING_PROTECTION, ReplicationState.DISABLED):
            protection.transition(stored, state)
        protection.mark_critical(session, stored, "Old", "left from before")
    with session_scope(engine) as session:
        again = protection.protect_vm(session, vm, policy, recovery_storage="file:///srv/recovery")
        assert again.id == item.id
    with session_scope(engine) as session:
        stored = session.get(ProtectedItem, item.id)
        assert (stored.replication_state, stored.recovery_storage, stored.storage_options, stored.health) == (
            ReplicationState.ENABLING_PROTECTION, "file:///srv/recovery", {}, Health.HEALTHY,
        )
        assert stored.updated_at >= stored.created_at


def test_recovery_points_prune_keeps_the_latest(engine: Engine) -> None:
    now = datetime(2026, 5, 4, 12, 0, tzinfo=UTC)
    with session_scope(engine) as session:
        item = make_item(session, retention_h=2)
        disk = "3b8f1f59-0f6c-4c1e-9d39-6d4c8e3b8a01"
        ages = (timedelta(hours=5), timedelta(hours=3), timedelta(hours=1), timedelta(minutes=10))
        for generation, age in enumerate(ages, start=1):
            protection.record_recovery_point(
                session, item, {disk: generation}, now - age,
                RecoveryPointKind.APP_CONSISTENT if generation == 2 else RecoveryPointKind.CRASH_CONSISTENT,
                {disk: f"{generation:032x}"},
            )
        item_id = item.id
    with session_scope(engine) as session:
        item = session.get(ProtectedItem, item_id)
        assert item.last_recovery_point_at == now - timedelta(minutes=10)
        pruned = protection.prune_recovery_points(session, item, now)
    assert sorted(p.generations[disk] for p in pruned) == [1, 2]
    assert {p.kind for p in pruned} == {RecoveryPointKind.CRASH_CONSISTENT, RecoveryPointKind.APP_CONSISTENT}
    with session_scope(engine) as session:
        item = session.get(ProtectedItem, item_id)
        kept = protection.recovery_points(session, item)
        assert [(p.generations, p.manifest_roots, p.created_at) for p in kept] == [
            ({disk: 3}, {disk: f"{3:032x}"}, now - timedelta(hours=1)),
            ({disk: 4}, {disk: f"{4:032x}"}, now - timedelta(minutes=10)),
        ]
        # Replication stalled for a day: everything is past the window, and the latest point still stays.
        pruned = protection.prune_recovery_points(session, item, now + timedelta(days=1))
        assert [p.generations[disk] for p in pruned] == [3]
        assert [p.generations[disk] for p in protection.recovery_points(session, item)] == [4]
        assert protection.prune_recovery_points(session, item, now + timedelta(days=2)) == []
        with pytest.raises(ValueError, match="generations must map each disk id"):
            protection.record_recovery_point(session, item, {disk: -1}, now)
        with pytest.raises(ValueError, match="generations must map each disk id"):
            protection.record_recovery_point(session, item, {}, now)


def test_retention_zero_keeps_only_the_latest_point(engine: Engine) -> None:
    now = datetime(2026, 5, 4, 12, 0, tzinfo=UTC)
    with session_scope(engine) as session:
        item = make_item(session, retention_h=0)
        for minutes in (30, 20, 10):
            protection.record_recovery_point(session, item, {"d": 60 - minutes}, now - timedelta(minutes=minutes))
        assert len(protection.prune_recovery_points(session, item, now)) == 2
        assert [p.generations for p in protection.recovery_points(session, item)] == [{"d": 50}]


# ---- several processes at once ---------------------------------------------------------------------------
# Each contender connects, says it is ready, waits for the start signal, then runs its part and prints
# the outcome: all start the contended part within milliseconds of each other.
_CONTENDER = textwrap.dedent("""
    import os, sys, time
    import sqlalchemy
    from models.db import get_engine, init_db, session_scope
    from models.jobs import JobLock
    part, url, ready, go, *arguments = sys.argv[1:]
    engine = get_engine(url)
    with engine.connect():
        pass
    open(ready, "w").close()
    deadline = time.monotonic() + 30
    while not os.path.exists(go):
        if time.monotonic() > deadline:
            sys.exit("no start signal")
        time.sleep(0.002)
    if part == "init_db":
        init_db(engine)
        print("created", flush=True)
    else:
        lock_key, job_id = arguments
        try:
            with session_scope(engine) as session:
                session.add(JobLock(lock_key=lock_key, job_id=job_id))
            print("won", flush=True)
        except sqlalchemy.exc.IntegrityError:
            print("lost", flush=True)
""")


def run_contenders(tmp_path: Path, part: str, db_url: str, arguments: list[list[str]]) -> list[str]:
    """Run one contender process per entry of `arguments`; their outputs, in that order."""
    go = tmp_path / f"go-{part}"
    ready = [tmp_path / f"ready-{part}-{n}" for n in range(len(arguments))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    contenders = [
        subprocess.Popen(
            [sys.executable, "-c", _CONTENDER, part, db_url, str(flag), str(go), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO_ROOT,
        )
        for flag, extra in zip(ready, arguments, strict=True)
    ]
    try:
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
        while not all(flag.exists() for flag in ready):
            assert time.monotonic() < deadline, f"{part} contenders did not start"
            exited = [c.communicate() for c in contenders if c.poll() is not None]
            assert not exited, f"a {part} contender exited early: {exited}"
            time.sleep(0.02)
        go.touch()
        outcomes = []
        for contender in contenders:
            out, err = contender.communicate(timeout=SUBPROCESS_TIMEOUT_S)
            assert contender.returncode == 0, err
            outcomes.append(out.strip())
        return outcomes
    finally:
        for contender in contenders:
            if contender.poll() is None:
                contender.kill()
                contender.wait(timeout=10)


def test_workers_starting_together_all_create_the_tables(db_url: str, tmp_path: Path) -> None:
    assert run_contenders(tmp_path, "init_db", db_url, [[] for _ in range(4)]) == ["created"] * 4
    assert row_counts(get_engine(db_url)) == dict.fromkeys((table.__tablename__ for table in MY_TABLES), 0)


def test_item_lock_is_taken_by_exactly_one_of_several_processes(engine: Engine, db_url: str, tmp_path: Path) -> None:
    """One workflow at a time per protected item: the engine's lock row keyed by the item."""
    with session_scope(engine) as session:
        item_id = make_item(session).id
        jobs = [Job(kind="enable_protection", target=item_id) for _ in range(4)]
        session.add_all(jobs)
        session.flush()
        job_ids = [job.id for job in jobs]
    key = protection.item_lock_key(item_id)
    outcomes = run_contenders(tmp_path, "lock", db_url, [[key, job_id] for job_id in job_ids])
    assert sorted(outcomes) == ["lost"] * 3 + ["won"]
    with session_scope(engine) as session:
        assert session.get(JobLock, key).job_id == job_ids[outcomes.index("won")]


# ---- what the recovery side holds -----------------------------------------------------------------------
def test_replica_records_one_per_disk_of_an_item(engine: Engine) -> None:
    from models.replicas import ReplicaRecord, replica_record, replica_records

    with session_scope(engine) as session:
        item = make_item(session)
        first = replica_record(session, item.id, "6c3a0d6e5d2b4f0e9a1b2c3d4e5f6a7b", "hv01/app01/disk0.vhd")
        first.initial_copy_done, first.applied_generation, first.version = True, 7, 3
        assert replica_record(session, item.id, "6c3a0d6e5d2b4f0e9a1b2c3d4e5f6a7b", "ignored") is first
        replica_record(session, item.id, "00000000000000000000000000000001", "hv01/app01/disk1.vhd")
    with session_scope(engine) as session:
        records = replica_records(session, item.id)
        assert [(r.replica_name, r.applied_generation, r.version, r.initial_copy_done) for r in records] == [
            ("hv01/app01/disk0.vhd", 7, 3, True), ("hv01/app01/disk1.vhd", 0, 0, False)]
    # One row per disk of an item, whatever the callers do.
    with pytest.raises(sa.exc.IntegrityError):
        with session_scope(engine) as session:
            session.add(ReplicaRecord(item_id=item.id, disk_uuid="00000000000000000000000000000001",
                                      replica_name="again"))
