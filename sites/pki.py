"""The private certificate authority of one deployment and the certificates it signs (issue 15).

One folder holds everything a deployment needs for TLS on every connection:

    ca.pem            the CA's certificate: every client verifies the servers with it (ASR_TLS_CA_FILE)
    ca-key.pem        the CA's private key: keep it offline once the certificates are made
    server.pem        the servers' certificate (Redis, the REST API, Flower, Azurite, PostgreSQL), with
    server-key.pem    every name and address they are reached by as subjectAltNames (ASR_TLS_CERT_FILE/_KEY_FILE)
    client.pem        the certificate the engine's processes present to Redis (mutual TLS,
    client-key.pem    ASR_TLS_CLIENT_CERT_FILE/_KEY_FILE)

Keys are ECDSA P-256 (fast to make and to handshake with, accepted by OpenSSL, Node and PostgreSQL), written
0600 in a 0700 folder, never over an existing file. `export_for_servers` and `export_for_clients` copy what a
server (ca.pem, server.pem, server-key.pem) or a client (ca.pem, client.pem, client-key.pem) needs into a
folder of its own, so that only the folder of the set holds the CA's key. The certificates name their
purpose (extended key usage serverAuth or clientAuth), so a client certificate cannot serve as a server's.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
"""Always in the server certificate: a process on the same machine reaches every service by these."""

CA_DAYS = 3650
LEAF_DAYS = 825  # the longest validity clients such as Apple's accept for a TLS server certificate
KEY_MODE = 0o600
DIR_MODE = 0o700
# A DNS name as RFC 1123 allows it (labels of letters, digits and inner hyphens), or a wildcard's first label.
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME = re.compile(rf"^(\*\.)?{_LABEL}(\.{_LABEL})*$")


class PkiError(ValueError):
    """The certificates cannot be made as asked; the message says why (nothing was written)."""


@dataclass(frozen=True)
class DeploymentCertificates:
    """Where the files of one deployment's PKI are."""

    folder: Path

    @property
    def ca_file(self) -> Path:
        return self.folder / "ca.pem"

    @property
    def ca_key_file(self) -> Path:
        return self.folder / "ca-key.pem"

    @property
    def server_cert_file(self) -> Path:
        return self.folder / "server.pem"

    @property
    def server_key_file(self) -> Path:
        return self.folder / "server-key.pem"

    @property
    def client_cert_file(self) -> Path:
        return self.folder / "client.pem"

    @property
    def client_key_file(self) -> Path:
        return self.folder / "client-key.pem"

    def files(self) -> list[Path]:
        return [self.ca_file, self.ca_key_file, self.server_cert_file, self.server_key_file,
                self.client_cert_file, self.client_key_file]

    def server_files(self) -> list[Path]:
        """What a server needs: the CA (to verify client certificates) and its own pair; not the CA's key."""
        return [self.ca_file, self.server_cert_file, self.server_key_file]

    def client_files(self) -> list[Path]:
        """What a client needs: the CA (to verify the servers) and its own pair; not the CA's key."""
        return [self.ca_file, self.client_cert_file, self.client_key_file]

    def key_files(self) -> list[Path]:
        return [self.ca_key_file, self.server_key_file, self.client_key_file]

    def settings(self) -> dict[str, str]:
        """The ASR_TLS_* settings of a process of this deployment (docs/operations.md, "Security: TLS")."""
        return {
            "ASR_TLS_CA_FILE": str(self.ca_file),
            "ASR_TLS_CERT_FILE": str(self.server_cert_file),
            "ASR_TLS_KEY_FILE": str(self.server_key_file),
            "ASR_TLS_CLIENT_CERT_FILE": str(self.client_cert_file),
            "ASR_TLS_CLIENT_KEY_FILE": str(self.client_key_file),
        }


def subject_alt_names(hosts: list[str] | tuple[str, ...]) -> list[x509.GeneralName]:
    """DNS names and IP addresses for the server certificate: DEFAULT_HOSTS and `hosts`, each once, in
    order; PkiError for a name that is neither a DNS name nor an IP address."""
    names: list[x509.GeneralName] = []
    seen: set[str] = set()
    for host in (*DEFAULT_HOSTS, *hosts):
        if not isinstance(host, str) or not host.strip():
            raise PkiError(f"empty host name in {list(hosts)!r}")
        host = host.strip()
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            if len(host) > 253 or not _DNS_NAME.match(host):
                raise PkiError(f"{host!r} is neither a DNS name nor an IP address: "
                               f"it cannot be a subjectAltName") from None
            key = host.lower()
            name: x509.GeneralName = x509.DNSName(key)
        else:
            key = str(address)
            name = x509.IPAddress(address)
        if key not in seen:
            seen.add(key)
            names.append(name)
    return names


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str, deployment: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Site Recovery Engine"),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, deployment),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def _builder(subject: x509.Name, issuer: x509.Name, public_key, days: int) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            # A minute back: a machine whose clock is slightly behind still accepts a certificate made now.
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False))


