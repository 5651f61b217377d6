"""Multi-process integration tests: whole meshes on loopback (`snapbright up`, control planes,
gateways, sidecars, the WAN emulator), each bounded in time."""
