"""Recovery points of a replica: every version of its content stays reachable through undo logs.

A replica is one disk changed in place; each completed change (the initial copy, each applied log, each
resync) makes a new *version* of its content, and undo logs keep the earlier ones readable
(datapath/undolog.py). Every version also has its chunk manifest `<replica>.vNNNNNNNN.manifest`
(datapath/manifest.py's binary form), so a point can be checked against what it held when it was made
without touching the source disk.
"""
from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from datapath.copy import copy_disk
from datapath.endpoint import DiskEndpoint
from datapath.errors import NonRecoverableError, SizeMismatchError
from datapath.manifest import Manifest, ManifestFormatError, compute_manifest, diff_manifests
from datapath.undolog import PointDisk, UndoLog, fetch_undo
from sites.storage.base import ObjectNotFoundError

if TYPE_CHECKING:
    from datapath.replication import ReplicaDisk, ReplicaState

Progress = Callable[[int, int], None]
"""on_progress(bytes_done, bytes_total)"""

_VERSION_OBJECT = re.compile(r"v(\d{8,})\.(undo|manifest)")


class PointUnavailableError(NonRecoverableError):
    """A version of a replica cannot be read: its undo logs or manifest are gone (pruned), or it is not
    a version the replica has (yet)."""


class PointMismatchError(NonRecoverableError):
    """What was read or copied from a recovery point does not match the manifest stored with it."""


# ---- what is stored ----------------------------------------------------------------------------
@dataclass(frozen=True)
class StoredVersions:
    undo: frozenset[int]
    manifests: frozenset[int]


def stored_versions(replica: ReplicaDisk) -> StoredVersions:
    """The versions whose undo log and manifest objects exist (one listing)."""
    prefix = f"{replica.name}."
    undo, manifests = set(), set()
    for name in replica.storage.list_objects(f"{prefix}v"):
        match = _VERSION_OBJECT.fullmatch(name[len(prefix):])
        if match:
            (undo if match[2] == "undo" else manifests).add(int(match[1]))
    return StoredVersions(frozenset(undo), frozenset(manifests))


def delete_all_versions(replica: ReplicaDisk) -> None:
    """Delete every undo log and manifest of the replica: for a copy starting from scratch, after
    which no earlier content can be rebuilt. Oldest first, so a crash leaves a chain that is still
    consistent (its oldest points gone first)."""
    stored = stored_versions(replica)
    for version in sorted(stored.undo):
        replica.storage.delete_object(replica.undo_name(version))
    for version in sorted(stored.manifests):
        replica.storage.delete_object(replica.manifest_name(version))


def load_manifest(replica: ReplicaDisk, version: int) -> Manifest | None:
    """The stored manifest of `version`, None when there is none."""
    name = replica.manifest_name(version)
    try:
        raw = replica.storage.read_object(name)
    except ObjectNotFoundError:
        return None
    return Manifest.from_bytes(raw, name=name)


def manifest_if_root(replica: ReplicaDisk, version: int, root: str | None) -> Manifest | None:
    """The stored manifest of `version` only when its root is `root` (the root the database recorded for
    that version, or a state checked against it); None when none is stored or it says otherwise, so a
    manifest changed on the storage is not relied upon."""
    manifest = load_manifest(replica, version)
    if manifest is None or root is None or manifest.root_hex != root:
        return None
    return manifest


