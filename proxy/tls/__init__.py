"""Mesh mTLS: TLS 1.3 contexts built from SVIDs and trust bundles, and peer verification.

engine.py carries the sidecar's connections (OpenSSL over memory BIOs), peer.py judges the
peer from the chain OpenSSL verified, context.py holds the stdlib ``ssl`` contexts.
"""
