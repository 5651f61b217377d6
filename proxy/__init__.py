"""The mesh vocabulary and the data plane: names, identity, TLS, policy schema, sidecar."""

from proxy import native as _native

# Before any hot-path module is imported: run the compiled ones only if they match the sources.
_native.activate()
