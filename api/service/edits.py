"""Changing what an operator registered: a host's registration key, a site's description, a replication
policy's settings, a recovery plan's groups. Each change is validated as the thing's creation is (the same
checks, the same messages), and a refused change changes nothing."""
from __future__ import annotations

from typing import Any

from models.db import session_scope
from models.fabric import rekey_host as _rekey_host
from models.plans import get_plan
from models.plans import update_plan as _update_plan
from models.policy import update_policy as _update_policy

from .dependents import describe_job, plan_job
from .errors import Conflict, Invalid, _operation
from .lookups import _host, _name, _policy, _site
from .policies import _policy_options
from .presenters import _host_dict, _plan_dict, _policy_dict, _site_dict

APPLIES_FROM = "the next cycle of each VM the policy protects (a delta cycle already scheduled keeps its time)"


@_operation
def rekey_host(name: str) -> dict[str, Any]:
    """A new registration key for the host: in the answer this once (only its hash is kept). The old key no
    longer admits an agent; an agent already running goes on until it is restarted, with the new key."""
    with session_scope() as session:
        row = _host(session, name)
        key = _rekey_host(session, row)
        return {**_host_dict(session, row), "registration_key": key}


@_operation
def update_site(name: str, *, description: str | None = None) -> dict[str, Any]:
    """Change a site's description (text of at most 1024 characters, as when it was added)."""
    if description is None:
        raise Invalid(f"nothing to change for site {name!r}: give a description")
    if not isinstance(description, str) or len(description) > 1024:
        raise Invalid("a site's description is text of at most 1024 characters")
    with session_scope() as session:
        row = _site(session, name)
        row.description = description
        session.add(row)
        session.flush()
        return _site_dict(session, row, detail=True)


@_operation
def update_policy(name: str, **options: Any) -> dict[str, Any]:
    """Change some settings of a replication policy (the options of `add_policy`; those left out keep their
    values). The policy as it would be is validated as a new one is; the new values apply from the next cycle
    of each VM it protects (`applies_from` in the answer)."""
    with session_scope() as session:
        row = _policy(session, name)
        settings = _policy_options(row.name, options)
        if not settings:
            raise Invalid(f"nothing to change for replication policy {row.name!r}: give at least one setting")
        _update_policy(session, row, **settings)
        return {**_policy_dict(session, row, detail=True), "applies_from": APPLIES_FROM}


@_operation
def update_plan(name: str, groups: list[dict], description: str | None = None) -> dict[str, Any]:
    """Replace a recovery plan's groups (and its description, unless None), validated as a new plan's are
    (every problem at once); refused while the plan runs."""
    with session_scope() as session:
        plan = get_plan(session, _name(name, "recovery plan"))
        job = plan_job(session, plan.id)
        if job is not None:
            raise Conflict(f"recovery plan {plan.name!r} is running: {describe_job(job)}; it can be changed once "
                           f"the run ends (or is cancelled: `asr jobs cancel {job.id}`)")
        return _plan_dict(session, _update_plan(session, plan.id, groups, description))
