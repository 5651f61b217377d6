"""Cluster trust: the CA that issues SVIDs, its state directory, and bundle rotation."""
