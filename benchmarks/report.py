"""The benchmark report as people read it: the results table (text for the terminal, Markdown for
docs/benchmarks.md), the detail lines under it, and the two files `python -m benchmarks.run` writes
(benchmarks/run.py measures; this module only presents what it measured)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks import churn, nbd, scale
from benchmarks.workflow_report import workflow_detail_lines
from datapath.disk import format_size


def all_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Every benchmark's result rows: the data path's, then the workflows', NBD's, churn's and scale's."""
    return [row for benchmark in benchmarks_of(report) for row in benchmark["rows"]]


def benchmarks_of(report: dict[str, Any],
                  keys: tuple[str, ...] = ("benchmarks", "workflows", "nbd", "churn", "scale")) -> list:
    return [benchmark for key in keys for benchmark in report.get(key, {}).values()]


def format_value(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if unit == "bytes":
        return f"{format_size(int(value))} ({int(value):,} B)" if value >= 1024 else f"{int(value)} B"
    if unit == "s":
        return f"{value:.3f} s"
    return f"{value:.2f} {unit}"


def verdict(passed: bool | None) -> str:
    return {True: "pass", False: "miss", None: "—"}[passed]


def results_table(report: dict[str, Any]) -> list[list[str]]:
    """Rows of [benchmark, metric, ours, peer, ratio, goal, result]: the data path's, its memory steps,
    then the workflows' and NBD's."""
    lines = [_row_cells(benchmark["title"], row) for benchmark in benchmarks_of(report, ("benchmarks",))
             for row in benchmark["rows"]]
    memory = report.get("memory", {"steps": []})
    for step in memory["steps"]:
        lines.append([
            "Peak memory (VmHWM)", step["step"],
            f"{format_size(step['peak_rss_bytes_full'])} at {format_size(step['full_size'])}",
            f"{format_size(step['peak_rss_bytes_quarter'])} at {format_size(step['quarter_size'])}",
            "—", f"grows < {format_size(memory['flat_slack_bytes'])} at 4× the disk "
                 f"(grew {step['growth_bytes'] / (1 << 20):+.1f} MiB)",
            verdict(step["passed"]),
        ])
    return lines + [_row_cells(benchmark["title"], row)
                    for benchmark in benchmarks_of(report, ("workflows", "nbd", "churn", "scale"))
                    for row in benchmark["rows"]]


def _row_cells(title: str, row: dict[str, Any]) -> list[str]:
    ours, peer = format_value(row["ours"], row["unit"]), format_value(row["peer"], row["unit"])
    ratio = "—" if row["ratio"] is None else f"{row['ratio']:.2f}×"
    if "median_ratio" in row:
        ours += f" (median {row['ours_median']:.3f})"
        peer += f" (median {row['peer_median']:.3f})"
        ratio += f" (median {row['median_ratio']:.2f}×)"
    return [title, row["metric"], ours, peer, ratio, row["goal"], verdict(row["passed"])]


TABLE_HEADER = ["Benchmark", "Metric", "Ours", "Peer", "Ratio", "Goal", "Result"]


def text_table(lines: list[list[str]]) -> str:
    """The table for a terminal: a benchmark's name only on its first line."""
    rendered = [TABLE_HEADER] + [["" if previous[0] == line[0] else line[0]] + line[1:]
                                 for previous, line in zip([[""]] + lines, lines, strict=False)]
    widths = [max(len(line[column]) for line in rendered) for column in range(len(TABLE_HEADER))]
    rule = "  ".join("-" * width for width in widths)
    out = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
           for line in rendered]
    return "\n".join([out[0], rule] + out[1:])


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown(report: dict[str, Any]) -> str:
    machine = report["machine"]
    fs = machine["workdir_filesystem"]
    settings = report["settings"]
    scope = []
    if "datapath" in report["sections"]:
        scope.append(f"disk size {format_size(settings['size'])} (memory also at "
                     f"{format_size(settings['quarter_size'])})")
    if "workflows" in report["sections"]:
        scope.append(f"{settings['steps']} workflow steps, {settings['vms']} VMs protected, a recovery plan of "
                     f"{settings['plan_vms']} VMs in {settings['plan_groups']} groups failed over")
    if "nbd" in report["sections"]:
        scope.append(f"{settings['nbd_total_mib']} MiB written over NBD per run")
    if "churn" in report["sections"]:
        scope.append(f"RPO sampled for {settings['churn_duration_s']:g} s under churn of "
                     f"{', '.join(f'{rate:g}' for rate in settings['churn_rates_mb_s'])} MB/s")
    if "scale" in report["sections"]:
        scope.append(f"{settings['scale_vms']} VMs sampled for {settings['scale_duration_s']:g} s at a "
                     f"{settings['scale_copy_frequency_s']} s copy frequency"
                     + (f", {settings['scale_fast_vms']} for {settings['scale_fast_duration_s']:g} s at "
                        f"{settings['scale_fast_copy_frequency_s']} s" if settings["scale_fast_vms"] else ""))
    lines = [
        "# Benchmarks: " + " and ".join(SECTION_TITLES[section] for section in report["sections"]),
        "",
        f"Written by `{report['command']}` (`make bench`) on {report['date']}; do not edit, re-run. "
        f"The full figures of every run are in `benchmarks.json` beside this file.",
        "",
        f"**{report['goals_met']} of {report['goals_judged']} goals met.** {_sentence('; '.join(scope))}; "
        f"{settings['rounds']} round(s), seed {settings['seed']}, run time {report['seconds']:.0f} s.",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        f"| CPU | {machine['cpu']}, nproc {machine['nproc']} |",
        f"| memory | {format_size(machine['memory_bytes'])} |",
        f"| kernel | {machine['kernel']} |",
        f"| workdir filesystem | {fs['type']} ({fs['device']} on {fs['mount_point']}) |",
        f"| load average (1, 5, 15 min) before / after | "
        f"{', '.join(f'{x:.2f}' for x in report['load_average_before'])} / "
        f"{', '.join(f'{x:.2f}' for x in report['load_average_after'])} |",
        f"| tools | Python {machine['python']}, mmh3 {machine['mmh3']}; {machine['cp']}; {machine['rsync']}; "
        f"{machine['qemu_img']}; {machine['redis_server']}; Celery {machine['celery']} |",
        "",
        "## Results",
        "",
        "| " + " | ".join(TABLE_HEADER) + " |",
        "|" + "---|" * len(TABLE_HEADER),
    ]
    lines += ["| " + " | ".join(_md_cell(cell) if cell != "miss" else "**miss**" for cell in line) + " |"
              for line in results_table(report)]
    lines += ["", "## What each side runs", ""]
    for benchmark in benchmarks_of(report):
        lines.append(f"- **{benchmark['title']}**. Ours: {benchmark['ours_does']}. "
                     f"Peer: {benchmark['peer_does'] or 'none'}.")
    lines += ["", "## Method", ""] + [f"- {item}" for item in report["method"]]
    lines += ["", "## Details", ""]
    if "datapath" in report["sections"]:
        lines += detail_lines(report)
    if "workflows" in report["sections"]:
        lines += workflow_detail_lines(report["workflows"])
    if "nbd" in report["sections"]:
        lines += nbd.detail_lines(report["nbd"])
    if "churn" in report["sections"]:
        lines += churn.detail_lines(report["churn"])
    if "scale" in report["sections"]:
        lines += scale.detail_lines(report["scale"])
    return "\n".join(lines) + "\n"


