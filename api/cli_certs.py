"""`asr certs create`: the private CA and the certificates of a deployment, so TLS needs nothing else."""
from __future__ import annotations

from pathlib import Path

import click

from api.cli import _fail, _Group, main


@main.group(cls=_Group)
def certs():
    """Certificates for TLS on every connection of a deployment (docs/operations.md, "Security: TLS")."""


@certs.command("create")
@click.option("--dir", "folder", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the CA and the certificates (created 0700; files already there are never replaced).")
@click.option("--host", "hosts", multiple=True, metavar="NAME",
              help="A DNS name or IP address the servers are reached by (repeatable); localhost, 127.0.0.1 "
                   "and ::1 are always in.")
@click.option("--name", "deployment", default="deployment", show_default=True,
              help="The deployment's name, written into the certificates' subjects.")
@click.option("--keep-existing", is_flag=True,
              help="When DIR already holds a whole set, keep it and succeed (a compose service run at every start).")
@click.option("--server-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also copy what the servers need (ca.pem, server.pem, server-key.pem) into this folder.")
@click.option("--client-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also copy what the clients need (ca.pem, client.pem, client-key.pem) into this folder.")
def certs_create(folder: Path, hosts: tuple[str, ...], deployment: str, keep_existing: bool,
                 server_dir: Path | None, client_dir: Path | None):
    """A private CA in DIR and the certificates it signs: server.pem (for Redis, the API, Flower, Azurite
    and PostgreSQL, valid for every --host) and client.pem (what the engine's processes present to
    Redis). Private keys are written 0600. Prints the ASR_TLS_* settings that use them.

    With --server-dir and --client-dir, the servers' and the clients' files are copied into folders of
    their own, which the servers and clients mount instead of DIR: then only DIR holds the CA's key
    (ca-key.pem), with which whoever reads it could make certificates the whole deployment trusts."""
    from sites.pki import (
        DeploymentCertificates,
        PkiError,
        create_deployment_certificates,
        export_for_clients,
        export_for_servers,
    )

    existing = DeploymentCertificates(folder.resolve())
    if keep_existing and all(path.is_file() for path in existing.files()):
        click.echo(f"{existing.folder} already holds the deployment's CA and certificates: kept.")
        made = existing
    else:
        try:
            made = create_deployment_certificates(folder.resolve(), hosts, deployment=deployment)
        except PkiError as exc:
            _fail(str(exc))
        except OSError as exc:
            _fail(f"cannot write the certificates into {folder}: {exc}")
        click.echo(f"CA and certificates written to {made.folder} (keep ca-key.pem offline once done).")
        click.echo("Settings of every process of this deployment:")
        for name, value in made.settings().items():
            click.echo(f"  {name}={value}")
    for what, target, export in (("servers'", server_dir, export_for_servers),
                                 ("clients'", client_dir, export_for_clients)):
        if target is None:
            continue
        try:
            written = export(made, target.resolve())
        except PkiError as exc:
            _fail(str(exc))
        except OSError as exc:
            _fail(f"cannot copy the {what} files into {target}: {exc}")
        click.echo(f"The {what} files {'copied to' if written else 'already in'} {target.resolve()} "
                   f"(without the CA's key).")
