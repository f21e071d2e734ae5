"""The tracker service (sites/host/trackerservice.py) as QEMU meets it: a detached process serving tracked
disks over NBD, with qemu-io and qemu-img as its clients.

The check the data tests end with: the disk as it was when tracking started, plus every sealed log
replayed, equals the disk the service wrote, byte for byte."""
from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import mmh3
import pytest
from test_nbd import Client
from test_tracker import copy_data, data_of, logged_writes, make_disk, replay_logs

from benchmarks.nbd import benchmark_nbd
from datapath import nbd
from datapath.tracker import ReplicationTracker
from sites.host.trackerservice import TrackerService, TrackerServiceError, serving_marker
from sites.localservices import wait_until

MIB = 1024 * 1024
DISK_SIZE = 32 * MIB
QEMU_TIMEOUT = 60


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = make_disk(tmp_path / "disk0.raw", "raw", DISK_SIZE)
    ReplicationTracker.enable(path).close()
    return path


@pytest.fixture
def services(tmp_path: Path) -> Iterator[list[TrackerService]]:
    """Services the test starts; any still running at its end is stopped (killed if need be)."""
    started: list[TrackerService] = []
    yield started
    for service in started:
        service.stop(timeout=5.0)


def qemu_io(socket_path: Path, *commands: str, image: str | None = None) -> subprocess.CompletedProcess:
    target = image or f"nbd+unix:///disk0?socket={socket_path}"
    args = ["qemu-io", "-t", "writeback", "-f", "raw", target]
    for command in commands:
        args += ["-c", command]
    return subprocess.run(args, capture_output=True, text=True, timeout=QEMU_TIMEOUT)


def all_logs(disk: Path):
    with ReplicationTracker(disk) as tracker:
        tracker.seal()
        return tracker.pending_logs()


def test_every_write_zeroing_and_trim_is_logged_and_a_clean_stop_leaves_nothing(disk, tmp_path, services):
    original = copy_data(disk, tmp_path / "original.raw")
    service = TrackerService(tmp_path / "a" / "runtime-dir-with-a-long-name" / ("x" * 60))
    services.append(service)
    pid = service.start({"disk0": disk})
    assert len(str(service.socket("disk0"))) <= 107  # long runtime dirs get a short socket folder
    assert service.start({"disk0": disk}) == pid  # idempotent
    assert serving_marker(disk).exists()
    result = qemu_io(service.socket("disk0"), "write -P 0xab 0 1M", "write -z 1M 1M", "discard 2M 1M", "flush",
                     "write -f -P 0xcd 4M 64k", "write -P 0x11 8M 3", "read -P 0xab 0 1M", "read -P 0 1M 2M")
    assert result.returncode == 0, result.stderr
    assert "Pattern verification failed" not in result.stdout
    assert service.stop() == "stopped"
    assert not service.running()
    assert not serving_marker(disk).exists()
    logs = all_logs(disk)
    writes = sorted((offset, length) for _, offset, length, _ in logged_writes(logs).values())
    assert writes == [(0, MIB), (MIB, MIB), (2 * MIB, MIB), (4 * MIB, 64 * 1024), (8 * MIB, 512)]
    replay_logs(original, logs, first_generation=1)
    assert data_of(original) == data_of(disk)
    with ReplicationTracker(disk) as tracker:
        assert tracker.resync_required() is None
    assert service.stop() == "not-running"


def test_the_image_is_held_while_served_and_a_second_service_is_refused(disk, tmp_path, services):
    service = TrackerService(tmp_path / "one")
    services.append(service)
    service.start({"disk0": disk})
    direct = qemu_io(service.socket("disk0"), "read 0 4k", image=str(disk))
    assert direct.returncode != 0 and re.search(r'Failed to get ".*" lock', direct.stderr), direct.stderr
    second = TrackerService(tmp_path / "two")
    services.append(second)
    with pytest.raises(TrackerServiceError, match="served by another tracker service"):
        second.start({"disk0": disk})
    assert not second.running()
    assert qemu_io(service.socket("disk0"), "write -P 1 0 4k").returncode == 0  # the first one goes on
    service.stop()
    assert qemu_io(service.socket("disk0"), "read -P 1 0 4k", image=str(disk)).returncode == 0