SECTION_TITLES = {"datapath": "data path", "workflows": "workflows", "nbd": "writes over NBD",
                  "churn": "RPO under churn", "scale": "scale"}


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def detail_lines(report: dict[str, Any]) -> list[str]:
    """The figures beside the headline ones: what was moved, what crossed, what was allocated."""
    benchmarks = report["benchmarks"]
    copy, sparse, resync = benchmarks["initial_copy"], benchmarks["sparse_copy"], benchmarks["resync"]
    product = benchmarks["resync_product"]
    ours_product = min(product["ours"]["runs"], key=lambda run: run["seconds"])
    scan, log = benchmarks["checksum_scan"], benchmarks["log_apply"]
    best_copy = min(copy["ours"]["runs"], key=lambda run: run["seconds"])
    best_sparse = min(sparse["ours"]["runs"], key=lambda run: run["seconds"])
    ours_sync = min(resync["ours"]["runs"], key=lambda run: run["seconds"])
    peer_sync = min(resync["peer"]["runs"], key=lambda run: run["seconds"])
    details = resync["details"]
    tracked = log["tracker"]["runs"][0]
    return [
        f"- Initial copy: ours {copy['details']['ours_gb_per_s']:.2f} GB/s, cp "
        f"{copy['details']['peer_gb_per_s']:.2f} GB/s; ours read {best_copy['bytes_read']:,} B and wrote "
        f"{best_copy['bytes_written']:,} B.",
        f"- Sparse copy: {format_size(sparse['details']['virtual_size'])} virtual, "
        f"{format_size(sparse['details']['data_bytes'])} of data in {sparse['details']['data_extents']} "
        f"extents; ours read {best_sparse['bytes_read']:,} B and wrote {best_sparse['bytes_written']:,} B, leaving "
        f"{best_sparse['zero_bytes_skipped']:,} B of zeros unwritten. Allocated: source "
        f"{sparse['details']['source_allocated_bytes']:,} B, ours (replica with footer) "
        f"{best_sparse['allocated_bytes']:,} B, cp {sparse['peer']['runs'][0]['allocated_bytes']:,} B.",
        f"- Resync: {details['damaged_chunks']} damaged chunks of {format_size(details['chunk_size'])}, one "
        f"{details['damage_write_size']}-byte write each at a sector-aligned offset "
        f"({details['damaged_blocks']} blocks of {format_size(details['block_size'])} touched). Ours: bytes_sent "
        f"{ours_sync['bytes_sent']:,} B, hash_bytes {ours_sync['hash_bytes']:,} B "
        f"({ours_sync['chunks_compared']} chunks compared, {ours_sync['chunks_sent']} chunks and "
        f"{ours_sync['blocks_sent']} blocks sent). rsync: literal data {peer_sync['literal_data']:,} B, matched "
        f"{peer_sync['matched_data']:,} B, total bytes sent {peer_sync['total_bytes_sent']:,} B, received "
        f"{peer_sync['total_bytes_received']:,} B.",
        f"- Product-path resync: the tracked source changed in {product['details']['changed_chunks']} chunks "
        f"({product['details']['changed_blocks']} blocks) after an initial copy of "
        f"{product['details']['initial_copy_seconds']:.1f} s; ours read {ours_product['replica_bytes_read']:,} B of "
        f"the replica (the differing chunks, compared then kept in the undo log), sent "
        f"{ours_product['bytes_sent']:,} B, hash_bytes {ours_product['hash_bytes']:,} B; best "
        f"{product['ours']['best_seconds']:.3f} s against rsync's {product['peer']['best_seconds']:.3f} s and "
        f"sync_disks' (both sides read, `asr disk sync`) {resync['ours']['best_seconds']:.3f} s.",
        f"- Checksum scan: cold best {scan['ours']['best_seconds']:.3f} s, warm best "
        f"{scan['ours_warm']['best_seconds']:.3f} s, in-memory ceiling {scan['peer']['best_seconds']:.3f} s; "
        f"every run gave root {scan['details']['root']}.",
        f"- Log apply: {log['details']['writes']} writes through the tracker "
        f"({log['details']['records']} records, {log['details']['data_bytes']:,} B of data, log file "
        f"{log['details']['log_file_bytes']:,} B); tracker writes took {tracked['write_seconds']:.3f} s and the "
        f"seal {tracked['seal_seconds']:.3f} s; apply best "
        f"{log['ours']['best_seconds']:.3f} s, median {log['ours']['median_seconds']:.3f} s.",
        f"- Peak memory baseline (an idle child with the data-path modules imported): "
        f"{format_size(report['memory']['baseline_peak_rss_bytes'])}.",
    ] + encryption_detail_lines(benchmarks.get("encryption_cost"))


