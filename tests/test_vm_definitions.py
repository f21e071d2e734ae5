"""A VM's definition and its creation on a host: the guest section of a manifest (sites/host/guestdef.py)
checked field by field, boot files and disk images taken only from inside the host's root and only in the
formats the data path replicates as they are (sites/host/images.py), and `Host.create_vm` leaving nothing
behind when it refuses. One short QEMU boot checks what a running guest refuses.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session

from datapath.digest import disk_digest
from datapath.disk import create_disk, open_disk
from models.db import get_engine, init_db
from models.fabric import create_site, import_vm_manifest, register_host, vm_disks
from sites.guest import make_data_disk
from sites.host import Host, VmManifestError, VmRunningError, VmSpecError
from sites.host.guestdef import GuestDefinition
from sites.localservices import wait_until

MIB = 1024 * 1024
GOOD: dict[str, Any] = {"kernel": "vmlinux", "initrd": "initrd.img", "cmdline": "console=ttyS0",
                        "heartbeat": r"READY (\S+)", "check_pass": "PASS", "check_fail": "FAIL"}


def definition(**changes: Any) -> GuestDefinition:
    return GuestDefinition.from_manifest({**GOOD, **changes}, "test")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- the guest definition --------------------------------------------------------------------------------
def test_a_good_definition_round_trips() -> None:
    guest = definition(memory_mb=512, guest_agent=False, boot_timeout_s=30)
    assert guest.boot_files == ["vmlinux", "initrd.img"]
    assert GuestDefinition.from_manifest(guest.to_manifest(), "again") == guest
    assert definition(initrd=None).boot_files == ["vmlinux"]
    assert definition(check_pass=None, check_fail=None).check_pass is None


@pytest.mark.parametrize(("changes", "fragment"), [
    ({"kernal": "vmlinux"}, "unknown guest definition field(s) kernal"),
    ({"runtime": "kvm"}, "guest runtime must be 'qemu'"),
    ({"heartbeat": "READY ("}, "heartbeat 'READY (' is not a valid regular expression"),
    ({"heartbeat": None}, "heartbeat must be a regular expression"),
    ({"heartbeat": ""}, "heartbeat must be a regular expression"),
    ({"heartbeat": "x" * 201}, "heartbeat must be a regular expression of 1 to 200 characters"),
    ({"check_pass": "[PASS"}, "check_pass '[PASS' is not a valid regular expression"),
    ({"check_fail": "(?P<x"}, "check_fail '(?P<x' is not a valid regular expression"),
    ({"memory_mb": 32}, "memory_mb must be a whole number from 64 to 16384, got 32"),
    ({"memory_mb": 16385}, "memory_mb must be a whole number from 64 to 16384"),
    ({"memory_mb": True}, "memory_mb must be a whole number"),
    ({"memory_mb": "256"}, "memory_mb must be a whole number"),
    ({"memory_mb": 256.5}, "memory_mb must be a whole number"),
    ({"boot_timeout_s": 4}, "boot_timeout_s must be from 5 to 3600 seconds, got 4"),
    ({"boot_timeout_s": 3601}, "boot_timeout_s must be from 5 to 3600 seconds"),
    ({"boot_timeout_s": "60"}, "boot_timeout_s must be from 5 to 3600 seconds"),
    ({"guest_agent": "yes"}, "guest_agent must be true or false"),
    ({"cmdline": "a\nb"}, "cmdline must be one line"),
    ({"cmdline": "x" * 1025}, "cmdline must be one line of at most 1024 characters"),
    ({"check_fail": None}, "give both check_pass and check_fail, or neither"),
    ({"check_pass": None}, "give both check_pass and check_fail, or neither"),
    ({"hashes": {"vmlinux": "0" * 64}}, "hashes name ['vmlinux'], the boot files are ['vmlinux', 'initrd.img']"),
    ({"hashes": {"vmlinux": "0" * 64, "initrd.img": "0" * 64, "other": "0" * 64}}, "hashes name"),
    ({"hashes": {"vmlinux": "0" * 63, "initrd.img": "0" * 64}}, "SHA-256 hex digests"),
    ({"hashes": {"vmlinux": "G" * 64, "initrd.img": "0" * 64}}, "SHA-256 hex digests"),
    ({"hashes": ["vmlinux"]}, "SHA-256 hex digests"),
    ({"kernel": "boot/vmlinux"}, "invalid kernel file name 'boot/vmlinux'"),
    ({"kernel": ".."}, "invalid kernel file name '..'"),
    ({"kernel": "../vmlinux"}, "invalid kernel file name"),
    ({"kernel": None}, "say how the guest boots: a kernel (with initrd and cmdline), or a boot_disk"),
    ({"boot_disk": "os"}, "a guest booting from its disk 'os' takes no kernel, initrd, cmdline"),
    ({"boot_disk": "os", "kernel": None, "initrd": None}, "takes no cmdline: the disk's boot loader"),
    ({"boot_disk": "../os", "kernel": None}, "invalid boot disk name '../os'"),
    ({"boot_disk": "", "kernel": None}, "invalid boot disk name ''"),
    ({"initrd": "../../etc/shadow"}, "invalid initrd file name"),
    ({"initrd": "/initrd.img"}, "invalid initrd file name"),
])
def test_every_bad_field_is_refused_by_name(changes: dict[str, Any], fragment: str) -> None:
    with pytest.raises(VmSpecError) as caught:
        definition(**changes)
    assert fragment in str(caught.value) and str(caught.value).startswith("test: "), str(caught.value)


def test_a_definition_booting_from_a_disk_round_trips() -> None:
    guest = definition(kernel=None, initrd=None, cmdline=None, boot_disk="os")
    assert (guest.boot_disk, guest.kernel, guest.cmdline, guest.boot_files) == ("os", None, "", [])
    assert GuestDefinition.from_manifest(guest.to_manifest(), "again") == guest
    assert "boot_disk" not in definition().to_manifest()  # a direct-kernel manifest stays as it was


def test_a_definition_that_is_not_an_object_is_refused() -> None:
    with pytest.raises(VmSpecError, match="the guest definition must be an object"):
        GuestDefinition.from_manifest(["vmlinux"], "test")


# ---- creating a VM on a host ---------------------------------------------------------------------------------
@pytest.fixture
def host(tmp_path: Path) -> Host:
    root = tmp_path / "host1"
    (root / "images").mkdir(parents=True)
    return Host(root, "host1")


@pytest.fixture
def boot(host: Host) -> dict[str, Path]:
    """A kernel and an initrd inside the host's root (their content does not matter until a boot)."""
    files = {"vmlinux": host.root / "images" / "vmlinux", "initrd.img": host.root / "images" / "initrd.img"}
    files["vmlinux"].write_bytes(b"kernel " * 1000)
    files["initrd.img"].write_bytes(b"initrd " * 500)
    return files


