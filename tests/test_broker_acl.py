"""Broker isolation with Redis ACL users (issue 11): each host's agent reaches Redis as its own user
(sites/brokeracl.py), which may consume only its own queue. A rogue holding host1's broker credentials gets
nothing from host2's queue and changes nothing there, cannot administer the broker, and a job across both
hosts still runs with every agent on its own user, without a single command refused.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest
import redis
from click.testing import CliRunner
from engine_actions import read_records
from engine_harness import ACTION_MODULES, register_hosts
from recovery_site import RecoverySite

from api.cli import main
from sites.brokeracl import ENGINE_USER, KOMBU_SEP, host_user_name
from sites.deployment import Deployment
from sites.localservices import RedisServer, wait_until
from workflows.engine import StepSpec, get_job, start_job

QUIET_S = 3.0  # how long a rogue worker is given to take a message it should not get


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    deployment = Deployment(tmp_path_factory.mktemp("brokeracl"), workers={"orchestration": (["orchestration"], 1)},
                            beat=False, appendonly=False, broker_acl=True,
                            # Answering Flower's read-only questions, as compose.yaml sets it (default: off).
                            worker_settings={"ASR_ACTION_MODULES": ACTION_MODULES,
                                             "ASR_WORKER_REMOTE_CONTROL": "inspect"})
    with deployment.start():
        yield deployment


@pytest.fixture(scope="module")
def host_keys(site: Deployment, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return register_hosts(tmp_path_factory.mktemp("roots"), ("host1", "host2"))


def client_as_host(site: Deployment, host_name: str) -> redis.Redis:
    """A plain Redis client holding host `host_name`'s broker credentials (as its agent's URL gives them)."""
    url = urlparse(site.host_broker_url(host_name))
    return site.redis.client(url.username, url.password)


def agent_env(site: Deployment, host_name: str, key: str) -> dict[str, str]:
    # Read-only remote control on, as an operator who wants Flower's view of the agents sets it (the default is
    # off): their users admit its replies too. RecoverySite's agent below keeps the default.
    return {**site.env, "ASR_HOST_NAME": host_name, "ASR_HOST_KEY": key, "ASR_WORKER_REMOTE_CONTROL": "inspect"}


def denied(call) -> bool:
    try:
        call()
    except redis.exceptions.NoPermissionError:
        return True
    return False


def subscribe(client: redis.Redis, pattern: str) -> None:
    listener = client.pubsub()
    listener.psubscribe(pattern)
    listener.get_message(timeout=2)  # the reply to PSUBSCRIBE: the confirmation, or the refusal raised


def test_host1s_credentials_take_nothing_from_host2s_queue(site: Deployment, host_keys: dict[str, str],
                                                          tmp_path: Path) -> None:
    admin = site.redis.client()
    log = tmp_path / "copy.log"
    job_id = start_job("test.failover", lock_key=None, stages=[
        [StepSpec("Copy disk disk0", "test.record", "host.host2", {"log": str(log), "label": "copy"})]])
    wait_until(lambda: admin.llen("host.host2") == 1, timeout=10, what="host2's step message on its queue")
    queued = admin.lrange("host.host2", 0, -1)

    # A plain client with host1's credentials: no pop, no read, no removal, no move of host2's messages.
    rogue = client_as_host(site, "host1")
    assert rogue.ping()
    for name, call in {
        "BRPOP": lambda: rogue.brpop(["host.host2"], timeout=1),
        "RPOP": lambda: rogue.rpop("host.host2"),
        "LPOP": lambda: rogue.lpop("host.host2"),
        "LRANGE": lambda: rogue.lrange("host.host2", 0, -1),
        "LINDEX": lambda: rogue.lindex("host.host2", 0),
        "RPOPLPUSH": lambda: rogue.rpoplpush("host.host2", "host.host1"),
        "LMOVE": lambda: rogue.lmove("host.host2", "host.host1"),
        "BRPOP of a priority list": lambda: rogue.brpop([f"host.host2{KOMBU_SEP}9"], timeout=1),
        "DEL": lambda: rogue.delete("host.host2"),
        "LTRIM": lambda: rogue.ltrim("host.host2", 1, 0),
        "LREM": lambda: rogue.lrem("host.host2", 0, queued[0]),
        "LSET": lambda: rogue.lset("host.host2", 0, "forged"),
        "RENAME": lambda: rogue.rename("host.host2", "host.host1"),
        "DUMP": lambda: rogue.dump("host.host2"),
        "EVAL of a pop": lambda: rogue.eval("return redis.call('RPOP', KEYS[1])", 1, "host.host2"),
        "SORT": lambda: rogue.sort("host.host2", store="host.host1"),
    }.items():
        assert denied(call), f"{name} on host2's queue was allowed to host1's user"
    # Nor a real Celery worker started as host1's agent (its key, its broker user) on host2's queue. Its
    # database is out of reach, so that its own start check (tasks/host_identity.py, which would make it
    # exit) cannot verify anything and lets it start: the broker's ACL alone stops it.
    admin.execute_command("ACL", "LOG", "RESET")
    rogue_worker = site.add_worker("rogue-host1", ["host.host2"], wait=False, env={
        **agent_env(site, "host1", host_keys["host1"]), "ASR_DATABASE_URL": "postgresql://rogue@127.0.0.1:9/none"})
    wait_until(lambda: any(entry["username"] == host_user_name("host1") and entry["object"] == "host.host2"
                           for entry in admin.acl_log(count=100)), timeout=30,
               what="the rogue worker to be refused host2's queue")
    wait_until(lambda: "NoPermissionError" in rogue_worker.log(), timeout=10, what="the rogue worker to log it")
    time.sleep(QUIET_S)
    assert admin.lrange("host.host2", 0, -1) == queued
    site.stop_process("rogue-host1", kill=True)
    step = get_job(job_id)["steps"][0]
    assert step["state"] == "queued" and step["worker"] is None, step
    assert read_records(log) == []

    # Host2's own agent, on host2's user, runs it.
    site.add_worker("host-host2", ["host.host2"], env=agent_env(site, "host2", host_keys["host2"]))
    job = wait_until(lambda: (job := get_job(job_id))["state"] in ("succeeded", "failed") and job, timeout=60,
                     what="host2's agent to run the step")
    assert job["state"] == "succeeded", job
    assert job["steps"][0]["worker"].startswith("host-host2@"), job["steps"][0]
    assert [record["label"] for record in read_records(log)] == ["copy"]


def test_host1s_credentials_administer_nothing(site: Deployment, host_keys: dict[str, str]) -> None:
    admin = site.redis.client()
    admin.hset("unacked", "some-tag", "a message in flight")
    admin.hset("unacked.host.host2", "other-tag", "host2's message in flight")
    rogue = client_as_host(site, "host1")
    for name, call in {
        "FLUSHALL": lambda: rogue.flushall(),
        "FLUSHDB": lambda: rogue.flushdb(),
        "CONFIG SET": lambda: rogue.config_set("dir", "/tmp"),
        "CONFIG GET": lambda: rogue.config_get("requirepass"),
        "ACL LIST": lambda: rogue.acl_list(),
        "ACL SETUSER": lambda: rogue.acl_setuser("rogue", enabled=True, nopass=True, categories=["+@all"]),
        "ACL WHOAMI's neighbour ACL GETUSER": lambda: rogue.acl_getuser("asr-engine"),
        "KEYS": lambda: rogue.keys("*"),
        "SCAN": lambda: rogue.scan(),
        "SHUTDOWN": lambda: rogue.execute_command("SHUTDOWN", "NOSAVE"),
        "BGSAVE": lambda: rogue.bgsave(),
        "SWAPDB": lambda: rogue.swapdb(0, 1),
        "MODULE LIST": lambda: rogue.execute_command("MODULE", "LIST"),
        "CLIENT LIST": lambda: rogue.client_list(),
        "CLIENT KILL": lambda: rogue.execute_command("CLIENT", "KILL", "TYPE", "normal"),
        "MONITOR": lambda: rogue.execute_command("MONITOR"),
        "SCRIPT FLUSH": lambda: rogue.script_flush(),
        "REPLICAOF": lambda: rogue.execute_command("REPLICAOF", "127.0.0.1", "1"),
        "the shared unacknowledged messages": lambda: rogue.hgetall("unacked"),
        "host2's unacknowledged messages": lambda: rogue.hgetall("unacked.host.host2"),
        "acknowledging host2's message": lambda: rogue.hdel("unacked.host.host2", "other-tag"),
        "the orchestration queue": lambda: rogue.brpop(["orchestration"], timeout=1),
        "the recovery queue": lambda: rogue.rpop("recovery"),
        "a job's progress": lambda: rogue.hgetall("asr:job:some-job:progress"),
        "a console session": lambda: rogue.get("asr:console:session:x"),
        "the task events": lambda: subscribe(rogue, "/0.celeryev/*"),
        "the remote control replies": lambda: subscribe(rogue, "/0.reply.celery.pidbox"),
        "removing a binding": lambda: rogue.srem("_kombu.binding.host.host2", "x"),
    }.items():
        assert denied(call), f"{name} was allowed to host1's user"
    assert admin.hget("unacked.host.host2", "other-tag") == b"host2's message in flight"
    # The `default` user needs the operator's password.
    with pytest.raises(redis.exceptions.AuthenticationError):
        site.redis.client("default", "wrong").ping()
    with pytest.raises(redis.exceptions.RedisError):
        redis.Redis(host="127.0.0.1", port=site.redis.port, socket_timeout=5).llen("host.host2")
    # Every password lives in a private file.
    for path in (site.workdir / "broker-users").iterdir():
        assert path.stat().st_mode & 0o777 == 0o600, path
    assert host_user_name("host1") in {path.stem for path in (site.workdir / "broker-users").iterdir()}


def test_a_job_across_two_hosts_runs_with_each_agent_on_its_own_user(site: Deployment, host_keys: dict[str, str],
                                                                      tmp_path: Path) -> None:
    from worker import app

    admin = site.redis.client()
    for name in ("host1", "host2"):
        if f"host-{name}" not in site.workers:
            site.add_worker(f"host-{name}", [f"host.{name}"], env=agent_env(site, name, host_keys[name]))
    admin.execute_command("ACL", "LOG", "RESET")
    log = tmp_path / "steps.log"

    def step(label: str, queue: str) -> StepSpec:
        return StepSpec(f"Step {label}", "test.record", queue, {"log": str(log), "label": label, "seconds": 0.5})

    # Each stage is sent on by the worker that ends the one before: host1's agent sends host2's steps and
    # the orchestration worker's, host2's sends host1's.
    job_id = start_job("test.failover", lock_key=None, stages=[
        [step("one", "host.host1")], [step("two-a", "host.host2"), step("two-b", "host.host2")],
        [step("three", "host.host1")], [step("four", "orchestration")]])
    try:
        job = wait_until(lambda: (job := get_job(job_id))["state"] in ("succeeded", "failed") and job, timeout=90,
                         what="the job across both hosts")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; refused: {admin.acl_log(count=20)}") from exc
    assert job["state"] == "succeeded", job
    workers = {one["name"]: one["worker"].split("@")[0] for one in job["steps"]}
    assert workers == {"Step one": "host-host1", "Step two-a": "host-host2", "Step two-b": "host-host2",
                       "Step three": "host-host1", "Step four": "orchestration"}, workers
    assert sorted(record["label"] for record in read_records(log)) == ["four", "one", "three", "two-a", "two-b"]
    # The agents answer the read-only questions Flower asks (remote control, set on, through their own users).
    replies = wait_until(lambda: app.control.inspect(timeout=2).ping(), timeout=15, what="ping replies")
    assert {"host-host1", "host-host2", "orchestration"} <= {node.split("@")[0] for node in replies}, replies
    # Nothing any of them did was refused: the rules hold everything kombu and Celery do.
    refused = [{key: entry[key] for key in ("username", "reason", "object", "context")}
               for entry in admin.acl_log(count=100)]
    assert refused == [], json.dumps(refused, default=str)
    # The agents kept their messages in flight apart from the shared ones.
    assert not admin.exists("unacked.host.host1") or admin.hlen("unacked.host.host1") == 0
    # Each agent's environment names its user, not the password: that is in a file only it is given.
    environ = dict(entry.split("=", 1) for entry in Path(f"/proc/{site.workers['host-host1'].process.pid}/environ")
                   .read_text().split("\0") if "=" in entry)
    password = site.broker_password_file(host_user_name("host1")).read_text().strip()
    assert urlparse(environ["ASR_BROKER_URL"]).username == host_user_name("host1"), environ["ASR_BROKER_URL"]
    assert urlparse(environ["ASR_BROKER_URL"]).password is None and password not in "".join(environ.values())
    assert environ["ASR_BROKER_PASSWORD_FILE"] == str(site.broker_password_file(host_user_name("host1")))


def test_protection_and_a_delta_cycle_run_with_broker_acl_users(tmp_path: Path) -> None:
    # A whole replication site (host agent, orchestration and recovery worker, beat) on ACL users: the
    # initial copy and a delta cycle, which take steps across the host's and the engine's queues, report
    # progress and keep their messages in flight, with no command refused.
    with RecoverySite(tmp_path, broker_acl=True) as site:
        admin = site.redis.client()
        vm_id = site.create_vm("host1", "app01", [("disk0", "8M", "raw")], fill=0.25, seed=3)
        site.wait_job(site.protect(vm_id), timeout=90)
        site.wait_idle(vm_id, timeout=30)
        cycle = site.delta_cycle(vm_id)
        assert cycle["state"] == "succeeded", cycle
        site.verify_replica(vm_id)
        refused = [{key: entry[key] for key in ("username", "reason", "object", "context")}
                   for entry in admin.acl_log(count=100)]
        assert refused == [], json.dumps(refused, default=str)
        # The agent connected as its host's user, the other processes as the engine's.
        assert f"://{host_user_name('host1')}:**@" in site.workers["host-host1"].log()
        assert f"://{ENGINE_USER}:**@" in site.workers["orchestration"].log()


def test_the_cli_prints_a_host_user_an_operators_redis_takes(tmp_path: Path) -> None:
    password_file = tmp_path / "web1.password"
    runner = CliRunner()
    printed = runner.invoke(main, ["broker-acl", "host", "web1", "--password-file", str(password_file)])
    assert printed.exit_code == 0, printed.output
    line = printed.stdout.strip()
    password = password_file.read_text().strip()
    assert password_file.stat().st_mode & 0o777 == 0o600 and password not in line
    # The same password again from the file.
    again = runner.invoke(main, ["broker-acl", "host", "web1", "--password-file", str(password_file)])
    assert again.stdout.strip() == line
    assert runner.invoke(main, ["broker-acl", "host", "web*", "--password-file", str(password_file)]).exit_code != 0
    # The engine's user, both ways: a SETUSER line for redis-cli, and its line for an ACL file.
    engine_file = tmp_path / "engine.password"
    engine_line = runner.invoke(main, ["broker-acl", "engine", "--password-file", str(engine_file)])
    file_line = runner.invoke(main, ["broker-acl", "engine", "--password-file", str(engine_file), "--acl-file-line"])
    assert engine_line.exit_code == 0 and file_line.exit_code == 0, engine_line.output + file_line.output
    engine_password = engine_file.read_text().strip()
    assert engine_file.stat().st_mode & 0o777 == 0o600 and engine_password not in engine_line.stdout + file_line.stdout
    assert file_line.stdout.startswith(f"user {ENGINE_USER} on ") and "#" + hashlib.sha256(
        engine_password.encode()).hexdigest() in file_line.stdout.split(), file_line.stdout

    server = RedisServer(tmp_path / "redis").start()
    try:
        # As an operator types it into redis-cli.
        typed = subprocess.run([shutil.which("redis-cli"), "-p", str(server.port)], input=line + "\n", text=True,
                               capture_output=True, timeout=10, check=True)
        assert typed.stdout.strip() == "OK", typed
        server.client().lpush("host.web2", "web2's step")
        agent = server.client("asr-host-web1", password)
        agent.lpush("host.web1", "its own step")
        assert agent.brpop(["host.web1"], timeout=1) == (b"host.web1", b"its own step")
        agent.lpush("host.web2", "a next step")  # pushing the next stage's steps is allowed
        assert denied(lambda: agent.rpop("host.web2")) and denied(lambda: agent.config_get("*"))
        assert server.client().lrange("host.web2", 0, -1) == [b"a next step", b"web2's step"]
        # The engine's line as typed: its user with its password takes any queue's step, administers nothing.
        typed = subprocess.run([shutil.which("redis-cli"), "-p", str(server.port)], input=engine_line.stdout,
                               text=True, capture_output=True, timeout=10, check=True)
        assert typed.stdout.strip() == "OK", typed
        engine = server.client(ENGINE_USER, engine_password)
        assert engine.rpop("host.web2") == b"web2's step" and engine.publish("asr-events", "x") == 0
        assert denied(lambda: engine.config_get("*")) and denied(lambda: engine.execute_command("ACL", "LIST"))
        with pytest.raises(redis.exceptions.AuthenticationError):
            server.client(ENGINE_USER, password).ping()  # web1's password is not the engine's
    finally:
        server.stop()


def test_a_deployments_acl_file_admits_each_user_with_its_own_password_and_nobody_else(tmp_path: Path) -> None:
    """`asr broker-acl file` (compose.yaml's broker-users service) on a real redis-server started with
    --aclfile: no client gets in without a user, the engine's user has every key but no administration,
    each host's user only its own queue; passwords stay in their files and are kept when run again."""
    from sites.localservices import free_port

    acl = tmp_path / "acl" / "users.acl"
    acl.parent.mkdir()
    files = {name: tmp_path / name / "broker-password" for name in ("engine", "host1", "host2")}
    arguments = ["broker-acl", "file", str(acl), "--engine-password-file", str(files["engine"]),
                 "--host", f"host1={files['host1']}", "--host", f"host2={files['host2']}"]
    made = CliRunner().invoke(main, arguments)
    assert made.exit_code == 0, made.output
    passwords = {name: path.read_text().strip() for name, path in files.items()}
    text = acl.read_text()
    assert text.splitlines()[0] == "user default off" and not any(p in text for p in passwords.values())
    assert all(path.stat().st_mode & 0o777 == 0o600 for path in files.values())
    port = free_port()
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--aclfile", str(acl), "--dir", str(tmp_path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        def as_user(user: str | None, password: str | None) -> redis.Redis:
            return redis.Redis(host="127.0.0.1", port=port, username=user, password=password, socket_timeout=5)

        def answering() -> bool:
            try:
                return as_user(ENGINE_USER, passwords["engine"]).ping()
            except redis.exceptions.ConnectionError:
                return False

        wait_until(answering, timeout=15, interval=0.1, what="redis-server with the ACL file")
        with pytest.raises(redis.exceptions.AuthenticationError):
            as_user(None, None).llen("host.host1")
        engine = as_user(ENGINE_USER, passwords["engine"])
        engine.lpush("host.host2", "a step for host2")
        assert denied(lambda: engine.config_get("*")) and denied(lambda: engine.flushall())
        host1 = as_user(host_user_name("host1"), passwords["host1"])
        assert host1.llen("host.host1") == 0
        assert denied(lambda: host1.rpop("host.host2"))
        with pytest.raises(redis.exceptions.AuthenticationError):
            as_user(host_user_name("host1"), passwords["host2"]).ping()
        # Run again with a third host: the passwords made before are kept, the new user added.
        files["dr1"] = tmp_path / "dr1" / "broker-password"
        again = CliRunner().invoke(main, [*arguments, "--host", f"dr1={files['dr1']}"])
        assert again.exit_code == 0, again.output
        assert {name: files[name].read_text().strip() for name in passwords} == passwords
        assert denied(lambda: engine.execute_command("ACL", "LOAD"))
        assert host_user_name("dr1") in acl.read_text()
    finally:
        server.terminate()
        server.wait(timeout=10)
    for bad in (["--host", "host1"], ["--host", "x=a", "--host", "x=b"], ["--host", "../x=f"]):
        refused = CliRunner().invoke(main, ["broker-acl", "file", str(tmp_path / "other.acl"),
                                            "--engine-password-file", str(files["engine"]), *bad])
        assert refused.exit_code == 2, (bad, refused.output)
        assert not (tmp_path / "other.acl").exists()