def settled_manifest(replica: ReplicaDisk, state: ReplicaState, chunk_size: int) -> tuple[Manifest | None, str]:
    """The stored manifest of the replica's current version when it describes the replica's bytes, with
    "" as the reason; otherwise None and why not.

    Every change of the replica (initial copy, log apply, resync, consistency repair) stores the undo log
    of the version it makes before it writes the first byte, and that version's manifest and then the
    state only after its last byte is written and flushed. So the replica's bytes are those of the
    state's version's manifest exactly when the state says a completed copy (not a copy or resync in
    progress) and no undo log or manifest of a later version is stored (an apply, resync or repair that
    stopped half-way, or versions the state was put back behind). The state's root must be the one the
    database recorded (the caller checks it: datapath.statecheck), and the stored manifest must have it.
    Damage to the replica's bytes (storage corruption, writes from outside) is not seen here: only by
    reading them (`check_replica`)."""
    if not state.initial_copy_done or state.version < 1:
        return None, "no completed version: a copy or resync was in progress"
    stored = stored_versions(replica)
    later = sorted(version for version in stored.undo | stored.manifests if version > state.version)
    if later:
        return None, (f"version {later[0]} is stored beyond the state's version {state.version}: a change "
                      f"was interrupted, the replica may hold part of it")
    manifest = manifest_if_root(replica, state.version, state.manifest_root)
    if manifest is None:
        return None, f"no stored manifest of version {state.version} with the recorded root {state.manifest_root}"
    if manifest.chunk_size != chunk_size or manifest.size != state.size:
        return None, (f"the manifest of version {state.version} has {manifest.chunk_size}-byte chunks of a "
                      f"{manifest.size}-byte disk, not {chunk_size}-byte chunks of {state.size} bytes")
    return manifest, ""


def store_manifest(replica: ReplicaDisk, version: int, manifest: Manifest) -> None:
    replica.storage.put_object(replica.manifest_name(version), manifest.to_bytes())


def reads_as_zeros(endpoint: DiskEndpoint) -> bool:
    """True when the disk has no data extent at all, so every byte reads as zero (one request)."""
    return next(iter(endpoint.data_extents()), None) is None


def _current_state(replica: ReplicaDisk, version: int) -> ReplicaState:
    """The replica's state, when `version` is one of its versions (PointUnavailableError otherwise)."""
    state = replica.load_state()
    current = state.version if state is not None else 0
    if current < 1:
        raise PointUnavailableError(
            f"replica {replica.name} has no recovery point (version {version} asked): its initial copy "
            f"is not complete"
        )
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= current:
        raise PointUnavailableError(
            f"replica {replica.name} has no version {version!r}: its versions run from 1 to {current}"
        )
    return state


def open_point(replica: ReplicaDisk, version: int) -> PointDisk:
    """The replica's content at `version`, read-only: the replica overlaid with the undo logs of the
    versions after it (each downloaded and verified first: a damaged one raises LogCorruptError naming
    it). Close it to remove the spooled logs.

    The view is stable only while no log is applied to the replica and no resync runs on it."""
    state = _current_state(replica, version)
    current = state.version
    stored = stored_versions(replica)
    missing = [later for later in range(version + 1, current + 1) if later not in stored.undo]
    if missing:
        raise PointUnavailableError(
            f"version {version} of replica {replica.name} is no longer available: the undo log of "
            f"version {missing[-1]} is gone (pruned)"
        )
    # An undo for the next version is a change interrupted half-way: the replica may hold part of it.
    interrupted = [current + 1] if current + 1 in stored.undo else []
    layers: list[UndoLog] = []
    try:
        for later in [*range(version + 1, current + 1), *interrupted]:
            layer = fetch_undo(replica, later, state)
            if layer is None:
                raise PointUnavailableError(
                    f"version {version} of replica {replica.name} is no longer available: the undo log of "
                    f"version {later} was deleted while it was being read"
                )
            layers.append(layer)
        base = replica.storage.open_disk(replica.name)
    except BaseException:
        for layer in layers:
            layer.close()
        raise
    if base.size != state.size:
        base.close()
        for layer in layers:
            layer.close()
        raise SizeMismatchError(f"replica {replica.name} is {base.size} bytes but its state says {state.size}")
    return PointDisk(base, layers, name=f"{replica.name} at version {version}")


def point_manifest(replica: ReplicaDisk, version: int) -> Manifest:
    """The manifest stored with `version` (PointUnavailableError when it is gone or not a version)."""
    state = _current_state(replica, version)
    manifest = load_manifest(replica, version)
    if manifest is None:
        raise PointUnavailableError(
            f"version {version} of replica {replica.name} is no longer available: its manifest is gone (pruned)"
        )
    if manifest.size != state.size:
        raise ManifestFormatError(
            f"{replica.manifest_name(version)}: describes a {manifest.size}-byte disk, the replica is {state.size}"
        )
    return manifest


