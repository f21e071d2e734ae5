"""The protected host driver and the guest workload, on real disk images, real processes and qemu-img.

The central check: the workload's writes, replayed from the sealed replication logs onto copies of the
disks taken when tracking began, reproduce the disks byte for byte; so no write bypassed the tracker.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from datapath.disk import create_disk, open_disk
from datapath.errors import (
    DiskFormatError,
    DiskNotFoundError,
    NonRecoverableError,
    PathOutsideRootError,
    RecoverableError,
    SizeMismatchError,
)
from datapath.replog import apply_log
from datapath.tracker import NotTrackedError, ReplicationTracker
from sites.host import (
    DiskProtectedError,
    Host,
    InvalidNameError,
    NetworkAdapter,
    NetworkConfigError,
    QuiesceError,
    VmExistsError,
    VmManifestError,
    VmNotFoundError,
    VmRunningError,
    VmSpecError,
    WorkloadStop,
)

MiB = 1 << 20
MB = 1_000_000
BAD_NAMES = ["", ".", "..", "../x", "a/b", "/abs", ".hidden", "-dash", "a\\b", "a b", "a\x00b", "é", "x" * 65]


def qemu_info(path: Path, fmt: str) -> dict:
    """qemu-img's view of an image; the format is given since qemu only probes VHDs by a header, which
    a fixed VHD lacks (its footer is at the end)."""
    result = subprocess.run(["qemu-img", "info", "--output=json", "-f", fmt, str(path)], capture_output=True,
                            text=True, timeout=30, check=True)
    return json.loads(result.stdout)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return Host(tmp_path / "host", "hv01")


@pytest.fixture
def tracked_vm(host: Host):
    """A 2-disk VM (fixed VHD and raw) with initial content, under the tracker; shut down afterwards."""
    vm = host.create_vm("app01", [("os", 16 * MiB, "vhd"), ("data", 8 * MiB, "raw")])
    host.write_initial_data(vm, seed=1, fraction=0.5)
    host.enable_tracking(vm)
    yield vm
    host.shut_down(vm, timeout=5)


# ---- VMs -----------------------------------------------------------------------------------------
def test_create_get_list_delete_vm_with_raw_and_vhd_disks(host: Host):
    vm = host.create_vm("app01", [("os", 16 * MiB, "vhd"), ("data", "8M", "raw")], networks=("corp", "dmz"))

    assert vm.state == "off" and vm.generation == 1 and vm.host == "hv01"
    assert uuid.UUID(vm.id).version == 4
    assert [(a.name, a.vm_network) for a in vm.network_adapters] == [("nic0", "corp"), ("nic1", "dmz")]
    os_disk, data_disk = vm.disks
    assert (os_disk.name, os_disk.file, os_disk.size, os_disk.format) == ("os", "os.vhd", 16 * MiB, "vhd")
    assert (data_disk.name, data_disk.file, data_disk.size, data_disk.format) == ("data", "data.raw", 8 * MiB, "raw")
    assert os_disk.id != data_disk.id and all(uuid.UUID(d.id) for d in vm.disks)
    assert vm.path == host.root / "vms" / "app01"

    # qemu-img, an independent reader, agrees on format and virtual size; the images are sparse.
    assert qemu_info(os_disk.path, "vpc")["virtual-size"] == 16 * MiB
    assert qemu_info(data_disk.path, "raw")["virtual-size"] == 8 * MiB
    assert os_disk.path.stat().st_size == 16 * MiB + 512
    assert all(d.path.stat().st_blocks * 512 <= 64 * 1024 for d in vm.disks)

    manifest = json.loads((vm.path / "vm.json").read_text())
    assert manifest["name"] == "app01" and manifest["id"] == vm.id and manifest["state"] == "off"
    assert [d["file"] for d in manifest["disks"]] == ["os.vhd", "data.raw"]
    assert manifest["network_adapters"] == [
        {"name": "nic0", "vm_network": "corp"}, {"name": "nic1", "vm_network": "dmz"}]

    assert host.get_vm("app01") == vm
    assert Host(host.root, "hv01").get_vm("app01") == vm  # the manifest is the whole truth
    other = host.create_vm("web02", [("os", 4 * MiB, "raw")], networks=(), generation=2)
    (host.vms_dir / ".creating-x-1").mkdir()  # an interrupted create is not a VM
    assert [v.name for v in host.list_vms()] == ["app01", "web02"]
    assert other.generation == 2 and other.network_adapters == []

    before = tree(host.root)
    with pytest.raises(VmExistsError, match="app01.*hv01"):
        host.create_vm("app01", [("os", 4 * MiB, "raw")])
    assert tree(host.root) == before

    host.delete_vm("app01")
    assert not vm.path.exists()
    assert [v.name for v in host.list_vms()] == ["web02"]
    with pytest.raises(VmNotFoundError):
        host.get_vm("app01")


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_bad_names_are_refused_and_nothing_is_created(tmp_path: Path, bad: str):
    root = tmp_path / "host"
    with pytest.raises(InvalidNameError, match="invalid host name"):
        Host(root, bad)
    host = Host(root, "hv01")
    attempts = [
        (lambda: host.create_vm(bad, [("os", MiB, "raw")]), "VM"),
        (lambda: host.create_vm("vm1", [(bad, MiB, "raw")]), "disk"),
        (lambda: host.create_vm("vm1", [("os", MiB, "raw")], networks=(bad,)), "network"),
        (lambda: host.get_vm(bad), "VM"),
        (lambda: host.delete_vm(bad), "VM"),
        (lambda: host.start_workload(bad), "VM"),
    ]
    for attempt, kind in attempts:
        with pytest.raises(InvalidNameError, match=f"invalid {kind} name") as caught:
            attempt()
        assert isinstance(caught.value, PathOutsideRootError) and isinstance(caught.value, NonRecoverableError)
    assert not root.exists()


def test_paths_escaping_the_root_are_refused(host: Host, tmp_path: Path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.raw").write_bytes(b"\1" * MiB)
    host.vms_dir.mkdir(parents=True)
    (host.vms_dir / "escape").symlink_to(outside)
    with pytest.raises(PathOutsideRootError, match="outside host 'hv01' root"):
        host.create_vm("escape", [("victim", MiB, "raw")])
    with pytest.raises(PathOutsideRootError):
        host.get_vm("escape")
    assert tree(outside) == ["victim.raw"] and (outside / "victim.raw").read_bytes() == b"\1" * MiB

    # A manifest is input too: a disk file naming a path elsewhere, or a link out, is refused.
    vm = host.create_vm("app01", [("os", MiB, "raw")])
    manifest = json.loads((vm.path / "vm.json").read_text())
    for file in ("../../../outside/victim.raw", "victim.raw"):
        manifest["disks"][0]["file"] = file
        (vm.path / "vm.json").write_text(json.dumps(manifest))
        if file == "victim.raw":
            (vm.path / "victim.raw").symlink_to(outside / "victim.raw")
        with pytest.raises(VmManifestError, match="app01.*hv01"):
            host.get_vm("app01")
    assert (outside / "victim.raw").read_bytes() == b"\1" * MiB


@pytest.mark.parametrize("disks, kwargs, message", [
    ([], {}, "at least one disk"),
    ([("os", MiB, "raw"), ("os", MiB, "vhd")], {}, "used twice"),
    ([("os", MiB, "vhdx")], {}, "format must be raw or vhd"),
    ([("os", MiB + 512, "raw")], {}, "whole number of MiB"),
    ([("os", 0, "raw")], {}, "whole number of MiB"),
    ([("os", 1 << 50, "raw")], {}, "at most 8388607 MiB"),  # past the replica's VHD (and ext4's largest file)
    ([("os", "99999999999999T", "raw")], {}, "at most 8388607 MiB"),  # past what ftruncate takes
    ([("d" * 61, MiB, "raw")], {}, "at most 60 characters"),  # its file "ddd...d.raw" would not read back
    ([("os", "lots", "raw")], {}, "invalid size"),
    ([("os", MiB, "raw")], {"generation": 3}, "generation must be 1 or 2"),
])
def test_bad_vm_definitions_are_refused_and_nothing_is_created(host: Host, disks, kwargs, message):
    with pytest.raises(VmSpecError, match=message):
        host.create_vm("vm1", disks, **kwargs)
    assert tree(host.root) == []


def test_unknown_vm_and_disk_errors_name_them(host: Host):
    for call in (lambda: host.get_vm("ghost"), lambda: host.delete_vm("ghost"),
                 lambda: host.start_workload("ghost"), lambda: host.stop_workload("ghost"),
                 lambda: host.enable_tracking("ghost")):
        with pytest.raises(VmNotFoundError, match="VM 'ghost' not found on host 'hv01'") as caught:
            call()
        assert isinstance(caught.value, NonRecoverableError)
    host.create_vm("app01", [("os", MiB, "raw")])
    with pytest.raises(DiskNotFoundError, match="VM 'app01' on host 'hv01' has no disk 'swap'"):
        host.tracker("app01", "swap")
    with pytest.raises(NotTrackedError, match="disk 'os' of VM 'app01' on host 'hv01' is not tracked"):
        host.tracker("app01", "os")


# ---- initial content -----------------------------------------------------------------------------
def test_initial_data_fills_the_fraction_in_mib_extents_and_is_reproducible(host: Host, tmp_path: Path):
    vm = host.create_vm("app01", [("os", 32 * MiB, "vhd"), ("data", 32 * MiB, "raw")])
    twin = host.create_vm("app02", [("os", 32 * MiB, "vhd"), ("data", 32 * MiB, "raw")])
    assert host.write_initial_data(vm, seed=5, fraction=0.25) == {"os": 8 * MiB, "data": 8 * MiB}
    host.write_initial_data(twin, seed=5, fraction=0.25)

    for disk, twin_disk in zip(vm.disks, twin.disks, strict=True):
        with open_disk(disk.path) as image:
            extents = list(image.data_extents())
        assert sum(length for _, length in extents) == 8 * MiB
        assert all(offset % MiB == 0 and length % MiB == 0 for offset, length in extents)
        data = disk.path.read_bytes()[: disk.size]
        for offset, length in extents:
            assert all(data[o : o + MiB] != bytes(MiB) for o in range(offset, offset + length, MiB))
        assert twin_disk.path.read_bytes()[: disk.size] == data  # same seed and disk name, same content
    # qemu-img reads the VHD's data where we wrote it: the image stays a valid fixed VHD.
    converted = tmp_path / "os-converted.raw"
    subprocess.run(["qemu-img", "convert", "-f", "vpc", "-O", "raw", str(vm.disks[0].path), str(converted)],
                   check=True, timeout=60)
    assert converted.read_bytes() == vm.disks[0].path.read_bytes()[: 32 * MiB]

    host.enable_tracking(vm)
    hashes = [sha256_of(d.path) for d in vm.disks]
    with pytest.raises(DiskProtectedError, match="os, data are tracked"):
        host.write_initial_data(vm, seed=6)
    assert [sha256_of(d.path) for d in vm.disks] == hashes


# ---- tracking and the workload -------------------------------------------------------------------
def test_enable_tracking_is_idempotent_and_uses_the_disk_ids(host: Host):
    vm = host.create_vm("app01", [("os", 4 * MiB, "vhd"), ("data", 4 * MiB, "raw")])
    assert [d.name for d in host.enable_tracking(vm)] == ["os", "data"]
    assert host.enable_tracking(vm) == []
    for disk in vm.disks:
        assert host.is_tracked(vm, disk)
        with host.tracker(vm, disk) as tracker:
            assert tracker.disk_id == uuid.UUID(disk.id).bytes


def replay_logs_onto(baseline: Path, host: Host, vm, disk) -> tuple[int, int]:
    """Seal the disk's log, apply every sealed log onto `baseline`; return (records, data bytes)."""
    with host.tracker(vm, disk) as tracker:
        tracker.seal()
        logs = tracker.pending_logs()
        disk_id = tracker.disk_id
    with open_disk(baseline, writable=True) as replica:
        for log in logs:
            apply_log(log.path, replica, expected_generation=log.generation, disk_id=disk_id, disk_name=disk.name)
    return sum(log.records for log in logs), sum(log.data_bytes for log in logs)


