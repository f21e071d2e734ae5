"""`asr keys`: the key-encryption key (KEK) of the recovery storage: create one, rotate to a new one."""
from __future__ import annotations

import json
from pathlib import Path

import click

from api.cli import _fail, _Group, main


@main.group(cls=_Group)
def keys():
    """The recovery storage's key-encryption key (KEK).

    Everything the engine stores in the recovery storage is encrypted under data keys that the KEK wraps
    (docs/operations.md, "Security: encryption at rest"). Every process that opens the storage (workers,
    host agents) reads the KEK from ASR_STORAGE_KEK_FILE (or ASR_STORAGE_KEK). Losing the KEK makes the
    replicas and recovery points unreadable: keep a copy somewhere safe."""


@keys.command("create")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Replace an existing file (what it wrapped becomes unreadable).")
def keys_create(path: Path, force: bool):
    """Write a new random KEK to PATH (mode 0600); point ASR_STORAGE_KEK_FILE at it."""
    from sites.storage.keys import write_kek_file

    try:
        kek = write_kek_file(path, overwrite=force)
    except FileExistsError:
        _fail(f"{path} exists: a KEK file is never replaced unless --force (what it wrapped would be lost)")
    except OSError as exc:
        _fail(f"cannot write {path}: {exc.strerror or exc}")
    click.echo(f"key-encryption key {kek.key_id} written to {path} (mode 0600); set ASR_STORAGE_KEK_FILE={path} "
               f"for every process that opens the recovery storage, and keep a copy in a safe place")


@keys.command("rotate")
@click.option("--new-kek-file", "new_file", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The new KEK (made with `asr keys create`).")
@click.option("--old-kek-file", "old_file", type=click.Path(dir_okay=False, path_type=Path),
              help="The KEK in use (default: ASR_STORAGE_KEK_FILE or ASR_STORAGE_KEK of this process).")
@click.option("--storage", "urls", multiple=True,
              help="A recovery storage URL to rotate besides every one the database's protected items use "
                   "(repeatable); options as JSON after a space, e.g. 'azure:c {\"connection_string_env\": \"X\"}'.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of text.")
def keys_rotate(new_file: Path, old_file: Path | None, urls: tuple[str, ...], as_json: bool):
    """Re-wrap every data key of every recovery storage under a new KEK; the disks and objects are not
    rewritten. Safe to run again (keys already wrapped by the new KEK are left alone). Afterwards point
    ASR_STORAGE_KEK_FILE at the new file on every process and restart them: the old KEK opens nothing."""
    from datapath.errors import DataPathError
    from sites.storage.encrypted import rewrap_keys
    from sites.storage.keys import load_kek, read_kek_file
    from tasks.recovery_storage import open_backend

    try:
        old = read_kek_file(old_file) if old_file else load_kek()
        new = read_kek_file(new_file)
    except DataPathError as exc:
        _fail(str(exc))
    if old.key_id == new.key_id:
        _fail(f"the new KEK ({new_file}) is the one in use (id {new.key_id}): create a new one first")
    storages = _storages_in_use()
    for text in urls:
        url, _, options = text.partition(" ")
        try:
            storages.append((url, json.loads(options) if options.strip() else {}))
        except ValueError as exc:
            _fail(f"--storage {text!r}: the options are not JSON ({exc})")
    report = {"old_kek_id": old.key_id, "new_kek_id": new.key_id, "storages": []}
    seen: set[str] = set()
    for url, options in storages:
        identity = json.dumps([url, options], sort_keys=True)
        if identity in seen:
            continue
        seen.add(identity)
        try:
            backend = open_backend(url, options)
            try:
                counts = rewrap_keys(backend, old, new)
            finally:
                backend.close()
        except DataPathError as exc:
            _fail(f"rotating the keys of {url}: {exc} (run `asr keys rotate` again once fixed: it resumes)")
        report["storages"].append({"url": url, **counts})
    if as_json:
        click.echo(json.dumps(report))
        return
    for entry in report["storages"]:
        click.echo(f"{entry['url']}: {entry['rewrapped']} data keys re-wrapped, {entry['already']} already under "
                   f"the new key")
    click.echo(f"done: every data key is wrapped by key-encryption key {new.key_id}; set ASR_STORAGE_KEK_FILE="
               f"{new_file} on every process and restart them (key {old.key_id} opens nothing any more)")


def _storages_in_use() -> list[tuple[str, dict]]:
    """(URL, options) of the recovery storage of every protected item of the database."""
    from sqlmodel import select

    from models.db import session_scope
    from models.protection import ProtectedItem

    with session_scope() as session:
        rows = session.exec(select(ProtectedItem.recovery_storage, ProtectedItem.storage_options)).all()
    return [(url, dict(options or {})) for url, options in rows]
