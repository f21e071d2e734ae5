"""The scripts recovery plans may run, as an administrator registered them on the orchestration workers.

A plan does not carry a command line: it names a registered script and gives values for the arguments the
script declares. The registry is a folder (ASR_PLAN_SCRIPTS_DIR) of executables and one `scripts.toml`
declaring them:

    [check-db]                                  # runs <folder>/check-db
    description = "Checks that the database answers"
    timeout_s = 120                              # the most a plan may give it (default 300)
    args = { mode = "quick|full", table = "[a-z_]{1,32}" }   # each a regular expression its value matches whole

Only what `scripts.toml` declares is registered; an executable it does not name never runs. A script gets
its arguments as environment variables ASR_ARG_<NAME> (upper case, `-` as `_`), never on a command line a
value could turn into an option. Refused at load, each with the reason: a script that is not a regular
executable file inside the folder, or that users other than its owner may change.
"""
from __future__ import annotations

import os
import re
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST = "scripts.toml"
DEFAULT_TIMEOUT_S = 300
MAX_TIMEOUT_S = 86400
MAX_ARG_CHARS = 1024
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_ARG_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_SCRIPT_KEYS = frozenset({"description", "timeout_s", "args"})


class ScriptRegistryError(ValueError):
    """The registry cannot be read, or a plan's reference to it is not one it allows."""


@dataclass(frozen=True)
class RegisteredScript:
    name: str
    path: Path
    description: str
    timeout_s: float
    args: dict[str, re.Pattern[str]]

    def environment(self, values: dict[str, str]) -> dict[str, str]:
        """The ASR_ARG_* variables of a run with these (checked) argument values."""
        return {f"ASR_ARG_{name.upper().replace('-', '_')}": value for name, value in values.items()}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "timeout_s": self.timeout_s,
                "args": {name: pattern.pattern for name, pattern in self.args.items()}}


def load_registry(folder: Path | None) -> dict[str, RegisteredScript]:
    """The scripts registered in `folder` by name (none when `folder` is None). ScriptRegistryError naming
    every problem of the manifest and its scripts."""
    if folder is None:
        return {}
    manifest = folder / MANIFEST
    try:
        declared = tomllib.loads(manifest.read_text())
    except FileNotFoundError:
        raise ScriptRegistryError(f"the plan scripts folder {str(folder)!r} has no {MANIFEST}") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ScriptRegistryError(f"{manifest} cannot be read: {exc}") from None
    problems: list[str] = []
    scripts = {}
    for name, spec in declared.items():
        script = _check_declaration(folder, name, spec, problems)
        if script is not None:
            scripts[name] = script
    if problems:
        raise ScriptRegistryError(f"{manifest}: {'; '.join(problems)}")
    return scripts