def nothing_left(host: Host) -> None:
    """No VM folder and no staging folder: a refused creation leaves the host as it was."""
    leftovers = sorted(p.name for p in host.vms_dir.iterdir()) if host.vms_dir.exists() else []
    assert leftovers == [], f"a refused creation left {leftovers} in {host.vms_dir}"


def refused(host: Host, *fragments: str, **create: Any) -> str:
    create.setdefault("name", "vm1")
    create.setdefault("disks", [("disk0", "4M", "raw")])
    with pytest.raises(VmSpecError) as caught:
        host.create_vm(create.pop("name"), create.pop("disks"), **create)
    for fragment in fragments:
        assert fragment in str(caught.value), f"{caught.value} should mention {fragment!r}"
    nothing_left(host)
    return str(caught.value)


def test_boot_files_are_copied_with_their_sha256_recorded(host: Host, boot: dict[str, Path]) -> None:
    vm = host.create_vm("web01", [("disk0", "4M", "raw"), ("disk1", "8M", "vhd")], guest=definition(),
                        boot_files=boot)
    assert vm.guest is not None and vm.guest.hashes == {name: sha256(path) for name, path in boot.items()}
    for name, source in boot.items():
        copy = vm.path / "boot" / name
        assert copy.read_bytes() == source.read_bytes() and not copy.is_symlink()
    manifest = json.loads((vm.path / "vm.json").read_text())
    assert manifest["guest"]["hashes"] == vm.guest.hashes
    assert manifest["guest"]["kernel"] == "vmlinux" and manifest["guest"]["heartbeat"] == r"READY (\S+)"
    # The round trip: the store reads back the same definition.
    assert host.get_vm("web01").guest == vm.guest
    assert [d.name for d in host.get_vm("web01").disks] == ["disk0", "disk1"]
    assert host.power_state("web01") == "off"
    # The copy is the VM's: changing the source afterwards changes nothing the VM boots.
    boot["vmlinux"].write_bytes(b"changed")
    assert sha256(vm.path / "boot" / "vmlinux") == vm.guest.hashes["vmlinux"]
    assert sorted(p.name for p in host.vms_dir.iterdir()) == ["web01"]


