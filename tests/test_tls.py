"""TLS on every connection (issue 15): the deployment's PKI from `asr certs create`, a whole engine run over a
redis-server speaking TLS only (with client certificates), Azurite over HTTPS, the REST API (`asr api`) and
Flower (`asr flower`) over HTTPS, all real processes; and plain text (redis://, http:// storage, a
PostgreSQL URL without sslmode=verify-full, a server without a certificate) refused unless
ASR_INSECURE_TRANSPORT=1 allows it, which each process then logs once.
"""
from __future__ import annotations

import ipaddress
import os
import secrets
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from recovery_site import RecoverySite

from api import service
from api.client import SiteRecoveryClient
from datapath.digest import disk_digest
from models.db import dispose_engines, get_engine
from sites.localservices import (
    LOCALHOST,
    AzuriteProcess,
    RedisServer,
    ServiceStartError,
    celery_env,
    free_port,
    start_flower,
    start_worker,
    stop_all,
)
from sites.pki import DeploymentCertificates, PkiError, create_deployment_certificates, export_for_clients
from sites.storage.keys import new_kek_text
from tasks.recovery_storage import open_recovery_storage
from workflows import failover_request, kinds, transport
from workflows.retry import NonRecoverableError

ASR = str(Path(sys.executable).with_name("asr"))
INSECURE = "ASR_INSECURE_TRANSPORT"
JOB_TIMEOUT = 120


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def ca_context(certificates: DeploymentCertificates) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certificates.ca_file))


