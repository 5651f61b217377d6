"""Workload identity: SPIFFE IDs, trust domains, X.509-SVID validation, trust bundles."""
