"""Federation: catalog, discovery API server, peering, mirroring, CA and trust federation."""
