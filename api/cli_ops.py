"""The operator's verbs of `asr`: sites, hosts, VMs, protection, failover, plans, jobs (filled in by issue 5)."""