def test_workload_writes_through_the_tracker_at_the_rate_and_stops_cleanly(host: Host, tracked_vm, tmp_path: Path):
    vm = tracked_vm
    baselines = {d.name: tmp_path / f"baseline-{d.file}" for d in vm.disks}
    for disk in vm.disks:
        shutil.copyfile(disk.path, baselines[disk.name])
    before = {d.name: sha256_of(d.path) for d in vm.disks}

    rate_mb_s = 3.0
    pid = host.start_workload(vm, rate_mb_s=rate_mb_s, write_sizes=(4096, 65536), seed=7)
    assert host.workload_running(vm) and host.get_vm("app01").state == "running"
    assert json.loads((vm.path / "workload.pid").read_text())["pid"] == pid
    assert host.start_workload(vm) == pid  # already running: left as it is
    with pytest.raises(VmRunningError):
        host.delete_vm("app01")
    time.sleep(1.5)

    # Another agent process (here another Host on the same root) finds the workload by its pid file.
    other_agent = Host(host.root, "hv01")
    assert other_agent.workload_running(vm)
    started = time.monotonic()
    assert other_agent.stop_workload(vm, timeout=10) is WorkloadStop.STOPPED
    assert time.monotonic() - started < 2.0
    assert not host.workload_running(vm) and not (vm.path / "workload.pid").exists()
    assert host.stop_workload(vm) is WorkloadStop.NOT_RUNNING
    assert host.get_vm("app01").state == "running"  # the guest idles; shut_down turns it off

    stats = host.workload_stats(vm)
    assert stats["stopped_by"] == "SIGTERM" and stats["error"] is None and stats["seed"] == 7
    expected = rate_mb_s * MB * stats["seconds"]
    assert 0.3 * expected <= stats["bytes"] <= 1.5 * expected, (stats["bytes"], expected)

    for disk in vm.disks:
        per_disk = stats["disks"][str(disk.path)]
        assert per_disk["writes"] > 0, f"no writes reached disk {disk.name}"
        assert sha256_of(disk.path) != before[disk.name]
        records, data_bytes = replay_logs_onto(baselines[disk.name], host, vm, disk)
        assert (records, data_bytes) == (per_disk["writes"], per_disk["bytes"])
        assert baselines[disk.name].read_bytes() == disk.path.read_bytes(), f"disk {disk.name} has untracked writes"

    assert host.shut_down(vm) is WorkloadStop.NOT_RUNNING and host.get_vm("app01").state == "off"


