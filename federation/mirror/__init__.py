"""Service mirroring: federated upstreams from local services and peers' imports."""
