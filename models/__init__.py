"""sqlmodel tables: the durable state of sites, hosts, VMs, protected items, what the recovery side
holds of each disk, failovers, recovery plans, jobs and job steps.

Importing this package registers every table on `SQLModel.metadata` (what `models.db.init_db` creates).
"""
from . import jobs  # noqa: F401  (the job engine's tables; its names are imported from models.jobs)
from .alerts import Alert, AlertEvent, AlertKind
from .apikeys import ApiKey, ApiKeyNotFoundError
from .db import dispose_engines, get_engine, init_db, session_scope
from .fabric import (
    AmbiguousVmError,
    Host,
    NetworkMapping,
    Site,
    VirtualDisk,
    VirtualMachine,
    VmmCloud,
    VmmServer,
    VmNetworkAdapter,
    VmNotFoundError,
)
from .failover import FailoverKind, FailoverRecord, FailoverStatus
from .plans import PlanError, PlanNotFoundError, PlanOperation, RecoveryPlan
from .policy import ReplicationPolicy
from .protection import (
    Health,
    InvalidStateError,
    ProtectedItem,
    RecoveryPoint,
    RecoveryPointKind,
    ReplicationState,
)
from .replicas import ReplicaRecord

__all__ = [
    "get_engine", "init_db", "session_scope", "dispose_engines",
    "Site", "VmmServer", "VmmCloud", "Host", "VirtualMachine", "VirtualDisk", "VmNetworkAdapter",
    "NetworkMapping", "VmNotFoundError", "AmbiguousVmError",
    "ReplicationPolicy",
    "FailoverRecord", "FailoverKind", "FailoverStatus",
    "RecoveryPlan", "PlanError", "PlanNotFoundError", "PlanOperation",
    "ProtectedItem", "RecoveryPoint", "ReplicationState", "Health", "RecoveryPointKind", "InvalidStateError",
    "ApiKey", "ApiKeyNotFoundError",
    "ReplicaRecord",
    "Alert", "AlertEvent", "AlertKind",
]
