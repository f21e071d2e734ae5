"""The test guest and the QEMU runtime, with real QEMU guests (TCG): boot, check, workload, ACPI power-off,
guest agent, and the errors a caller sees. Every QEMU a test starts is killed in its teardown, and the
teardown checks that none is left."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sites.guest import DataDiskError, GuestImage, build_guest, make_boot_disk, make_data_disk
from sites.guest.build import extract_vmlinux
from sites.guest.errors import GuestBuildError
from sites.host.errors import GuestAgentError, GuestError, GuestTimeoutError
from sites.host.guestagent import GuestAgent
from sites.host.qemu import CONSOLE_LOG, QEMU_PID, QMP_SOCKET, GuestDrive, GuestSpec, QemuRuntime, socket_dir
from sites.host.qmp import qmp_execute

# Whole deployments (workers, beat, Redis) or real guests per test: out of the quick loop (-m "not slow").
pytestmark = pytest.mark.slow

BOOT_TIMEOUT_S = 90.0  # ~4 s alone under TCG; several times that when other tests load the machine
DISK_SIZE = 64 << 20
MARKER = b"ASR-TEST-MARKER-" + bytes(range(48))


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[QemuRuntime]:
    """A runtime whose guests all live under tmp_path; none survives the test."""
    runtime = QemuRuntime()
    yield runtime
    for pid_file in tmp_path.rglob(QEMU_PID):
        runtime.kill(pid_file.parent)
    leftovers = [pid for pid in _qemu_pids() if str(tmp_path) in _cmdline(pid)]
    assert not leftovers, f"QEMU processes left running: {leftovers}"


def _qemu_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and "qemu-system" in _cmdline(int(entry.name)):
            pids.append(int(entry.name))
    return pids


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _spec(guest: GuestImage, folder: Path, disk: Path, extra: str = "", **options) -> GuestSpec:
    cmdline = f"{guest.cmdline} {extra}".strip()
    return GuestSpec(folder=folder, kernel=guest.kernel_path, initrd=guest.initrd_path, cmdline=cmdline,
                     drives=(GuestDrive("data", file=disk),), **options)


def _e2fsck(disk: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["e2fsck", "-fn", str(disk)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin"})


# ---- the guest image --------------------------------------------------------------------------------
def test_guest_build_is_cached(test_guest: GuestImage) -> None:
    said = []
    again = build_guest(test_guest.folder, log=said.append)
    assert again == test_guest
    assert "up to date" in said[0]
    assert hashlib.sha256(test_guest.kernel_path.read_bytes()).hexdigest() == test_guest.kernel_sha256
    assert test_guest.hashes[test_guest.initrd] == hashlib.sha256(test_guest.initrd_path.read_bytes()).hexdigest()
    assert test_guest.kernel_path.read_bytes()[:4] == b"\x7fELF"  # the uncompressed kernel, booted via PVH
    boot_disk = test_guest.boot_disk_path.read_bytes()
    assert hashlib.sha256(boot_disk).hexdigest() == test_guest.boot_disk_sha256
    assert boot_disk[510:512] == b"\x55\xaa" and boot_disk[54:59] == b"FAT16"  # syslinux's boot sector, a FAT


def test_extract_vmlinux_refuses_a_file_without_kernel() -> None:
    with pytest.raises(GuestBuildError, match="no xz-compressed ELF kernel"):
        extract_vmlinux(b"MZ" + bytes(4096))


def test_guest_build_without_apt_says_so(tmp_path: Path) -> None:
    built = subprocess.run([sys.executable, "-m", "sites.guest.build", "--out", str(tmp_path / "guest")],
                           capture_output=True, text=True, timeout=60,
                           env={**os.environ, "PATH": str(tmp_path / "empty")})
    assert built.returncode == 1
    assert "cannot build the guest" in built.stderr and "apt-cache is not installed" in built.stderr
    assert "Debian" in built.stderr


def test_data_disk_bad_input(tmp_path: Path) -> None:
    with pytest.raises(DataDiskError, match="at least"):
        make_data_disk(tmp_path / "small.raw", 1 << 20)
    with pytest.raises(DataDiskError, match="not a folder"):
        make_data_disk(tmp_path / "seeded.raw", DISK_SIZE, seed_dir=tmp_path / "missing")
    make_data_disk(tmp_path / "disk.raw", DISK_SIZE)
    with pytest.raises(DataDiskError, match="exists already"):
        make_data_disk(tmp_path / "disk.raw", DISK_SIZE)
    assert (tmp_path / "disk.raw").stat().st_blocks * 512 < DISK_SIZE  # sparse


# ---- booting ------------------------------------------------------------------------------------------
def test_guest_checks_writes_powers_off_and_rechecks(test_guest: GuestImage, runtime: QemuRuntime,
                                                      tmp_path: Path) -> None:
    folder, disk = tmp_path / "vm", tmp_path / "data.raw"
    make_data_disk(disk, DISK_SIZE)
    started = time.monotonic()
    runtime.start(_spec(test_guest, folder, disk, "asr.write_files=5"))
    assert runtime.wait_for_console(folder, test_guest.check_pass, BOOT_TIMEOUT_S).group(1) == "0"
    heartbeat = runtime.wait_for_console(folder, test_guest.heartbeat, BOOT_TIMEOUT_S)
    print(f"first boot: heartbeat after {time.monotonic() - started:.1f} s")
    runtime.wait_for_console(folder, r"ASR-WORKLOAD-DONE 5\b", BOOT_TIMEOUT_S, since=heartbeat.end())
    assert runtime.state(folder) == "running"
    qmp_execute(socket_dir(folder) / QMP_SOCKET, "stop")
    assert runtime.state(folder) == "paused"
    qmp_execute(socket_dir(folder) / QMP_SOCKET, "cont")

    assert runtime.power_down(folder, timeout=60) == "acpi"
    assert "ASR-GUEST-POWEROFF" in runtime.console_tail(folder)
    assert runtime.state(folder) == "off"
    assert not (folder / QEMU_PID).exists()
    with pytest.raises(GuestError, match="not running"):  # fails at once, not after the timeout
        runtime.wait_for_console(folder, "never printed", timeout=60)
    assert runtime.power_down(folder, timeout=5) == "not-running"
    fsck = _e2fsck(disk)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr

    runtime.start(_spec(test_guest, folder, disk))
    assert runtime.wait_for_console(folder, test_guest.check_pass, BOOT_TIMEOUT_S).group(1) == "5"
    second = runtime.wait_for_console(folder, test_guest.heartbeat, BOOT_TIMEOUT_S)
    assert second.group(1) != heartbeat.group(1)  # a new boot, with a console log of its own
    assert (folder / "console.previous.log").read_text(errors="replace").count("ASR-WORKLOAD-DONE 5") == 1
    assert runtime.power_down(folder, timeout=60) == "acpi"


def test_a_crash_mid_workload_leaves_a_disk_that_passes_the_check(test_guest: GuestImage, runtime: QemuRuntime,
                                                                   tmp_path: Path) -> None:
    """Every manifest line names a file made durable before the line was written: killing QEMU in the
    middle of the workload (the disk as a crash left it) must not make the next boot's check fail."""
    folder, disk = tmp_path / "vm", tmp_path / "data.raw"
    make_data_disk(disk, DISK_SIZE)
    runtime.start(_spec(test_guest, folder, disk, "asr.workload=100000"))
    heartbeat = runtime.wait_for_console(folder, test_guest.heartbeat, BOOT_TIMEOUT_S)
    runtime.wait_for_console(folder, r"ASR-WORKLOAD: 10 files", BOOT_TIMEOUT_S, since=heartbeat.end())
    runtime.kill(folder)
    assert runtime.state(folder) == "off"

    # Again with the workload running: the power button stops it and unmounts /data cleanly.
    runtime.start(_spec(test_guest, folder, disk, "asr.workload=100000"))
    checked = runtime.wait_for_console(folder, test_guest.check_pass, BOOT_TIMEOUT_S)
    assert int(checked.group(1)) >= 10
    runtime.wait_for_console(folder, r"ASR-WORKLOAD: 10 files", BOOT_TIMEOUT_S, since=checked.end())
    assert runtime.power_down(folder, timeout=60) == "acpi"
    assert "ASR-WORKLOAD-DONE" in runtime.console_tail(folder)
    fsck = _e2fsck(disk)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_guest_on_an_nbd_disk(test_guest: GuestImage, runtime: QemuRuntime, tmp_path: Path) -> None:
    """A drive served over NBD (by qemu-nbd here, an independent server), its socket at a path too long
    for a sockaddr_un: the runtime reaches it through a short symlink."""
    disk = tmp_path / "data.raw"
    make_data_disk(disk, DISK_SIZE)
    served = tmp_path / ("a-long-folder-for-the-nbd-socket-" * 3)
    served.mkdir()
    server = subprocess.Popen(["qemu-nbd", f"--socket={tmp_path / 'nbd.sock'}", "--export-name=data",
                               "--format=raw", "--persistent", "--discard=unmap", str(disk)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not (tmp_path / "nbd.sock").exists():
            assert server.poll() is None and time.monotonic() < deadline, "qemu-nbd did not start"
            time.sleep(0.05)
        # A bound socket keeps working when renamed: this is the only way to have one at a long path.
        (tmp_path / "nbd.sock").rename(served / "nbd.sock")
        assert len(str(served / "nbd.sock")) > 107
        folder = tmp_path / "vm"
        drive = GuestDrive("data", nbd_socket=served / "nbd.sock")
        spec = GuestSpec(folder, test_guest.kernel_path, test_guest.initrd_path,
                         f"{test_guest.cmdline} asr.write_files=3", (drive,))
        runtime.start(spec)
        heartbeat = runtime.wait_for_console(folder, test_guest.heartbeat, BOOT_TIMEOUT_S)
        runtime.wait_for_console(folder, r"ASR-WORKLOAD-DONE 3\b", BOOT_TIMEOUT_S, since=heartbeat.end())
        assert runtime.power_down(folder, timeout=60) == "acpi"
    finally:
        server.terminate()
        server.wait(timeout=10)
    fsck = _e2fsck(disk)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_a_disk_without_ext4_powers_the_guest_off(test_guest: GuestImage, runtime: QemuRuntime,
                                                  tmp_path: Path) -> None:
    disk = tmp_path / "blank.raw"
    with open(disk, "wb") as blank:
        blank.truncate(DISK_SIZE)
    folder = tmp_path / "vm"
    runtime.start(_spec(test_guest, folder, disk))
    runtime.wait_for_console(folder, "ASR-GUEST-ERROR cannot mount /dev/vda as ext4", BOOT_TIMEOUT_S)
    deadline = time.monotonic() + 30
    while runtime.state(folder) != "off" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert runtime.state(folder) == "off"
    assert "ASR-GUEST-READY" not in runtime.console_tail(folder)


def test_bad_workload_parameter_stops_the_guest_before_its_heartbeat(test_guest: GuestImage, runtime: QemuRuntime,
                                                                     tmp_path: Path) -> None:
    seed = tmp_path / "seed"
    seed.mkdir()
    (seed / "MANIFEST.sha256").write_bytes(b"")  # empty: names nothing, passes
    folder, disk = tmp_path / "vm", tmp_path / "data.raw"
    make_data_disk(disk, DISK_SIZE, seed_dir=seed)
    runtime.start(_spec(test_guest, folder, disk, "asr.workload=fast", guest_agent=False))
    runtime.wait_for_console(folder, "ASR-GUEST-ERROR asr.workload=fast is not a whole number", BOOT_TIMEOUT_S)
    with pytest.raises(GuestError, match="not running"):
        runtime.wait_for_console(folder, test_guest.heartbeat, BOOT_TIMEOUT_S)

    runtime.start(_spec(test_guest, folder, disk, guest_agent=False))
    assert runtime.wait_for_console(folder, test_guest.check_pass, BOOT_TIMEOUT_S).group(1) == "0"
    runtime.kill(folder)


def test_corrupted_file_fails_the_check(test_guest: GuestImage, runtime: QemuRuntime, tmp_path: Path) -> None:
    seed = tmp_path / "seed"
    (seed / "files").mkdir(parents=True)
    content = MARKER + os.urandom(16 << 10)
    (seed / "files" / "precious").write_bytes(content)
    (seed / "MANIFEST.sha256").write_text(f"{hashlib.sha256(content).hexdigest()}  files/precious\n")
    disk = tmp_path / "data.raw"
    make_data_disk(disk, DISK_SIZE, seed_dir=seed)
    image = bytearray(disk.read_bytes())
    offset = image.find(MARKER)
    assert offset >= 0 and image.find(MARKER, offset + 1) < 0
    image[offset + len(MARKER) + 100] ^= 0xFF
    disk.write_bytes(image)

    folder = tmp_path / "vm"
    runtime.start(_spec(test_guest, folder, disk, guest_agent=False, network="isolated"))
    assert "user,id=net0,restrict=on" in (folder / QEMU_PID).read_text()
    failed = runtime.wait_for_console(folder, test_guest.check_fail, BOOT_TIMEOUT_S)
    assert "files/precious" in failed.group(1)
    assert "ASR-CHECK: PASS" not in runtime.console_tail(folder)
    runtime.kill(folder)
    assert runtime.state(folder) == "off"


def test_guest_agent_freezes_and_thaws_and_shuts_down(test_guest: GuestImage, runtime: QemuRuntime,
                                                      tmp_path: Path) -> None:
    # A folder whose socket paths would not fit in a sockaddr_un: they go to a short folder in /tmp.
    folder, disk = tmp_path / ("a-rather-long-folder-name-" * 4) / "vm", tmp_path / "data.raw"
    make_data_disk(disk, DISK_SIZE)
    runtime.start(_spec(test_guest, folder, disk, "asr.workload=2000"))
    assert socket_dir(folder) != folder.resolve() and (socket_dir(folder) / "qmp.sock").exists()
    heartbeat = runtime.wait_for_console(folder, test_guest.heartbeat, BOOT_TIMEOUT_S)
    agent = GuestAgent(folder, timeout=20)
    agent.ping()
    assert agent.status() == "thawed"
    assert agent.freeze() == 1
    runtime.wait_for_console(folder, "^ASR-FREEZE", 10, since=heartbeat.end())
    assert agent.status() == "frozen"
    assert agent.freeze() == 1  # freezing a frozen guest is no error
    with pytest.raises(GuestAgentError, match="CommandNotFound"):
        agent.execute("guest-get-time")
    assert agent.thaw() == 1
    thawed = runtime.wait_for_console(folder, "^ASR-THAW", 10, since=heartbeat.end())
    assert agent.status() == "thawed"
    runtime.wait_for_console(folder, r"ASR-WORKLOAD: \d+ files", BOOT_TIMEOUT_S, since=thawed.end())

    agent.shutdown()
    runtime.wait_for_console(folder, "ASR-GUEST-POWEROFF", 60, since=thawed.end())
    deadline = time.monotonic() + 30
    while runtime.state(folder) != "off" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert runtime.state(folder) == "off"
    assert not socket_dir(folder).exists()
    fsck = _e2fsck(disk)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_guest_without_agent_and_a_wrong_pattern(test_guest: GuestImage, runtime: QemuRuntime,
                                                  tmp_path: Path) -> None:
    folder, disk = tmp_path / "vm", tmp_path / "data.raw"
    make_data_disk(disk, DISK_SIZE)
    runtime.start(_spec(test_guest, folder, disk, "asr.agent=0"))
    runtime.wait_for_console(folder, test_guest.heartbeat, BOOT_TIMEOUT_S)
    started = time.monotonic()
    with pytest.raises(GuestTimeoutError, match="did not answer guest-ping within 2 s"):
        GuestAgent(folder, timeout=2).ping()
    assert time.monotonic() - started < 5
    with pytest.raises(GuestTimeoutError, match="ASR-GUEST-READY") as waited:  # the tail is in the message
        runtime.wait_for_console(folder, "ASR-NEVER-PRINTED", timeout=1.5)
    assert isinstance(waited.value, TimeoutError)
    runtime.kill(folder)
    assert runtime.state(folder) == "off"


def test_guest_without_agent_channel(test_guest: GuestImage, runtime: QemuRuntime, tmp_path: Path) -> None:
    folder, disk = tmp_path / "vm", tmp_path / "data.raw"
    make_data_disk(disk, DISK_SIZE)
    runtime.start(_spec(test_guest, folder, disk, guest_agent=False))
    with pytest.raises(GuestError, match="cannot reach the guest agent socket"):
        GuestAgent(folder, timeout=2).ping()
    runtime.kill(folder)


def test_guest_boots_from_its_boot_disk(test_guest: GuestImage, runtime: QemuRuntime, tmp_path: Path) -> None:
    """No kernel file: SeaBIOS boots the boot disk (bootindex), syslinux loads the kernel with the command line
    on that disk (here with asr.write_files=2); the guest finds its data disk after the FAT boot disk."""
    folder, boot, disk = tmp_path / "vm", tmp_path / "os.raw", tmp_path / "data.raw"
    make_boot_disk(boot, test_guest, "asr.write_files=2")
    make_data_disk(disk, DISK_SIZE)
    spec = GuestSpec(folder, kernel=None, initrd=None, cmdline="", boot_drive="os",
                     drives=(GuestDrive("os", file=boot), GuestDrive("data", file=disk)))
    started = time.monotonic()
    runtime.start(spec)
    command = json.loads((folder / QEMU_PID).read_text())["command"]
    assert "-kernel" not in command and "-append" not in command
    assert [arg for arg in command if "bootindex" in arg] == ["virtio-blk-pci,drive=disk0,serial=os,bootindex=0"]
    assert runtime.wait_for_console(folder, test_guest.check_pass, BOOT_TIMEOUT_S).group(1) == "0"
    heartbeat = runtime.wait_for_console(folder, test_guest.heartbeat, BOOT_TIMEOUT_S)
    print(f"boot from disk: heartbeat after {time.monotonic() - started:.1f} s")
    assert "SYSLINUX" in runtime.console_tail(folder)
    runtime.wait_for_console(folder, r"ASR-WORKLOAD-DONE 2\b", BOOT_TIMEOUT_S, since=heartbeat.end())
    assert runtime.power_down(folder, timeout=60) == "acpi"
    fsck = _e2fsck(disk)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    fat = subprocess.run(["fsck.fat", "-n", str(boot)], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin"})
    assert fat.returncode == 0, fat.stdout + fat.stderr  # the guest never wrote to its boot disk's FAT

    with pytest.raises(DataDiskError, match="exists already"):
        make_boot_disk(boot, test_guest)
    with pytest.raises(DataDiskError, match="one printable line"):
        make_boot_disk(tmp_path / "other.raw", test_guest, "asr.write_files=1\nDEFAULT evil")
    assert not (tmp_path / "other.raw").exists()


# ---- bad input ----------------------------------------------------------------------------------------
def test_missing_kernel_is_a_clear_error(test_guest: GuestImage, runtime: QemuRuntime, tmp_path: Path) -> None:
    disk = tmp_path / "data.raw"
    make_data_disk(disk, DISK_SIZE)
    spec = GuestSpec(tmp_path / "vm", kernel=tmp_path / "no-such-kernel", initrd=test_guest.initrd_path,
                     cmdline=test_guest.cmdline, drives=(GuestDrive("data", file=disk),))
    with pytest.raises(GuestError, match="kernel .*no-such-kernel of guest .* does not exist"):
        runtime.start(spec)
    with pytest.raises(GuestError, match="exactly one of nbd_socket and file"):
        runtime.start(GuestSpec(tmp_path / "vm", test_guest.kernel_path, None, "", (GuestDrive("data"),)))
    with pytest.raises(GuestError, match="network 'bridged'"):
        runtime.start(_spec(test_guest, tmp_path / "vm", disk, network="bridged"))
    with pytest.raises(GuestError, match="boots from drive 'os', which it does not have \\(its drives: data\\)"):
        runtime.start(GuestSpec(tmp_path / "vm", None, None, "", (GuestDrive("data", file=disk),), boot_drive="os"))
    with pytest.raises(GuestError, match="boots from drive 'data': .*give no kernel"):
        runtime.start(GuestSpec(tmp_path / "vm", test_guest.kernel_path, None, "", (GuestDrive("data", file=disk),),
                                boot_drive="data"))
    with pytest.raises(GuestError, match="needs a kernel or a boot drive"):
        runtime.start(GuestSpec(tmp_path / "vm", None, None, "", (GuestDrive("data", file=disk),)))
    assert runtime.state(tmp_path / "vm") == "off"


def test_qemu_exiting_at_once_reports_its_messages(test_guest: GuestImage, runtime: QemuRuntime,
                                                   tmp_path: Path) -> None:
    not_a_kernel = tmp_path / "vmlinux"
    not_a_kernel.write_bytes(b"this is not a kernel\n" * 100)
    disk = tmp_path / "data.raw"
    make_data_disk(disk, DISK_SIZE)
    spec = GuestSpec(tmp_path / "vm", kernel=not_a_kernel, initrd=None, cmdline="console=ttyS0",
                     drives=(GuestDrive("data", file=disk),))
    with pytest.raises(GuestError, match="QEMU exited at once .*qemu"):
        runtime.start(spec)
    assert not (tmp_path / "vm" / QEMU_PID).exists()
    assert (tmp_path / "vm" / CONSOLE_LOG).exists()
