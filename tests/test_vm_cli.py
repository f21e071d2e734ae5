"""Creating, starting, stopping and reading VMs as an operator does: through the REST API (a real uvicorn
subprocess, tests/api_server.py) and through `asr vm create|start|stop|console|show` (the installed console
script in subprocesses), against a real database (tests/recovery_site.py, without workers: none of these
verbs starts a job).

One QEMU boot: the guest created with `asr vm create` is started, its console read and stopped through the
CLI; everything else is checked without booting.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from api_server import ApiServer
from click.testing import CliRunner
from recovery_site import RecoverySite
from sqlmodel import select

from api import service
from api.cli import main
from api.client import ApiError, SiteRecoveryClient
from datapath.digest import disk_digest
from models.db import session_scope
from models.fabric import VirtualDisk, VirtualMachine
from sites.guest import make_boot_disk, make_data_disk
from sites.localservices import wait_until

ASR = str(Path(sys.executable).with_name("asr"))
MIB = 1024 * 1024
BOOT_TIMEOUT = 120


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory):
    with RecoverySite(tmp_path_factory.mktemp("vms"), start_workers=False) as deployment:
        yield deployment


@pytest.fixture(scope="module")
def api(site: RecoverySite):
    key = service.create_api_key("vm-tests", role="admin")["key"]
    server = ApiServer(site.env, site.workdir)
    try:
        with SiteRecoveryClient(server.url, key, timeout=90) as client:
            yield client
    except BaseException:
        print(server.log())
        raise
    finally:
        server.stop()


@pytest.fixture(scope="module")
def images(site: RecoverySite, test_guest) -> dict[str, Path]:
    """The test guest's boot files and boot disk, two ext4 data disks and a qcow2 image, in host1's images
    folder."""
    folder = site.host("host1").root / "images"
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for what, source in (("kernel", test_guest.kernel_path), ("initrd", test_guest.initrd_path)):
        files[what] = folder / source.name
        shutil.copy(source, files[what])
    for name in ("data-api", "data-cli"):
        files[name] = make_data_disk(folder / f"{name}.raw", 16 * MIB)
    files["bootdisk"] = make_boot_disk(folder / "os.raw", test_guest)
    files["qcow2"] = folder / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(files["qcow2"]), "16M"], check=True,
                   capture_output=True, timeout=60)
    return files


def guest_json(test_guest, **changes: Any) -> dict[str, Any]:
    return {"kernel": test_guest.kernel, "initrd": test_guest.initrd, "cmdline": f"{test_guest.cmdline} asr.agent=0",
            "heartbeat": test_guest.heartbeat, "check_pass": test_guest.check_pass,
            "check_fail": test_guest.check_fail, **changes}


def asr(site: RecoverySite, *args: str, cwd: Path | None = None, check: bool = True,
        timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run([ASR, *args], capture_output=True, text=True, timeout=timeout, env=site.env, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"asr {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}{proc.stdout}")
    return proc


def asr_json(site: RecoverySite, *args: str, cwd: Path | None = None) -> Any:
    return json.loads(asr(site, *args, "--json", cwd=cwd).stdout)


def registered() -> dict[str, int]:
    with session_scope() as session:
        return {model.__name__: session.exec(select(sa.func.count()).select_from(model)).one()
                for model in (VirtualMachine, VirtualDisk)}


def vm_folders(site: RecoverySite) -> list[str]:
    vms = site.host("host1").vms_dir
    return sorted(p.name for p in vms.iterdir()) if vms.exists() else []


def api_refused(site: RecoverySite, call, status: int, *fragments: str) -> str:
    """`call` fails with `status` and a message holding every fragment, creating nothing (no row, no folder)."""
    rows, folders = registered(), vm_folders(site)
    with pytest.raises(ApiError) as caught:
        call()
    assert caught.value.status == status, f"expected {status}, got {caught.value.status}: {caught.value}"
    for fragment in fragments:
        assert fragment in caught.value.message, f"{caught.value.message!r} should mention {fragment!r}"
    assert registered() == rows and vm_folders(site) == folders, f"a refused request ({caught.value}) created something"
    return caught.value.message


# ---- the REST API ------------------------------------------------------------------------------------------
def test_create_vms_over_the_api(site: RecoverySite, api: SiteRecoveryClient, images: dict[str, Path],
                                 test_guest) -> None:
    synthetic = api.create_vm("host1", "api-synth", disks=[{"name": "disk0", "size": "8M", "format": "vhd"},
                                                           {"name": "disk1", "size": 4 * MIB}])
    assert synthetic["runtime"] == "synthetic" and synthetic["power_state"] == "off"
    assert [(d["name"], d["size"], d["format"]) for d in synthetic["disks"]] == [
        ("disk0", 8 * MIB, "vhd"), ("disk1", 4 * MIB, "raw")]

    guest = api.create_vm(
        "host1", "api-guest", disks=[{"name": "data", "image": str(images["data-api"])}],
        guest=guest_json(test_guest, memory_mb=128),
        boot_files={test_guest.kernel: str(images["kernel"]), test_guest.initrd: str(images["initrd"])})
    assert guest["runtime"] == "qemu" and guest["power_state"] == "off"
    assert [(d["name"], d["size"]) for d in guest["disks"]] == [("data", 16 * MIB)]
    shown = api.show_vm("host1/api-guest")
    assert shown["runtime"] == "qemu" and shown["power_state"] == "off" and shown["id"] == guest["id"]
    assert {"api-synth", "api-guest"} <= {vm["name"] for vm in api.list_vms()}
    driver = site.host("host1")
    vm = driver.get_vm("api-guest")
    assert vm.guest.memory_mb == 128 and vm.guest.hashes[test_guest.kernel] == test_guest.kernel_sha256
    assert disk_digest(vm.disk("data").path) == disk_digest(images["data-api"])
    with session_scope() as session:
        row = session.exec(select(VirtualMachine).where(VirtualMachine.name == "api-guest")).one()
        assert row.guest["hashes"] == vm.guest.hashes, "the database keeps the boot files' hashes as registered"

    # The console of a VM that has no guest; and of a guest that never ran (off, no console yet).
    api_refused(site, lambda: api.vm_console("host1/api-synth"), 422, "synthetic VM", "no console")
    assert api.vm_console("host1/api-guest") == {"vm": "api-guest", "host": "host1", "power_state": "off",
                                                 "console": "(no console.log)"}
    # Stopping a VM that is off says so.
    stopped = api.stop_vm("host1/api-guest", timeout=5)
    assert stopped["stopped"] == "not-running" and stopped["power_state"] == "off"
    # Creating a VM that exists is a conflict.
    api_refused(site, lambda: api.create_vm("host1", "api-synth", disks=[{"name": "disk0", "size": "4M"}]), 409,
                "already exists")


def test_bad_vm_definitions_over_the_api_create_nothing(site: RecoverySite, api: SiteRecoveryClient,
                                                        images: dict[str, Path], test_guest, tmp_path: Path) -> None:
    boot = {test_guest.kernel: str(images["kernel"]), test_guest.initrd: str(images["initrd"])}
    data = [{"name": "data", "image": str(images["data-api"])}]

    def create(**changes: Any):
        options = {"disks": data, "guest": guest_json(test_guest), "boot_files": boot, **changes}
        return lambda: api.create_vm("host1", "bad", **options)

    outside = tmp_path / "vmlinux"
    shutil.copy(images["kernel"], outside)
    api_refused(site, create(boot_files={**boot, test_guest.kernel: str(outside)}), 422,
                f"boot file '{test_guest.kernel}'", "outside the host's root")
    api_refused(site, create(boot_files={**boot, test_guest.initrd: "/etc/passwd"}), 422, "outside the host's root")
    api_refused(site, create(disks=[{"name": "data", "image": "/etc/hostname"}]), 422, "image for disk 'data'",
                "outside the host's root")
    api_refused(site, create(disks=[{"name": "data", "image": str(images["qcow2"])}]), 422, "is a qcow2 image",
                f"qemu-img convert -O raw {images['qcow2']} DISK.raw")
    missing = str(images["kernel"].with_name("no-such-kernel"))
    api_refused(site, create(boot_files={**boot, test_guest.kernel: missing}), 422, f"{missing} does not exist")
    api_refused(site, create(boot_files={test_guest.initrd: str(images["initrd"])}), 422, "give a file for each")
    api_refused(site, create(disks=[{"name": "data", "size": "32M", "image": str(images["data-api"])}]), 422,
                "the image holds 16777216 bytes, the disk is to be 33554432")
    api_refused(site, create(guest=guest_json(test_guest, check_fail=None)), 422,
                "give both check_pass and check_fail")
    api_refused(site, create(guest=guest_json(test_guest, heartbeat="READY (")), 422, "not a valid regular expression")
    api_refused(site, create(guest=None), 422, "boot files are given with a guest definition only")
    api_refused(site, create(guest=guest_json(test_guest, kernel="../vmlinux")), 422, "kernel")
    api_refused(site, create(guest=guest_json(test_guest, memory_mb=32)), 422, "memory_mb")
    from_disk = {"boot_disk": "system", "heartbeat": test_guest.heartbeat}
    api_refused(site, create(guest=from_disk, boot_files=None), 422,
                "the guest boots from disk 'system', which the VM does not have (its disks: data)")
    api_refused(site, create(guest={**guest_json(test_guest), "boot_disk": "data"}, boot_files=None), 422,
                "give a kernel or a boot disk, not both")
    api_refused(site, create(guest={**from_disk, "boot_disk": "data"}), 422, "it takes no boot files")
    api_refused(site, create(disks=[{"name": "data"}]), 422, "give its size, or an image to import")
    api_refused(site, create(disks=[{"name": "data", "size": "3M", "format": "qcow2"}], guest=None, boot_files=None),
                422, "format must be raw or vhd")
    api_refused(site, lambda: api.create_vm("nohost", "bad", disks=[{"name": "d", "size": "4M"}]), 404, "nohost")

    # A VM still registered under that name whose folder went from the host: the database refuses the new one,
    # and the VM made on the host for it goes again.
    api.create_vm("host1", "stale", disks=[{"name": "d", "size": "4M"}])
    shutil.rmtree(site.host("host1").vms_dir / "stale")
    api_refused(site, lambda: api.create_vm("host1", "stale", disks=[{"name": "d", "size": "4M"}]), 422,
                "VM 'stale'", "remove the old VM first")


# ---- the CLI -------------------------------------------------------------------------------------------------
def asr_many(site: RecoverySite, commands: list[tuple[str, ...]], cwd: Path | None = None
             ) -> list[subprocess.CompletedProcess]:
    """Independent commands side by side (each `asr` spends seconds importing the service on a loaded machine)."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(lambda args: asr(site, *args, cwd=cwd, check=False), commands))