def _leaf(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, common_name: str, deployment: str,
          usage: x509.ObjectIdentifier, alt_names: list[x509.GeneralName] | None
          ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    builder = (_builder(_name(common_name, deployment), ca_cert.subject, key.public_key(), LEAF_DAYS)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, content_commitment=False,
                                            data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
    if alt_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def _write(path: Path, data: bytes, mode: int) -> None:
    # O_EXCL: never over an existing file (a second run must not replace a CA the deployment trusts);
    # the mode is set at creation, so a key is never readable by others, not even for an instant.
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
    os.chmod(path, mode)  # the umask may have taken bits off a certificate's 0644


def create_deployment_certificates(folder: Path, hosts: list[str] | tuple[str, ...] = (),
                                   *, deployment: str = "deployment") -> DeploymentCertificates:
    """A new CA in `folder` and the server and client certificates it signs (the server's valid for
    DEFAULT_HOSTS and `hosts`). PkiError, writing nothing, when a host name is invalid or `folder` already
    holds one of the files."""
    alt_names = subject_alt_names(tuple(hosts))
    certificates = DeploymentCertificates(Path(folder))
    existing = [path.name for path in certificates.files() if path.exists()]
    if existing:
        raise PkiError(f"{folder} already holds {', '.join(existing)}: not replaced (a deployment trusts its CA); "
                       f"choose another folder or remove them first")
    certificates.folder.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    os.chmod(certificates.folder, DIR_MODE)

    ca_key = _new_key()
    ca_name = _name(f"Site Recovery Engine CA ({deployment})", deployment)
    ca_cert = (_builder(ca_name, ca_name, ca_key.public_key(), CA_DAYS)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, content_commitment=False,
                                            data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                            crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA256()))
    first_dns = next((n.value for n in alt_names if isinstance(n, x509.DNSName) and n.value != "localhost"), None)
    server_cert, server_key = _leaf(ca_cert, ca_key, first_dns or "localhost", deployment,
                                    ExtendedKeyUsageOID.SERVER_AUTH, alt_names)
    # A subjectAltName for the client too: RFC 5280 verifiers (cryptography's among them) require one.
    client_cert, client_key = _leaf(ca_cert, ca_key, "asr-client", deployment, ExtendedKeyUsageOID.CLIENT_AUTH,
                                    [x509.DNSName("asr-client")])

    for path, data, mode in (
        (certificates.ca_key_file, _pem_key(ca_key), KEY_MODE),
        (certificates.ca_file, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644),
        (certificates.server_key_file, _pem_key(server_key), KEY_MODE),
        (certificates.server_cert_file, server_cert.public_bytes(serialization.Encoding.PEM), 0o644),
        (certificates.client_key_file, _pem_key(client_key), KEY_MODE),
        (certificates.client_cert_file, client_cert.public_bytes(serialization.Encoding.PEM), 0o644),
    ):
        _write(path, data, mode)
    return certificates


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    # PKCS#8 without a passphrase: redis-server, uvicorn, Tornado, Node and PostgreSQL read it unattended.
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def export_for_servers(certificates: DeploymentCertificates, folder: Path) -> list[Path]:
    """Copy the servers' files (`server_files`) into `folder`; see `_export`."""
    return _export(certificates.server_files(), Path(folder))


def export_for_clients(certificates: DeploymentCertificates, folder: Path) -> list[Path]:
    """Copy the clients' files (`client_files`) into `folder`; see `_export`."""
    return _export(certificates.client_files(), Path(folder))


def _export(files: list[Path], folder: Path) -> list[Path]:
    """Copy `files` into `folder` (made 0700), with their modes (keys 0600): the paths written, none when
    `folder` already holds the same files (a compose service runs this at every start). PkiError, writing
    nothing, when a file there differs (a folder of another CA is never mixed with this one) or a file
    to copy is missing."""
    missing = [path.name for path in files if not path.is_file()]
    if missing:
        raise PkiError(f"{files[0].parent} lacks {', '.join(missing)}: make the set first (asr certs create)")
    different = [path.name for path in files if (folder / path.name).exists()
                 and (folder / path.name).read_bytes() != path.read_bytes()]
    if different:
        raise PkiError(f"{folder} already holds another {', '.join(different)}: not replaced (it belongs to "
                       f"another set); choose another folder or remove them first")
    folder.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    os.chmod(folder, DIR_MODE)
    written = []
    for path in files:
        target = folder / path.name
        if not target.exists():
            _write(target, path.read_bytes(), path.stat().st_mode & 0o777)
            written.append(target)
    return written
