"""docs/quickstart.md, run as a newcomer would: every `$` line of its console blocks, in order, in one shell
that stops at the first failure; then the VM's disks at the recovery site are compared byte for byte with
the primary's. The environment is the reader's: only the Redis and PATH differ (a Redis of the test's own,
the venv's `asr` on the PATH), and HOME is the test's folder.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from datapath.digest import disk_digest
from sites.localservices import RedisServer

# Whole deployments (workers, beat, Redis) or real guests per test: out of the quick loop (-m "not slow").
pytestmark = pytest.mark.slow

DOC = Path(__file__).resolve().parent.parent / "docs" / "quickstart.md"
TIMEOUT_S = 600


def doc_commands(text: str) -> list[str]:
    """The `$` lines of the console blocks (a line ending in a backslash goes on), in order."""
    commands: list[str] = []
    for block in re.findall(r"```console\n(.*?)```", text, re.S):
        pending = None
        for line in block.splitlines():
            if pending is not None:
                pending += "\n" + line
            elif line.startswith("$ "):
                pending = line[2:]
            else:
                continue
            if not pending.endswith("\\"):
                commands.append(pending)
                pending = None
    return commands


# With web01 failed over (committed), its network's mapping and its definition cannot change: side by side, each
# command's error and exit status kept for the test to read (web01's adapter is then read back, unchanged). Only
# these two are waited for: the workers and beat run in the background until the test ends.
REFUSED_WHILE_FAILED_OVER = """
(asr network set default --site primary --recovery-network elsewhere || echo "exit $?") > "$QS/set-mapping.txt" 2>&1 &
mapping=$!
(asr vm set host1/web01 --network nic0=elsewhere || echo "exit $?") > "$QS/set-vm.txt" 2>&1 &
wait $mapping $!
"""


def test_the_quickstart_runs_as_written_and_the_failed_over_disks_hold_the_primarys_bytes(tmp_path: Path) -> None:
    commands = doc_commands(DOC.read_text())
    assert len(commands) >= 20 and any(c.startswith("asr failover planned") for c in commands), commands
    redis_server = RedisServer(tmp_path / "redis").start()
    home = tmp_path / "home"
    home.mkdir()
    # The reader's environment: none of this test run's settings, the venv's asr first on the PATH.
    env = {key: value for key, value in os.environ.items() if not key.startswith("ASR_")}
    env.update(HOME=str(home), ASR_BROKER_URL=redis_server.url,
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    script = "set -euo pipefail\n" + "\n".join(f"echo \"+ $(date +%T)\" {shlex.quote(c.splitlines()[0][:120])}\n{c}"
                                                for c in commands) \
        + "\necho QUICKSTART-DONE\n" + REFUSED_WHILE_FAILED_OVER \
        + 'asr vm show host1/web01 --json > "$QS/web01.json"\n'
    shell = subprocess.Popen(["bash", "-c", script], env=env, cwd=home, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = shell.communicate(timeout=TIMEOUT_S)
    finally:
        # The processes the quickstart started in the background belong to the shell's session.
        try:
            os.killpg(shell.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        redis_server.stop()
    print(output[-5000:])  # the timeline: shown with -s or for a failure
    qs = home / "asr-quickstart"
    logs = "".join(f"\n--- {log.name}\n{log.read_text()[-3000:]}" for log in sorted(qs.glob("*.log")))
    assert shell.returncode == 0 and "QUICKSTART-DONE" in output, f"{output[-6000:]}{logs}"

    shown = json.loads((qs / "web01.json").read_text())
    assert shown["protection"]["state"] == "failover_committed", shown["protection"]
    primary = {disk["name"]: Path(disk["primary_path"]) for disk in shown["disks"]}
    recovery = {disk["name"]: Path(disk["recovery_path"]) for disk in shown["disks"]}
    assert set(primary) == {"os", "data"} and all(path.is_file() for path in recovery.values()), shown["disks"]
    # The guest-visible bytes: the recovery host's disks are VHDs (a footer past the data), the primary's raw.
    assert {name: disk_digest(recovery[name]) for name in recovery} == \
        {name: disk_digest(primary[name]) for name in primary}
    assert disk_digest(primary["data"]) == disk_digest(qs / "hosts" / "host1" / "images" / "data.raw")
    assert disk_digest(primary["data"]) != disk_digest(primary["os"])  # the data disk holds data, not zeros
    assert "every disk matches the manifest root the point recorded" in output, output[-3000:]
    mapping, vm = ((qs / name).read_text() for name in ("set-mapping.txt", "set-vm.txt"))
    assert mapping.endswith("exit 2\n") and "VM(s) host1/web01 failed over (or are failing over) into " \
        "'recovery-net' (10.10.0.0/24) by this mapping" in mapping, mapping
    assert vm.endswith("exit 2\n") and "VM host1/web01 is failover_committed: it runs at the recovery site" in vm, vm
    assert shown["adapters"][0]["vm_network"] == "default"
    for marker in ("asr protect host1/web01", "asr failover test host1/web01", "asr failover commit"):
        assert re.search(rf"^\+ [0-9:]+ {re.escape(marker)}", output, re.M), output[-3000:]
