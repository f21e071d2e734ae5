"""compose.yaml, checked without Docker (none on the test machines): it parses, every service is buildable
or pulled, our processes' commands are `asr` verbs that exist with options they accept, dependencies and
volumes resolve, orchestration can scale, Redis keeps its append-only file, credentials come from the
environment, and the services match README.md's compose section both ways. The file is read with
PyYAML's safe loader.
"""
from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "compose.yaml"
README = REPO / "README.md"
README_SECTION = "## Running with compose"

OUR_SERVICES = {"migrate", "api", "beat", "orchestration", "recovery", "host1", "host2", "dr1", "flower"}
CREDENTIAL_SERVICES = {"broker-users", "db-owner", "db-roles"}
"""Our image's one-shot services that make each process's broker and database credentials."""
EXPECTED_SERVICES = OUR_SERVICES | CREDENTIAL_SERVICES | {"certs", "redis", "postgres", "azurite"}
HOST_AGENTS = {"host1", "host2", "dr1"}
ENGINE_PROCESSES = {"migrate", "beat", "orchestration", "recovery", "flower"}
OWNER_PROCESSES = ENGINE_PROCESSES - {"flower"}
"""The processes that connect to the database as the schema's owner; Flower reads the broker only."""
DATA_MOVERS = {"orchestration", "recovery"} | HOST_AGENTS
"""The processes that open the recovery storage (tasks.recovery_storage.open_recovery_storage, in step actions run
by the orchestration and recovery workers and the host agents); the API only checks a protection's storage
against the allow-list, beat only queues ticks, Flower reads the broker."""
STORAGE_SETTINGS = {"ASR_AZURE_CONNECTION_STRING", "ASR_STORAGE_KEK", "ASR_STORAGE_KEK_FILE"}
TLS_SERVERS = {"redis", "postgres", "azurite", "api", "flower"}
# The compose specification's service keys this file may use (a typo in a key is silently ignored by
# nothing: Docker rejects the file, so we reject it here).
SERVICE_KEYS = {
    "build", "image", "command", "entrypoint", "environment", "env_file", "depends_on", "volumes", "ports",
    "restart", "healthcheck", "deploy", "container_name", "hostname", "user", "working_dir", "networks",
    "expose", "labels", "logging", "stop_signal", "stop_grace_period", "init", "profiles", "pull_policy",
}
TOP_LEVEL_KEYS = {"services", "volumes", "networks", "configs", "secrets", "name"}
RESTART_POLICIES = re.compile(r"no|always|unless-stopped|on-failure(:\d+)?")
DEPENDENCY_CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
INTERPOLATION = re.compile(r"\$(\$|\{[A-Za-z_][A-Za-z0-9_]*(:?[-?+][^}]*)?\})")
DURATION = re.compile(r"(\d+(us|ms|s|m|h))+")


# ---- the file ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(document, dict), "compose.yaml must be a mapping"
    return document


