"""Every job kind of the product, one file each; importing this package declares them all.

A new kind is a new file here, listed below, plus its actions in `tasks/` (docs/architecture.md shows how).
"""
from workflows.kinds import (  # noqa: F401  (each module declares its kind when imported)
    cancel_failback,
    cancel_failover,
    commit_failback,
    commit_failover,
    consistency_check,
    delete_recovery_points,
    delta_replication,
    disable_protection,
    enable_protection,
    failback,
    failback_completion,
    initial_replication,
    planned_failover,
    recovery_plan,
    resync_preview,
    resynchronize,
    reverse_replication,
    test_failover,
    test_failover_cleanup,
    unplanned_failover,
    verify_recovery_point,
)
