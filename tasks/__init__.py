"""Celery tasks: thin wrappers that load state, call the data path, and record progress.

The worker imports this package at start (`include=["tasks"]` in worker.py); every task module is
imported here so its actions are registered, one module per family of the action catalog
(workflows/actions.py).
"""
from tasks import alerts, consistency, failback, failover, plans, points, preview, replication, steps  # noqa: F401
