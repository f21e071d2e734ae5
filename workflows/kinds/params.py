"""What the job record of a one-VM failover or failback keeps of its request."""
from __future__ import annotations

from typing import Any

from workflows.failover_request import VmRequest


def vm_job_params(request: VmRequest) -> dict[str, Any]:
    """The item, the VM's name, the failover record the job writes, and what its restart needs."""
    return {"item_id": request.item_id, "vm": request.vm, "failover_id": request.failover_id, **request.record}
