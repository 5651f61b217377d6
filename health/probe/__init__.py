"""Active health probes: local endpoints over HTTP and peer gateways over mTLS."""
