"""The host identity check of a step's claim (tasks/host_identity.py), against a real database: a worker
started as host1's agent with its key may claim host1's steps, and no other host's; after `asr host rekey`
the very next claim is refused (the key is verified once per stored key hash, not for a while after)."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlmodel import select

from models.db import dispose_engines, init_db, session_scope
from models.fabric import Host, create_site, register_host, rekey_host
from tasks import host_identity


@pytest.fixture
def hosts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """{host name: registration key} of host1 and host2, registered in a SQLite database of the test's own."""
    monkeypatch.setenv("ASR_DATABASE_URL", f"sqlite:///{tmp_path / 'asr.db'}")
    init_db()
    keys = {}
    with session_scope() as session:
        site = create_site(session, "primary")
        for name in ("host1", "host2"):
            _, keys[name] = register_host(session, name, str(tmp_path / name), site=site)
    monkeypatch.setattr(host_identity, "_verified", {})
    yield keys
    dispose_engines()


def started_as(monkeypatch: pytest.MonkeyPatch, name: str | None, key: str | None) -> None:
    monkeypatch.setitem(host_identity._identity, "name", name)
    monkeypatch.setitem(host_identity._identity, "key", key)


def test_an_agent_claims_its_own_hosts_steps_only(hosts: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    started_as(monkeypatch, "host1", hosts["host1"])
    assert host_identity.unproven_host_queue("host.host1") is None
    assert host_identity.unproven_host_queue("orchestration") is None
    assert "not started as the agent of host 'host2'" in host_identity.unproven_host_queue("host.host2")
    started_as(monkeypatch, "host2", hosts["host1"])  # host2's name, host1's key
    assert host_identity.unproven_host_queue("host.host2") == \
        "this worker does not hold the registration key of host 'host2'"


def test_the_claim_after_a_rekey_is_refused_at_once(hosts: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    started_as(monkeypatch, "host1", hosts["host1"])
    assert host_identity.unproven_host_queue("host.host1") is None
    assert host_identity.unproven_host_queue("host.host1") is None  # verified once: the same stored hash
    with session_scope() as session:
        new_key = rekey_host(session, session.exec(select(Host).where(Host.name == "host1")).one())
    assert host_identity.unproven_host_queue("host.host1") == \
        "this worker does not hold the registration key of host 'host1'"
    started_as(monkeypatch, "host1", new_key)  # an agent restarted with the new key
    assert host_identity.unproven_host_queue("host.host1") is None