def test_boot_files_that_differ_from_the_definitions_hashes_are_refused(host: Host,
                                                                         boot: dict[str, Path]) -> None:
    hashes = {name: sha256(path) for name, path in boot.items()}
    hashes["initrd.img"] = hashlib.sha256(b"what was registered").hexdigest()
    refused(host, "boot file(s) initrd.img do not match the SHA-256", guest=definition(hashes=hashes),
            boot_files=boot)
    # The files that match are accepted.
    hashes["initrd.img"] = sha256(boot["initrd.img"])
    vm = host.create_vm("vm1", [("disk0", "4M", "raw")], guest=definition(hashes=hashes), boot_files=boot)
    assert vm.guest.hashes == hashes


def test_missing_or_unnamed_boot_files_are_refused(host: Host, boot: dict[str, Path]) -> None:
    missing = host.root / "images" / "no-such-vmlinux"
    refused(host, "boot file 'vmlinux'", f"{missing} does not exist", guest=definition(),
            boot_files={**boot, "vmlinux": missing})
    refused(host, "give a file for each", guest=definition(), boot_files={"initrd.img": boot["initrd.img"]})
    refused(host, "give a file for each", guest=definition(), boot_files=None)
    refused(host, "boot files given for a VM without a guest definition", boot_files=boot)
    refused(host, "is not a regular file", guest=definition(),
            boot_files={**boot, "vmlinux": host.root / "images"})


def test_files_outside_the_host_root_are_refused_even_through_a_symlink(host: Host, boot: dict[str, Path],
                                                                         tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "vmlinux"
    secret.write_bytes(b"not the host's")
    image = outside / "data.raw"
    create_disk(image, 4 * MIB, "raw")
    refused(host, "boot file 'vmlinux'", "outside the host's root", guest=definition(),
            boot_files={**boot, "vmlinux": secret})
    refused(host, "boot file 'initrd.img'", "outside the host's root", guest=definition(),
            boot_files={**boot, "initrd.img": "/etc/passwd"})
    refused(host, "image for disk 'disk0'", "outside the host's root", disks=[("disk0", None, "raw")],
            images={"disk0": image})
    # A path that looks inside but climbs out.
    refused(host, "outside the host's root", disks=[("disk0", None, "raw")],
            images={"disk0": host.root / "images" / ".." / ".." / "outside" / "data.raw"})
    # Symlinks inside the root pointing out are followed before the check.
    (host.root / "images" / "link-kernel").symlink_to(secret)
    (host.root / "images" / "link-image.raw").symlink_to(image)
    refused(host, "resolves to", str(secret), "outside the host's root", guest=definition(),
            boot_files={**boot, "vmlinux": host.root / "images" / "link-kernel"})
    refused(host, "outside the host's root", disks=[("disk0", None, "raw")],
            images={"disk0": host.root / "images" / "link-image.raw"})
    # A folder symlinked out of the root is no way around it either.
    (host.root / "images" / "elsewhere").symlink_to(outside)
    refused(host, "outside the host's root", disks=[("disk0", None, "raw")],
            images={"disk0": host.root / "images" / "elsewhere" / "data.raw"})


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True, timeout=60)


