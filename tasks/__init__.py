"""Celery tasks: thin wrappers that load state, call the data path, and record progress.

The worker imports this package at start (`include=["tasks"]` in worker.py); every task module is
imported here so its tasks are registered.
"""
from tasks import failover, plans, replication, steps  # noqa: F401
