"""Site drivers: the protected (primary) host, the recovery-site storage and compute."""
