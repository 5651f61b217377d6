"""Mesh mTLS: TLS 1.3 contexts built from SVIDs and trust bundles, and peer verification."""