def test_stop_kills_a_workload_that_does_not_exit_in_time(host: Host, tracked_vm, tmp_path: Path):
    vm = tracked_vm
    baselines = {d.name: tmp_path / f"baseline-{d.file}" for d in vm.disks}
    for disk in vm.disks:
        shutil.copyfile(disk.path, baselines[disk.name])
    pid = host.start_workload(vm, rate_mb_s=0, write_sizes=(512, 256 * 1024), seed=9)
    time.sleep(0.3)
    os.kill(pid, signal.SIGSTOP)  # a stopped process cannot act on SIGTERM, only die of SIGKILL

    started = time.monotonic()
    assert host.stop_workload(vm, timeout=0.5) is WorkloadStop.KILLED
    assert 0.5 <= time.monotonic() - started < 3.0
    assert not host.workload_running(vm) and host.workload_stats(vm) is None

    # Killed anywhere in a write, the tracker still holds the disk and its logs in step.
    for disk in vm.disks:
        replay_logs_onto(baselines[disk.name], host, vm, disk)
        assert baselines[disk.name].read_bytes() == disk.path.read_bytes(), f"disk {disk.name} out of step"


def test_workload_refuses_untracked_disks(host: Host, tmp_path: Path):
    vm = host.create_vm("app01", [("os", 4 * MiB, "raw"), ("data", 4 * MiB, "raw")])
    stats_file = tmp_path / "stats.json"
    result = subprocess.run(
        [sys.executable, "-m", "sites.workload", "--disk", str(vm.disks[0].path), "--duration", "5",
         "--stats", str(stats_file)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0
    assert f"disk {vm.disks[0].path} is not enabled for replication tracking" in result.stderr
    assert "break replication" in result.stderr
    assert not stats_file.exists() and vm.disks[0].path.read_bytes() == bytes(4 * MiB)

    ReplicationTracker.enable(vm.disks[0].path).close()
    with pytest.raises(NotTrackedError, match="VM 'app01' on host 'hv01': disks data are not tracked"):
        host.start_workload(vm)
    assert not host.workload_running(vm) and host.get_vm("app01").state == "off"
    assert not (vm.path / "workload.pid").exists()


def test_workload_command_line_duration_and_bad_sizes(host: Host, tracked_vm, tmp_path: Path):
    disk = tracked_vm.disks[1]
    stats_file = tmp_path / "stats.json"
    command = [sys.executable, "-m", "sites.workload", "--disk", str(disk.path), "--stats", str(stats_file)]
    result = subprocess.run(command + ["--rate", "0", "--duration", "0.5", "--min-size", "512",
                                       "--max-size", "8192", "--seed", "3"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    stats = json.loads(stats_file.read_text())
    assert stats["stopped_by"] == "duration" and stats["writes"] > 0 and 0.5 <= stats["seconds"] < 1.5
    assert stats["disks"][str(disk.path)]["bytes"] == stats["bytes"]

    for sizes in (["--min-size", "1000"], ["--min-size", "8192", "--max-size", "4096"], ["--min-size", "0"]):
        result = subprocess.run(command + sizes, capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and "multiples of 512" in result.stderr
    with pytest.raises(ValueError, match="multiples of 512"):
        host.start_workload(tracked_vm, write_sizes=(1000, 4096))


# ---- network adapters ----------------------------------------------------------------------------
def test_adapter_subnet_and_public_ip_round_trip_through_the_manifest(host: Host):
    vm = host.create_vm("app01", [("os", MiB, "raw")], networks=("corp", "dmz"))
    assert [(a.subnet, a.public_ip) for a in vm.network_adapters] == [(None, None), (None, None)]

    connected = host.connect_adapter(vm, "nic0", "recovery-corp", "10.20.0.0/24")
    assert (connected.name, connected.vm_network, connected.subnet, connected.public_ip) == (
        "nic0", "recovery-corp", "10.20.0.0/24", None)
    addressed = host.assign_public_ip("app01", "nic0", "20.50.1.2")
    assert (addressed.vm_network, addressed.subnet, addressed.public_ip) == (
        "recovery-corp", "10.20.0.0/24", "20.50.1.2")
    host.assign_public_ip(vm, "nic1", "2001:DB8:0:0::0001")  # stored canonical

    # Another agent reading the manifest sees the same adapters; an adapter without the new fields
    # is written as before, so older readers of vm.json are unaffected.
    reread = Host(host.root, "hv01").get_vm("app01")
    assert [(a.name, a.vm_network, a.subnet, a.public_ip) for a in reread.network_adapters] == [
        ("nic0", "recovery-corp", "10.20.0.0/24", "20.50.1.2"), ("nic1", "dmz", None, "2001:db8::1")]
    manifest = json.loads((vm.path / "vm.json").read_text())
    assert manifest["network_adapters"] == [
        {"name": "nic0", "vm_network": "recovery-corp", "subnet": "10.20.0.0/24", "public_ip": "20.50.1.2"},
        {"name": "nic1", "vm_network": "dmz", "public_ip": "2001:db8::1"}]

    # Reconnecting keeps the public IP; no subnet detaches it from its subnet; repeating is harmless.
    host.connect_adapter(vm, "nic0", "corp")
    assert host.get_vm("app01").adapter("nic0") == NetworkAdapter("nic0", "corp", None, "20.50.1.2")
    before = (vm.path / "vm.json").read_bytes()
    host.connect_adapter(vm, "nic0", "corp")
    assert (vm.path / "vm.json").read_bytes() == before


@pytest.mark.parametrize("ip", ["", "abc", "300.1.2.3", "1.2.3", "10.0.0.1/32", "0.0.0.0", "::", "127.0.0.1",
                                "::1", "224.0.0.9", "169.254.10.1", "fe80::1", " 20.1.1.1"])
def test_invalid_public_ips_and_subnets_are_refused_and_change_nothing(host: Host, ip: str):
    vm = host.create_vm("app01", [("os", MiB, "raw")], networks=("corp",))
    before = (vm.path / "vm.json").read_bytes()
    with pytest.raises(NetworkConfigError,
                       match=f"VM 'app01' on host 'hv01', adapter 'nic0': {re.escape(repr(ip))}") as caught:
        host.assign_public_ip(vm, "nic0", ip)
    assert isinstance(caught.value, NonRecoverableError)
    for subnet in ("10.20.0.5/24", "10.20.0.0/33", "corp-subnet", "", "2001:db8::1/64"):
        with pytest.raises(NetworkConfigError,
                           match="adapter 'nic0' of VM 'app01': subnet .* is not a network in CIDR"):
            host.connect_adapter(vm, "nic0", "corp", subnet)
    with pytest.raises(NetworkConfigError, match="VM 'app01' on host 'hv01' has no network adapter 'nic7' .*nic0"):
        host.assign_public_ip(vm, "nic7", "20.1.1.1")
    with pytest.raises(NetworkConfigError, match="no network adapter 'nic7'"):
        host.connect_adapter(vm, "nic7", "corp")
    with pytest.raises(InvalidNameError, match="invalid network name"):
        host.connect_adapter(vm, "nic0", "../corp")
    assert (vm.path / "vm.json").read_bytes() == before


def test_manifest_with_a_bad_adapter_address_or_quiesce_command_is_refused(host: Host):
    vm = host.create_vm("app01", [("os", MiB, "raw")], networks=("corp",))
    good = json.loads((vm.path / "vm.json").read_text())
    for damage in (lambda m: m["network_adapters"][0].update(public_ip="999.1.1.1"),
                   lambda m: m["network_adapters"][0].update(subnet="10.0.0.1/8"),
                   lambda m: m.update(quiesce={"pre": "sync", "post": None}),
                   lambda m: m.update(quiesce={"pre": [], "post": None}),
                   lambda m: m.update(quiesce=["sync"])):
        manifest = json.loads(json.dumps(good))
        damage(manifest)
        (vm.path / "vm.json").write_text(json.dumps(manifest))
        with pytest.raises(VmManifestError, match="app01.*hv01"):
            host.get_vm("app01")


def test_start_vm_marks_it_running_without_a_workload(host: Host):
    vm = host.create_vm("app01", [("os", MiB, "raw")])
    assert host.start_vm(vm).state == "running" and host.get_vm("app01").state == "running"
    assert host.start_vm("app01").state == "running"  # idempotent
    assert not host.workload_running(vm)
    with pytest.raises(VmRunningError):
        host.delete_vm("app01")
    assert host.shut_down(vm) is WorkloadStop.NOT_RUNNING and host.get_vm("app01").state == "off"


# ---- failback staging ----------------------------------------------------------------------------
def test_replace_disk_refuses_bad_staging_and_a_running_or_tracked_vm_changing_nothing(host: Host, tmp_path: Path):
    vm = host.create_vm("app01", [("os", 4 * MiB, "vhd"), ("data", 4 * MiB, "raw")])
    host.write_initial_data(vm, seed=3, fraction=0.5)
    os_disk, data_disk = vm.disks
    staging = host.staging_path(vm, "os")
    assert staging == vm.path / ".os.vhd.failback"
    assert host.staging_path("app01", data_disk) == vm.path / ".data.raw.failback"
    with pytest.raises(DiskNotFoundError, match="no disk 'swap'"):
        host.staging_path(vm, "swap")
    disks_before = [sha256_of(d.path) for d in vm.disks]

    def refused(error: type[Exception], message: str, staging_image: Path) -> None:
        files = tree(host.root)
        with pytest.raises(error, match=message) as caught:
            host.replace_disk(vm, "os", staging_image)
        assert isinstance(caught.value, NonRecoverableError)
        assert [sha256_of(d.path) for d in vm.disks] == disks_before and tree(host.root) == files

    create_disk(staging, 8 * MiB, "vhd")
    refused(SizeMismatchError, "disk 'os' of VM 'app01' on host 'hv01': staging image .* is 8388608 bytes", staging)
    staging.unlink()
    create_disk(staging, 4 * MiB, "raw")
    refused(DiskFormatError, "disk 'os' of VM 'app01' on host 'hv01': staging image .* is raw, the disk is vhd",
            staging)
    staging.unlink()
    create_disk(staging, 4 * MiB, "vhd")
    outside = tmp_path / ".elsewhere.failback"
    create_disk(outside, 4 * MiB, "vhd")
    (vm.path / ".link.failback").symlink_to(outside)
    for wrong in (outside, vm.path / ".link.failback"):
        refused(PathOutsideRootError, "outside host 'hv01' root", wrong)
    for wrong in (vm.path / "data.raw", vm.path / "vm.json", Path("data.raw"), vm.path / ".os.vhd.failback.tmp"):
        refused(PathOutsideRootError,
                "disk 'os' of VM 'app01' on host 'hv01': staging image .* must be a staging file", wrong)
    host.start_vm(vm)
    refused(VmRunningError, "disk 'os' of VM 'app01' on host 'hv01': the VM is running", staging)
    host.shut_down(vm)
    host.enable_tracking(vm)
    refused(DiskProtectedError, "disk 'os' of VM 'app01' on host 'hv01' is tracked", staging)

    with host.tracker(vm, "os") as tracker:
        tracker.disable()
    assert host.replace_disk(vm, "os", staging) is True
    assert not staging.exists() and os_disk.path.read_bytes()[: 4 * MiB] == bytes(4 * MiB)
    with open_disk(os_disk.path) as swapped:
        assert (swapped.format, swapped.size) == ("vhd", 4 * MiB)
    assert host.replace_disk(vm, "os", staging) is False  # a rerun after the swap
    host.discard_staging(vm, "os")  # nothing staged: harmless
    assert sha256_of(data_disk.path) == disks_before[1]


# ---- quiesce -------------------------------------------------------------------------------------
def disk_state(vm) -> dict[str, tuple[str, int]]:
    """Each disk's bytes (hashed) and its active replication log's size."""
    return {d.name: (sha256_of(d.path), d.path.with_name(d.path.name + ".hrl").stat().st_size) for d in vm.disks}


def wait_for(condition, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def recorder(path: Path, extra: str = "") -> list[str]:
    """A command appending its environment and the active log sizes it sees to `path`."""
    script = (
        "import os, sys, pathlib, json\n"
        "vm_dir = pathlib.Path(os.environ['ASR_VM_DIR'])\n"
        "logs = {p.name: p.stat().st_size for p in sorted(vm_dir.glob('*.hrl'))}\n"
        "entry = [sys.argv[1], os.environ['ASR_VM'], os.environ['ASR_HOST'], str(vm_dir), os.getcwd(), logs]\n"
        "with open(sys.argv[2], 'a') as out: out.write(json.dumps(entry) + '\\n')\n" + extra
    )
    return [sys.executable, "-c", script]


def recorded(path: Path) -> list[list]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_quiesce_holds_every_write_while_frozen_and_runs_pre_and_post(host: Host, tracked_vm, tmp_path: Path):
    vm = tracked_vm
    calls = tmp_path / "calls.jsonl"
    host.set_quiesce_commands(vm, recorder(calls) + ["pre", str(calls)], recorder(calls) + ["post", str(calls)])
    assert host.get_vm("app01").quiesce_pre[-2:] == ("pre", str(calls))
    host.start_workload(vm, rate_mb_s=20, write_sizes=(4096, 65536), seed=11)
    writing = disk_state(vm)
    wait_for(lambda: all(disk_state(vm)[name] != writing[name] for name in writing), 5, "writes to every disk")

    with host.quiesce(vm, timeout=5) as frozen_vm:
        assert frozen_vm.name == "app01" and host.workload_frozen(vm)
        held = disk_state(vm)
        time.sleep(0.5)
        assert disk_state(vm) == held, "a write reached a disk or its log while the VM was quiesced"
        assert [c[0] for c in recorded(calls)] == ["pre"]
    assert [c[0] for c in recorded(calls)] == ["pre", "post"]
    assert not host.workload_frozen(vm) and not (vm.path / "workload.freeze").exists()

    pre, post = recorded(calls)
    assert pre[1:5] == ["app01", "hv01", str(vm.path), str(vm.path)]
    # The pre command ran once the writes were held: the logs it saw are the ones of the frozen window.
    assert pre[5] == {d.file + ".hrl": held[d.name][1] for d in vm.disks}
    wait_for(lambda: all(disk_state(vm)[name] != held[name] for name in held), 5, "writes to resume on every disk")

    assert host.stop_workload(vm) is WorkloadStop.STOPPED
    stats = host.workload_stats(vm)
    assert stats["freezes"] == 1 and stats["frozen_seconds"] >= 0.5 and stats["error"] is None


def test_pre_command_failure_raises_thaws_and_still_runs_post(host: Host, tracked_vm, tmp_path: Path):
    vm = tracked_vm
    calls = tmp_path / "calls.jsonl"
    failing_pre = recorder(calls, "sys.stderr.write('database refused to flush\\n'); sys.exit(3)\n")
    host.set_quiesce_commands(vm, failing_pre + ["pre", str(calls)], recorder(calls) + ["post", str(calls)])
    host.start_workload(vm, rate_mb_s=20, seed=12)
    body_ran = False
    with pytest.raises(QuiesceError) as caught:
        with host.quiesce(vm, timeout=5):
            body_ran = True
    message = str(caught.value)
    assert "VM 'app01' on host 'hv01'" in message and "quiesce pre command" in message and "'pre'" in message
    assert "exited with code 3" in message and "database refused to flush" in message
    assert isinstance(caught.value, RecoverableError) and not body_ran
    assert [c[0] for c in recorded(calls)] == ["pre", "post"]
    assert not host.workload_frozen(vm) and not (vm.path / "workload.freeze").exists()
    after = disk_state(vm)
    wait_for(lambda: all(disk_state(vm)[name] != after[name] for name in after), 5, "the workload to write again")


def test_post_runs_when_the_body_fails_and_a_failing_post_is_reported(host: Host, tracked_vm, tmp_path: Path):
    vm = tracked_vm
    calls = tmp_path / "calls.jsonl"
    host.set_quiesce_commands(vm, None, recorder(calls) + ["post", str(calls)])
    host.start_workload(vm, rate_mb_s=20, seed=13)
    with pytest.raises(RuntimeError, match="snapshot failed"):
        with host.quiesce(vm, timeout=5):
            raise RuntimeError("snapshot failed")
    assert [c[0] for c in recorded(calls)] == ["post"] and not host.workload_frozen(vm)

    # A post that fails after a good body is an error of its own; one after a failed body is a note.
    host.set_quiesce_commands(vm, None, [sys.executable, "-c", "import sys; sys.exit('cannot unlock tables')"])
    with pytest.raises(QuiesceError, match="quiesce post command .*exited with code 1: cannot unlock tables"):
        with host.quiesce(vm, timeout=5):
            pass
    with pytest.raises(RuntimeError, match="snapshot failed") as caught:
        with host.quiesce(vm, timeout=5):
            raise RuntimeError("snapshot failed")
    assert any("cannot unlock tables" in note for note in caught.value.__notes__)
    assert not host.workload_frozen(vm) and not (vm.path / "workload.freeze").exists()
    after = disk_state(vm)
    wait_for(lambda: disk_state(vm) != after, 5, "the workload to write again")


def test_pre_command_overrunning_the_timeout_is_killed(host: Host, tmp_path: Path):
    vm = host.create_vm("app01", [("os", MiB, "raw")])
    child_pid_file = tmp_path / "child.pid"
    script = (f"import os, subprocess, sys, time\n"
              f"child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
              f"open({str(child_pid_file)!r}, 'w').write(str(child.pid))\n"
              f"time.sleep(60)\n")
    host.set_quiesce_commands(vm, [sys.executable, "-c", script], None)
    started = time.monotonic()
    with pytest.raises(QuiesceError, match="quiesce pre command .* did not finish within 0.5 s and was killed"):
        with host.quiesce(vm, timeout=0.5):
            pass
    assert time.monotonic() - started < 3
    wait_for(lambda: not Path(f"/proc/{child_pid_file.read_text()}").exists()
             or "zombie" in Path(f"/proc/{child_pid_file.read_text()}/status").read_text(), 5,
             "the command's own child to be killed with it")


def test_quiesce_without_a_workload_runs_the_commands_only(host: Host, tmp_path: Path):
    vm = host.create_vm("app01", [("os", MiB, "raw")])
    calls = tmp_path / "calls.jsonl"
    host.set_quiesce_commands(vm, recorder(calls) + ["pre", str(calls)], recorder(calls) + ["post", str(calls)])
    with host.quiesce("app01"):
        assert not host.workload_frozen(vm)
    assert [c[0] for c in recorded(calls)] == ["pre", "post"]
    host.set_quiesce_commands(vm, None, None)
    assert "quiesce" not in json.loads((vm.path / "vm.json").read_text())
    with host.quiesce("app01"):
        pass
    assert len(recorded(calls)) == 2
    before = (vm.path / "vm.json").read_bytes()
    for bad in ("sync", [], [""], ["sync", 3], ["sync", "a\x00b"]):
        with pytest.raises(VmSpecError,
                           match="VM 'app01' on host 'hv01': quiesce pre command must be a non-empty list"):
            host.set_quiesce_commands(vm, bad, None)
        with pytest.raises(VmSpecError, match="quiesce post command must be a non-empty list"):
            host.set_quiesce_commands(vm, ["sync"], bad)
    assert (vm.path / "vm.json").read_bytes() == before


def test_quiesce_commands_get_no_credentials_of_the_agent(host: Host, tmp_path: Path, monkeypatch):
    """The agent's environment holds the database and broker URLs, storage credentials and its host key: a
    quiesce command sees none of it, only PATH, LANG and the VM's variables."""
    secrets = {"ASR_DATABASE_URL": "postgresql://asr:db-password-123@db/asr", "ASR_HOST_KEY": "host-key-456789",
               "ASR_AZURE_CONNECTION_STRING": "AccountName=a;AccountKey=c2VjcmV0LWtleQ==;"}
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    vm = host.create_vm("app01", [("os", MiB, "raw")])
    seen = tmp_path / "env.json"
    dump = [sys.executable, "-c", f"import json, os; open({str(seen)!r}, 'w').write(json.dumps(dict(os.environ)))"]
    host.set_quiesce_commands(vm, dump, None)
    with host.quiesce("app01"):
        pass
    env = json.loads(seen.read_text())
    assert set(env) <= {"PATH", "LANG", "ASR_VM", "ASR_HOST", "ASR_VM_DIR", "LC_CTYPE"}, sorted(env)
    assert (env["ASR_VM"], env["ASR_HOST"], env["ASR_VM_DIR"]) == ("app01", "hv01", str(vm.path))
    assert not any(value in seen.read_text() for value in secrets.values())


def test_a_workload_started_during_a_quiesce_starts_frozen(host: Host, tracked_vm):
    vm = tracked_vm
    before = disk_state(vm)
    with host.quiesce(vm, timeout=5):
        host.start_workload(vm, rate_mb_s=20, seed=19)
        wait_for(lambda: host.workload_frozen(vm), 5, "the new workload to acknowledge the freeze")
        time.sleep(0.3)
        held = disk_state(vm)
        assert held == before, "the workload wrote before it saw the freeze"
    wait_for(lambda: disk_state(vm) != held, 5, "the workload to write once thawed")


def test_frozen_workload_stops_promptly_and_a_stuck_one_times_out(host: Host, tracked_vm):
    vm = tracked_vm
    pid = host.start_workload(vm, rate_mb_s=20, seed=14)
    with host.quiesce(vm, timeout=5):
        started = time.monotonic()
        assert host.stop_workload(vm, timeout=5) is WorkloadStop.STOPPED
        assert time.monotonic() - started < 1.0
    assert host.workload_stats(vm)["stopped_by"] == "SIGTERM"

    # A workload that cannot answer (here stopped by SIGSTOP) makes the quiesce fail, not hang.
    pid = host.start_workload(vm, rate_mb_s=20, seed=15)
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(QuiesceError,
                           match=f"VM 'app01' on host 'hv01': its workload \\(pid {pid}\\) did not acknowledge"):
            with host.quiesce(vm, timeout=0.5):
                pass
        assert time.monotonic() - started < 2
        assert not (vm.path / "workload.freeze").exists()
    finally:
        os.kill(pid, signal.SIGCONT)
    after = disk_state(vm)
    wait_for(lambda: disk_state(vm) != after, 5, "the workload to write again")


def test_one_quiesce_at_a_time(host: Host, tracked_vm):
    vm = tracked_vm
    host.start_workload(vm, rate_mb_s=5, seed=16)
    with host.quiesce(vm, timeout=5):
        started = time.monotonic()
        with pytest.raises(QuiesceError, match="another quiesce has held it for over 0.3 s"):
            with Host(host.root, "hv01").quiesce(vm, timeout=0.3):
                pass
        assert 0.3 <= time.monotonic() - started < 2
        assert host.workload_frozen(vm)  # the refused attempt did not thaw the one in progress
    assert not host.workload_frozen(vm)


def test_a_quiescer_that_dies_does_not_leave_the_workload_frozen(host: Host, tracked_vm):
    vm = tracked_vm
    host.start_workload(vm, rate_mb_s=20, seed=17)
    agent = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\n"
         "from sites.host import Host\n"
         f"with Host({str(host.root)!r}, 'hv01').quiesce('app01', timeout=5):\n"
         "    print('frozen', flush=True)\n"
         "    time.sleep(60)\n"],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1],
    )
    try:
        assert agent.stdout.readline().strip() == "frozen"
        held = disk_state(vm)
        time.sleep(0.3)
        assert disk_state(vm) == held and host.workload_frozen(vm)
    finally:
        agent.kill()
        agent.wait()
    assert (vm.path / "workload.freeze").exists()  # the dead agent's request is still there...
    wait_for(lambda: disk_state(vm) != held, 5, "the workload to resume on its own")  # ...and ignored
    assert not host.workload_frozen(vm)

    # A workload started later does not start frozen by the abandoned request either.
    host.stop_workload(vm)
    (vm.path / "workload.freeze").write_text("abandoned")
    host.start_workload(vm, rate_mb_s=20, seed=18)
    assert not (vm.path / "workload.freeze").exists()
    after = disk_state(vm)
    wait_for(lambda: disk_state(vm) != after, 5, "the new workload to write")
