"""`asr demo`: the data path end to end, with every replica checked byte for byte.

For each recovery backend (a local directory, and Azure page blobs on an Azurite it starts itself):
build a host with a two-disk VM, start the VM's workload writing through the replication tracker,
copy a snapshot of each disk while the workload writes, run delta cycles, stop the workload, verify;
then damage a replica, resynchronize sending only what differs, and verify again.
"""
from __future__ import annotations

import json
import random
import shutil
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import click

MiB = 1 << 20


@dataclass
class Report:
    backend: str
    steps: list[dict] = field(default_factory=list)
    checks: list[dict] = field(default_factory=list)

    def step(self, name: str, **details) -> None:
        self.steps.append({"step": name, **details})

    def check(self, name: str, ok: bool, detail: str) -> bool:
        self.checks.append({"check": name, "ok": ok, "detail": detail})
        return ok

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c["ok"] for c in self.checks)


def _say(quiet: bool, text: str) -> None:
    if not quiet:
        click.echo(text)


def _verify_replica(storage, replica, disk_path) -> tuple[bool, str]:
    from datapath.compare import first_difference
    from datapath.disk import open_disk

    with open_disk(disk_path) as source:
        target = storage.open_disk(replica.name)
        try:
            if target.size != source.size:
                return False, f"sizes differ: {source.size} vs {target.size}"
            offset = first_difference(source, target)
        finally:
            target.close()
    if offset is None:
        return True, f"{source.size} bytes identical"
    return False, f"first difference at offset {offset}"


