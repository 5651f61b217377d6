"""Data-plane policies people write: TrafficPolicy and AuthorizationPolicy."""