def encryption_detail_lines(encryption: dict[str, Any] | None) -> list[str]:
    if not encryption or not encryption["details"]:
        return []
    details = encryption["details"]
    steps, xts, ship, log = details["steps"], details["xts_in_memory"], details["ship"], details["log"]

    def step_line(step: str, title: str) -> str:
        figures = steps[step]
        cpu = figures["cpu_seconds"]
        speeds = (f" ({figures['gb_per_s']['encrypted']:.2f} GB/s encrypted, {figures['gb_per_s']['clear']:.2f} GB/s "
                  f"clear)" if "gb_per_s" in figures else "")
        return (f"- Encryption, {title}: {figures['cost']:.2f}× the time in clear at best, "
                f"{figures['median_cost']:.2f}× at the median{speeds}; clear over encrypted round by round "
                f"{', '.join(f'{ratio:.2f}' for ratio in figures['round_ratios'])} (median "
                f"{figures['median_round_ratio']:.2f}); CPU time (median) {cpu['encrypted']['median']:.2f} s "
                f"encrypted, {cpu['clear']['median']:.2f} s clear.")

    return [step_line(step, f"{title} ({details['rounds']} rounds after a warm-up round)" if step == "copy"
                      else title)
            for step, title in (("copy", "initial copy"), ("log_apply", "log apply"), ("resync", "resync"),
                                ("restore", "restore"))] + [
        f"- Encryption, what the steps moved: the log applied holds {log['records']} records, "
        f"{log['data_bytes']:,} B of data ({log['log_file_bytes']:,} B of log file); shipping it took "
        f"{ship['encrypted']['best_seconds']:.3f} s encrypted, {ship['clear']['best_seconds']:.3f} s clear (best; "
        f"reported, not judged); the resync's source changed in {details['resync']['changed_chunks']} chunks "
        f"({details['resync']['changed_blocks']} blocks). Peak memory of the encrypted copy "
        f"{format_size(encryption['ours']['peak_rss_bytes'])}, in clear "
        f"{format_size(encryption['peer']['peak_rss_bytes'])}. AES-XTS in memory, one thread: ours (OpenSSL's, "
        f"many sectors per call) {xts['ours_mb_per_s']:.0f} MB/s encrypting, "
        f"{xts['ours_decrypt_mb_per_s']:.0f} MB/s decrypting; a cipher per sector "
        f"{xts['per_sector_mb_per_s']:.0f} MB/s.",
    ]


def write_outputs(report: dict[str, Any], output: Path) -> tuple[Path, Path]:
    output.mkdir(parents=True, exist_ok=True)
    json_path, md_path = output / "benchmarks.json", output / "benchmarks.md"
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    md_path.write_text(markdown(report))
    return md_path, json_path
