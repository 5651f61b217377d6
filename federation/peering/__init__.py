"""Peering between clusters: tokens, the session state machine, and exported-service logs."""
