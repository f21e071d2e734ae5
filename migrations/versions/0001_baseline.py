"""Baseline: the schema as it stood when migrations were introduced (release 0.1.0 after issue 9).

Frozen on purpose: later schema changes are later revisions, never edits here. `baseline_metadata()` is
also what `migrations/adopt.py` compares a pre-migration database with.

Revision ID: 0001
Revises:
Create Date: 2026-12-03
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def baseline_metadata() -> sa.MetaData:
    """Every table of the baseline. Types are the storage types (DateTime, String(n) for enums), not the
    models' Python-side decorators, so the revision does not change when those do."""
    metadata = sa.MetaData()
    sa.Table(
        'api_key', metadata,
        sa.Column('id', sa.String(36), primary_key=True, nullable=False),
        sa.Column('name', sa.String(64), nullable=False),
        sa.Column('prefix', sa.String(16), nullable=False),
        sa.Column('key_hash', sa.String(256), nullable=False),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.Column('last_used_at', sa.DateTime(), nullable=True),
        sa.Column('revoked_at', sa.DateTime(), nullable=True),
        sa.UniqueConstraint('prefix'),
        sa.UniqueConstraint('name'),
    )
    sa.Table(
        'job', metadata,
        sa.Column('id', sa.String(36), primary_key=True, nullable=False),
        sa.Column('kind', sa.String(64), nullable=False),
        sa.Column('target', sa.String(255), nullable=True),
        sa.Column('lock_key', sa.String(255), nullable=True),
        sa.Column('lock_keys', sa.JSON(), nullable=False),
        sa.Column('state', sa.String(14), nullable=False),
        sa.Column('params', sa.JSON(), nullable=False),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.Column('started_at', sa.DateTime(), nullable=True),
        sa.Column('ended_at', sa.DateTime(), nullable=True),
        sa.Column('error', sa.Text(), nullable=True),
        sa.Column('error_class', sa.String(255), nullable=True),
        sa.Column('settled_at', sa.DateTime(), nullable=True),
        sa.Column('hook_pending', sa.Boolean(), nullable=False),
        sa.Column('hook_error', sa.Text(), nullable=True),
        sa.Index('ix_job_hook_pending', 'hook_pending'),
        sa.Index('ix_job_kind', 'kind'),
        sa.Index('ix_job_state', 'state'),
        sa.Index('ix_job_target', 'target'),
    )
    sa.Table(
        'recovery_plan', metadata,
        sa.Column('id', sa.String(36), primary_key=True, nullable=False),
        sa.Column('name', sa.String(64), nullable=False),
        sa.Column('description', sa.String(1024), nullable=False),
        sa.Column('groups', sa.JSON(), nullable=False),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.Column('updated_at', sa.DateTime(), nullable=False),
        sa.UniqueConstraint('name'),
    )
    sa.Table(
        'replication_policy', metadata,
        sa.Column('id', sa.String(36), primary_key=True, nullable=False),
        sa.Column('name', sa.String(64), nullable=False),
        sa.Column('copy_frequency_s', sa.Integer(), nullable=False),
        sa.Column('recovery_point_retention_h', sa.Integer(), nullable=False),
        sa.Column('app_consistent_frequency_h', sa.Integer(), nullable=False),
        sa.Column('initial_replication_at', sa.DateTime(), nullable=True),
        sa.Column('office_hours_start', sa.Time(), nullable=False),
        sa.Column('office_hours_end', sa.Time(), nullable=False),
        sa.Column('office_days', sa.JSON(), nullable=False),
        sa.Column('office_timezone', sa.String(64), nullable=False),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.UniqueConstraint('name'),
    )
    sa.Table(
        'site', metadata,
        sa.Column('id', sa.String(36), primary_key=True, nullable=False),
        sa.Column('name', sa.String(64), nullable=False),
        sa.Column('description', sa.String(1024), nullable=False),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.UniqueConstraint('name'),
    )
    sa.Table(
        'vmm_server', metadata,
        sa.Column('id', sa.String(36), primary_key=True, nullable=False),
        sa.Column('name', sa.String(64), nullable=False),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.UniqueConstraint('name'),
    )
    sa.Table(
        'job_lock', metadata,
        sa.Column('lock_key', sa.String(255), primary_key=True, nullable=False),
        sa.Column('job_id', sa.String(36), sa.ForeignKey('job.id'), nullable=False),
        sa.Column('acquired_at', sa.DateTime(), nullable=False),
        sa.Index('ix_job_lock_job_id', 'job_id'),
    )
    sa.Table(
        'job_step', metadata,
        sa.Column('id', sa.String(36), primary_key=True, nullable=False),
        sa.Column('job_id', sa.String(36), sa.ForeignKey('job.id'), nullable=False),
        sa.Column('stage', sa.Integer(), nullable=False),
        sa.Column('index', sa.Integer(), nullable=False),
        sa.Column('name', sa.String(255), nullable=False),
        sa.Column('action', sa.String(255), nullable=False),
        sa.Column('queue', sa.String(255), nullable=False),
        sa.Column('params', sa.JSON(), nullable=False),
        sa.Column('state', sa.String(14), nullable=False),
        sa.Column('attempts', sa.Integer(), nullable=False),
        sa.Column('deaths', sa.Integer(), nullable=False),
        sa.Column('started_at', sa.DateTime(), nullable=True),
        sa.Column('ended_at', sa.DateTime(), nullable=True),
        sa.Column('heartbeat_at', sa.DateTime(), nullable=True),
        sa.Column('queued_at', sa.DateTime(), nullable=True),
        sa.Column('next_attempt_at', sa.DateTime(), nullable=True),
        sa.Column('error', sa.Text(), nullable=True),
        sa.Column('error_class', sa.String(255), nullable=True),
        sa.Column('instructions', sa.Text(), nullable=True),
        sa.Column('celery_task_id', sa.String(64), nullable=True),
        sa.Column('worker', sa.String(255), nullable=True),
        sa.Column('lease', sa.String(36), nullable=True),
        sa.Column('progress_done', sa.Integer(), nullable=False),
        sa.Column('progress_total', sa.Integer(), nullable=False),
        sa.Column('result', sa.JSON(), nullable=True),
        sa.UniqueConstraint('job_id', 'stage', 'index'),
        sa.Index('ix_job_step_job_id', 'job_id'),
        sa.Index('ix_job_step_state', 'state'),
    )
    sa.Table(
        'vmm_cloud', metadata,
        sa.Column('id', sa.String(36), primary_key=True, nullable=False),
        sa.Column('vmm_server_id', sa.String(36), sa.ForeignKey('vmm_server.id'), nullable=False),
        sa.Column('name', sa.String(64), nullable=False),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.UniqueConstraint('vmm_server_id', 'name'),
        sa.Index('ix_vmm_cloud_vmm_server_id', 'vmm_server_id'),
    )
    sa.Table(
        'host', metadata,
        sa.Column('id', sa.String(36), primary_key=True, nullable=False),
        sa.Column('name', sa.String(64), nullable=False),
        sa.Column('site_id', sa.String(36), sa.ForeignKey('site.id'), nullable=True),
        sa.Column('cloud_id', sa.String(36), sa.ForeignKey('vmm_cloud.id'), nullable=True),
        sa.Column('root', sa.String(4096), nullable=False),
        sa.Column('queue', sa.String(80), nullable=False),
        sa.Column('key_hash', sa.String(256), nullable=False),
        sa.Column('registered_at', sa.DateTime(), nullable=False),
        sa.Column('last_seen_at', sa.DateTime(), nullable=True),
        sa.UniqueConstraint('name'),
        sa.CheckConstraint('(site_id IS NULL) <> (cloud_id IS NULL)', name='host_in_exactly_one_site_or_cloud'),
        sa.Index('ix_host_cloud_id', 'cloud_id'),
        sa.Index('ix_host_site_id', 'site_id'),
    )
    sa.Table(
        'network_mapping', metadata,
        sa.Column('id', sa.String(36), primary_key=True, nullable=False),
        sa.Column('site_id', sa.String(36), sa.ForeignKey('site.id'), nullable=True),
        sa.Column('cloud_id', sa.String(36), sa.ForeignKey('vmm_cloud.id'), nullable=True),
        sa.Column('source_network', sa.String(64), nullable=False),
        sa.Column('recovery_network', sa.String(64), nullable=False),
        sa.Column('recovery_subnet', sa.String(49), nullable=False),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.CheckConstraint('(site_id IS NULL) <> (cloud_id IS NULL)', name='mapping_in_exactly_one_site_or_cloud'),
        sa.Index('ux_network_mapping_cloud_source', 'cloud_id', 'source_network', unique=True,
                 sqlite_where=sa.text('cloud_id IS NOT NULL'), postgresql_where=sa.text('cloud_id IS NOT NULL')),
        sa.Index('ux_network_mapping_site_source', 'site_id', 'source_network', unique=True,
                 sqlite_where=sa.text('site_id IS NOT NULL'), postgresql_where=sa.text('site_id IS NOT NULL')),
    )
    sa.Table(
        'virtual_machine', metadata,
        sa.Column('id', sa.String(36), primary_key=True, nullable=False),
        sa.Column('host_id', sa.String(36), sa.ForeignKey('host.id'), nullable=False),
        sa.Column('name', sa.String(64), nullable=False),
        sa.Column('vm_uuid', sa.String(36), nullable=False),
        sa.Column('generation', sa.Integer(), nullable=False),
        sa.Column('state', sa.String(16), nullable=False),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.UniqueConstraint('host_id', 'name'),
        sa.Index('ix_virtual_machine_host_id', 'host_id'),
        sa.Index('ix_virtual_machine_vm_uuid', 'vm_uuid'),
    )
    sa.Table(
        'protected_item', metadata,
        sa.Column('id', sa.String(36), primary_key=True, nullable=False),
        sa.Column('vm_id', sa.String(36), sa.ForeignKey('virtual_machine.id'), nullable=False),
        sa.Column('policy_id', sa.String(36), sa.ForeignKey('replication_policy.id'), nullable=False),
        sa.Column('recovery_storage', sa.String(4096), nullable=False),
        sa.Column('storage_options', sa.JSON(), nullable=False),
        sa.Column('replication_state', sa.String(27), nullable=False),
        sa.Column('health', sa.String(8), nullable=False),
        sa.Column('health_errors', sa.JSON(), nullable=False),
        sa.Column('resync_required_reason', sa.String(2048), nullable=True),
        sa.Column('resync_scheduled_for', sa.DateTime(), nullable=True),
        sa.Column('current_rpo_s', sa.Integer(), nullable=True),
        sa.Column('last_recovery_point_at', sa.DateTime(), nullable=True),
        sa.Column('unsent_ratio', sa.Float(), nullable=False),
        sa.Column('next_delta_at', sa.DateTime(), nullable=True),
        sa.Column('next_app_consistent_at', sa.DateTime(), nullable=True),
        sa.Column('recovery_host_id', sa.String(36), sa.ForeignKey('host.id'), nullable=True),
        sa.Column('replica_folder', sa.String(200), nullable=True),
        sa.Column('initial_replication_at', sa.DateTime(), nullable=True),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.Column('updated_at', sa.DateTime(), nullable=False),
        sa.UniqueConstraint('vm_id'),
        sa.Index('ix_protected_item_policy_id', 'policy_id'),
    )
    sa.Table(
        'virtual_disk', metadata,
        sa.Column('id', sa.String(36), primary_key=True, nullable=False),
        sa.Column('vm_id', sa.String(36), sa.ForeignKey('virtual_machine.id', ondelete='CASCADE'), nullable=False),
        sa.Column('name', sa.String(64), nullable=False),
        sa.Column('file_name', sa.String(64), nullable=False),
        sa.Column('size', sa.BigInteger(), nullable=False),
        sa.Column('format', sa.String(8), nullable=False),
        sa.Column('disk_uuid', sa.String(36), nullable=False),
        sa.UniqueConstraint('vm_id', 'name'),
        sa.UniqueConstraint('vm_id', 'disk_uuid'),
        sa.Index('ix_virtual_disk_vm_id', 'vm_id'),
    )
    sa.Table(
        'vm_network_adapter', metadata,
        sa.Column('id', sa.String(36), primary_key=True, nullable=False),
        sa.Column('vm_id', sa.String(36), sa.ForeignKey('virtual_machine.id', ondelete='CASCADE'), nullable=False),
        sa.Column('name', sa.String(64), nullable=False),
        sa.Column('vm_network', sa.String(64), nullable=False),
        sa.Column('public_ip', sa.String(45), nullable=True),
        sa.UniqueConstraint('vm_id', 'name'),
        sa.Index('ix_vm_network_adapter_vm_id', 'vm_id'),
    )
    sa.Table(
        'failover', metadata,
        sa.Column('id', sa.String(36), primary_key=True, nullable=False),
        sa.Column('item_id', sa.String(36), sa.ForeignKey('protected_item.id', ondelete='CASCADE'), nullable=False),
        sa.Column('kind', sa.String(9), nullable=False),
        sa.Column('status', sa.String(11), nullable=False),
        sa.Column('job_id', sa.String(36), nullable=True),
        sa.Column('point_choice', sa.String(64), nullable=False),
        sa.Column('point_id', sa.String(36), nullable=True),
        sa.Column('point_created_at', sa.DateTime(), nullable=True),
        sa.Column('point_kind', sa.String(32), nullable=True),
        sa.Column('versions', sa.JSON(), nullable=False),
        sa.Column('expected_roots', sa.JSON(), nullable=False),
        sa.Column('produced_roots', sa.JSON(), nullable=False),
        sa.Column('verified', sa.Boolean(), nullable=True),
        sa.Column('target_host', sa.String(64), nullable=True),
        sa.Column('target_vm', sa.String(64), nullable=True),
        sa.Column('network', sa.String(64), nullable=True),
        sa.Column('details', sa.JSON(), nullable=False),
        sa.Column('started_at', sa.DateTime(), nullable=False),
        sa.Column('vm_up_at', sa.DateTime(), nullable=True),
        sa.Column('ended_at', sa.DateTime(), nullable=True),
        sa.Column('rto_s', sa.Float(), nullable=True),
        sa.Column('rpo_s', sa.Float(), nullable=True),
        sa.Index('ix_failover_item_started', 'item_id', 'started_at'),
    )
    sa.Table(
        'recovery_point', metadata,
        sa.Column('id', sa.String(36), primary_key=True, nullable=False),
        sa.Column('item_id', sa.String(36), sa.ForeignKey('protected_item.id', ondelete='CASCADE'), nullable=False),
        sa.Column('generations', sa.JSON(), nullable=False),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.Column('kind', sa.String(16), nullable=False),
        sa.Column('manifest_roots', sa.JSON(), nullable=False),
        sa.Column('versions', sa.JSON(), nullable=False),
        sa.Index('ix_recovery_point_item_created', 'item_id', 'created_at'),
    )
    return metadata


def upgrade() -> None:
    baseline_metadata().create_all(op.get_bind())


def downgrade() -> None:
    baseline_metadata().drop_all(op.get_bind())