def test_a_disk_open_in_qemu_is_not_served(disk, tmp_path, services):
    holder = subprocess.Popen(["qemu-io", "-f", "raw", "-c", "sleep 20000", str(disk)])
    try:
        time.sleep(0.5)
        service = TrackerService(tmp_path / "svc")
        services.append(service)
        with pytest.raises(TrackerServiceError, match="open in QEMU"):
            service.start({"disk0": disk})
    finally:
        holder.kill()
        holder.wait(10)


def test_bad_requests_and_garbage_do_not_stop_the_service(disk, tmp_path, services):
    service = TrackerService(tmp_path / "svc")
    services.append(service)
    service.start({"disk0": disk})
    garbage = Client(service.socket("disk0"))
    garbage.recv(18)
    garbage.sock.sendall(b"\x00\x00\x00\x01" + os.urandom(64))
    garbage.close()
    client = Client(service.socket("disk0"))
    client.greeting()
    assert client.go() == DISK_SIZE
    assert client.request(nbd.CMD_WRITE, DISK_SIZE, 512, b"\1" * 512)[0] == errno.ENOSPC
    assert client.request(nbd.CMD_READ, DISK_SIZE - 512, 1024)[0] == errno.EINVAL
    assert client.request(nbd.CMD_WRITE, 512, 512, b"\2" * 512, flags=nbd.CMD_FLAG_FUA) == (0, b"")
    client.close()
    assert qemu_io(service.socket("disk0"), "read -P 2 512 512").returncode == 0
    assert service.running()


STARTER = r"""
import sys
from pathlib import Path
from sites.localservices import wait_until
from sites.host.trackerservice import TrackerService
print(TrackerService(Path(sys.argv[1])).start({"disk0": Path(sys.argv[2])}), flush=True)
"""


