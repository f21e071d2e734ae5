"""The outside commands the guest builders run (apt-get, dpkg-deb, busybox, mkfs.fat, mtools, syslinux): each
bounded in time, each failure a GuestBuildError that says what was being done and what the command said."""
from __future__ import annotations

import subprocess
from collections.abc import Mapping
from pathlib import Path

from .errors import GuestBuildError


def run_build_command(command: list[str], what: str, *, timeout: float, missing: str, cwd: Path | None = None,
                      env: Mapping[str, str] | None = None) -> str:
    """Run `command` for `what` and return its standard output; `missing` is the advice given when the
    command is not installed."""
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                                env=dict(env) if env is not None else None)
    except FileNotFoundError:
        raise GuestBuildError(f"{what}: {command[0]} is not installed ({missing})") from None
    except subprocess.TimeoutExpired:
        raise GuestBuildError(f"{what}: {' '.join(command)} took more than {timeout:g} s") from None
    if result.returncode != 0:
        raise GuestBuildError(f"{what}: {' '.join(command)} failed ({result.returncode}): "
                              f"{(result.stderr or result.stdout).strip()[-1500:]}")
    return result.stdout
