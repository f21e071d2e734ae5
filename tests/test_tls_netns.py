"""The recovery storage on another machine, as far as the network can tell: Azurite in a network namespace of
its own, reached by address over a veth link that the test makes (iproute2) and captures (tcpdump). A VM's
protection over HTTPS sends its disks across that link and the capture holds none of their bytes; the same
capture on plain HTTP (allowed explicitly) does find them, so the search would see them if they leaked.

(A first step toward issue 15's split of the whole deployment over namespaces: docs/operations.md, "Security:
TLS".) Needs root for `ip netns` and tcpdump (scripts/ensure-tools.sh installs it).
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from recovery_site import RecoverySite

from sites.localservices import AzuriteProcess, wait_until
from sites.pki import create_deployment_certificates
from sites.storage.azure import AzureBlobStorage

PROBE = 64  # bytes of a disk block searched for: within one TCP segment however the stream is cut


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@dataclass
class Link:
    """A network namespace joined to this one by a veth pair: `local` here, `remote` there."""

    netns: str
    host_if: str
    local: str
    remote: str


@pytest.fixture
def remote_site() -> Iterator[Link]:
    if os.geteuid() != 0:
        pytest.fail("this test makes network namespaces: run it as root (CI does)", pytrace=False)
    if shutil.which("tcpdump") is None:
        pytest.fail("tcpdump is missing: run scripts/ensure-tools.sh tcpdump", pytrace=False)
    tag = f"{os.getpid() % 10000}{random.randrange(100, 1000)}"
    subnet = random.randrange(1, 250)
    link = Link(f"asr-rs-{tag}", f"asrh{tag}", f"10.231.{subnet}.1", f"10.231.{subnet}.2")
    _ip("netns", "add", link.netns)
    try:
        _ip("link", "add", link.host_if, "type", "veth", "peer", "name", f"asrn{tag}")
        _ip("link", "set", f"asrn{tag}", "netns", link.netns)
        _ip("addr", "add", f"{link.local}/30", "dev", link.host_if)
        _ip("link", "set", link.host_if, "up")
        _ip("-n", link.netns, "addr", "add", f"{link.remote}/30", "dev", f"asrn{tag}")
        _ip("-n", link.netns, "link", "set", f"asrn{tag}", "up")
        _ip("-n", link.netns, "link", "set", "lo", "up")
        yield link
    finally:
        subprocess.run(["ip", "link", "del", link.host_if], capture_output=True, timeout=30)
        subprocess.run(["ip", "netns", "del", link.netns], capture_output=True, timeout=30)


class Capture:
    """tcpdump on an interface into a file, until `stop()`."""

    def __init__(self, interface: str, path: Path) -> None:
        self.path = path
        self.process = subprocess.Popen(["tcpdump", "-i", interface, "-U", "-s", "0", "-w", str(path), "tcp"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        wait_until(lambda: path.exists() or self.process.poll() is not None, timeout=15, what="tcpdump to start")
        assert self.process.poll() is None, self.process.stderr.read().decode()
        time.sleep(0.5)

    def stop(self) -> bytes:
        if self.process.poll() is None:
            time.sleep(0.5)  # the last packets written (-U: per packet)
            self.process.send_signal(signal.SIGINT)
            self.process.wait(timeout=15)
        return self.path.read_bytes()


def probes(data: bytes, count: int) -> list[bytes]:
    """`count` 64-byte pieces of the 4 KiB blocks of `data` that are not all one byte (a zero or filler
    block could appear anywhere)."""
    blocks = [data[i:i + 4096] for i in range(0, len(data) - 4095, 4096)]
    varied = [block for block in blocks if len(set(block[:PROBE])) > 8]
    assert len(varied) >= count, f"only {len(varied)} blocks with data"
    step = len(varied) // count
    return [varied[i * step][:PROBE] for i in range(count)]


def test_disk_data_crosses_the_link_to_the_storage_only_encrypted(tmp_path: Path, remote_site: Link) -> None:
    certificates = create_deployment_certificates(tmp_path / "pki", [remote_site.remote])

    # The capture works: plain HTTP to the same place shows the bytes sent.
    plain = AzuriteProcess(tmp_path / "azurite-plain", host=remote_site.remote, netns=remote_site.netns).start()
    try:
        capture = Capture(remote_site.host_if, tmp_path / "plain.pcap")
        payload = random.Random(5).randbytes(256 * 1024)
        storage = AzureBlobStorage("plain-probe", connection_string=plain.connection_string())
        try:
            storage.put_object("probe", payload)
        finally:
            storage.close()
        seen = capture.stop()
        assert all(piece in seen for piece in probes(payload, 16)), "the capture misses plain-text payload"
    finally:
        plain.stop()

    azurite = AzuriteProcess(tmp_path / "azurite", tls=certificates, host=remote_site.remote,
                             netns=remote_site.netns).start()
    try:
        assert azurite.blob_endpoint.startswith(f"https://{remote_site.remote}:")
        capture = Capture(remote_site.host_if, tmp_path / "tls.pcap")
        with RecoverySite(tmp_path / "site", backend="azure", azurite=azurite, tls=certificates) as site:
            vm_id = site.create_vm("host1", "app01", [("disk0", "16M", "vhd"), ("disk1", "8M", "raw")],
                                   fill=0.5, seed=31)
            site.wait_job(site.protect(vm_id), 120)
            site.verify_replica(vm_id)  # the replicas are in the remote storage, byte for byte
            disks = [Path(d.path).read_bytes() for d in site.host("host1").get_vm("app01").disks]
        seen = capture.stop()
        assert len(seen) > sum(len(d) for d in disks) // 2, f"only {len(seen)} bytes captured: not the copy's path"
        leaked = [piece.hex()[:16] for data in disks for piece in probes(data, 64) if piece in seen]
        assert leaked == [], f"disk data in clear on the link: {leaked[:5]}"
    finally:
        azurite.stop()
