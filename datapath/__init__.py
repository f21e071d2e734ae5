"""The replication data path: disk images, the replication tracker and its logs, chunk checksums,
copy and resynchronization. Plain Python; nothing here knows about Celery."""
