"""resync_preview: what a resync of a VM would send, without sending: each disk read live on its host and
compared with the manifest of its replica's last recorded version. Nothing changes: no state, no health.

Preview disk ×disks (H)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from models.protection import ReplicationState
from workflows import actions as A
from workflows.engine import StepSpec
from workflows.items import (
    ItemRequest,
    item_job_params,
    item_locks,
    item_target,
    require_state,
    start_for_item,
    view_of,
)
from workflows.jobkind import JobKind, declare
from workflows.stages import Stages

S = ReplicationState


def build(request: ItemRequest) -> Stages:
    return [[StepSpec(f"Preview resync of disk {disk.name}", A.PREVIEW_RESYNC, request.queue,
                      {**request.params, "disk_id": disk.id}) for disk in request.disks]]


def start(item_id: str) -> str:
    """Preview a resync of the item's disks. Returns the job id."""
    view = view_of(item_id)
    require_state(view, KIND.starts_from, "preview a resync of")
    return start_for_item(KIND, ItemRequest.of(view))


def restart(params: Mapping[str, Any]) -> str:
    return start(params["item_id"])


KIND = declare(JobKind(
    name="resync_preview",
    summary="Preview what a resync of a VM would send, without sending anything",
    actions=frozenset({A.PREVIEW_RESYNC}),
    build=build, locks=item_locks, target=item_target, params=item_job_params, restart=restart,
    starts_from=(S.PROTECTED, S.RESYNC_REQUIRED),
))
