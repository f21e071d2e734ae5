"""A host's upload limit (sites/storage/throttled.py, ASR_HOST_UPLOAD_LIMIT): one budget for every process of a
host agent, counting what crosses the network and nothing else. The throttled copy of a real host agent is
exercised by tests/test_faults.py, whose mid-copy kills need a copy that lasts."""
from __future__ import annotations

import io
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from sites.storage.local import LocalDirectoryStorage
from sites.storage.throttled import ThrottledStorage, UploadLimit
from tasks.replication import checkpoint_interval
from workflows import settings

MIB = 1024 * 1024


class FrozenClock:
    """A clock that moves only when told, and a sleep that records instead of sleeping."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(round(seconds, 6))


def limit_on(path: Path, bytes_per_s: int, clock: FrozenClock) -> UploadLimit:
    return UploadLimit(bytes_per_s, path, clock=clock, sleep=clock.sleep)


def test_two_senders_sharing_the_file_share_one_budget_and_idle_time_earns_no_credit(tmp_path: Path) -> None:
    clock = FrozenClock()
    first, second = (limit_on(tmp_path / "uplink", MIB, clock) for _ in range(2))
    assert [first.consume(MIB), second.consume(MIB), first.consume(MIB // 2), second.consume(0)] == [0, 1, 2, 0]
    assert clock.slept == [1, 2]
    # After a long pause the next send goes at once, and the one after it waits its full share again.
    clock.now += 3600
    assert [second.consume(MIB), first.consume(MIB)] == [0, 1]
    assert oct((tmp_path / "uplink").stat().st_mode & 0o777) == "0o600"


def test_a_torn_state_file_starts_afresh_instead_of_stalling(tmp_path: Path) -> None:
    clock = FrozenClock()
    (tmp_path / "uplink").write_bytes(b"not a time")
    assert limit_on(tmp_path / "uplink", MIB, clock).consume(MIB) == 0


def _send(path: str, sends: int) -> None:
    limit = UploadLimit(MIB, Path(path))
    for _ in range(sends):
        limit.consume(MIB // 4)


def test_processes_of_one_agent_together_stay_under_the_limit(tmp_path: Path) -> None:
    """Two real processes, 3 sends of 256 KiB each at 1 MiB/s: the last of the six may start only 1.25 s after
    the first, whoever sends it."""
    started = time.monotonic()
    context = multiprocessing.get_context("fork")
    senders = [context.Process(target=_send, args=(str(tmp_path / "uplink"), 3)) for _ in range(2)]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join(timeout=30)
    assert [sender.exitcode for sender in senders] == [0, 0]
    assert time.monotonic() - started >= 1.25


def test_storage_books_data_it_sends_and_nothing_else(tmp_path: Path) -> None:
    """At 1 byte/s on a frozen clock, the time the uplink is next free is the number of bytes booked."""
    clock = FrozenClock()
    limit = limit_on(tmp_path / "uplink", 1, clock)
    storage = ThrottledStorage(LocalDirectoryStorage(tmp_path / "site"), limit)

    def booked() -> int:
        return round(float((tmp_path / "uplink").read_bytes()) - clock.now)

    storage.create_disk("h/vm/d.vhd", MIB)
    disk = storage.open_disk("h/vm/d.vhd")
    disk.write(4096, b"\x07" * 8192)
    disk.write_zeros(0, 4096)  # cleared pages carry no data
    disk.flush()
    assert booked() == 8192
    assert storage.put_object("h/vm/a", b"x" * 100) == 100
    assert storage.put_object("h/vm/b", io.BytesIO(b"y" * 300)) == 300
    assert storage.put_new_object("h/vm/c", b"z" * 50)
    assert booked() == 8192 + 100 + 300 + 50
    # Reads are free, and what was sent arrived whole.
    buffer = bytearray(8192)
    disk.read_into(4096, memoryview(buffer))
    assert bytes(buffer) == b"\x07" * 8192
    assert storage.read_object("h/vm/b") == b"y" * 300
    assert booked() == 8192 + 450
    disk.close()
    storage.close()


@pytest.mark.parametrize(("raw", "expected"), [
    (None, None), ("", None), ("0", None), ("8M", 8 * MIB), ("512k", 512 * 1024), ("1.5G", 3 * 1024 * MIB // 2),
    ("1000", 1000),
])
def test_the_setting_reads_sizes(monkeypatch: pytest.MonkeyPatch, raw: str | None, expected: int | None) -> None:
    if raw is None:
        monkeypatch.delenv("ASR_HOST_UPLOAD_LIMIT", raising=False)
    else:
        monkeypatch.setenv("ASR_HOST_UPLOAD_LIMIT", raw)
    assert settings.host_upload_limit() == expected


@pytest.mark.parametrize("raw", ["fast", "-1M", "inf", "nan", "8X", "2P"])
def test_a_bad_setting_names_the_variable(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv("ASR_HOST_UPLOAD_LIMIT", raw)
    with pytest.raises(ValueError, match="ASR_HOST_UPLOAD_LIMIT"):
        settings.host_upload_limit()


def test_a_limited_copy_checkpoints_every_five_seconds_of_sending(tmp_path: Path) -> None:
    assert checkpoint_interval(None) == 64 * MIB
    assert checkpoint_interval(UploadLimit(4 * MIB, tmp_path / "a")) == 20 * MIB
    assert checkpoint_interval(UploadLimit(100 * 1024, tmp_path / "b")) == MIB
    assert checkpoint_interval(UploadLimit(1024 * MIB, tmp_path / "c")) == 64 * MIB
    assert os.path.exists(tmp_path / "a")
