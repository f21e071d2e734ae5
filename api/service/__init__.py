"""The operations an operator performs, as plain functions: the one layer the REST API and the `asr` CLI share.

Every function opens its own database session, validates its input before anything is written, calls the
models and workflows, and returns JSON-ready dicts and lists (ISO 8601 datetimes, enum values as strings).
Whatever goes wrong is raised as a `ServiceError` whose message is the text to show the user and whose
`status` is the HTTP status the REST layer answers with; domain exceptions are mapped to them in one place
(`_translate`). Functions that start a job return at once with `{"job_id", "kind", "vm"}`: the job runs on
the workers and is followed with `show_job` or `job_events`.

A `vm` argument is a VM's name (when only one host has a VM of that name), "host/name", or the VM's id.

This package is the public face; the operations live by area: `fabric` (sites, VMM clouds, hosts, VMs, network
mappings), `vms` (create, start, stop a VM, its console), `policies`, `protection` (protect, disable, replicate
now, resync, consistency check, recovery points and their deletion, verify, health), `edits` (a host's new key,
root or site; a site's description; a VM's networks and guest definition; a network mapping's recovery network;
a policy's settings; a plan's groups), `removals` (each refused while something depends on
it), `failover` (failover, failback, reverse replication), `plans`, `jobs`, `metrics` (Prometheus) and `apikeys`;
beside them `errors` (the ServiceErrors, `_translate`, the `_operation` decorator), `dependents` (the jobs and
plans that depend on a thing), `lookups` (finding things by name or id, name checks) and `presenters` (rows as
plain dicts).
"""
from .alerts import list_alerts
from .apikeys import create_api_key, create_env_api_key, hash_api_key, list_api_keys, revoke_api_key
from .edits import (
    rekey_host,
    update_host,
    update_network_mapping,
    update_plan,
    update_policy,
    update_site,
    update_vm,
)
from .errors import Conflict, Invalid, NotFound, ServiceError, Unavailable
from .errors import _ensure_database as _ensure_database  # the REST API's key check readies the tables too
from .fabric import (
    add_host,
    add_network_mapping,
    add_site,
    add_vm,
    add_vmm_cloud,
    list_hosts,
    list_network_mappings,
    list_sites,
    list_vms,
    show_host,
    show_site,
    show_vm,
)
from .failover import (
    FAILBACK_MODES,
    MAX_FAILOVER_HISTORY,
    POINT_CHOICES,
    cancel_failover,
    commit_failover,
    complete_failover,
    failback,
    failover_history,
    planned_failover,
    reverse_replication,
    test_failover,
    test_failover_cleanup,
    unplanned_failover,
)
from .jobs import (
    MAX_JOB_LIMIT,
    MAX_WATCH_S,
    cancel_job,
    job_events,
    job_snapshot,
    list_jobs,
    restart_job,
    resume_job,
    retry_job,
    show_job,
)
from .jobs import check_watch as check_watch  # the REST API checks a watch's query before it streams
from .metrics import metrics
from .plans import PLAN_OPTIONS, create_plan, list_plans, plan_scripts, run_plan, show_plan, validate_plan
from .policies import POLICY_OPTIONS, add_policy, list_policies, show_policy
from .protection import (
    consistency_check,
    delete_recovery_points,
    disable_protection,
    health,
    preview_resync,
    protect,
    recovery_points,
    replicate,
    resync,
    verify,
)
from .removals import remove_host, remove_network_mapping, remove_plan, remove_policy, remove_site, remove_vm
from .vms import CONSOLE_MAX_BYTES, create_vm, start_vm, stop_vm, vm_console

__all__ = [
    "ServiceError", "NotFound", "Conflict", "Invalid", "Unavailable",
    "add_site", "list_sites", "show_site", "add_vmm_cloud",
    "add_host", "list_hosts", "show_host",
    "add_vm", "list_vms", "show_vm", "create_vm", "start_vm", "stop_vm", "vm_console",
    "add_network_mapping", "list_network_mappings",
    "add_policy", "list_policies", "show_policy",
    "protect", "disable_protection", "resync", "consistency_check",
    "test_failover", "test_failover_cleanup", "planned_failover", "unplanned_failover",
    "complete_failover", "commit_failover", "cancel_failover", "failback", "reverse_replication", "failover_history",
    "list_alerts", "preview_resync",
    "create_plan", "list_plans", "show_plan", "run_plan", "validate_plan", "plan_scripts", "resume_job",
    "recovery_points", "delete_recovery_points", "verify", "health", "metrics",
    "list_jobs", "show_job", "cancel_job", "retry_job", "restart_job", "job_events", "job_snapshot",
    "create_api_key", "create_env_api_key", "list_api_keys", "revoke_api_key", "hash_api_key",
    "rekey_host", "update_host", "update_site", "update_vm", "update_network_mapping", "update_policy", "update_plan",
    "replicate",
    "remove_vm", "remove_host", "remove_site", "remove_network_mapping", "remove_policy", "remove_plan",
    "POLICY_OPTIONS", "PLAN_OPTIONS", "FAILBACK_MODES", "POINT_CHOICES", "MAX_JOB_LIMIT", "MAX_FAILOVER_HISTORY",
    "MAX_WATCH_S", "CONSOLE_MAX_BYTES",
]