def check_arguments(script: RegisteredScript, values: Any, where: str) -> list[str]:
    """What is wrong with `values` as the arguments of `script`: every declared one given, none other, each
    text of at most 1024 characters matching its pattern whole."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        return [f"{where}: args must be an object of argument values, got {values!r}"]
    problems = []
    unknown = sorted(map(str, values.keys() - script.args.keys()))
    if unknown:
        declared = ", ".join(sorted(script.args)) or "none"
        problems.append(f"{where}: script {script.name!r} has no argument {', '.join(unknown)} "
                        f"(it declares {declared})")
    for name, pattern in script.args.items():
        value = values.get(name)
        if value is None:
            problems.append(f"{where}: script {script.name!r} needs argument {name!r}")
        elif not isinstance(value, str) or len(value) > MAX_ARG_CHARS or "\x00" in value:
            problems.append(f"{where}: argument {name!r} must be text of at most {MAX_ARG_CHARS} characters, "
                            f"got {value!r}")
        elif not pattern.fullmatch(value):
            problems.append(f"{where}: argument {name!r} must match {pattern.pattern!r}, got {value!r}")
    return problems


def _check_declaration(folder: Path, name: str, spec: Any, problems: list[str]) -> RegisteredScript | None:
    where = f"script {name!r}"
    if not _NAME.fullmatch(name):
        problems.append(f"{where}: a script's name is 1-64 letters, digits, '.', '_' or '-', starting with a "
                        f"letter or digit")
        return None
    if not isinstance(spec, dict):
        problems.append(f"{where} must be a table, got {spec!r}")
        return None
    unknown = sorted(spec.keys() - _SCRIPT_KEYS)
    if unknown:
        problems.append(f"{where}: unknown keys {', '.join(unknown)} (a script has {', '.join(sorted(_SCRIPT_KEYS))})")
    description = spec.get("description", "")
    if not isinstance(description, str):
        problems.append(f"{where}: description must be text")
    timeout_s = spec.get("timeout_s", DEFAULT_TIMEOUT_S)
    if not isinstance(timeout_s, (int, float)) or isinstance(timeout_s, bool) or not 1 <= timeout_s <= MAX_TIMEOUT_S:
        problems.append(f"{where}: timeout_s must be 1 to {MAX_TIMEOUT_S} seconds, got {timeout_s!r}")
    args: dict[str, re.Pattern[str]] = {}
    raw_args = spec.get("args", {})
    if not isinstance(raw_args, dict):
        problems.append(f"{where}: args must be a table of argument name = pattern")
        raw_args = {}
    for arg, pattern in raw_args.items():
        if not _ARG_NAME.fullmatch(arg):
            problems.append(f"{where}: argument name {arg!r} must be 1-32 lower-case letters, digits, '_' or '-'")
            continue
        try:
            args[arg] = re.compile(pattern) if isinstance(pattern, str) else None
        except re.error as exc:
            problems.append(f"{where}: argument {arg!r}: bad pattern {pattern!r}: {exc}")
            continue
        if args[arg] is None:
            problems.append(f"{where}: argument {arg!r}: its pattern must be a regular expression (text)")
    path = folder / name
    problem = _executable_problem(folder, path)
    if problem:
        problems.append(f"{where}: {problem}")
    if problems:
        return None
    return RegisteredScript(name, path, description, float(timeout_s), args)


def _executable_problem(folder: Path, path: Path) -> str | None:
    """Why `path` may not run as a registered script, or None: it must be a regular executable file (not a
    link) directly in `folder`, which no one but its owner can change."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return f"{path} does not exist"
    if not stat.S_ISREG(info.st_mode):
        return f"{path} is not a regular file (links are not followed)"
    if not info.st_mode & stat.S_IXUSR:
        return f"{path} is not executable"
    for what, mode in ((path, info.st_mode), (folder, os.stat(folder).st_mode)):
        if mode & (stat.S_IWGRP | stat.S_IWOTH):
            return f"{what} may be changed by users other than its owner (chmod go-w)"
    return None


def shared_folder(prefix: str) -> Path:
    """A new folder in the system's temporary folder that any user may enter (0755): scripts run as
    ASR_PLAN_SCRIPT_USER, who must reach them (a test's or the demo's own folder is often private)."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix=prefix))
    folder.chmod(0o755)
    return folder


def write_registry(folder: Path, scripts: dict[str, tuple[str, dict[str, Any]]]) -> None:
    """Register `scripts` in `folder` as an administrator would: {name: (the executable's text, its
    declaration: description, timeout_s, args)}; each executable 0755, scripts.toml 0644."""
    lines = []
    for name, (text, declaration) in scripts.items():
        path = folder / name
        path.write_text(text)
        path.chmod(0o755)
        lines.append(f'["{name}"]')
        for key, value in declaration.items():
            if key == "args":
                inner = ", ".join(f'"{arg}" = {_toml_string(pattern)}' for arg, pattern in value.items())
                lines.append(f"args = {{ {inner} }}")
            elif isinstance(value, str):
                lines.append(f"{key} = {_toml_string(value)}")
            else:
                lines.append(f"{key} = {value!r}")
    (folder / MANIFEST).write_text("\n".join(lines) + "\n")
    (folder / MANIFEST).chmod(0o644)


def _toml_string(text: str) -> str:
    # A TOML literal string takes a regular expression's backslashes as they are.
    if "'" in text or "\n" in text:
        raise ValueError(f"cannot write {text!r} as a TOML literal string")
    return f"'{text}'"
