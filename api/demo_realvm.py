"""The demo's `real-vm` stage: a real QEMU guest (the project's test guest, sites/guest) protected beside the
synthetic VMs, writing files to ext4 through the replication tracker, failed over (planned) and booted at the
recovery site, where it checks its own files. Its disks and the recovery storage stay in the work folder for
anyone to inspect (the report's `paths`)."""
from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from api.demo_report import Check, Report, Stage
from api.demo_site import RECOVERY_HOST, DemoError, DemoSite, DemoVm

REAL_VM = "guest01"
REAL_VM_HOST = "host1"
DATA_DISK_BYTES = 64 * 1024 * 1024
WORKLOAD_KIB_S = 256
GUEST_DIR = Path(__file__).resolve().parents[1] / ".tools" / "guest"
"""Where `make guest` builds the test guest (make demo runs it first)."""
FILES_TIMEOUT_S = 180.0


def stage_real_vm(d: DemoSite, stage: Stage, checks: list[Check], report: Report) -> None:
    from sqlmodel import select

    from models.db import session_scope
    from models.fabric import Host as HostRow
    from models.fabric import import_vm_manifest
    from sites.guest import load_guest, make_data_disk
    from sites.host.guestdef import GuestDefinition
    from workflows import kinds

    image = load_guest(GUEST_DIR)
    primary, recovery = d.hosts[REAL_VM_HOST], d.hosts[RECOVERY_HOST]
    images = primary.root / "images"
    images.mkdir(exist_ok=True)
    for source in (image.kernel_path, image.initrd_path):
        shutil.copy(source, images / source.name)
    make_data_disk(images / "data.raw", DATA_DISK_BYTES)
    definition = GuestDefinition(
        kernel=image.kernel, initrd=image.initrd, cmdline=f"{image.cmdline} asr.workload={WORKLOAD_KIB_S}",
        heartbeat=image.heartbeat, check_pass=image.check_pass, check_fail=image.check_fail)
    vm = primary.create_vm(REAL_VM, [("data", None, "raw")], guest=definition, images={"data": images / "data.raw"},
                           boot_files={name: images / name for name in definition.boot_files})
    with session_scope() as session:
        row = session.exec(select(HostRow).where(HostRow.name == REAL_VM_HOST)).one()
        d.vms[REAL_VM] = DemoVm(REAL_VM, REAL_VM_HOST, import_vm_manifest(session, row, vm.to_manifest()).id)
    d.console.say(f"  QEMU guest {REAL_VM} on {REAL_VM_HOST}: kernel {image.kernel}, one 64 MiB ext4 data disk")

    from workflows.engine import get_job
    from workflows.kinds.enable_protection import start as enable_protection

    job_id = d.request(lambda: enable_protection(
        d.vms[REAL_VM].vm_id, d.policy_id, recovery_storage=d.recovery_storage,
        storage_options=dict(d.storage_options), recovery_host=RECOVERY_HOST), f"enable protection of {REAL_VM}", stage)
    d.vms[REAL_VM].item_id = get_job(job_id)["params"]["item_id"]
    d.wait({job_id: f"protect {REAL_VM}"})
    primary.start_vm(REAL_VM)
    boot = primary.check_boot(primary.get_vm(REAL_VM))
    checks.append(Check(f"{REAL_VM} boots on {REAL_VM_HOST} through the replication tracker", boot.booted,
                        f"heartbeat after {boot.heartbeat_s and round(boot.heartbeat_s, 1)} s; {boot.detail}"))
    if not boot.booted:
        raise DemoError(f"{REAL_VM} did not boot: {boot.detail}")
    deadline = time.monotonic() + FILES_TIMEOUT_S
    while _files_written(primary) < 3:
        if time.monotonic() > deadline:
            raise DemoError(f"{REAL_VM} wrote no files within {FILES_TIMEOUT_S:g} s:\n{primary.console_log(vm)}")
        time.sleep(1)
    d.delta_cycles([REAL_VM], stage)

    item_id = d.vms[REAL_VM].item_id
    d.run(lambda: kinds.planned_failover.start(item_id), f"planned failover of {REAL_VM}", stage)
    record = d.latest_record(REAL_VM, "planned")
    written = _files_written(primary)
    checks.append(Check(f"{REAL_VM} booted at {RECOVERY_HOST} and its own check of its files passed",
                        record.booted is True and record.boot_check == "passed",
                        f"{record.boot_detail}; {written} files written on {REAL_VM_HOST}"))
    checks.append(Check("RTO measured to the guest's heartbeat", record.heartbeat_s is not None and
                        record.rto_s is not None and record.rto_s >= record.heartbeat_s,
                        f"RTO {record.rto_s and round(record.rto_s, 1)} s (boot to heartbeat "
                        f"{record.heartbeat_s and round(record.heartbeat_s, 1)} s), "
                        f"RPO {record.rpo_s and round(record.rpo_s, 1)} s"))
    # The replica holds the primary's disk at shutdown; the recovery VM booted from exactly that (its
    # restored root is the point's), then mounted and wrote to it.
    d.verify_replicas(REAL_VM, checks)
    checks.append(Check("the recovery VM's disk was restored to the point's content",
                        bool(record.verified) and record.produced_roots == record.expected_roots,
                        f"roots {record.produced_roots}"))
    recovery.shut_down(REAL_VM)
    fsck = _e2fsck(recovery.get_vm(REAL_VM).disk("data").path)
    checks.append(Check("e2fsck -fn of the recovery disk passes after the guest's shutdown", fsck[0], fsck[1]))
    report.paths = {
        "storage_root": str(d.workdir / "recovery-site") if d.backend == "local" else d.recovery_storage,
        "source_disks": [str(disk.path) for disk in primary.get_vm(REAL_VM).disks],
        "recovery_disks": [str(disk.path) for disk in recovery.get_vm(REAL_VM).disks],
    }


def _files_written(driver) -> int:
    from sites.guest import files_written

    return files_written(driver.console_log(driver.get_vm(REAL_VM)))


def _e2fsck(disk: Path) -> tuple[bool, str]:
    """e2fsck -fn of the disk's file system. A fixed VHD is its raw content plus a 512-byte footer past the
    file system's end, which e2fsck does not read, so it checks either format in place."""
    result = subprocess.run(["e2fsck", "-fn", str(disk)], capture_output=True, text=True, timeout=120)
    return result.returncode == 0, (result.stdout.strip().splitlines() or ["(no output)"])[-1]
