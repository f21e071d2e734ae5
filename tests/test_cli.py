"""The `asr disk` commands, run as a user runs them: the installed console script in a subprocess."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

ASR = str(Path(sys.executable).with_name("asr"))
MiB = 1 << 20


def asr(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([ASR, *args], capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"asr {' '.join(args)} exited {proc.returncode}: {proc.stderr}{proc.stdout}")
    return proc


def fill_random(path: Path, extents: list[tuple[int, int]], seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "r+b") as f:
        for offset, length in extents:
            f.seek(offset)
            f.write(rng.randbytes(length))


def content(path: Path, size: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(size)


def test_every_command_has_help():
    for command in ([], ["disk"], ["disk", "create"], ["disk", "convert"], ["disk", "manifest"],
                    ["disk", "sync"], ["disk", "verify"]):
        proc = asr(*command, "--help")
        assert "Usage:" in proc.stdout


def test_create_raw_and_vhd_sparse(tmp_path):
    asr("disk", "create", str(tmp_path / "a.raw"), "--size", "64M")
    asr("disk", "create", str(tmp_path / "b.vhd"), "--size", "64M", "--format", "vhd")
    assert (tmp_path / "a.raw").stat().st_size == 64 * MiB
    assert (tmp_path / "b.vhd").stat().st_size == 64 * MiB + 512
    assert (tmp_path / "a.raw").stat().st_blocks * 512 < MiB  # sparse
    info = json.loads(subprocess.run(["qemu-img", "info", "-f", "vpc", "--output=json", str(tmp_path / "b.vhd")],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["format"] == "vpc" and info["virtual-size"] == 64 * MiB


def test_create_refuses_bad_input_and_changes_nothing(tmp_path):
    proc = asr("disk", "create", str(tmp_path / "x.vhd"), "--size", "1000K", "--format", "vhd", check=False)
    assert proc.returncode == 2 and "MiB" in proc.stderr
    assert not (tmp_path / "x.vhd").exists()
    proc = asr("disk", "create", str(tmp_path / "y.raw"), "--size", "lots", check=False)
    assert proc.returncode != 0 and "lots" in proc.stderr
    asr("disk", "create", str(tmp_path / "z.raw"), "--size", "1M")
    fill_random(tmp_path / "z.raw", [(0, 4096)], 1)
    before = content(tmp_path / "z.raw", MiB)
    proc = asr("disk", "create", str(tmp_path / "z.raw"), "--size", "2M", check=False)
    assert proc.returncode == 2 and "z.raw" in proc.stderr
    assert content(tmp_path / "z.raw", MiB) == before


def test_convert_round_trip_keeps_content_and_holes(tmp_path):
    src = tmp_path / "src.raw"
    asr("disk", "create", str(src), "--size", "48M")
    fill_random(src, [(0, 3 * MiB), (20 * MiB + 4096, 5000), (47 * MiB, MiB)], 2)
    asr("disk", "convert", str(src), str(tmp_path / "mid.vhd"), "--format", "vhd")
    asr("disk", "convert", str(tmp_path / "mid.vhd"), str(tmp_path / "back.raw"), "--format", "raw")
    assert content(tmp_path / "back.raw", 48 * MiB) == content(src, 48 * MiB)
    assert content(tmp_path / "mid.vhd", 48 * MiB) == content(src, 48 * MiB)
    # 5 MiB of data, 48 MiB virtual: the holes were neither read as data nor written.
    assert (tmp_path / "mid.vhd").stat().st_blocks * 512 < 8 * MiB
    info = json.loads(subprocess.run(["qemu-img", "info", "-f", "vpc", "--output=json", str(tmp_path / "mid.vhd")],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["virtual-size"] == 48 * MiB
    # qemu-img reads the same bytes through its own VHD driver.
    subprocess.run(["qemu-img", "compare", "-f", "vpc", "-F", "raw", str(tmp_path / "mid.vhd"), str(src)],
                   check=True, capture_output=True)


def test_manifest_json_and_root_equal_across_formats(tmp_path):
    src = tmp_path / "d.raw"
    asr("disk", "create", str(src), "--size", "8M")
    fill_random(src, [(MiB, MiB)], 3)
    asr("disk", "convert", str(src), str(tmp_path / "d.vhd"), "--format", "vhd")
    raw = json.loads(asr("disk", "manifest", str(src), "--json").stdout)
    vhd = json.loads(asr("disk", "manifest", str(tmp_path / "d.vhd"), "--json").stdout)
    assert raw["chunk_size"] == MiB and raw["chunk_count"] == 8
    assert raw["root"] == vhd["root"]
    text = asr("disk", "manifest", str(src)).stdout
    assert raw["root"] in text and "8" in text


def test_sync_sends_only_damaged_blocks_and_verify_reports_offsets(tmp_path):
    src, dst = tmp_path / "s.raw", tmp_path / "t.vhd"
    asr("disk", "create", str(src), "--size", "32M")
    fill_random(src, [(0, 32 * MiB)], 4)
    asr("disk", "sync", str(src), str(dst), "--json")  # creates dst as VHD from its extension
    assert asr("disk", "verify", str(src), str(dst)).returncode == 0

    fill_random(dst, [(5 * MiB + 8192, 4096), (17 * MiB, 4096), (30 * MiB + 4096 * 7, 4096)], 5)
    proc = asr("disk", "verify", str(src), str(dst), check=False)
    assert proc.returncode == 1 and f"offset {5 * MiB + 8192}" in proc.stdout

    stats = json.loads(asr("disk", "sync", str(src), str(dst), "--json").stdout)
    assert stats["bytes_sent"] == 3 * 4096
    assert stats["chunks_compared"] == 32 and stats["chunks_sent"] == 3
    assert set(stats) >= {"bytes_sent", "chunks_compared", "chunks_sent", "seconds"}
    assert asr("disk", "verify", str(src), str(dst)).returncode == 0
    assert content(dst, 32 * MiB) == content(src, 32 * MiB)

    again = json.loads(asr("disk", "sync", str(src), str(dst), "--json").stdout)
    assert again["bytes_sent"] == 0 and again["chunks_sent"] == 0


def test_verify_size_mismatch_and_missing_disk(tmp_path):
    asr("disk", "create", str(tmp_path / "a.raw"), "--size", "2M")
    asr("disk", "create", str(tmp_path / "b.raw"), "--size", "3M")
    proc = asr("disk", "verify", str(tmp_path / "a.raw"), str(tmp_path / "b.raw"), check=False)
    assert proc.returncode == 1 and "size" in proc.stdout
    proc = asr("disk", "verify", str(tmp_path / "a.raw"), str(tmp_path / "nope.raw"), check=False)
    assert proc.returncode == 2 and "nope.raw" in proc.stderr


def test_sync_refuses_size_mismatch_and_leaves_target(tmp_path):
    src, dst = tmp_path / "s.raw", tmp_path / "t.raw"
    asr("disk", "create", str(src), "--size", "4M")
    asr("disk", "create", str(dst), "--size", "8M")
    fill_random(src, [(0, 4 * MiB)], 6)
    fill_random(dst, [(0, 8 * MiB)], 7)
    before = content(dst, 8 * MiB)
    proc = asr("disk", "sync", str(src), str(dst), check=False)
    assert proc.returncode == 2 and "size" in proc.stderr.lower()
    assert content(dst, 8 * MiB) == before


def test_corrupt_vhd_footer_is_a_clear_error(tmp_path):
    path = tmp_path / "c.vhd"
    asr("disk", "create", str(path), "--size", "2M", "--format", "vhd")
    with open(path, "r+b") as f:
        f.seek(2 * MiB + 100)
        f.write(b"\xff")
    proc = asr("disk", "manifest", str(path), check=False)
    assert proc.returncode == 2 and "c.vhd" in proc.stderr and "Traceback" not in proc.stderr
