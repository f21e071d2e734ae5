"""Replication logs (`.hrl`) are in datapath/logformat.py (the layout, writing), datapath/logreader.py
(reading, verifying) and datapath/logapply.py (applying a log to a replica).

The names below stay importable from here only for the modules named beside them, until those import
them from where they are defined.
"""
from datapath.logapply import apply_log  # imported by tasks/failover.py, tests/test_host.py
from datapath.logformat import (  # imported by tests/test_failback_data.py
    HEADER_SIZE,
    RECORD_HEADER_SIZE,
    RECORD_OVERHEAD,
    SEAL_RECORD_SIZE,
)
from datapath.logreader import LogDiskMismatchError, read_log_header  # imported by tests/test_failback_data.py

__all__ = [
    "HEADER_SIZE",
    "RECORD_HEADER_SIZE",
    "RECORD_OVERHEAD",
    "SEAL_RECORD_SIZE",
    "LogDiskMismatchError",
    "apply_log",
    "read_log_header",
]
