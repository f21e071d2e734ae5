"""What the engine creates on disk is its owner's only: files 0600, folders 0700, whatever the umask.

Each file is made through the real code path (the local recovery storage, the database engine and ASR_HOME,
the replication tracker, disk creation) under a permissive umask (0, and the usual 022),
then its mode is read back with stat. Folders that already existed are left as they were.
"""
from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from datapath.disk import create_disk
from datapath.tracker import ReplicationTracker
from models.db import database_url, dispose_engines, get_engine, init_db
from sites.storage.local import LocalDirectoryStorage

MIB = 1024 * 1024


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture(params=[0o000, 0o022], ids=["umask-000", "umask-022"])
def umask(request) -> Iterator[int]:
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


class WatchingReader:
    """A stream to upload that, when first read, notes the modes of the hidden files beside the object:
    the temporary file the upload is being written to."""

    def __init__(self, directory: Path, data: bytes):
        self.directory = directory
        self.data = data
        self.seen: dict[str, int] = {}

    def read(self, size: int = -1) -> bytes:
        if not self.seen:
            self.seen = {p.name: mode(p) for p in self.directory.iterdir() if p.name.startswith(".")}
        data, self.data = (self.data, b"") if size < 0 else (self.data[:size], self.data[size:])
        return data


def test_local_storage_creates_private_files_and_folders(tmp_path: Path, umask: int) -> None:
    existing = tmp_path / "shared"
    existing.mkdir(mode=0o755)
    os.chmod(existing, 0o755)
    root = existing / "new" / "recovery"
    storage = LocalDirectoryStorage(root)
    storage.create_disk("host1/vm1/disk0.vhd", 4 * MIB)
    storage.put_object("host1/vm1/disk0.vhd.state.json", b'{"version": 1}')
    folder = root / "host1" / "vm1"
    upload = WatchingReader(folder, b"log bytes" * 1000)
    storage.put_object("host1/vm1/disk0.vhd.00000001.hrl", upload)
    storage.put_object("failback/host1/vm1/disk0.final.json", b"{}")

    assert mode(existing) == 0o755, "a folder that existed is left as it was"
    for directory in (existing / "new", root, root / "host1", folder, root / "failback", root / "failback" / "host1",
                      root / "failback" / "host1" / "vm1"):
        assert mode(directory) == 0o700, (directory, oct(mode(directory)))
    files = [path for path in root.rglob("*") if path.is_file()]
    assert len(files) == 4, files
    for path in files:
        assert mode(path) == 0o600, (path, oct(mode(path)))
    assert upload.seen and set(upload.seen.values()) == {0o600}, upload.seen
    assert (folder / "disk0.vhd.00000001.hrl").read_bytes() == b"log bytes" * 1000


def test_the_sqlite_database_and_asr_home_are_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       umask: int) -> None:
    monkeypatch.delenv("ASR_DATABASE_URL", raising=False)
    home = tmp_path / "user" / ".asr"
    monkeypatch.setenv("ASR_HOME", str(home))
    url = database_url()
    assert mode(home) == 0o700 and mode(home.parent) == 0o700
    engine = init_db(get_engine(url))
    try:
        with engine.connect() as connection:  # WAL mode: the -wal and -shm files exist while connected
            connection.exec_driver_sql("CREATE TABLE IF NOT EXISTS probe (x INTEGER)")
            connection.commit()
            made = sorted(path.name for path in home.iterdir())
            assert made[:1] == ["asr.db"] and "asr.db-wal" in made, made
            for name in made:
                assert mode(home / name) == 0o600, (name, oct(mode(home / name)))
    finally:
        dispose_engines()

    # A database file given by URL, created by the engine: 0600 too; one made earlier with a wider mode
    # (by this user) is narrowed when the engine opens it.
    given = tmp_path / "given.db"
    older = tmp_path / "older.db"
    older.touch()
    os.chmod(older, 0o644)
    for path in (given, older):
        engine = init_db(get_engine(f"sqlite:///{path}"))
        try:
            with engine.connect() as connection:
                connection.exec_driver_sql("SELECT 1")
            assert mode(path) == 0o600, (path, oct(mode(path)))
        finally:
            dispose_engines()


def test_tracker_files_and_disks_are_private(tmp_path: Path, umask: int) -> None:
    disk = tmp_path / "vm" / "disk0.raw"
    disk.parent.mkdir()
    create_disk(disk, 4 * MIB)
    with ReplicationTracker.enable(disk) as tracker:
        tracker.write(0, b"\x01" * 4096)
        tracker.seal()
        tracker.write(8192, b"\x02" * 4096)
        tracker.create_snapshot()
        tracker.write(0, b"\x03" * 4096)  # copy-on-write: the snapshot keeps the old bytes
        files = sorted(path for path in disk.parent.iterdir() if path.is_file())
        assert len(files) >= 4, files  # the disk, the control file, a sealed and an active log, the snapshot
        for path in files:
            assert mode(path) == 0o600, (path.name, oct(mode(path)))
        tracker.delete_snapshot()
