"""One cluster's control plane, composed from its parts in one readable place.

- ``model``: the ``ControlPlaneConfig`` document and the shape of ``endpoints.json``.
- ``policies``: the policy directory, loaded whole and hot-reloaded (last good set kept).
- ``snapshot``: what each class of proxies is sent, built from the catalog, the peers'
  imports, the failover weights, the policies and the trust bundles.
- ``api``: the admin HTTP API (peering, services, explain, status) beside the dashboard.
- ``process``: :func:`~snapbright.controlplane.process.serve`, the whole process in one
  function: CA, registry, policies, discovery, peering, failover, admin.
"""