def test_the_service_outlives_the_process_that_started_it(disk, tmp_path, services):
    runtime = tmp_path / "svc"
    service = TrackerService(runtime)
    services.append(service)
    starter = subprocess.run([sys.executable, "-c", STARTER, str(runtime), str(disk)], capture_output=True,
                             text=True, timeout=QEMU_TIMEOUT, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert starter.returncode == 0, starter.stderr
    pid = int(starter.stdout.strip())
    assert service.running()
    assert os.getpgid(pid) == pid  # its own process group
    assert qemu_io(service.socket("disk0"), "write -P 3 0 4k").returncode == 0
    assert service.stop() == "stopped"


def test_sigkill_while_writing_loses_no_acknowledged_write_and_requires_resync(disk, tmp_path, services):
    original = copy_data(disk, tmp_path / "original.raw")
    service = TrackerService(tmp_path / "svc")
    services.append(service)
    pid = service.start({"disk0": disk})
    slots = DISK_SIZE // 4096
    commands = []
    for i in range(slots):
        commands += ["-c", f"write -P {i % 255 + 1} {i * 4096} 4k"]
    writer = subprocess.Popen(["qemu-io", "-t", "writeback", "-f", "raw",
                               f"nbd+unix:///disk0?socket={service.socket('disk0')}", *commands],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    active = disk.with_name(disk.name + ".hrl")
    deadline = time.monotonic() + QEMU_TIMEOUT
    while active.stat().st_size < 2 * MIB and time.monotonic() < deadline and writer.poll() is None:
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    out, _ = writer.communicate(timeout=QEMU_TIMEOUT)
    acknowledged = [int(offset) for offset in re.findall(r"wrote 4096/4096 bytes at offset (\d+)", out)]
    assert 0 < len(acknowledged) < slots, "the kill came after every write, or before any"
    assert serving_marker(disk).exists()  # left behind
    wait_until(lambda: not service.running(), timeout=10, what="the killed service to be gone")

    service.start({"disk0": disk})
    with ReplicationTracker(disk) as tracker:
        assert tracker.resync_required() == f"tracker service stopped uncleanly (pid {pid})", \
            service.log_path.read_text()
    assert f"stopped uncleanly (pid {pid})" in service.log_path.read_text()
    assert service.stop() == "stopped"

    data = data_of(disk)
    logs = all_logs(disk)
    logged = {(offset, digest) for _, offset, _, digest in logged_writes(logs).values()}
    for offset in acknowledged:
        pattern = bytes([offset // 4096 % 255 + 1]) * 4096
        assert data[offset : offset + 4096] == pattern
        assert (offset, mmh3.mmh3_x64_128_digest(pattern).hex()) in logged
    replay_logs(original, logs, first_generation=1)
    assert data_of(original) == data  # and the disk holds nothing the logs lack


def test_failing_to_start_says_why(tmp_path, services):
    service = TrackerService(tmp_path / "svc")
    services.append(service)
    untracked = make_disk(tmp_path / "plain.raw", "raw", MIB)
    with pytest.raises(TrackerServiceError, match="No such file or directory"):
        service.start({"disk0": tmp_path / "missing.raw"})
    assert not service.running()
    record = tmp_path / "svc" / "trackerservice.pid"
    assert not record.exists() or not json.loads(record.read_text())
    with pytest.raises(TrackerServiceError, match="disk name"):
        service.start({"../x": untracked})


def test_an_untracked_disk_is_served_as_it_is_and_held_like_a_tracked_one(tmp_path, services):
    """A drill's test VM has untracked disks: QEMU still reaches them only through the service, which writes
    them directly (no log) and holds the image against direct opens."""
    untracked = make_disk(tmp_path / "plain.raw", "raw", MIB)
    service = TrackerService(tmp_path / "svc")
    services.append(service)
    service.start({"disk0": untracked})
    target = f"nbd+unix:///disk0?socket={service.socket('disk0')}"
    done = subprocess.run(["qemu-io", "-f", "raw", target, "-c", "write -P 0x5c 4096 64k", "-c", "flush"],
                          capture_output=True, text=True, timeout=QEMU_TIMEOUT)
    assert done.returncode == 0, done.stderr
    direct = subprocess.run(["qemu-io", "-f", "raw", str(untracked), "-c", "read 0 512"],
                            capture_output=True, text=True, timeout=QEMU_TIMEOUT)
    assert direct.returncode != 0 and "lock" in direct.stderr, direct.stderr
    assert service.stop() == "stopped"
    data = untracked.read_bytes()
    assert data[4096:4096 + 65536] == b"\x5c" * 65536
    assert not list(tmp_path.glob("plain.raw.*")), "an untracked disk gets no log, control file or marker"


def test_many_writes_in_flight_are_all_logged_in_order(disk, tmp_path, services):
    """qemu-img bench keeps 16 writes in flight: the service takes them in batches (write_many)."""
    original = copy_data(disk, tmp_path / "original.raw")
    service = TrackerService(tmp_path / "svc")
    services.append(service)
    service.start({"disk0": disk})
    target = f"nbd+unix:///disk0?socket={service.socket('disk0')}"
    for pattern, size, count in ((0x5A, "64k", 160), (0xA5, "1M", 150)):  # overlapping, within the disk
        bench = subprocess.run(["qemu-img", "bench", "-w", "-t", "writeback", "-d", "16", "-c", str(count), "-s", size,
                                "-S", "192k", f"--pattern={pattern}", "-f", "raw", target],
                               capture_output=True, text=True, timeout=QEMU_TIMEOUT)
        assert bench.returncode == 0, bench.stderr
    assert service.stop() == "stopped"
    logs = all_logs(disk)
    assert sum(log.records for log in logs) == 310
    replay_logs(original, logs, first_generation=1)
    assert data_of(original) == data_of(disk)


def test_the_nbd_benchmark_runs_small(tmp_path):
    """Timings are never asserted: they depend on the machine."""
    results = benchmark_nbd(disk_mib=16, total_mib=16, rounds=1, directory=tmp_path)
    for size in ("64k", "1024k"):
        assert set(results[size]) == {"raw_file_mb_s", "qemu_nbd_mb_s", "tracker_service_mb_s", "tracker_vs_qemu_nbd"}
        assert all(value > 0 for value in results[size].values())
    assert list(tmp_path.iterdir()) == []  # everything it made is gone
