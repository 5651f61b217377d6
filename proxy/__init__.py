"""The mesh vocabulary and the data plane: names, identity, TLS, policy schema, sidecar."""