@pytest.mark.parametrize(("create", "named"), [
    (["-f", "qcow2"], "qcow2"),
    (["-f", "vhdx"], "vhdx"),
    (["-f", "vpc", "-o", "subformat=dynamic"], "dynamic or differencing VHD"),
    (["-f", "vmdk"], "vmdk"),
    (["-f", "vdi"], "vdi"),
    (["-f", "qed"], "qed"),
    (["-f", "parallels"], "parallels"),
])
def test_container_images_are_refused_with_the_convert_command(host: Host, create: list[str], named: str) -> None:
    image = host.root / "images" / "disk.img"
    qemu_img("create", *create, str(image), "8M")
    message = refused(host, f"is a {named} image, not a raw disk or a fixed VHD",
                      f"qemu-img convert -O raw {image} DISK.raw", disks=[("disk0", None, "raw")],
                      images={"disk0": image})
    assert str(image) in message


def random_raw(path: Path, size: int, seed: int) -> None:
    """A raw image with data at a few places and holes between."""
    import random
    rng = random.Random(seed)
    create_disk(path, size, "raw")
    with open_disk(path, writable=True) as disk:
        for offset in (0, size // 3, size - 64 * 1024):
            disk.write(offset, rng.randbytes(64 * 1024))


@pytest.mark.parametrize("target", ["raw", "vhd"])
def test_raw_and_fixed_vhd_images_are_imported_byte_for_byte(host: Host, target: str) -> None:
    raw = host.root / "images" / "data.raw"
    random_raw(raw, 8 * MIB, seed=3)
    vhd = host.root / "images" / "data.vhd"
    # force_size: the VHD's size is the raw image's, not rounded up to a disk geometry.
    qemu_img("convert", "-f", "raw", "-O", "vpc", "-o", "subformat=fixed,force_size=on", str(raw), str(vhd))
    vm = host.create_vm("vm1", [("from-raw", None, target), ("from-vhd", 8 * MIB, target)],
                        images={"from-raw": raw, "from-vhd": vhd})
    expected = disk_digest(raw)
    assert disk_digest(vhd) == expected
    for disk in vm.disks:
        assert disk.size == 8 * MIB and disk.format == target
        assert disk.path.suffix == f".{target}"
        assert disk_digest(disk.path) == expected, f"disk {disk.name} differs from its image"
    # The images are left as they were; the VM's disks are its own files.
    assert disk_digest(raw) == expected and all(not d.path.is_symlink() for d in vm.disks)


def test_an_image_whose_size_disagrees_is_refused(host: Host) -> None:
    raw = host.root / "images" / "data.raw"
    random_raw(raw, 8 * MIB, seed=4)
    refused(host, "the image holds 8388608 bytes, the disk is to be 16777216", disks=[("disk0", "16M", "raw")],
            images={"disk0": raw})
    refused(host, "images given for disks it does not have: other", disks=[("disk0", "8M", "raw")],
            images={"other": raw})
    # qemu-img's fixed VHD without force_size rounds the size up to a CHS geometry: not a whole MiB.
    chs = host.root / "images" / "chs.vhd"
    qemu_img("convert", "-f", "raw", "-O", "vpc", "-o", "subformat=fixed", str(raw), str(chs))
    refused(host, "whole number of MiB", "force_size=on", disks=[("disk0", None, "vhd")], images={"disk0": chs})


def test_a_guest_vm_with_an_imported_ext4_disk(host: Host, boot: dict[str, Path]) -> None:
    data = host.root / "images" / "data.raw"
    make_data_disk(data, 16 * MIB)
    vm = host.create_vm("web01", [("data", None, "raw")], guest=definition(), boot_files=boot,
                        images={"data": data})
    assert vm.disk("data").size == 16 * MIB and disk_digest(vm.disk("data").path) == disk_digest(data)


def test_a_guest_booting_from_one_of_its_disks(host: Host, boot: dict[str, Path]) -> None:
    from_disk = definition(kernel=None, initrd=None, cmdline=None, boot_disk="os")
    refused(host, "VM 'vm1': the guest boots from disk 'os', which the VM does not have (its disks: disk0)",
            guest=from_disk)
    refused(host, "its guest boots from its disk 'os', whose boot loader loads the kernel: it takes no boot files",
            disks=[("os", "4M", "raw")], guest=from_disk, boot_files=boot)
    refused(host, "boots through a BIOS (generation 1); UEFI firmware for generation 2 is not supported",
            disks=[("os", "4M", "raw")], guest=from_disk, generation=2)
    vm = host.create_vm("vm1", [("data", "4M", "raw"), ("os", "4M", "raw")], guest=from_disk)
    assert vm.guest.boot_disk == "os" and not (vm.path / "boot").exists()
    assert host.get_vm("vm1").guest == vm.guest


# ---- manifests ---------------------------------------------------------------------------------------------
def test_a_damaged_guest_section_makes_the_manifest_invalid(host: Host, boot: dict[str, Path]) -> None:
    vm = host.create_vm("web01", [("disk0", "4M", "raw")], guest=definition(), boot_files=boot)
    manifest_path = vm.path / "vm.json"
    good = json.loads(manifest_path.read_text())
    for damage, fragment in [
        ({"heartbeat": "READY ("}, "not a valid regular expression"),
        ({"kernel": "../../vmlinux"}, "invalid kernel file name"),
        ({"memory_mb": 1}, "memory_mb"),
        ({"extra": 1}, "unknown guest definition field(s) extra"),
        ({"hashes": {"vmlinux": "0" * 64}}, "hashes name"),
    ]:
        manifest_path.write_text(json.dumps({**good, "guest": {**good["guest"], **damage}}))
        with pytest.raises(VmManifestError) as caught:
            host.get_vm("web01")
        assert fragment in str(caught.value) and "web01" in str(caught.value), str(caught.value)
    booting_from = {key: value for key, value in good["guest"].items() if key not in ("kernel", "initrd", "hashes")}
    manifest_path.write_text(json.dumps({**good, "guest": {**booting_from, "cmdline": "", "boot_disk": "os"}}))
    with pytest.raises(VmManifestError, match="boots from disk 'os', which the VM does not have"):
        host.get_vm("web01")
    manifest_path.write_text(json.dumps({**good, "guest": "vmlinux"}))
    with pytest.raises(VmManifestError, match="must be an object"):
        host.get_vm("web01")


@pytest.fixture
def db_session(tmp_path: Path):
    engine = init_db(get_engine(f"sqlite:///{tmp_path / 'asr.db'}"))
    with Session(engine, expire_on_commit=False) as session:
        yield session
    engine.dispose()


def test_import_vm_manifest_stores_the_guest_and_refuses_a_bad_one(host: Host, boot: dict[str, Path],
                                                                    db_session: Session) -> None:
    site = create_site(db_session, "primary")
    row, _key = register_host(db_session, "host1", str(host.root), site=site)
    vm = host.create_vm("web01", [("disk0", "4M", "raw")], guest=definition(), boot_files=boot)
    registered = import_vm_manifest(db_session, row, vm.to_manifest())
    db_session.commit()
    assert registered.guest == vm.guest.to_manifest()
    assert GuestDefinition.from_manifest(registered.guest, "db") == vm.guest
    synthetic = import_vm_manifest(db_session, row, host.create_vm("plain", [("disk0", "4M", "raw")]).to_manifest())
    assert synthetic.guest is None
    bad = vm.to_manifest()
    bad["name"] = "other"
    bad["id"] = "6c3f6a56-3c1f-4b47-9d43-7f1d1c1a0b01"
    for damage in ({"heartbeat": "("}, {"memory_mb": 0}, {"kernel": "a/b"}, {"check_fail": None},
                   {"kernel": None, "initrd": None, "cmdline": "", "hashes": {}, "boot_disk": "os"}):
        with pytest.raises(ValueError, match="VM manifest 'other' from host 'host1'"):
            import_vm_manifest(db_session, row, {**bad, "guest": {**bad["guest"], **damage}})
    assert {v.name for v in [registered, synthetic]} == {"web01", "plain"}


def test_the_database_keeps_the_disk_order_of_the_manifest(host: Host, db_session: Session) -> None:
    """A guest's first drive is its /dev/vda: the registered disks (what a recovery VM is made from) keep
    the manifest's order, not the order of their names."""
    site = create_site(db_session, "primary")
    row, _key = register_host(db_session, "host1", str(host.root), site=site)
    manifest = host.create_vm("web01", [("os", "8M", "raw"), ("data", "4M", "raw"), ("bin", "4M", "vhd")]
                              ).to_manifest()
    vm = import_vm_manifest(db_session, row, manifest)
    db_session.commit()
    assert [d.name for d in vm_disks(db_session, vm)] == ["os", "data", "bin"]
    # Registered again after the disks were reordered on the host: the new order.
    manifest["disks"] = [manifest["disks"][2], manifest["disks"][0], manifest["disks"][1]]
    import_vm_manifest(db_session, row, manifest)
    db_session.commit()
    assert [d.name for d in vm_disks(db_session, vm)] == ["bin", "os", "data"]


# ---- what a running guest refuses (one short boot) --------------------------------------------------------
@pytest.fixture
def running_guest(tmp_path: Path, test_guest):
    host = Host(tmp_path / "host1", "host1")
    images = host.root / "images"
    images.mkdir(parents=True)
    for source in (test_guest.kernel_path, test_guest.initrd_path):
        shutil.copy(source, images / source.name)
    data = images / "data.raw"
    make_data_disk(data, 16 * MIB)
    guest = GuestDefinition(kernel=test_guest.kernel, initrd=test_guest.initrd,
                            cmdline=f"{test_guest.cmdline} asr.agent=0", heartbeat=test_guest.heartbeat,
                            check_pass=test_guest.check_pass, check_fail=test_guest.check_fail)
    host.create_vm("web01", [("data", None, "raw")], guest=guest, images={"data": data},
                   boot_files={name: images / name for name in guest.boot_files})
    host.create_vm("plain", [("disk0", "4M", "raw")])
    try:
        yield host
    finally:
        host.shut_down("web01", timeout=5)


def test_a_running_guest_refuses_tracking_and_the_synthetic_workload(running_guest: Host) -> None:
    host = running_guest
    with pytest.raises(VmSpecError, match="is a QEMU guest: its own workload runs inside it"):
        host.start_workload("web01")
    host.start_vm("web01")
    wait_until(lambda: host.power_state("web01") == "running", timeout=30, what="QEMU to run")
    with pytest.raises(VmRunningError, match="is running: shut it down before enabling replication"):
        host.enable_tracking("web01")
    with pytest.raises(VmSpecError, match="is a QEMU guest"):
        host.start_workload("web01")
    with pytest.raises(VmRunningError, match="is running"):
        host.delete_vm("web01")
    # The synthetic VM beside it is not affected.
    assert [d.name for d in host.enable_tracking("plain")] == ["disk0"]
    report = host.check_boot(host.get_vm("web01"), timeout=90)
    assert report.booted and report.check == "passed", report
    assert host.shut_down("web01", timeout=10).value in ("stopped", "killed")
    assert host.power_state("web01") == "off"
    assert [d.name for d in host.enable_tracking("web01")] == ["data"], "tracking is enabled once it is off"