@pytest.fixture(scope="module")
def cli_guest(site: RecoverySite, images: dict[str, Path], test_guest) -> dict[str, Any]:
    """`asr vm create` of a QEMU guest from paths relative to the current folder (the host's root); the
    VM as the command printed it (--json)."""
    return asr_json(site, "vm", "create", "host1", "cli-guest", "--disk", "data=@images/data-cli.raw",
                    "--kernel", f"images/{test_guest.kernel}", "--initrd", f"images/{test_guest.initrd}",
                    "--cmdline", f"{test_guest.cmdline} asr.agent=0", "--heartbeat", test_guest.heartbeat,
                    "--check-pass", test_guest.check_pass, "--check-fail", test_guest.check_fail,
                    "--memory", "192", "--no-guest-agent", cwd=site.host("host1").root)


def test_create_vms_with_the_cli(site: RecoverySite, cli_guest: dict[str, Any], test_guest,
                                 images: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    driver = site.host("host1")
    # A synthetic VM with two disks, listed in the order given (the first is the OS disk).
    made = asr(site, "vm", "create", "host1", "cli-synth", "--disk", "os=8M:vhd", "--disk", "data=4M").stdout
    assert "VM cli-synth created on host1 (synthetic), off: 2 disk(s)" in made, made
    synthetic, guest = asr_many(site, [("vm", "show", "host1/cli-synth", "--json"),
                                       ("vm", "show", "host1/cli-guest", "--json")])
    shown = json.loads(synthetic.stdout)
    assert shown["runtime"] == "synthetic" and shown["power_state"] == "off"
    assert [(d["name"], d["format"]) for d in shown["disks"]] == [("os", "vhd"), ("data", "raw")]

    # The guest: `asr vm create` printed it, `asr vm show` shows the same.
    assert cli_guest["runtime"] == "qemu" and cli_guest["power_state"] == "off", cli_guest
    assert [(d["name"], d["size"]) for d in cli_guest["disks"]] == [("data", 16 * MIB)]
    shown = json.loads(guest.stdout)
    assert (shown["id"], shown["runtime"], shown["power_state"]) == (cli_guest["id"], "qemu", "off")
    vm = driver.get_vm("cli-guest")
    assert vm.guest.memory_mb == 192 and vm.guest.guest_agent is False
    assert vm.guest.heartbeat == test_guest.heartbeat and vm.guest.cmdline.endswith("asr.agent=0")
    assert vm.guest.hashes == {test_guest.kernel: test_guest.kernel_sha256,
                               test_guest.initrd: test_guest.initrd_sha256}

    # Refusals: one line, exit 2, nothing created. The same verbs in this process (the subprocesses above
    # showed the console script; each costs seconds here), paths relative to the host's root.
    monkeypatch.chdir(driver.root)
    rows, folders = registered(), vm_folders(site)
    runner = CliRunner()
    for args, needle in {
        ("vm", "create", "host1", "bad", "--disk", "d=4M", "--initrd", "images/initrd.img"):
            "give --kernel or --boot-disk too",
        ("vm", "create", "host1", "bad", "--disk", "d=4M", "--heartbeat", "READY"): "give --kernel or --boot-disk too",
        ("vm", "create", "host1", "bad", "--disk", "os=@images/os.raw", "--boot-disk", "os", "--kernel",
         f"images/{test_guest.kernel}", "--heartbeat", "READY"): "not both",
        ("vm", "create", "host1", "bad", "--disk", "os=@images/os.raw", "--boot-disk", "os", "--cmdline",
         "console=ttyS0", "--heartbeat", "READY"): "a boot disk's boot loader has its own",
        ("vm", "create", "host1", "bad", "--disk", "os=@images/os.raw", "--boot-disk", "os"): "needs --heartbeat",
        ("vm", "create", "host1", "bad", "--disk", "os=@images/os.raw", "--boot-disk", "system", "--heartbeat",
         "READY"): "boots from disk 'system', which the VM does not have (its disks: os)",
        ("vm", "create", "host1", "bad", "--disk", "os=@images/os.raw", "--boot-disk", "../os", "--heartbeat",
         "READY"): "invalid boot disk name",
        ("vm", "create", "host1", "bad", "--disk", "d=4M", "--kernel", f"images/{test_guest.kernel}"):
            "needs --heartbeat",
        ("vm", "create", "host1", "bad", "--disk", "d=@images/disk.qcow2"): "is a qcow2 image",
        ("vm", "create", "host1", "bad", "--disk", "d=@/etc/hostname"): "outside the host's root",
        ("vm", "create", "host1", "bad", "--disk", "d=@images/data-cli.raw", "--kernel", "images/no-such-kernel",
         "--heartbeat", "READY"): "images/no-such-kernel does not exist",
        ("vm", "create", "host1", "bad", "--disk", "d=@images/data-cli.raw", "--kernel", "/etc/passwd",
         "--heartbeat", "READY"): "outside the host's root",
        ("vm", "create", "host1", "bad", "--disk", "nosize"): "NAME=SIZE",
        ("vm", "create", "host1", "cli-synth", "--disk", "d=4M"): "already exists",
        ("vm", "console", "host1/cli-synth"): "synthetic VM",
    }.items():
        result = runner.invoke(main, list(args))
        what = f"asr {' '.join(args)} exited {result.exit_code}: {result.output}"
        assert result.exit_code == 2 and result.stdout == "" and "Traceback" not in result.stderr, what
        assert isinstance(result.exception, SystemExit), what  # click's exit, not an error escaping the verb
        assert needle.lower() in result.stderr.lower(), what
    assert registered() == rows and vm_folders(site) == folders, "a refused command created something"

    # A guest booting from its imported boot disk: no boot files, the disk named in its definition.
    result = runner.invoke(main, ["vm", "create", "host1", "cli-bootdisk", "--disk", "os=@images/os.raw",
                                  "--disk", "data=16M", "--boot-disk", "os", "--heartbeat", test_guest.heartbeat,
                                  "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["runtime"] == "qemu"
    vm = driver.get_vm("cli-bootdisk")
    assert (vm.guest.boot_disk, vm.guest.kernel, vm.guest.cmdline, vm.guest.hashes) == ("os", None, "", {})
    assert [(d.name, d.size) for d in vm.disks] == [("os", 16 * MIB), ("data", 16 * MIB)]
    assert not (vm.path / "boot").exists()
    assert vm.disk("os").path.read_bytes() == images["bootdisk"].read_bytes()


def test_start_console_and_stop_a_guest_with_the_cli(site: RecoverySite, cli_guest: dict[str, Any],
                                                     test_guest) -> None:
    driver = site.host("host1")
    vm = driver.get_vm("cli-guest")
    started = asr(site, "vm", "start", "host1/cli-guest").stdout
    try:
        assert "qemu" in started, started
        # Polled here (each `asr` costs seconds), then seen through the CLI.
        wait_until(lambda: driver.power_state("cli-guest") == "running", timeout=30, what="QEMU to run", interval=0.5)
        wait_until(lambda: "ASR-GUEST-READY" in driver.console_log(vm), timeout=BOOT_TIMEOUT,
                   what="the guest's heartbeat", interval=1)
        show, listed, console, tail = asr_many(site, [
            ("vm", "show", "host1/cli-guest", "--json"), ("vm", "list", "--json"), ("vm", "console", "host1/cli-guest"),
            ("vm", "console", "host1/cli-guest", "--bytes", "200", "--json")])
        assert show.returncode == 0 and json.loads(show.stdout)["power_state"] == "running", show
        # `vm list` reports the power state the host reads now too, not the one stored at registration.
        assert listed.returncode == 0, listed
        assert [(row["host"], row["power_state"]) for row in json.loads(listed.stdout)
                if row["name"] == "cli-guest"] == [("host1", "running")], listed.stdout
        assert console.returncode == 0 and re.search(test_guest.heartbeat, console.stdout), console
        assert "ASR-CHECK: PASS 0 files" in console.stdout, console.stdout
        tail = json.loads(tail.stdout)
        assert tail["power_state"] == "running" and 0 < len(tail["console"]) <= 200
        # Its definition does not change while it runs (it booted with this one): refused, nothing written.
        manifest = (vm.path / "vm.json").read_bytes()
        with pytest.raises(service.Conflict, match=r"VM host1/cli-guest is running: .* stop it first"):
            service.update_vm("host1/cli-guest", guest={"memory_mb": 256})
        assert (vm.path / "vm.json").read_bytes() == manifest
    finally:
        stopped = asr_json(site, "vm", "stop", "host1/cli-guest", "--timeout", "30")
    assert stopped["stopped"] == "stopped" and stopped["power_state"] == "off", stopped
    show, listed, console = asr_many(site, [("vm", "show", "host1/cli-guest", "--json"), ("vm", "list", "--json"),
                                            ("vm", "console", "host1/cli-guest")])
    assert json.loads(show.stdout)["power_state"] == "off"
    assert [row["power_state"] for row in json.loads(listed.stdout) if row["name"] == "cli-guest"] == ["off"]
    assert "ASR-GUEST-POWEROFF" in console.stdout, console.stdout


def test_a_guests_definition_changes_as_it_is_created(site: RecoverySite, cli_guest: dict[str, Any],
                                                      api: SiteRecoveryClient) -> None:
    """`asr vm set` and PATCH /vms/{vm} of a guest that is off (after the test above stopped it): checked as
    `asr vm create` checks a definition; how it boots (its kernel, initrd and their hashes) stays."""
    driver = site.host("host1")
    before = {vm: (driver.get_vm(vm).path / "vm.json").read_bytes() for vm in ("cli-guest", "cli-bootdisk")}
    rows = registered()
    runner = CliRunner()
    for args, needle in {
        ("cli-guest", "--memory", "10"): "memory_mb must be a whole number from 64 to 16384, got 10",
        ("cli-guest", "--boot-timeout", "1"): "boot_timeout_s must be from 5 to 3600 seconds",
        ("cli-guest", "--heartbeat", "(READY"): "heartbeat '(READY' is not a valid regular expression",
        ("cli-bootdisk", "--cmdline", "console=ttyS0"): "a guest booting from its disk 'os' takes no cmdline",
    }.items():
        result = runner.invoke(main, ["vm", "set", f"host1/{args[0]}", *args[1:]])
        what = f"asr vm set {' '.join(args)} exited {result.exit_code}: {result.output}"
        assert result.exit_code == 2 and result.stdout == "" and needle in result.stderr, what
    api_refused(site, lambda: api.update_vm("host1/cli-guest", guest={"kernel": "other"}), 422, "kernel")
    api_refused(site, lambda: api.update_vm("host1/cli-guest", guest={"memory_mb": 20000}), 422, "16384")
    assert {vm: (driver.get_vm(vm).path / "vm.json").read_bytes() for vm in before} == before
    assert registered() == rows

    hashes = driver.get_vm("cli-guest").guest.hashes
    result = runner.invoke(main, ["vm", "set", "host1/cli-guest", "--memory", "320", "--boot-timeout", "90",
                                  "--guest-agent", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["guest"]["memory_mb"] == 320
    changed = api.update_vm("host1/cli-guest", guest={"check_pass": "ASR-CHECK: PASS", "memory_mb": 288})
    guest = api.show_vm("host1/cli-guest")["guest"]
    assert changed["guest"] == guest
    assert (guest["memory_mb"], guest["boot_timeout_s"], guest["guest_agent"], guest["check_pass"]) == (
        288, 90.0, True, "ASR-CHECK: PASS")
    on_host = driver.get_vm("cli-guest").guest  # the host's manifest says the same, and boots as before
    assert (on_host.memory_mb, on_host.boot_timeout_s, on_host.guest_agent, on_host.hashes) == (288, 90.0, True, hashes)
    with session_scope() as session:
        row = session.exec(select(VirtualMachine).where(VirtualMachine.name == "cli-guest")).one()
        assert row.guest["memory_mb"] == 288 and row.guest["hashes"] == hashes

    # The guest's own check can be removed (both patterns, as a definition has both or neither) and given again.
    check = {"check_pass": guest["check_pass"], "check_fail": guest["check_fail"]}
    for args, needle in {("--no-check", "--check-pass", "PASS"): "without --check-pass/--check-fail",
                         ("--check-pass", "PASS", "--no-check"): "without --check-pass/--check-fail"}.items():
        result = runner.invoke(main, ["vm", "set", "host1/cli-guest", *args])
        assert result.exit_code == 2 and needle in result.stderr, result.output
    api_refused(site, lambda: api.update_vm("host1/cli-guest", guest={"check_pass": None}), 422,
                "give both check_pass and check_fail, or neither")
    api_refused(site, lambda: api.update_vm("host1/cli-guest", guest={"memory_mb": None}), 422,
                "memory_mb must be a whole number")
    result = runner.invoke(main, ["vm", "set", "host1/cli-guest", "--no-check", "--json"])
    assert result.exit_code == 0, result.output
    assert (json.loads(result.stdout)["guest"]["check_pass"], api.show_vm("host1/cli-guest")["guest"]["check_fail"],
            driver.get_vm("cli-guest").guest.check_pass) == (None, None, None)
    assert (api.update_vm("host1/cli-guest", guest=check)["guest"]["check_pass"],
            driver.get_vm("cli-guest").guest.check_fail) == (check["check_pass"], check["check_fail"])
