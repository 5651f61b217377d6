"""The control plane's catalog: services, endpoints and workloads, from one of two sources.

- ``model``: the values (``Service``, ``Endpoint``, ``Workload``, ``Catalog``) and the admission
  of raw entries, which turns hostile data into a named rejection instead of a route.
- ``core``: pure decisions (blocking-query index steps, backoff, registration expiry).
- ``feed``: the latest-value broadcast every source publishes through (``watch()``, ``ready``).
- ``store``: the embedded registry, persisted in SQLite in the state directory.
- ``watch``: Consul as the production source, our own aiohttp watcher of blocking queries.
- ``consul``: Consul writes through py-consul: mirror write-back and leader election among
  control-plane replicas (the only module that imports the Consul client).

Both sources satisfy ``feed.CatalogSource``: ``ready``, ``current()`` and
``async for catalog in source.watch()``.
"""
