"""The control plane's end of the discovery protocol: snapshots and SVIDs out, stats in."""