def available_versions(replica: ReplicaDisk) -> range:
    """The versions that can still be opened: the current one and those whose chain of undo logs up to
    it is complete."""
    state = replica.load_state()
    if state is None or state.version < 1:
        return range(0)
    undo = stored_versions(replica).undo
    lowest = state.version
    while lowest > 1 and lowest in undo:
        lowest -= 1
    return range(lowest, state.version + 1)


def prune_versions(replica: ReplicaDisk, keep_from: int) -> list[int]:
    """Make the versions before `keep_from` unavailable: delete the undo logs of versions up to
    `keep_from` and the manifests of versions before it. Idempotent; returns the versions whose undo
    log was deleted. Oldest first, so an interrupted prune leaves a complete chain behind."""
    state = replica.load_state()
    if state is not None and keep_from > state.version:
        raise NonRecoverableError(
            f"cannot prune replica {replica.name} before version {keep_from}: its current version is "
            f"{state.version}, which always stays available"
        )
    stored = stored_versions(replica)
    deleted = []
    for version in sorted(version for version in stored.undo if version <= keep_from):
        replica.storage.delete_object(replica.undo_name(version))
        deleted.append(version)
    for version in sorted(version for version in stored.manifests if version < keep_from):
        replica.storage.delete_object(replica.manifest_name(version))
    return deleted


# ---- checking and restoring --------------------------------------------------------------------
@dataclass
class PointCheck:
    version: int
    expected_root: str
    """The root the point must have: the one given, else the stored manifest's."""
    actual_root: str
    """The root of the content read at that version."""
    ok: bool
    first_bad_chunk: int | None
    """The first chunk whose content differs from the stored manifest (None when none does)."""
    seconds: float


def verify_point(
    replica: ReplicaDisk, version: int, expected_root: str | None = None, on_progress: Progress | None = None
) -> PointCheck:
    """Checksum the replica's content at `version` and compare it with the manifest stored with that
    version (and with `expected_root`, when given, e.g. the root a recovery point recorded). Reads
    only the recovery site."""
    started = time.monotonic()
    stored = point_manifest(replica, version)
    with open_point(replica, version) as point:
        actual = compute_manifest(point, stored.chunk_size, on_progress=_offsets_to(on_progress, point.size))
    differing = diff_manifests(stored, actual)
    expected = stored.root_hex if expected_root is None else expected_root
    return PointCheck(
        version=version,
        expected_root=expected,
        actual_root=actual.root_hex,
        ok=not differing and actual.root_hex == expected,
        first_bad_chunk=differing[0] if differing else None,
        seconds=time.monotonic() - started,
    )


@dataclass
class RestoreResult:
    version: int
    bytes_copied: int
    """Disk data written to the target (zero chunks and holes are not sent)."""
    manifest_root: str
    """The root of what was written; equal to the version's stored manifest root."""
    seconds: float


def restore_point(
    replica: ReplicaDisk, version: int, target: DiskEndpoint, *, on_progress: Progress | None = None
) -> RestoreResult:
    """Copy the replica's content at `version` to `target` (a disk of the same size). Every undo log
    is verified before the first byte is written. PointMismatchError when what was copied does not
    match the version's stored manifest: the target is then not to be trusted."""
    started = time.monotonic()
    stored = point_manifest(replica, version)
    with open_point(replica, version) as point:
        result = copy_disk(point, target, chunk_size=stored.chunk_size, target_is_zero=reads_as_zeros(target),
                           on_progress=_offsets_to(on_progress, point.size))
    copied = result.manifest
    assert copied is not None  # a copy from offset 0 sees every chunk
    if copied.root != stored.root:
        chunk = diff_manifests(stored, copied)[0]
        raise PointMismatchError(
            f"restoring version {version} of replica {replica.name} to {target.name}: chunk {chunk} (offset "
            f"{chunk * stored.chunk_size}) differs from the version's manifest (root {copied.root_hex}, "
            f"expected {stored.root_hex}); the copy is not to be trusted"
        )
    return RestoreResult(version, result.bytes_written, copied.root_hex, time.monotonic() - started)


def _offsets_to(on_progress: Progress | None, total: int) -> Callable[[int], None] | None:
    if on_progress is None:
        return None
    return lambda offset: on_progress(offset, total)
