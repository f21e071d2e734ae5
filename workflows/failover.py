"""Transitional names of the failover workflows (now job kinds in workflows/kinds/); removed once every
caller imports the kinds directly."""
from workflows.failover_request import (  # noqa: F401
    DEFAULT_TEST_NETWORK,
    FailbackMode,
    PointChoice,
    recovery_network_for,
    resolve_point,
)
from workflows.items import active_jobs  # noqa: F401
from workflows.kinds.cancel_failback import start as cancel_failback  # noqa: F401
from workflows.kinds.cancel_failover import start as cancel_failover  # noqa: F401
from workflows.kinds.commit_failback import start as commit_failback  # noqa: F401
from workflows.kinds.commit_failover import start as commit_failover  # noqa: F401
from workflows.kinds.failback import start as start_failback  # noqa: F401
from workflows.kinds.failback_completion import start as complete_failback  # noqa: F401
from workflows.kinds.planned_failover import start as start_planned_failover  # noqa: F401
from workflows.kinds.reverse_replication import start as start_reverse_replication  # noqa: F401
from workflows.kinds.test_failover import start as start_test_failover  # noqa: F401
from workflows.kinds.test_failover_cleanup import start as start_test_failover_cleanup  # noqa: F401
from workflows.kinds.unplanned_failover import start as start_unplanned_failover  # noqa: F401
from workflows.kinds.verify_recovery_point import start as start_verify  # noqa: F401
from workflows.reports import failover_report  # noqa: F401

TEST_FAILOVER = "test_failover"
TEST_FAILOVER_CLEANUP = "test_failover_cleanup"
PLANNED_FAILOVER = "planned_failover"
UNPLANNED_FAILOVER = "unplanned_failover"
CANCEL_FAILOVER = "cancel_failover"
COMMIT_FAILOVER = "commit_failover"
FAILBACK = "failback"
FAILBACK_COMPLETION = "failback_completion"
CANCEL_FAILBACK = "cancel_failback"
COMMIT_FAILBACK_JOB = "commit_failback"
REVERSE_REPLICATION = "reverse_replication"
VERIFY_RECOVERY_POINT = "verify_recovery_point"
