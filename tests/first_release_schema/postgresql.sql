-- The schema the first landed release (commit b63a9d9, 2026-11-24) created with create_all on postgresql,
-- printed from that commit's models: what a database of that release holds, for tests/test_migrations.py.
CREATE TABLE job (
	id VARCHAR(36) NOT NULL, 
	kind VARCHAR(64) NOT NULL, 
	target VARCHAR(255), 
	lock_key VARCHAR(255), 
	state VARCHAR(13) NOT NULL, 
	params JSON NOT NULL, 
	created_at TIMESTAMP WITHOUT TIME ZONE NOT NULL, 
	started_at TIMESTAMP WITHOUT TIME ZONE, 
	ended_at TIMESTAMP WITHOUT TIME ZONE, 
	error TEXT, 
	error_class VARCHAR(255), 
	settled_at TIMESTAMP WITHOUT TIME ZONE, 
	hook_pending BOOLEAN NOT NULL, 
	hook_error TEXT, 
	PRIMARY KEY (id)
);
CREATE INDEX ix_job_kind ON job (kind);
CREATE INDEX ix_job_state ON job (state);
CREATE INDEX ix_job_target ON job (target);
CREATE INDEX ix_job_hook_pending ON job (hook_pending);
CREATE TABLE replication_policy (
	id VARCHAR(36) NOT NULL, 
	name VARCHAR(64) NOT NULL, 
	copy_frequency_s INTEGER NOT NULL, 
	recovery_point_retention_h INTEGER NOT NULL, 
	app_consistent_frequency_h INTEGER NOT NULL, 
	initial_replication_at TIMESTAMP WITHOUT TIME ZONE, 
	office_hours_start TIME WITHOUT TIME ZONE NOT NULL, 
	office_hours_end TIME WITHOUT TIME ZONE NOT NULL, 
	office_days JSON NOT NULL, 
	office_timezone VARCHAR(64) NOT NULL, 
	created_at TIMESTAMP WITHOUT TIME ZONE NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (name)
);
CREATE TABLE site (
	id VARCHAR(36) NOT NULL, 
	name VARCHAR(64) NOT NULL, 
	description VARCHAR(1024) NOT NULL, 
	created_at TIMESTAMP WITHOUT TIME ZONE NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (name)
);
CREATE TABLE vmm_server (
	id VARCHAR(36) NOT NULL, 
	name VARCHAR(64) NOT NULL, 
	created_at TIMESTAMP WITHOUT TIME ZONE NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (name)
);
CREATE TABLE job_lock (
	lock_key VARCHAR(255) NOT NULL, 
	job_id VARCHAR(36) NOT NULL, 
	acquired_at TIMESTAMP WITHOUT TIME ZONE NOT NULL, 
	PRIMARY KEY (lock_key), 
	FOREIGN KEY(job_id) REFERENCES job (id)
);
CREATE INDEX ix_job_lock_job_id ON job_lock (job_id);
CREATE TABLE job_step (
	id VARCHAR(36) NOT NULL, 
	job_id VARCHAR(36) NOT NULL, 
	stage INTEGER NOT NULL, 
	index INTEGER NOT NULL, 
	name VARCHAR(255) NOT NULL, 
	action VARCHAR(255) NOT NULL, 
	queue VARCHAR(255) NOT NULL, 
	params JSON NOT NULL, 
	state VARCHAR(13) NOT NULL, 
	attempts INTEGER NOT NULL, 
	deaths INTEGER NOT NULL, 
	started_at TIMESTAMP WITHOUT TIME ZONE, 
	ended_at TIMESTAMP WITHOUT TIME ZONE, 
	heartbeat_at TIMESTAMP WITHOUT TIME ZONE, 
	queued_at TIMESTAMP WITHOUT TIME ZONE, 
	next_attempt_at TIMESTAMP WITHOUT TIME ZONE, 
	error TEXT, 
	error_class VARCHAR(255), 
	celery_task_id VARCHAR(64), 
	worker VARCHAR(255), 
	lease VARCHAR(36), 
	progress_done INTEGER NOT NULL, 
	progress_total INTEGER NOT NULL, 
	result JSON, 
	PRIMARY KEY (id), 
	UNIQUE (job_id, stage, index), 
	FOREIGN KEY(job_id) REFERENCES job (id)
);
CREATE INDEX ix_job_step_job_id ON job_step (job_id);
CREATE INDEX ix_job_step_state ON job_step (state);
CREATE TABLE vmm_cloud (
	id VARCHAR(36) NOT NULL, 
	vmm_server_id VARCHAR(36) NOT NULL, 
	name VARCHAR(64) NOT NULL, 
	created_at TIMESTAMP WITHOUT TIME ZONE NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (vmm_server_id, name), 
	FOREIGN KEY(vmm_server_id) REFERENCES vmm_server (id)
);
CREATE INDEX ix_vmm_cloud_vmm_server_id ON vmm_cloud (vmm_server_id);
CREATE TABLE host (
	id VARCHAR(36) NOT NULL, 
	name VARCHAR(64) NOT NULL, 
	site_id VARCHAR(36), 
	cloud_id VARCHAR(36), 
	root VARCHAR(4096) NOT NULL, 
	queue VARCHAR(80) NOT NULL, 
	key_hash VARCHAR(256) NOT NULL, 
	registered_at TIMESTAMP WITHOUT TIME ZONE NOT NULL, 
	last_seen_at TIMESTAMP WITHOUT TIME ZONE, 
	PRIMARY KEY (id), 
	CONSTRAINT host_in_exactly_one_site_or_cloud CHECK ((site_id IS NULL) <> (cloud_id IS NULL)), 
	UNIQUE (name), 
	FOREIGN KEY(site_id) REFERENCES site (id), 
	FOREIGN KEY(cloud_id) REFERENCES vmm_cloud (id)
);
CREATE INDEX ix_host_site_id ON host (site_id);
CREATE INDEX ix_host_cloud_id ON host (cloud_id);
CREATE TABLE network_mapping (
	id VARCHAR(36) NOT NULL, 
	site_id VARCHAR(36), 
	cloud_id VARCHAR(36), 
	source_network VARCHAR(64) NOT NULL, 
	recovery_network VARCHAR(64) NOT NULL, 
	recovery_subnet VARCHAR(49) NOT NULL, 
	created_at TIMESTAMP WITHOUT TIME ZONE NOT NULL, 
	PRIMARY KEY (id), 
	CONSTRAINT mapping_in_exactly_one_site_or_cloud CHECK ((site_id IS NULL) <> (cloud_id IS NULL)), 
	FOREIGN KEY(site_id) REFERENCES site (id), 
	FOREIGN KEY(cloud_id) REFERENCES vmm_cloud (id)
);
CREATE UNIQUE INDEX ux_network_mapping_site_source ON network_mapping (site_id, source_network) WHERE site_id IS NOT NULL;
CREATE UNIQUE INDEX ux_network_mapping_cloud_source ON network_mapping (cloud_id, source_network) WHERE cloud_id IS NOT NULL;
CREATE TABLE virtual_machine (
	id VARCHAR(36) NOT NULL, 
	host_id VARCHAR(36) NOT NULL, 
	name VARCHAR(64) NOT NULL, 
	vm_uuid VARCHAR(36) NOT NULL, 
	generation INTEGER NOT NULL, 
	state VARCHAR(16) NOT NULL, 
	created_at TIMESTAMP WITHOUT TIME ZONE NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (host_id, name), 
	FOREIGN KEY(host_id) REFERENCES host (id)
);
CREATE INDEX ix_virtual_machine_vm_uuid ON virtual_machine (vm_uuid);
CREATE INDEX ix_virtual_machine_host_id ON virtual_machine (host_id);
CREATE TABLE protected_item (
	id VARCHAR(36) NOT NULL, 
	vm_id VARCHAR(36) NOT NULL, 
	policy_id VARCHAR(36) NOT NULL, 
	recovery_storage VARCHAR(4096) NOT NULL, 
	storage_options JSON NOT NULL, 
	replication_state VARCHAR(27) NOT NULL, 
	health VARCHAR(8) NOT NULL, 
	health_errors JSON NOT NULL, 
	resync_required_reason VARCHAR(2048), 
	resync_scheduled_for TIMESTAMP WITHOUT TIME ZONE, 
	current_rpo_s INTEGER, 
	last_recovery_point_at TIMESTAMP WITHOUT TIME ZONE, 
	unsent_ratio FLOAT NOT NULL, 
	next_delta_at TIMESTAMP WITHOUT TIME ZONE, 
	initial_replication_at TIMESTAMP WITHOUT TIME ZONE, 
	created_at TIMESTAMP WITHOUT TIME ZONE NOT NULL, 
	updated_at TIMESTAMP WITHOUT TIME ZONE NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (vm_id), 
	FOREIGN KEY(vm_id) REFERENCES virtual_machine (id), 
	FOREIGN KEY(policy_id) REFERENCES replication_policy (id)
);
CREATE INDEX ix_protected_item_policy_id ON protected_item (policy_id);
CREATE TABLE virtual_disk (
	id VARCHAR(36) NOT NULL, 
	vm_id VARCHAR(36) NOT NULL, 
	name VARCHAR(64) NOT NULL, 
	file_name VARCHAR(64) NOT NULL, 
	size BIGINT NOT NULL, 
	format VARCHAR(8) NOT NULL, 
	disk_uuid VARCHAR(36) NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (vm_id, name), 
	UNIQUE (vm_id, disk_uuid), 
	FOREIGN KEY(vm_id) REFERENCES virtual_machine (id) ON DELETE CASCADE
);
CREATE INDEX ix_virtual_disk_vm_id ON virtual_disk (vm_id);
CREATE TABLE vm_network_adapter (
	id VARCHAR(36) NOT NULL, 
	vm_id VARCHAR(36) NOT NULL, 
	name VARCHAR(64) NOT NULL, 
	vm_network VARCHAR(64) NOT NULL, 
	public_ip VARCHAR(45), 
	PRIMARY KEY (id), 
	UNIQUE (vm_id, name), 
	FOREIGN KEY(vm_id) REFERENCES virtual_machine (id) ON DELETE CASCADE
);
CREATE INDEX ix_vm_network_adapter_vm_id ON vm_network_adapter (vm_id);
CREATE TABLE recovery_point (
	id VARCHAR(36) NOT NULL, 
	item_id VARCHAR(36) NOT NULL, 
	generations JSON NOT NULL, 
	created_at TIMESTAMP WITHOUT TIME ZONE NOT NULL, 
	kind VARCHAR(16) NOT NULL, 
	manifest_roots JSON NOT NULL, 
	PRIMARY KEY (id), 
	FOREIGN KEY(item_id) REFERENCES protected_item (id) ON DELETE CASCADE
);
CREATE INDEX ix_recovery_point_item_created ON recovery_point (item_id, created_at);
