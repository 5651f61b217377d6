"""The regional health dashboard: what each control plane shows people about the mesh."""
