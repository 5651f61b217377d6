"""The sidecar: outbound and inbound listeners, mesh routing, mTLS, admin, wiring."""
