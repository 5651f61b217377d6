"""The proxy's end of the discovery protocol: config and SVIDs in, per-second stats out."""