def test_compose_file_structure(compose: dict[str, Any]) -> None:
    assert set(compose) - TOP_LEVEL_KEYS <= {key for key in compose if key.startswith("x-")}, set(compose)
    services: dict[str, dict[str, Any]] = compose["services"]
    assert set(services) == EXPECTED_SERVICES, sorted(services)
    declared_volumes = set(compose.get("volumes") or {})
    for name, service in services.items():
        where = f"service {name}"
        assert set(service) <= SERVICE_KEYS, f"{where}: unknown keys {set(service) - SERVICE_KEYS}"
        assert "image" in service or "build" in service, f"{where} has neither image nor build"
        if "build" in service:
            assert service["build"] == "." and (REPO / "Dockerfile").is_file(), where
        command = service.get("command")
        assert command is None or (isinstance(command, list) and all(isinstance(a, str) for a in command)), \
            f"{where}: command must be a list of strings (no shell parsing), got {command!r}"
        if "restart" in service:
            assert RESTART_POLICIES.fullmatch(service["restart"]), f"{where}: restart {service['restart']!r}"
        for key in ("stop_grace_period",):
            if key in service:
                assert DURATION.fullmatch(service[key]), f"{where}: {key} {service[key]!r}"
        environment = service.get("environment") or {}
        assert isinstance(environment, dict), f"{where}: environment as a mapping"
        for variable, value in environment.items():
            # Compose wants strings here; an unquoted yes/no/number would become a YAML bool or int.
            assert isinstance(value, str), f"{where}: {variable} must be a quoted string, got {value!r}"
            leftover = INTERPOLATION.sub("", value)
            assert "$" not in leftover, f"{where}: {variable} has a malformed ${{...}}: {value!r}"
        depends = service.get("depends_on") or {}
        if isinstance(depends, list):
            depends = {dependency: {"condition": "service_started"} for dependency in depends}
        for dependency, spec in depends.items():
            assert dependency in services and dependency != name, f"{where} depends on unknown {dependency!r}"
            assert spec["condition"] in DEPENDENCY_CONDITIONS, f"{where}: condition {spec['condition']!r}"
            if spec["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], f"{where} waits for {dependency}'s health check"
        for mount in service.get("volumes") or []:
            source, target, *options = mount.split(":")
            assert target.startswith("/") and options in ([], ["ro"], ["rw"]), f"{where}: volume {mount!r}"
            if not source.startswith((".", "/")):
                assert source in declared_volumes, f"{where} mounts undeclared volume {source!r}"
        for port in service.get("ports") or []:
            assert re.fullmatch(r"127\.0\.0\.1:\d+:\d+", str(port)), \
                f"{where}: publish on 127.0.0.1 only, as host:container, got {port!r}"
        if "healthcheck" in service:
            check = service["healthcheck"]
            assert isinstance(check["test"], list) and check["test"][0] in ("CMD", "CMD-SHELL"), where
            for key in ("interval", "timeout"):
                assert DURATION.fullmatch(check.get(key, "30s")), f"{where}: healthcheck {key}"
    used_volumes = {mount.split(":")[0] for service in services.values() for mount in service.get("volumes") or []}
    assert declared_volumes <= used_volumes, f"declared but unused volumes: {declared_volumes - used_volumes}"


def test_redis_keeps_an_append_only_file(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    command = redis["command"]
    assert command[0] == "redis-server"
    assert command[command.index("--appendonly") + 1] == "yes", command
    assert any(mount.endswith(":/data") for mount in redis["volumes"]), "the AOF must live in a volume"


def test_orchestration_scales(compose: dict[str, Any]) -> None:
    orchestration = compose["services"]["orchestration"]
    # `docker compose up --scale orchestration=3` refuses a fixed container name or a published port,
    # and a fixed hostname would make three Celery nodes of one name.
    for key in ("container_name", "ports", "hostname"):
        assert key not in orchestration, f"orchestration must not set {key}: it could not scale"
    assert orchestration["command"][:3] == ["asr", "worker", "orchestration"]
    assert "deploy" not in orchestration or "replicas" not in orchestration["deploy"]


def test_our_processes_run_asr_verbs_that_exist(compose: dict[str, Any]) -> None:
    from api.cli import main

    services = compose["services"]
    for name in OUR_SERVICES | CREDENTIAL_SERVICES:
        service = services[name]
        assert service.get("image") == "site-recovery-engine:dev" and service.get("build") == ".", name
        command = service["command"]
        assert command[0] == "asr", f"{name}: run through its `asr` launcher, got {command}"
        # Walk the click tree and parse the arguments as `asr` would: an unknown verb or option fails.
        current: click.Command = main
        args = command[1:]
        while isinstance(current, click.Group) and args and args[0] in current.commands:
            current, args = current.commands[args[0]], args[1:]
        assert not isinstance(current, click.Group), f"{name}: `{' '.join(command)}` is not a command"
        try:
            current.make_context(current.name, list(args), resilient_parsing=False)
        except click.ClickException as error:
            pytest.fail(f"{name}: `{' '.join(command)}`: {error.format_message()}")
    expected = {
        "api": ["asr", "api"], "beat": ["asr", "beat"], "orchestration": ["asr", "worker", "orchestration"],
        "recovery": ["asr", "worker", "recovery"], "host1": ["asr", "worker", "host", "host1"],
        "host2": ["asr", "worker", "host", "host2"], "dr1": ["asr", "worker", "host", "dr1"],
        "flower": ["asr", "flower"], "migrate": ["asr", "db", "upgrade"],
        "broker-users": ["asr", "broker-acl", "file"], "db-roles": ["asr", "db", "roles", "apply"],
        "db-owner": ["asr", "db", "roles", "owner"],
    }
    for name, prefix in expected.items():
        assert services[name]["command"][: len(prefix)] == prefix, (name, services[name]["command"])
    # Listening services bind every interface inside their container, or the published port reaches nothing.
    for name in ("api", "flower"):
        command = services[name]["command"]
        assert command[command.index("--host" if name == "api" else "--address") + 1] == "0.0.0.0", name


def test_host_agents_have_their_own_trees_and_keys_from_the_environment(compose: dict[str, Any]) -> None:
    services = compose["services"]
    trees = {}
    for name in HOST_AGENTS:
        agent = services[name]
        key = agent["environment"]["ASR_HOST_KEY"]
        assert re.fullmatch(r"\$\{ASR_[A-Z0-9]+_KEY(:?-)?\}", key), f"{name}: key from the environment, got {key!r}"
        for setting in ("ASR_BROKER_URL", "ASR_DATABASE_URL", "ASR_AZURE_CONNECTION_STRING"):
            assert setting in agent["environment"], f"{name} lacks {setting} (merged from the shared settings)"
        # Whoever reaches Redis cannot make a host's agent consume another queue or stop, nor even question it
        # (issue 11): its remote control is left at the default, off.
        assert "ASR_WORKER_REMOTE_CONTROL" not in agent["environment"], name
        mounts = [m for m in agent["volumes"] if m.split(":")[1] == f"/hosts/{name}"]
        assert len(mounts) == 1 and not mounts[0].endswith(":ro"), (name, agent["volumes"])
        trees[name] = mounts[0].split(":")[0]
    assert len(set(trees.values())) == len(trees), f"each host agent needs a volume of its own: {trees}"
    keys = {services[name]["environment"]["ASR_HOST_KEY"] for name in HOST_AGENTS}
    assert len(keys) == len(HOST_AGENTS), "each host agent needs a key of its own"


def test_flower_credentials_come_from_the_environment(compose: dict[str, Any]) -> None:
    environment = compose["services"]["flower"]["environment"]
    for variable in ("ASR_FLOWER_USER", "ASR_FLOWER_PASSWORD"):
        assert re.fullmatch(rf"\$\{{{variable}(:?[-?][^}}]*)?\}}", environment[variable]), environment[variable]
    assert not any(name.startswith("FLOWER_") for name in environment), "asr flower sets Flower's own options"


def test_every_process_shares_the_deployment_settings(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in OUR_SERVICES:
        environment = services[name]["environment"]
        assert re.fullmatch(r"rediss://[a-z0-9-]+@redis:6379/0", environment["ASR_BROKER_URL"]), name
        if name == "flower":  # it never opens the database
            assert not {"ASR_DATABASE_URL", "ASR_DATABASE_PASSWORD_FILE"} & environment.keys(), environment
            continue
        database_url = environment["ASR_DATABASE_URL"]
        assert database_url.startswith("postgresql://") and "@postgres:5432/" in database_url, name
        assert "sslmode=verify-full" in database_url, name
        assert {"redis", "postgres"} <= set(services[name]["depends_on"]), name


def _option_values(command: list[str], option: str) -> list[str]:
    return [command[i + 1] for i, arg in enumerate(command) if arg == option]


def _secret_volumes(service: dict[str, Any]) -> dict[str, str]:
    """{volume: mount point} of the service's `*-secrets` volumes."""
    mounts = (mount.split(":") for mount in service.get("volumes") or [])
    return {parts[0]: parts[1] for parts in mounts if parts[0].endswith("-secrets")}


def test_each_process_holds_only_its_own_broker_and_database_passwords(compose: dict[str, Any]) -> None:
    """Per-role credentials (issue 11): a host agent connects to Redis as its own ACL user and to PostgreSQL as
    its own role, the API as its role, the engine's processes as the engine's user and the schema's owner;
    each password is in a volume only its process (and the services that make it) mounts."""
    services = compose["services"]
    expected_secrets = {name: {f"{name}-secrets"} for name in HOST_AGENTS}
    expected_secrets |= {name: {"engine-secrets", "owner-secrets"} for name in OWNER_PROCESSES}
    expected_secrets["flower"] = {"engine-secrets"}
    expected_secrets["api"] = {"engine-secrets", "api-secrets"}
    for name, volumes in expected_secrets.items():
        service = services[name]
        mounted = _secret_volumes(service)
        assert set(mounted) == volumes, (name, mounted)
        assert all(f"{volume}:{point}:ro" in service["volumes"] for volume, point in mounted.items()), name
        environment = service["environment"]
        for setting in ("ASR_BROKER_PASSWORD_FILE", "ASR_DATABASE_PASSWORD_FILE"):
            if setting in environment:
                assert any(environment[setting].startswith(point + "/") for point in mounted.values()), (name, setting)
        broker_user = re.fullmatch(r"rediss://([a-z0-9-]+)@redis:6379/0", environment["ASR_BROKER_URL"]).group(1)
        database_user = environment.get("ASR_DATABASE_URL", "://(none)@").split("://", 1)[1].split("@", 1)[0]
        if name in HOST_AGENTS:
            assert (broker_user, database_user) == (f"asr-host-{name}", f"asr_host_{name}"), name
            assert environment["ASR_BROKER_PASSWORD_FILE"] == f"/secrets/{name}/broker-password", name
            assert environment["ASR_DATABASE_PASSWORD_FILE"] == f"/secrets/{name}/db-password", name
            assert services[name]["depends_on"]["db-roles"] == {"condition": "service_completed_successfully"}
        elif name == "api":
            assert (broker_user, database_user) == ("asr-engine", "asr_api_login"), name
            assert services[name]["depends_on"]["db-roles"] == {"condition": "service_completed_successfully"}
        elif name == "flower":
            assert (broker_user, database_user) == ("asr-engine", "(none)"), name
        else:
            assert (broker_user, database_user) == ("asr-engine", "asr"), name
            assert environment["ASR_BROKER_PASSWORD_FILE"] == "/secrets/engine/broker-password", name
            assert environment["ASR_DATABASE_PASSWORD_FILE"] == "/secrets/owner/db-password", name
    # Redis admits only the users of the ACL file that broker-users writes, for every host agent there is.
    broker_users = services["broker-users"]
    command = broker_users["command"]
    redis = services["redis"]
    acl_file = redis["command"][redis["command"].index("--aclfile") + 1]
    assert command[3] == acl_file and redis["depends_on"]["broker-users"] == {
        "condition": "service_completed_successfully"}
    acl_volume = next(mount.split(":")[0] for mount in redis["volumes"] if mount.split(":")[1] == "/acl")
    assert f"{acl_volume}:/acl:ro" in redis["volumes"] and f"{acl_volume}:/acl" in broker_users["volumes"]
    hosts = dict(value.split("=", 1) for value in _option_values(command, "--host"))
    assert hosts == {name: f"/secrets/{name}/broker-password" for name in HOST_AGENTS}, hosts
    assert _option_values(command, "--engine-password-file") == ["/secrets/engine/broker-password"]
    # The database's login roles, for every host agent and the API, made after each upgrade.
    command = services["db-roles"]["command"]
    hosts = dict(value.split("=", 1) for value in _option_values(command, "--host"))
    assert hosts == {name: f"/secrets/{name}/db-password" for name in HOST_AGENTS}, hosts
    assert _option_values(command, "--api-password-file") == ["/secrets/api/db-password"]
    assert services["db-roles"]["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
    # The owner's password: made before PostgreSQL's first start, which sets it from the same file.
    postgres = services["postgres"]
    assert _option_values(services["db-owner"]["command"], "--password-file") == ["/secrets/owner/db-password"]
    assert postgres["environment"]["POSTGRES_PASSWORD_FILE"] == "/secrets/owner/db-password"
    assert "owner-secrets:/secrets/owner:ro" in postgres["volumes"]
    assert postgres["depends_on"]["db-owner"] == {"condition": "service_completed_successfully"}
    for name in CREDENTIAL_SERVICES:
        points = set(_secret_volumes(services[name]).values())
        files = [value.split("=", 1)[-1] for option in ("--host", "--engine-password-file", "--api-password-file",
                                                        "--password-file")
                 for value in _option_values(services[name]["command"], option)]
        assert all(Path(file).parent.as_posix() in points for file in files), (name, files, points)
    # The image owns every mount point, so the empty volumes start writable by our processes.
    dockerfile = (REPO / "Dockerfile").read_text()
    points = {point for service in services.values() for point in _secret_volumes(service).values()}
    points |= {mount.split(":")[1] for service in services.values() for mount in service.get("volumes") or []
               if mount.startswith("tls-")}
    for point in points | {"/acl"}:
        assert point in dockerfile, f"the image should own the mount point {point}"


def test_the_image_is_built_from_the_package(compose: dict[str, Any]) -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim$", dockerfile, re.MULTILINE), "FROM python:3.11-slim"
    assert re.search(r"^RUN (.+ && )?pip install \.", dockerfile, re.MULTILINE | re.DOTALL), "pip install ."
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    copied = set()
    for line in re.findall(r"^COPY (.+)$", dockerfile, re.MULTILINE):
        copied.update(part.rstrip("/") for part in line.split()[:-1])
    needed = {pattern.rstrip("*") for pattern in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    needed |= {f"{module}.py" for module in project["tool"]["setuptools"]["py-modules"]}
    needed |= {"pyproject.toml", "setup.py", project["project"]["readme"]}  # setup.py: the compiled AES-XTS
    assert needed <= copied, f"the Dockerfile does not copy {sorted(needed - copied)}: pip install . would miss them"
    for name in HOST_AGENTS:
        assert f"/hosts/{name}" in dockerfile, f"the image should own the mount point /hosts/{name}"


def readme_compose_services() -> set[str]:
    text = README.read_text()
    start = text.find(f"\n{README_SECTION}\n")
    if start < 0:
        pytest.fail(f"README.md has no section {README_SECTION!r}: add it (docs/operations.md, "
                    f"'README compose section', has the text to paste), naming every compose service")
    body = text[start + len(README_SECTION) + 2:]
    end = body.find("\n## ")
    body = body if end < 0 else body[:end]
    # The section's table names one service per row, in backticks in the first cell.
    return set(re.findall(r"^\|\s*`([a-z0-9][a-z0-9_-]*)`", body, re.MULTILINE))


def test_readme_compose_section_names_every_service(compose: dict[str, Any]) -> None:
    named = readme_compose_services()
    services = set(compose["services"])
    assert named - services == set(), f"README.md names services compose.yaml lacks: {sorted(named - services)}"
    assert services - named == set(), f"README.md's compose section leaves out: {sorted(services - named)}"


def test_operations_doc_proposes_a_readme_section_matching_the_file(compose: dict[str, Any]) -> None:
    doc = (REPO / "docs" / "operations.md").read_text()
    start = doc.index("## README compose section")
    proposal = doc[start:]
    named = set(re.findall(r"^\|\s*`([a-z0-9][a-z0-9_-]*)`", proposal, re.MULTILINE))
    assert named == set(compose["services"]), sorted(named ^ set(compose["services"]))


def test_every_process_waits_for_the_schema_upgrade(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["migrate"]["command"] == ["asr", "db", "upgrade"] and services["migrate"]["restart"] == "no"
    assert "migrate" not in services["migrate"]["depends_on"]
    for name in OUR_SERVICES - {"migrate"}:
        assert services[name]["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}, name


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """{mount point: volume} of the service."""
    return {mount.split(":")[1]: mount.split(":")[0] for mount in service.get("volumes") or []}


def test_tls_is_on_for_every_connection(compose: dict[str, Any]) -> None:
    """The certs service makes the CA and certificates once (`asr certs create`, kept); every server serves
    TLS with them, every client of ours verifies with the CA, and nothing allows plain text."""
    services = compose["services"]
    certs = services["certs"]
    command = certs["command"]
    assert command[:3] == ["asr", "certs", "create"] and "--keep-existing" in command, command
    from api.cli import main

    main.commands["certs"].commands["create"].make_context("create", command[3:], resilient_parsing=False)
    hosts = {command[i + 1] for i, arg in enumerate(command) if arg == "--host"}
    assert hosts >= TLS_SERVERS, hosts
    assert certs["restart"] == "no"
    # The servers' and the clients' folders, each a volume of its own.
    server_dir, = _option_values(command, "--server-dir")
    client_dir, = _option_values(command, "--client-dir")
    server_volume, client_volume = _mounts(certs)[server_dir], _mounts(certs)[client_dir]

    redis = services["redis"]["command"]
    assert redis[redis.index("--port") + 1] == "0", "no plain-text port"
    assert redis[redis.index("--tls-port") + 1] == "6379"
    assert redis[redis.index("--tls-auth-clients") + 1] == "yes"
    assert "--tls" in " ".join(services["redis"]["healthcheck"]["test"])
    assert "ssl=on" in services["postgres"]["command"]
    azurite = services["azurite"]["command"]
    assert azurite[azurite.index("--cert") + 1] == f"{server_dir}/server.pem"
    for name in ("redis", "postgres", "azurite"):
        assert services[name]["depends_on"]["certs"] == {"condition": "service_completed_successfully"}, name
        assert f"{server_volume}:{server_dir}:ro" in services[name]["volumes"], name
        files = [arg for arg in services[name]["command"] if ".pem" in arg]
        assert files and all(f"{server_dir}/" in arg for arg in files), (name, files)
    for name in OUR_SERVICES:
        service = services[name]
        environment = service["environment"]
        assert "ASR_INSECURE_TRANSPORT" not in environment, name
        assert environment["ASR_TLS_CA_FILE"] == f"{client_dir}/ca.pem", name
        for setting in ("ASR_TLS_CLIENT_CERT_FILE", "ASR_TLS_CLIENT_KEY_FILE"):
            assert environment[setting].startswith(f"{client_dir}/"), (name, setting)
        assert f"{client_volume}:{client_dir}:ro" in service["volumes"], name
        # Only the servers serve, with the servers' files; the others hold no server key.
        if name in TLS_SERVERS:
            for setting in ("ASR_TLS_CERT_FILE", "ASR_TLS_KEY_FILE"):
                assert environment[setting].startswith(f"{server_dir}/"), (name, setting)
            assert f"{server_volume}:{server_dir}:ro" in service["volumes"], name
        else:
            assert not {"ASR_TLS_CERT_FILE", "ASR_TLS_KEY_FILE"} & environment.keys(), name
            assert server_volume not in {mount.split(":")[0] for mount in service["volumes"]}, name
        database_url = environment.get("ASR_DATABASE_URL", "")
        assert not database_url or f"sslrootcert={client_dir}/ca.pem" in database_url, name
    for name in DATA_MOVERS:
        assert "BlobEndpoint=https://" in services[name]["environment"]["ASR_AZURE_CONNECTION_STRING"], name
    for name in ("api", "flower"):
        check = " ".join(services[name]["healthcheck"]["test"])
        assert "https://127.0.0.1" in check and f"cafile='{client_dir}/ca.pem'" in check, name


def test_only_the_certs_service_holds_the_cas_key(compose: dict[str, Any]) -> None:
    """Whoever reads the CA's key can make certificates the whole deployment trusts (a server's, to stand in
    for Redis or the API; a client's, for Redis): only the certs service mounts the folder that holds it. The
    servers get their own pair and the CA, the clients theirs (`asr certs create --server-dir --client-dir`)."""
    services = compose["services"]
    certs = services["certs"]
    ca_dir, = _option_values(certs["command"], "--dir")
    ca_volume = _mounts(certs)[ca_dir]
    assert ca_volume not in {_mounts(certs)[_option_values(certs["command"], option)[0]]
                             for option in ("--server-dir", "--client-dir")}
    for name, service in services.items():
        if name != "certs":
            volumes = {mount.split(":")[0] for mount in service.get("volumes") or []}
            assert ca_volume not in volumes, f"{name} mounts {ca_volume}, which holds the CA's key"
            assert all("ca-key" not in arg for arg in service.get("command") or []), name


def test_storage_credentials_reach_only_the_workers_that_move_data(compose: dict[str, Any]) -> None:
    """The recovery storage's connection string and key-encryption key are in the environment of the
    orchestration and recovery workers and the host agents only (docs/operations.md, which process holds
    which secret): not the API, beat, Flower, the schema upgrade or the one-shot credential services."""
    services = compose["services"]
    for name in DATA_MOVERS:
        environment = services[name]["environment"]
        assert {"ASR_AZURE_CONNECTION_STRING", "ASR_STORAGE_KEK"} <= environment.keys(), name
    for name in set(services) - DATA_MOVERS:
        environment = services[name].get("environment") or {}
        assert not STORAGE_SETTINGS & environment.keys(), f"{name} holds {STORAGE_SETTINGS & environment.keys()}"
        assert "AccountKey=" not in " ".join(services[name].get("command") or []), name
    doc = (REPO / "docs" / "operations.md").read_text()
    row = next(line for line in doc.splitlines() if line.startswith("| the storage's credentials"))
    assert "orchestration and recovery workers and the host agents" in row, row


def test_no_url_and_no_setting_carries_a_database_password(compose: dict[str, Any]) -> None:
    """Passwords are in files (each process's volume), never in a URL, a setting's value or a command line:
    PostgreSQL's owner password too (POSTGRES_PASSWORD_FILE, made by db-owner), with no default to guess."""
    services = compose["services"]
    url_with_password = re.compile(r"[a-z][a-z0-9+.-]*://[^/@\s:]+:[^@\s/]*@")
    for name, service in services.items():
        values = [*(service.get("environment") or {}).values(), *(service.get("command") or [])]
        for value in values:
            assert not url_with_password.search(value), f"{name}: a password in {value!r}"
        assert not {"POSTGRES_PASSWORD", "ASR_DATABASE_PASSWORD"} & (service.get("environment") or {}).keys(), name
    assert "ASR_POSTGRES_PASSWORD" not in COMPOSE.read_text()
    # The check itself finds a password in a URL.
    assert url_with_password.search("postgresql://asr:${ASR_POSTGRES_PASSWORD:-asr}@postgres:5432/asr")
    assert not url_with_password.search("postgresql://asr@postgres:5432/asr?sslmode=verify-full")
