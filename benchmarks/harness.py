"""How a benchmark is run and reported, for every section: ours in a child process, the peers as timed
commands, the two alternating over rounds, and the summaries and table rows of the results.

How a measurement is made, and why:
- Ours runs in a child process, `python -m MODULE STEP JSON` (run_ours; MODULE is benchmarks.datapath, the
  default, or benchmarks.encryption, each handing its STEPS to child_main), timed with perf_counter around
  the call inside the child, so the interpreter's start is not counted and the child's peak resident memory
  (VmHWM) is the step's own. Peers are timed with perf_counter around their commands.
- Ours and the peer alternate (round 1 ours first, round 2 the peer first, ...) and the best time of
  the rounds is reported, so neither side profits from its place; every run is kept in the results.
- A run whose result is wrong raises BenchmarkError: it is not a result. (The cold page cache a timed run
  starts from and the byte-for-byte checks of a result are benchmarks/disks.py's.)
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

_CHILD_BASE_TIMEOUT_S = 120.0
_CHILD_BYTES_PER_S = 20 * 10**6
_REPO_ROOT = Path(__file__).resolve().parent.parent


class BenchmarkError(RuntimeError):
    """A benchmark could not be measured, or measured a wrong result."""


# ---- running ours and the peers ---------------------------------------------------------------------
def command_timeout(byte_count: int) -> float:
    """How long a child or a command moving `byte_count` bytes may run: 120 s plus the time to move them
    at 20 MB/s: generous, but a bound."""
    return _CHILD_BASE_TIMEOUT_S + byte_count / _CHILD_BYTES_PER_S


def run_ours(step: str, byte_count: int, *, module: str = "benchmarks.datapath", **arguments: Any) -> dict[str, Any]:
    """Run one of our steps (of `module`'s STEPS) in a child process; its figures, with `seconds` and
    `peak_rss_bytes`."""
    command = [sys.executable, "-m", module, step, json.dumps(arguments)]
    search_path = [str(_REPO_ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    try:
        child = subprocess.run(command, capture_output=True, text=True, cwd=_REPO_ROOT,
                               env=dict(os.environ, PYTHONPATH=os.pathsep.join(search_path)),
                               timeout=command_timeout(byte_count))
    except subprocess.TimeoutExpired as exc:
        raise BenchmarkError(f"step {step} {arguments} did not finish within {exc.timeout:.0f} s") from None
    if child.returncode != 0:
        raise BenchmarkError(
            f"step {step} {arguments} failed (exit {child.returncode}): {child.stderr.strip()[-3000:]}"
        )
    return json.loads(child.stdout)


def run_peer(commands: list[list[str]], byte_count: int) -> dict[str, Any]:
    """Run commands one after the other, timed together; their stdout is kept for parsing."""
    outputs = []
    started = time.perf_counter()
    for command in commands:
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=command_timeout(byte_count))
        except subprocess.TimeoutExpired as exc:
            raise BenchmarkError(f"{' '.join(command)} did not finish within {exc.timeout:.0f} s") from None
        if done.returncode != 0:
            raise BenchmarkError(f"{' '.join(command)} failed (exit {done.returncode}): {done.stderr.strip()}")
        outputs.append(done.stdout)
    return {"seconds": time.perf_counter() - started, "stdout": "".join(outputs)}


def in_rounds(rounds: int, runs: list[Callable[[int], dict] | None],
              before_round: Callable[[int], None] | None = None) -> list[list[dict]]:
    """Each of `runs` once a round, given the round's number (1 to `rounds`): in the order listed in odd
    rounds, reversed in even ones, so no side always goes first; `before_round(number)` before each round.
    Their results, one list per run (empty for None), each marked with its round."""
    results: list[list[dict]] = [[] for _ in runs]
    order = list(enumerate(runs))
    for number in range(1, rounds + 1):
        if before_round is not None:
            before_round(number)
        for index, run in order if number % 2 else reversed(order):
            if run is not None:
                results[index].append(run(number) | {"round": number})
    return results


def alternate(
    rounds: int, ours: Callable[[], dict], peer: Callable[[], dict] | None
) -> tuple[list[dict], list[dict]]:
    """Run ours and the peer `rounds` times each: ours first in odd rounds, the peer first in even ones."""
    our_runs, peer_runs = in_rounds(rounds, [lambda _: ours(), None if peer is None else lambda _: peer()])
    return our_runs, peer_runs


def summary(runs: list[dict]) -> dict[str, Any]:
    """The runs with their best and median time and the highest peak memory any of them reached."""
    seconds = [run["seconds"] for run in runs]
    result: dict[str, Any] = {"runs": runs, "best_seconds": min(seconds),
                              "median_seconds": statistics.median(seconds)}
    peaks = [run["peak_rss_bytes"] for run in runs if "peak_rss_bytes" in run]
    if peaks:
        result["peak_rss_bytes"] = max(peaks)
    return result


def row(metric: str, ours: float, peer: float | None, unit: str, ratio: float | None, goal: str,
        passed: bool | None) -> dict[str, Any]:
    """One line of the results table. `ratio` is always "higher is better": the peer's time over ours,
    our speed over the peer's, or the peer's bytes over ours. `passed` is None where no goal is set."""
    return {"metric": metric, "ours": ours, "peer": peer, "unit": unit, "ratio": ratio, "goal": goal,
            "passed": passed}


def time_row(result: dict[str, Any], goal: str, min_ratio: float | None) -> dict[str, Any]:
    """The time line of a benchmark: best times judged against the goal (reported only, with
    `min_ratio` None), with the medians beside them (on a busy machine the spread between rounds is
    wide, and the best alone would hide it)."""
    ours, peer = result["ours"], result["peer"]
    ratio = peer["best_seconds"] / ours["best_seconds"]
    passed = None if min_ratio is None else ratio >= min_ratio
    return row("time", ours["best_seconds"], peer["best_seconds"], "s", ratio, goal, passed) | {
        "ours_median": ours["median_seconds"], "peer_median": peer["median_seconds"],
        "median_ratio": peer["median_seconds"] / ours["median_seconds"],
    }


# ---- a child process's side -----------------------------------------------------------------------
def peak_rss_bytes() -> int:
    """This process's peak resident memory (VmHWM)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise BenchmarkError("/proc/self/status has no VmHWM line")


def child_main(argv: list[str], steps: dict[str, Callable[..., dict[str, Any]]], module: str) -> int:
    if len(argv) != 2 or argv[0] not in steps:
        print(f"usage: python -m {module} {{{','.join(steps)}}} JSON-ARGUMENTS", file=sys.stderr)
        return 2
    figures = steps[argv[0]](**json.loads(argv[1]))
    print(json.dumps(figures | {"peak_rss_bytes": peak_rss_bytes()}))
    return 0