# ---- the PKI ------------------------------------------------------------------------------------------
def test_certs_create_makes_a_ca_whose_chain_verifies_with_keys_0600(tmp_path: Path) -> None:
    folder = tmp_path / "pki"
    proc = subprocess.run([ASR, "certs", "create", "--dir", str(folder), "--host", "redis", "--host", "10.1.2.3",
                           "--host", "Control.Example"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    made = DeploymentCertificates(folder)
    for name, value in made.settings().items():
        assert f"{name}={value}" in proc.stdout
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for path in made.key_files():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for path in (made.ca_file, made.server_cert_file, made.client_cert_file):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path

    ca, server, client = (load_cert(p) for p in (made.ca_file, made.server_cert_file, made.client_cert_file))
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost", "redis", "control.example"]
    addresses = [ipaddress.ip_address(a) for a in ("127.0.0.1", "::1", "10.1.2.3")]
    assert sans.get_values_for_type(x509.IPAddress) == addresses
    # Each private key is the one of its certificate.
    for cert, key_file in ((ca, made.ca_key_file), (server, made.server_key_file), (client, made.client_key_file)):
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        assert key.public_key().public_numbers() == cert.public_key().public_numbers()

    # The chain verifies for every name and address (cryptography's RFC 5280 verifier), and for no other.
    store = Store([ca])
    for name in (x509.DNSName("redis"), x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("10.1.2.3"))):
        chain = PolicyBuilder().store(store).build_server_verifier(name).verify(server, [])
        assert chain[-1] == ca
    with pytest.raises(VerificationError):
        PolicyBuilder().store(store).build_server_verifier(x509.DNSName("intruder.example")).verify(server, [])
    # The client certificate verifies as a client's and cannot serve as a server's.
    PolicyBuilder().store(store).build_client_verifier().verify(client, [])
    assert client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == \
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
    with pytest.raises(VerificationError):
        PolicyBuilder().store(store).build_server_verifier(x509.DNSName("localhost")).verify(client, [])
    # And OpenSSL, an independent implementation, agrees with the purposes.
    for cert, purpose in ((made.server_cert_file, "sslserver"), (made.client_cert_file, "sslclient")):
        check = subprocess.run(["openssl", "verify", "-CAfile", str(made.ca_file), "-purpose", purpose, str(cert)],
                               capture_output=True, text=True, timeout=30)
        assert check.returncode == 0 and ": OK" in check.stdout, check.stdout + check.stderr

    # A second run never replaces a CA the deployment trusts; a bad host name writes nothing.
    before = {path: path.read_bytes() for path in made.files()}
    again = subprocess.run([ASR, "certs", "create", "--dir", str(folder)], capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "already holds" in again.stderr, again.stderr
    assert {path: path.read_bytes() for path in made.files()} == before
    bad = subprocess.run([ASR, "certs", "create", "--dir", str(tmp_path / "bad"), "--host", "not a name"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "neither a DNS name nor an IP address" in bad.stderr, bad.stderr
    assert not (tmp_path / "bad").exists()
    with pytest.raises(PkiError):
        create_deployment_certificates(tmp_path / "bad2", ["a..b"])
    assert not (tmp_path / "bad2").exists()

    # As compose's certs service runs it at every start: the set kept, and the servers' and the clients' files
    # copied into folders of their own, neither with the CA's key; the next start finds them there.
    servers, clients = tmp_path / "server", tmp_path / "client"
    command = [ASR, "certs", "create", "--dir", str(folder), "--keep-existing", "--server-dir", str(servers),
               "--client-dir", str(clients)]
    for _start in range(2):
        kept = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert kept.returncode == 0 and "kept" in kept.stdout, kept.stdout + kept.stderr
        assert {path: path.read_bytes() for path in made.files()} == before
        for copy, files in ((servers, made.server_files()), (clients, made.client_files())):
            assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in files), copy
            assert stat.S_IMODE(copy.stat().st_mode) == 0o700
            for path in files:
                assert (copy / path.name).read_bytes() == path.read_bytes()
                assert stat.S_IMODE((copy / path.name).stat().st_mode) == stat.S_IMODE(path.stat().st_mode)
    assert "already in" in kept.stdout
    # A folder holding another set's files is never mixed with this one.
    other = create_deployment_certificates(tmp_path / "other")
    with pytest.raises(PkiError, match="already holds another ca.pem"):
        export_for_clients(other, clients)
    assert (clients / "ca.pem").read_bytes() == made.ca_file.read_bytes()


# ---- a whole deployment over TLS ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> DeploymentCertificates:
    return create_deployment_certificates(tmp_path_factory.mktemp("tls") / "pki", deployment="tls-test")


@pytest.fixture(scope="module")
def https_azurite(tmp_path_factory: pytest.TempPathFactory, certificates: DeploymentCertificates
                  ) -> Iterator[AzuriteProcess]:
    with AzuriteProcess(tmp_path_factory.mktemp("azurite-tls"), tls=certificates) as azurite:
        assert azurite.blob_endpoint.startswith("https://")
        yield azurite


@pytest.fixture(scope="module")
def tls_site(tmp_path_factory: pytest.TempPathFactory, certificates: DeploymentCertificates,
             https_azurite: AzuriteProcess) -> Iterator[RecoverySite]:
    # Read-only remote control, so that Flower's worker pages (over the TLS broker) have answers to show: off
    # is the default, and compose sets inspect for Flower as here.
    with RecoverySite(tmp_path_factory.mktemp("tls-site"), backend="azure", azurite=https_azurite, tls=certificates,
                      recovery_host_names=("dr1",), env={"ASR_WORKER_REMOTE_CONTROL": "inspect"}) as site:
        yield site


def test_the_whole_engine_runs_over_tls_redis_and_https_azurite(tls_site: RecoverySite,
                                                                 certificates: DeploymentCertificates) -> None:
    site = tls_site
    assert site.env["ASR_BROKER_URL"].startswith("rediss://") and INSECURE not in site.env
    assert site.env["ASR_AZURE_CONNECTION_STRING"].startswith("DefaultEndpointsProtocol=https;")
    # The broker speaks TLS only, and only to clients with a certificate of the deployment's CA.
    with pytest.raises(redis.ConnectionError):
        redis.Redis(host=LOCALHOST, port=site.redis.port, socket_timeout=3, socket_connect_timeout=3).ping()
    with pytest.raises(redis.ConnectionError):
        redis.Redis(host=LOCALHOST, port=site.redis.port, ssl=True, ssl_ca_certs=str(certificates.ca_file),
                    socket_timeout=3, socket_connect_timeout=3).ping()
    assert site.redis.client().ping()

    vm_id = site.create_vm("host1", "app01", [("disk0", "32M", "vhd"), ("disk1", "24M", "raw")], fill=0.5, seed=21)
    site.wait_job(site.protect(vm_id), JOB_TIMEOUT)
    item_id = site.item_id(vm_id)
    site.host("host1").start_workload("app01", rate_mb_s=1.0, seed=22)
    time.sleep(0.5)
    site.delta_cycle(vm_id, timeout=JOB_TIMEOUT)
    site.final_cycle(vm_id, timeout=JOB_TIMEOUT)
    site.verify_replica(vm_id)  # byte for byte, read back from Azurite over HTTPS

    # A drill: the test VM on the recovery host holds exactly the primary's disks.
    site.wait_job(site.when_free(kinds.test_failover.start, item_id, point=failover_request.PointChoice.LATEST),
                  JOB_TIMEOUT)
    primary = {d.name: disk_digest(d.path) for d in site.host("host1").get_vm("app01").disks}
    drill = {d.name: disk_digest(d.path) for d in site.host("dr1").get_vm("app01-test").disks}
    assert drill == primary
    site.wait_job(site.when_free(kinds.test_failover_cleanup.start, item_id), JOB_TIMEOUT)

    # No process of this deployment ran on plain text.
    for name, process in site.workers.items():
        assert "INSECURE TRANSPORT" not in process.log(), name


def test_the_api_serves_https_verified_with_the_deployments_ca(tls_site: RecoverySite,
                                                               certificates: DeploymentCertificates) -> None:
    key = service.create_api_key("tls-tests", role="admin")["key"]
    port = free_port()
    log_path = tls_site.workdir / "asr-api.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen([ASR, "api", "--port", str(port)], env=tls_site.env, stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"https://{LOCALHOST}:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, log_path.read_text()
            try:
                if httpx.get(f"{url}/healthz", verify=ca_context(certificates), timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        # The client verifies with ASR_TLS_CA_FILE (this process's, set by the deployment).
        assert os.environ["ASR_TLS_CA_FILE"] == str(certificates.ca_file)
        with SiteRecoveryClient(url, key) as client:
            assert client.healthz()["status"] == "ok"
            assert [site["name"] for site in client.list_sites()] == ["primary", "recovery"]
        # Without the CA the server is not trusted; plain HTTP on the port gets no answer.
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
            SiteRecoveryClient(url, key, verify=ssl.create_default_context()).healthz()
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://{LOCALHOST}:{port}/healthz", timeout=3)
    finally:
        process.terminate()
        process.wait(timeout=20)


def test_flower_serves_https_and_its_api_answers(tls_site: RecoverySite, certificates: DeploymentCertificates) -> None:
    password = secrets.token_urlsafe(12)
    flower = start_flower(tls_site.env, tls_site.workdir, user="operator", password=password)
    try:
        assert flower.url.startswith("https://")
        auth = ("operator", password)
        response = httpx.get(f"{flower.url}/api/workers?refresh=1", auth=auth, verify=ca_context(certificates),
                             timeout=20)
        assert response.status_code == 200, response.text
        assert any(node.startswith("orchestration@") for node in response.json()), response.json()
        assert httpx.get(f"{flower.url}/api/workers", verify=ca_context(certificates), timeout=10).status_code == 401
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
            httpx.get(f"{flower.url}/healthcheck", timeout=10)
    finally:
        stop_all([flower])


# ---- plain text refused, or allowed and logged ---------------------------------------------------------
def test_a_worker_on_plain_redis_is_refused_unless_allowed(tmp_path: Path) -> None:
    plain = RedisServer(tmp_path / "redis").start()
    try:
        env = celery_env(broker_url=plain.url, database_url=f"sqlite:///{tmp_path / 'asr.db'}")
        assert INSECURE not in env
        refused = start_worker("plain", ["orchestration"], env, tmp_path / "refused", wait=False)
        with pytest.raises(ServiceStartError, match="ASR_BROKER_URL=redis://.* is a plain-text connection"):
            refused.wait_ready(timeout=30)
        assert f"or set {INSECURE}=1" in refused.log()

        allowed = start_worker("plain", ["orchestration"], {**env, INSECURE: "1"}, tmp_path / "allowed")
        try:
            assert allowed.log().count("INSECURE TRANSPORT: ") == 1, allowed.log()
        finally:
            stop_all([allowed])
    finally:
        plain.stop()


def test_http_storage_endpoint_is_refused_unless_allowed(azurite: AzuriteProcess, https_azurite: AzuriteProcess,
                                                         certificates: DeploymentCertificates,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASR_STORAGE_TEST_CONNECTION_STRING", azurite.connection_string())
    # A worker's own key-encryption key: the test does not depend on one an earlier test left in the environment.
    monkeypatch.delenv("ASR_STORAGE_KEK_FILE", raising=False)
    monkeypatch.setenv("ASR_STORAGE_KEK", new_kek_text())
    options = {"connection_string_env": "ASR_STORAGE_TEST_CONNECTION_STRING"}
    monkeypatch.delenv(INSECURE)
    with pytest.raises(NonRecoverableError, match=rf"plain-text connection \(storage endpoint\).*{INSECURE}=1"):
        open_recovery_storage("azure:plain-refused", options)

    monkeypatch.setenv(INSECURE, "1")
    storage = open_recovery_storage("azure:plain-allowed", options)
    try:
        payload = os.urandom(100_000)
        storage.put_object("probe", payload)
        assert storage.read_object("probe") == payload
    finally:
        storage.close()

    # HTTPS needs no override, and is verified with the deployment's CA: without it, no connection.
    monkeypatch.delenv(INSECURE)
    monkeypatch.setenv("ASR_STORAGE_TEST_CONNECTION_STRING", https_azurite.connection_string())
    monkeypatch.setenv("ASR_TLS_CA_FILE", str(certificates.ca_file))
    storage = open_recovery_storage("azure:over-https", options)
    try:
        payload = os.urandom(300_000)
        storage.put_object("probe", payload)
        assert storage.read_object("probe") == payload
    finally:
        storage.close()
    monkeypatch.delenv("ASR_TLS_CA_FILE")
    with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
        open_recovery_storage("azure:over-https", options)


def test_servers_without_a_certificate_and_plain_clients_are_refused(tmp_path: Path,
                                                                     certificates: DeploymentCertificates,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ASR_", "FLOWER_"))}
    # ASR_HOME in the test's folder: the launchers must not open (or find out of date) the user's own database.
    env.update(ASR_FLOWER_USER="operator", ASR_FLOWER_PASSWORD="pw", ASR_BROKER_URL="rediss://broker:6379/0",
               ASR_HOME=str(tmp_path / "home"))
    for command in (["api"], ["flower"]):
        proc = subprocess.run([ASR, *command, "--dry-run"], env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and "would serve plain HTTP" in proc.stderr and INSECURE in proc.stderr, \
            proc.stderr
        served = subprocess.run([ASR, *command, "--dry-run"], env={**env, **certificates.settings()},
                                capture_output=True, text=True, timeout=60)
        assert served.returncode == 0, served.stderr
        for path in (certificates.server_cert_file, certificates.server_key_file):
            assert str(path) in served.stdout, served.stdout

    # The launchers refuse a plain broker before starting anything, in one line.
    plain = {**env, "ASR_BROKER_URL": "redis://10.0.0.5:6379/0"}
    for command in (["worker", "orchestration"], ["beat"], ["worker", "recovery"]):
        proc = subprocess.run([ASR, *command], env=plain, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and proc.stderr.startswith("asr: error: ASR_BROKER_URL=redis://10.0.0.5"), \
            proc.stderr
        assert "not started" in proc.stderr and "Traceback" not in proc.stderr

    monkeypatch.delenv(INSECURE)
    with pytest.raises(transport.InsecureTransportError, match=INSECURE):
        SiteRecoveryClient("http://127.0.0.1:8000", "key")

    # PostgreSQL: a network URL without sslmode=verify-full is refused; with it, libpq is asked for TLS (the
    # machine's test server has none, so the connection fails on that, not on our check) with the CA.
    plain_pg = "postgresql://postgres@127.0.0.1:5432/test"
    with pytest.raises(transport.InsecureTransportError, match="sslmode=verify-full"):
        get_engine(plain_pg)
    monkeypatch.setenv("ASR_TLS_CA_FILE", str(certificates.ca_file))
    verified = f"{plain_pg}?sslmode=verify-full"
    assert transport.database_connect_args(verified) == {"sslrootcert": str(certificates.ca_file)}
    try:
        with pytest.raises(sa.exc.OperationalError, match="SSL|ssl"):
            with get_engine(verified).connect():
                pass
    finally:
        dispose_engines()
    assert transport.check_database_url("ASR_DATABASE_URL", f"sqlite:///{tmp_path / 'a.db'}")
