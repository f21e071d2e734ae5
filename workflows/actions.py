"""The catalog of action names: every step of every job runs one of these.

A job kind (`workflows/kinds/`) declares which of them its stages use; the engine refuses a job whose
step names an action its kind did not declare. The code of each action is in `tasks/` (registered with
`@action(NAME)` under the same constant), and a unit test checks that every name here has its code and
that every registered action is in the catalog. Each name's prefix says where its code lives:
`replication.*` in tasks/replication.py, `failover.*` in tasks/failover.py, `failback.*` in
tasks/failback.py, `points.*` in tasks/points.py, `consistency.*` in tasks/consistency.py, `plan.*` in
tasks/plans.py, `preview.*` in tasks/preview.py.
"""
from __future__ import annotations

CATALOG: set[str] = set()


def declare(name: str) -> str:
    """Add `name` to the catalog and return it (extensions and tests declare their own actions this way)."""
    CATALOG.add(name)
    return name


# ---- protection and replication (tasks/replication.py) -------------------------------------------------
PREREQUISITES = declare("replication.prerequisites")
CREATE_RELATIONSHIP = declare("replication.create_relationship")
START_REPLICATION = declare("replication.start_replication")
SNAPSHOT_VM = declare("replication.snapshot_vm")
COPY_DISK = declare("replication.copy_disk")
DELETE_SNAPSHOT = declare("replication.delete_snapshot")
SHIP_LOGS = declare("replication.ship_logs")
APPLY_LOGS = declare("replication.apply_logs")
ACKNOWLEDGE_LOGS = declare("replication.acknowledge_logs")
FINALIZE = declare("replication.finalize")
UPDATE_HEALTH = declare("replication.update_health")
RESYNC_DISK = declare("replication.resync_disk")
BEGIN_DISABLE = declare("replication.begin_disable")
STOP_TRACKING = declare("replication.stop_tracking")
REMOVE_REPLICAS = declare("replication.remove_replicas")
FINISH_DISABLE = declare("replication.finish_disable")

# ---- resync preview (tasks/preview.py) -----------------------------------------------------------------
PREVIEW_RESYNC = declare("preview.resync_disk")

# ---- failover (tasks/failover.py) ----------------------------------------------------------------------
BEGIN_FAILOVER = declare("failover.begin")
SHUT_DOWN_PRIMARY = declare("failover.shut_down_primary")
CHOOSE_POINT = declare("failover.choose_point")
CREATE_RECOVERY_VM = declare("failover.create_recovery_vm")
RESTORE_DISK = declare("failover.restore_disk")
START_RECOVERY_VM = declare("failover.start_recovery_vm")
CHECK_RECOVERY_BOOT = declare("failover.check_recovery_boot")
FINISH_FAILOVER = declare("failover.finish")
DELETE_RECOVERY_VM = declare("failover.delete_recovery_vm")
RESUME_PRIMARY = declare("failover.resume_primary")
FINISH_CANCEL = declare("failover.finish_cancel")
FINISH_CLEANUP = declare("failover.finish_cleanup")
COMMIT = declare("failover.commit")

# ---- failback and reverse replication (tasks/failback.py) ----------------------------------------------
BEGIN_FAILBACK = declare("failback.begin")
PREPARE_PRIMARY_VM = declare("failback.prepare_primary_vm")
PREPARE_STAGING = declare("failback.prepare_staging")
SEND_DIFFERENCES = declare("failback.send_differences")
DOWNLOAD_DIFFERENCES = declare("failback.download_differences")
FAILBACK_READY = declare("failback.ready")
SHUT_DOWN_RECOVERY_VM = declare("failback.shut_down_recovery_vm")
SEND_FINAL_CHANGES = declare("failback.send_final_changes")
APPLY_FINAL_CHANGES = declare("failback.apply_final_changes")
SWAP_DISKS = declare("failback.swap_disks")
FINISH_FAILBACK = declare("failback.finish")
DISCARD_STAGING = declare("failback.discard_staging")
RESTART_RECOVERY_VM = declare("failback.restart_recovery_vm")
FINISH_FAILBACK_CANCEL = declare("failback.finish_cancel")
COMMIT_FAILBACK = declare("failback.commit")
BEGIN_REVERSE = declare("failback.begin_reverse_replication")

# ---- recovery points (tasks/points.py) ----------------------------------------------------------------
VERIFY_POINT = declare("points.verify")
DELETE_POINTS = declare("points.delete")
PRUNE_POINT_VERSIONS = declare("points.prune_versions")
CHECK_RETENTION_LOCK = declare("points.check_retention_lock")

# ---- consistency checks (tasks/consistency.py) -----------------------------------------------------------
CHECK_DISK = declare("consistency.check_disk")
FINISH_CHECK = declare("consistency.finish")

# ---- recovery plans (tasks/plans.py) -------------------------------------------------------------------
RUN_SCRIPT = declare("plan.script")
MANUAL_ACTION = declare("plan.manual")