def run_backend(backend: str, storage, workdir: Path, *, quiet: bool, seed: int) -> Report:
    from datapath.manifest import compute_manifest
    from datapath.replication import ReplicaDisk, initial_copy, replicate_cycle, resynchronize
    from sites.host import Host

    report = Report(backend)
    host = Host(workdir / f"host-{backend}", "host1")
    vm = host.create_vm("app01", [("disk0", 64 * MiB, "vhd"), ("disk1", 32 * MiB, "raw")])
    host.write_initial_data(vm, seed=seed, fraction=0.5)
    host.enable_tracking(vm)
    replicas = {d.name: ReplicaDisk(storage, ReplicaDisk.name_for(host.name, vm.name, d.name)) for d in vm.disks}
    _say(quiet, f"[{backend}] VM {vm.name} on {host.name}: "
                + ", ".join(f"{d.name} ({d.format}, {d.size // MiB} MiB)" for d in vm.disks))

    try:
        host.start_workload(vm, rate_mb_s=4.0, seed=seed)
        _say(quiet, f"[{backend}] workload writing 4 MB/s through the replication tracker")

        for disk in vm.disks:
            started = time.monotonic()
            last = [0.0]

            def progress(done: int, total: int, name=disk.name) -> None:
                if not quiet and time.monotonic() - last[0] > 0.5:
                    last[0] = time.monotonic()
                    click.echo(f"[{backend}]   copying {name}: {100 * done // max(total, 1)}%")

            tracker = host.tracker(vm, disk.name)
            try:
                state = initial_copy(tracker, replicas[disk.name], on_progress=progress)
            finally:
                tracker.close()
            seconds = time.monotonic() - started
            report.step("initial copy", disk=disk.name, seconds=round(seconds, 3),
                        logs_from_generation=state.applied_generation + 1)
            _say(quiet, f"[{backend}] initial copy of {disk.name} done in {seconds:.2f}s "
                        f"(writes since the snapshot are in logs from generation {state.applied_generation + 1})")

        for cycle in range(1, 4):
            time.sleep(1.0)
            for disk in vm.disks:
                tracker = host.tracker(vm, disk.name)
                try:
                    applied = replicate_cycle(tracker, replicas[disk.name])
                    unsent = tracker.unsent_ratio()
                finally:
                    tracker.close()
                report.step("delta cycle", cycle=cycle, disk=disk.name, generations=applied.applied,
                            records=applied.records, bytes=applied.data_bytes)
                _say(quiet, f"[{backend}] delta cycle {cycle} {disk.name}: generations {applied.applied}, "
                            f"{applied.records} writes, {applied.data_bytes} bytes applied, "
                            f"unsent logs {unsent:.2%} of the disk")

        host.stop_workload(vm)
        stats = host.workload_stats(vm) or {}
        _say(quiet, f"[{backend}] workload stopped after {stats.get('writes', '?')} writes")
        for disk in vm.disks:
            tracker = host.tracker(vm, disk.name)
            try:
                replicate_cycle(tracker, replicas[disk.name])
            finally:
                tracker.close()
            ok, detail = _verify_replica(storage, replicas[disk.name], disk.path)
            report.check(f"replica of {disk.name} equals source after delta replication", ok, detail)
            _say(quiet, f"[{backend}] verify {disk.name}: {'OK' if ok else 'FAILED'} ({detail})")

        disk = vm.disks[0]
        replica = replicas[disk.name]
        rng = random.Random(seed)
        target = storage.open_disk(replica.name)
        damaged = sorted(rng.sample(range(disk.size // 4096), 16))
        try:
            for block in damaged:
                target.write(block * 4096, rng.randbytes(4096))
            target.flush()
            damaged_root = compute_manifest(target).root_hex
        finally:
            target.close()
        _say(quiet, f"[{backend}] damaged {len(damaged)} blocks of the {disk.name} replica "
                    f"(manifest root now {damaged_root[:16]}...)")
        tracker = host.tracker(vm, disk.name)
        try:
            resync = resynchronize(tracker, replica)
            replicate_cycle(tracker, replica)
        finally:
            tracker.close()
        report.step("resynchronize", disk=disk.name, bytes_sent=resync.bytes_sent,
                    bytes_zeroed=resync.bytes_zeroed, hash_bytes=resync.hash_bytes,
                    chunks_compared=resync.chunks_compared, chunks_sent=resync.chunks_sent,
                    seconds=round(resync.seconds, 3))
        report.check("resync sent only the damaged blocks",
                     resync.blocks_sent == len(damaged)
                     and resync.bytes_sent + resync.bytes_zeroed == len(damaged) * 4096,
                     f"{resync.blocks_sent} blocks: {resync.bytes_sent} bytes sent and {resync.bytes_zeroed} "
                     f"cleared (source zeros) for {len(damaged)} damaged 4 KiB blocks")
        ok, detail = _verify_replica(storage, replica, disk.path)
        report.check(f"replica of {disk.name} equals source after resync", ok, detail)
        _say(quiet, f"[{backend}] resync sent {resync.bytes_sent} bytes of data and {resync.hash_bytes} "
                    f"bytes of checksums over {resync.chunks_compared} chunks; verify: "
                    f"{'OK' if ok else 'FAILED'} ({detail})")
    finally:
        host.stop_workload(vm)
    return report


@click.command("demo")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=Path("demo-work"),
              show_default=True, help="Scratch folder for hosts and the recovery site (emptied first).")
@click.option("--backend", "backends", type=click.Choice(["local", "azure"]), multiple=True,
              help="Recovery backend(s) to run against; default both.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of progress lines.")
@click.option("--seed", default=7, show_default=True, help="Seed of the generated data and damage.")
@click.option("--keep", is_flag=True, help="Keep the work folder afterwards.")
def demo(workdir: Path, backends: tuple[str, ...], as_json: bool, seed: int, keep: bool):
    """Run the data path end to end and verify every replica byte for byte; exit 1 if any check fails."""
    from sites.storage.azure import AzureBlobStorage
    from sites.localservices import AzuriteProcess
    from sites.storage.local import LocalDirectoryStorage

    backends = backends or ("local", "azure")
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    reports = []
    try:
        for backend in backends:
            with ExitStack() as stack:
                if backend == "local":
                    storage = LocalDirectoryStorage(workdir / "recovery-site")
                else:
                    azurite = stack.enter_context(AzuriteProcess(workdir / "azurite"))
                    _say(as_json, f"[azure] Azurite listening on {azurite.blob_endpoint}")
                    storage = AzureBlobStorage("recovery-site", connection_string=azurite.connection_string())
                stack.callback(storage.close)
                reports.append(run_backend(backend, storage, workdir, quiet=as_json, seed=seed))
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)

    ok = all(r.ok for r in reports)
    if as_json:
        click.echo(json.dumps({"ok": ok, "backends": [r.__dict__ | {"ok": r.ok} for r in reports]}, indent=2))
    else:
        click.echo("")
        for r in reports:
            for c in r.checks:
                click.echo(f"{'PASS' if c['ok'] else 'FAIL'}  [{r.backend}] {c['check']}: {c['detail']}")
        click.echo("demo " + ("succeeded" if ok else "FAILED"))
    sys.exit(0 if ok else 1)
