"""Real VMs end to end: QEMU guests (TCG) whose disks are served through the replication tracker over NBD,
protected, replicated while the guest writes files to ext4, failed over and booted at the recovery site.

The guest is the project's test guest (sites/guest): its init checks its own SHA-256 manifest of the files
it wrote and prints the verdict before its heartbeat. It boots from its kernel file, or (the OS-disk case)
from a bootable disk of its own that is replicated like its data disk. Each test checks data three ways: the guest's own
check after the boot at the recovery site, `e2fsck -fn` of the recovery disk, and the disks byte for byte.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
from recovery_site import RecoverySite
from sqlmodel import select

from api import service
from models.db import session_scope
from models.fabric import Host as HostRow
from models.fabric import VirtualMachine as VmRow
from models.fabric import import_vm_manifest
from models.failover import FailoverKind, FailoverRecord, FailoverStatus
from models.protection import InvalidStateError, ProtectedItem
from sites.guest import files_written as guest_files_written
from sites.guest import make_boot_disk, make_data_disk
from sites.host.guestdef import GuestDefinition
from sites.host.processes import process_start_ticks
from sites.host.trackerservice import PID_FILE
from sites.localservices import wait_until
from workflows import kinds
from workflows.engine import ItemBusyError, cancel
from workflows.kinds.delta_replication import start as start_delta_replication

pytestmark = pytest.mark.slow
JOB_TIMEOUT = 240
DATA_DISK = 64 * 1024 * 1024
BOOT_DISK_VM_DATA = 16 * 1024 * 1024


def guest_definition(image: Any, *, heartbeat: str | None = None, boot_timeout_s: float = 120.0,
                     workload_kib_s: int = 256, agent: bool = True) -> GuestDefinition:
    cmdline = f"{image.cmdline} asr.workload={workload_kib_s}" + ("" if agent else " asr.agent=0")
    return GuestDefinition(
        kernel=image.kernel, initrd=image.initrd, cmdline=cmdline,
        heartbeat=heartbeat or image.heartbeat, check_pass=image.check_pass, check_fail=image.check_fail,
        guest_agent=agent, boot_timeout_s=boot_timeout_s,
    )


def create_guest_vm(site: RecoverySite, image: Any, name: str = "web01", **options: Any) -> str:
    """A QEMU guest VM on host1 with one ext4 data disk, registered; returns its id."""
    driver = site.host("host1")
    images = driver.root / "images"
    images.mkdir(parents=True, exist_ok=True)
    for source in (image.kernel_path, image.initrd_path):
        if not (images / source.name).exists():
            shutil.copy(source, images / source.name)
    data = images / f"{name}-data.raw"
    make_data_disk(data, DATA_DISK)
    definition = guest_definition(image, **options)
    vm = driver.create_vm(name, [("data", None, "raw")], guest=definition, images={"data": data},
                          boot_files={f: images / f for f in definition.boot_files})
    with session_scope() as session:
        host_row = session.exec(select(HostRow).where(HostRow.name == "host1")).one()
        vm_id = import_vm_manifest(session, host_row, vm.to_manifest()).id
    site.vm_hosts[vm_id] = "host1"
    return vm_id


def create_boot_disk_vm(site: RecoverySite, image: Any, name: str, *, write_files: int) -> str:
    """A QEMU guest VM on host1 booting from its disk `os` (a copy of the guest's boot disk whose command line
    has it write `write_files` files), with an ext4 data disk, created and registered as an operator does
    (`asr vm create ... --disk os=@... --boot-disk os`); returns its id."""
    images = site.host("host1").root / "images"
    images.mkdir(parents=True, exist_ok=True)
    make_boot_disk(images / f"{name}-os.raw", image, f"asr.write_files={write_files}")
    make_data_disk(images / f"{name}-data.raw", BOOT_DISK_VM_DATA)
    created = service.create_vm(
        "host1", name, disks=[{"name": "os", "image": str(images / f"{name}-os.raw")},
                              {"name": "data", "image": str(images / f"{name}-data.raw")}],
        guest={"boot_disk": "os", "heartbeat": image.heartbeat, "check_pass": image.check_pass,
               "check_fail": image.check_fail})
    site.vm_hosts[created["id"]] = "host1"
    return created["id"]


def qemu_command(driver, vm_name: str) -> list[str]:
    """The command line of the QEMU running the VM, as the kernel reports it."""
    pid = recovery_pid(driver, driver.get_vm(vm_name))
    return Path(f"/proc/{pid}/cmdline").read_text().split("\0")


def boots_from_disk(command: list[str], disk: str) -> bool:
    """QEMU was started without a kernel file and its BIOS boots the drive serving `disk` over NBD."""
    boot_devices = [arg for arg in command if arg.startswith("virtio-blk-pci,") and "bootindex=0" in arg]
    assert len(boot_devices) == 1, command
    node = boot_devices[0].split("drive=")[1].split(",")[0]
    served = [json.loads(arg) for arg in command if arg.startswith("{") and f'"node-name": "{node}"' in arg]
    return ("-kernel" not in command and "-append" not in command and f"serial={disk}" in boot_devices[0]
            and len(served) == 1 and served[0]["file"]["driver"] == "nbd" and served[0]["file"]["export"] == disk)


def latest_record(item_id: str, kind: FailoverKind) -> FailoverRecord:
    with session_scope() as session:
        return session.exec(select(FailoverRecord).where(
            FailoverRecord.item_id == item_id, FailoverRecord.kind == kind,
        ).order_by(FailoverRecord.started_at.desc())).first()


def e2fsck(path: Path) -> None:
    result = subprocess.run(["e2fsck", "-fn", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"e2fsck -fn {path} failed:\n{result.stdout}\n{result.stderr}"


def files_written(site: RecoverySite, host: str, vm: str) -> int:
    """How many files the guest says it wrote (its workload's console lines)."""
    driver = site.host(host)
    return guest_files_written(driver.console_log(driver.get_vm(vm)))


@pytest.fixture
def guest_site(tmp_path: Path):
    with RecoverySite(tmp_path, recovery_host_names=("dr1",)) as site:
        try:
            yield site
        finally:
            for host in ("host1", "dr1"):
                driver = site.host(host)
                for vm in driver.list_vms():
                    driver.shut_down(vm.name, timeout=5)


def process_ended(pid: int) -> bool:
    """Gone, or a zombie (it exited; the worker process that started it reaps it later)."""
    return process_start_ticks(pid) is None


def recovery_pid(driver, vm) -> int:
    from sites.host.qemu import QemuRuntime
    return QemuRuntime().pid(driver.run_dir(vm))


def due_app_consistent(site: RecoverySite, vm_id: str) -> None:
    """Make the next Ship step take an application-consistent point."""
    with session_scope() as session:
        item = session.get(ProtectedItem, site.item_id(vm_id))
        item.next_app_consistent_at = None
        session.add(item)


def passed_files(detail: str | None) -> int:
    """The file count of an `ASR-CHECK: PASS <n> files` line."""
    assert detail and "PASS" in detail, detail
    return int(detail.split("PASS")[1].split()[0])


def isolated_then_cleaned_up(site: RecoverySite, item_id: str, drill, primary_vm: str) -> None:
    """The drill's test VM runs with no route out while the primary keeps running; its cleanup removes
    the test VM and ends its QEMU."""
    primary, recovery = site.host("host1"), site.host("dr1")
    pid = recovery_pid(recovery, recovery.get_vm(drill.target_vm))
    command = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
    assert any("restrict=on" in arg for arg in command), f"a drill's guest has no route out: {command}"
    assert primary.power_state(primary_vm) == "running", "a drill leaves the primary running"
    site.wait_job(site.when_free(lambda: kinds.test_failover_cleanup.start(item_id)), JOB_TIMEOUT)
    assert drill.target_vm not in [vm.name for vm in recovery.list_vms()]
    wait_until(lambda: process_ended(pid), timeout=10, what=f"the test VM's QEMU ({pid}) to end")


def planned_failover_that_booted(site: RecoverySite, item_id: str):
    """A planned failover of the item, which succeeded, verified, and whose recovery VM booted and passed
    its check; its record."""
    job = site.wait_job(site.when_free(lambda: kinds.planned_failover.start(item_id)), JOB_TIMEOUT)
    steps = {step["name"]: step["result"] for step in job["steps"]}
    assert steps["Check recovery VM boot"]["booted"] is True, steps["Check recovery VM boot"]
    record = latest_record(item_id, FailoverKind.PLANNED)
    assert record.status is FailoverStatus.SUCCEEDED and record.verified
    assert record.booted is True and record.boot_check == "passed", record.boot_detail
    return record


def test_a_guest_through_drill_planned_failover_failback_and_reverse_replication(guest_site: RecoverySite,
                                                                                   test_guest):
    """One guest through the whole cycle, its data checked by the guest itself at every boot:
    - it writes files to ext4 during initial replication and delta cycles; an app-consistent point freezes it
      through its agent (the guest says so on its console);
    - a drill from a point taken while it writes boots isolated (crash-consistent: ext4 replays its journal)
      and passes its own check; cleanup ends the test VM's QEMU;
    - a planned failover boots the recovery VM, whose check covers every file, and the replica equals the
      primary's disk at shutdown byte for byte; e2fsck passes on both;
    - the recovery VM writes new files; failback (minimize downtime) boots the primary with them; reverse
      replication sends only differences; the replica equals the primary again."""
    site = guest_site
    vm_id = create_guest_vm(site, test_guest, workload_kib_s=512)
    site.wait_job(site.protect(vm_id, policy_id=site.create_policy("hourly-app", app_consistent_frequency_h=1)),
                  JOB_TIMEOUT)
    item_id = site.item_id(vm_id)
    primary, recovery = site.host("host1"), site.host("dr1")
    primary.start_vm("web01")
    assert primary.check_boot(primary.get_vm("web01")).booted
    wait_until(lambda: files_written(site, "host1", "web01") >= 2, timeout=120, what="the guest to write files")

    # An app-consistent point: the guest's file systems frozen through its agent while the disks are sealed.
    due_app_consistent(site, vm_id)
    job = site.delta_cycle(vm_id, timeout=JOB_TIMEOUT)
    shipped = next(step["result"] for step in job["steps"] if step["name"] == "Ship logs")
    console = primary.console_log(primary.get_vm("web01"))
    assert shipped["app_consistent"] is True, shipped
    assert "ASR-FREEZE" in console and "ASR-THAW" in console, console[-2000:]
    assert console.index("ASR-FREEZE") < console.index("ASR-THAW")

    # A drill from the latest point while the guest writes.
    site.wait_job(site.when_free(lambda: kinds.test_failover.start(item_id)), JOB_TIMEOUT)
    drill = latest_record(item_id, FailoverKind.TEST)
    assert drill.booted is True and drill.boot_check == "passed", drill.boot_detail
    assert 0 < drill.heartbeat_s < drill.rto_s, (drill.heartbeat_s, drill.rto_s)
    isolated_then_cleaned_up(site, item_id, drill, "web01")

    # Planned failover: the guest is shut down, its last writes shipped, the recovery VM boots.
    record = planned_failover_that_booted(site, item_id)
    at_failover = passed_files(record.boot_detail)
    assert at_failover >= files_written(site, "host1", "web01") >= 2, record.boot_detail
    assert primary.power_state("web01") == "off"
    assert recovery.power_state("web01") == "running"
    # The replica holds the primary's disk at shutdown byte for byte; the recovery VM booted from exactly that
    # content (its restored root is the point's), then mounted and wrote to it.
    site.verify_replica(vm_id)
    assert record.produced_roots == record.expected_roots and None not in record.expected_roots.values()
    e2fsck(primary.get_vm("web01").disk("data").path)

    # The recovery VM writes new files; failback brings them to the primary.
    site.wait_job(kinds.commit_failover.start(item_id), JOB_TIMEOUT)
    wait_until(lambda: files_written(site, "dr1", "web01") >= 2, timeout=120,
               what="the recovery VM to write new files")
    site.wait_job(kinds.failback.start(item_id), JOB_TIMEOUT)
    assert site.item(vm_id)["state"] == "failback_ready"
    assert recovery.power_state("web01") == "running", "minimize downtime keeps the recovery VM running"
    site.wait_job(kinds.failback_completion.start(item_id), JOB_TIMEOUT)
    assert recovery.power_state("web01") == "off"
    e2fsck(recovery.get_vm("web01").disk("data").path)  # a fixed VHD: its footer lies past the file system
    assert primary.power_state("web01") == "running"
    boot = primary.check_boot(primary.get_vm("web01"))
    assert boot.booted and boot.check == "passed", boot
    assert passed_files(boot.detail) > at_failover, (boot.detail, at_failover)

    site.wait_job(kinds.commit_failback.start(item_id), JOB_TIMEOUT)
    job = site.wait_job(kinds.reverse_replication.start(item_id), JOB_TIMEOUT)
    resynced = [s["result"] for s in job["steps"] if s["name"].startswith("Resynchronize disk")]
    assert resynced and all(r["bytes_sent"] < DATA_DISK // 2 for r in resynced), resynced
    assert site.item(vm_id)["state"] == "protected"
    primary.shut_down("web01")
    site.when_free(lambda: site.delta_cycle(vm_id, timeout=JOB_TIMEOUT))
    site.verify_replica(vm_id)


def test_a_guest_without_agent_and_a_killed_tracker_service(guest_site: RecoverySite, test_guest):
    """Without its agent the guest's points are crash-consistent, with a Warning naming why. Then SIGKILL of the
    tracker service while the guest writes: the guest's I/O fails, no file it listed is lost (its next boot's own
    check passes), the restarted service marks the disk resync-required, the next Ship step refuses to ship, a
    resync heals the replica, and it equals the source byte for byte."""
    site = guest_site
    vm_id = create_guest_vm(site, test_guest, workload_kib_s=512, agent=False)
    site.wait_job(site.protect(vm_id, policy_id=site.create_policy("hourly-app", app_consistent_frequency_h=1)),
                  JOB_TIMEOUT)
    item_id = site.item_id(vm_id)
    primary = site.host("host1")
    primary.start_vm("web01")
    wait_until(lambda: files_written(site, "host1", "web01") >= 2, timeout=120, what="the guest to write files")
    due_app_consistent(site, vm_id)
    job = site.delta_cycle(vm_id, timeout=JOB_TIMEOUT)
    shipped = next(step["result"] for step in job["steps"] if step["name"] == "Ship logs")
    assert shipped["app_consistent"] is False and "no guest agent" in shipped["quiesce_error"], shipped
    assert "ASR-FREEZE" not in primary.console_log(primary.get_vm("web01"))
    item = site.item(vm_id)
    assert item["health"] == "Warning" and any("no guest agent" in str(e) for e in item["errors"]), item

    vm = primary.get_vm("web01")
    service_pid = json.loads((primary.run_dir(vm) / PID_FILE).read_text())["pid"]
    os.kill(service_pid, signal.SIGKILL)
    wait_until(lambda: process_ended(service_pid), timeout=10, what="the tracker service to die")
    primary.shut_down("web01")  # the guest lost its disks: ACPI may not be enough, QEMU is stopped anyway

    primary.start_vm("web01")
    boot = primary.check_boot(primary.get_vm("web01"))
    assert boot.booted and boot.check == "passed", boot
    with primary.tracker("web01", "data") as tracker:
        assert "stopped uncleanly" in (tracker.resync_required() or "")

    # The next delta cycle (the scheduler's or this one) refuses to ship and marks the item for resync.
    def resync_required() -> bool:
        with contextlib.suppress(ItemBusyError, InvalidStateError):
            start_delta_replication(item_id)
        return site.item(vm_id)["state"] == "resync_required"

    wait_until(resync_required, timeout=JOB_TIMEOUT, interval=1, what="the item to need a resync")
    assert "stopped uncleanly" in site.item(vm_id)["resync_required_reason"], site.item(vm_id)
    site.wait_idle(vm_id, JOB_TIMEOUT)
    site.wait_job(kinds.resynchronize.start(item_id), JOB_TIMEOUT)
    assert site.item(vm_id)["state"] == "protected"
    primary.shut_down("web01")
    site.when_free(lambda: site.delta_cycle(vm_id, timeout=JOB_TIMEOUT))
    site.verify_replica(vm_id)


def test_a_guest_that_never_reaches_its_heartbeat_fails_the_drill_recoverably(guest_site: RecoverySite,
                                                                               test_guest):
    """The boot check waits for the heartbeat the VM's definition names; a guest that never prints it is
    powered off and the step waits to retry with that reason; cancelling leaves the item protected."""
    site = guest_site
    vm_id = create_guest_vm(site, test_guest, heartbeat="NEVER-PRINTED-LINE", boot_timeout_s=5)
    site.wait_job(site.protect(vm_id), JOB_TIMEOUT)
    item_id = site.item_id(vm_id)
    job_id = site.when_free(lambda: kinds.test_failover.start(item_id))
    job = site.wait_job(job_id, JOB_TIMEOUT, states=("waiting_retry",))
    check = next(step for step in job["steps"] if step["name"] == "Check recovery VM boot")
    assert "did not reach its heartbeat" in (check.get("error") or job.get("error") or ""), check
    record = latest_record(item_id, FailoverKind.TEST)
    assert record.booted is False
    recovery = site.host("dr1")
    assert recovery.power_state(record.target_vm) == "off", "a guest that did not boot is not left running"
    cancel(job_id)
    site.wait_job(job_id, 60, states=("cancelled",))
    assert site.item(vm_id)["state"] == "protected"


def test_a_guest_booting_from_its_disk_fails_over_to_the_replica_of_that_disk(guest_site: RecoverySite,
                                                                              test_guest):
    """The OS-disk case: the guest boots from its own FAT boot disk (SeaBIOS, syslinux, no kernel file), both
    its disks protected. It writes files at the primary; a drill boots a test VM from the point's replica of
    that disk; a planned failover boots the recovery VM from the replica of its boot disk (QEMU started without
    -kernel, the BIOS booting the NBD-served replica); failback boots the primary from its own disk again; the
    guest's own check passes over every file each time. A boot disk the VM does not have is refused, creating
    nothing."""
    site = guest_site
    images = site.host("host1").root / "images"
    images.mkdir(parents=True)
    make_data_disk(images / "data.raw", BOOT_DISK_VM_DATA)
    with session_scope() as session:
        registered = len(session.exec(select(VmRow)).all())
    with pytest.raises(service.ServiceError, match="boots from disk 'system', which the VM does not have "
                                                  r"\(its disks: data\)"):
        service.create_vm("host1", "bad01", disks=[{"name": "data", "image": str(images / "data.raw")}],
                          guest={"boot_disk": "system", "heartbeat": test_guest.heartbeat})
    with pytest.raises(service.ServiceError, match="takes no kernel: .*give a kernel or a boot disk, not both"):
        service.create_vm("host1", "bad02", disks=[{"name": "data", "image": str(images / "data.raw")}],
                          guest={"boot_disk": "data", "kernel": test_guest.kernel, "heartbeat": test_guest.heartbeat})
    with session_scope() as session:
        assert len(session.exec(select(VmRow)).all()) == registered, "a refused VM was registered"
    assert list(site.host("host1").vms_dir.glob("*")) == [], "a refused VM left a folder (or a staging one)"

    vm_id = create_boot_disk_vm(site, test_guest, "os01", write_files=3)
    site.wait_job(site.protect(vm_id), JOB_TIMEOUT)
    item_id = site.item_id(vm_id)
    primary, recovery = site.host("host1"), site.host("dr1")
    assert not (primary.get_vm("os01").path / "boot").exists(), "a guest booting from its disk has no boot files"
    primary.start_vm("os01")
    assert boots_from_disk(qemu_command(primary, "os01"), "os")
    boot = primary.check_boot(primary.get_vm("os01"))
    assert boot.booted and boot.check == "passed" and passed_files(boot.detail) == 0, boot
    console = primary.console_log(primary.get_vm("os01"))
    assert "SYSLINUX" in console, console[-2000:]  # the disk's boot loader started the kernel
    wait_until(lambda: "ASR-WORKLOAD-DONE 3" in primary.console_log(primary.get_vm("os01")), timeout=120,
               what="the guest to write its files")

    # A drill boots a test VM from the point's replica of the boot disk, isolated, and its check passes.
    site.delta_cycle(vm_id, timeout=JOB_TIMEOUT)
    site.wait_job(site.when_free(lambda: kinds.test_failover.start(item_id)), JOB_TIMEOUT)
    drill = latest_record(item_id, FailoverKind.TEST)
    assert drill.booted is True and drill.boot_check == "passed", drill.boot_detail
    assert passed_files(drill.boot_detail) == 3, drill.boot_detail
    test_vm = recovery.get_vm(drill.target_vm)
    assert test_vm.guest.boot_disk == "os" and boots_from_disk(qemu_command(recovery, drill.target_vm), "os")
    assert "SYSLINUX" in recovery.console_log(test_vm)
    isolated_then_cleaned_up(site, item_id, drill, "os01")

    record = planned_failover_that_booted(site, item_id)
    assert passed_files(record.boot_detail) == 3, record.boot_detail  # every file the primary wrote
    print(f"recovery VM booted from its disk: heartbeat {record.heartbeat_s:.1f} s after QEMU started, "
          f"RTO {record.rto_s:.1f} s")
    recovery_vm = recovery.get_vm("os01")
    assert recovery.power_state("os01") == "running" and primary.power_state("os01") == "off"
    assert [(disk.name, disk.format) for disk in recovery_vm.disks] == [("os", "vhd"), ("data", "vhd")]
    assert recovery_vm.guest.boot_disk == "os" and not (recovery_vm.path / "boot").exists()
    assert boots_from_disk(qemu_command(recovery, "os01"), "os")
    assert "SYSLINUX" in recovery.console_log(recovery_vm)
    # Both replicas hold the primary's disks at shutdown byte for byte: the boot disk the recovery VM booted too.
    site.verify_replica(vm_id)
    e2fsck(primary.get_vm("os01").disk("data").path)

    # Failback (minimize downtime): the primary boots from its own boot disk again, with what the recovery VM
    # holds, and its check passes over every file.
    site.wait_job(kinds.commit_failover.start(item_id), JOB_TIMEOUT)
    site.wait_job(kinds.failback.start(item_id), JOB_TIMEOUT)
    site.wait_job(kinds.failback_completion.start(item_id), JOB_TIMEOUT)
    assert recovery.power_state("os01") == "off" and primary.power_state("os01") == "running"
    assert boots_from_disk(qemu_command(primary, "os01"), "os")
    boot = primary.check_boot(primary.get_vm("os01"))
    # Every file of before the failover, and any the recovery VM's workload wrote while it ran.
    assert boot.booted and boot.check == "passed" and passed_files(boot.detail) >= 3, boot
    site.wait_job(kinds.commit_failback.start(item_id), JOB_TIMEOUT)
