"""`snapbright up`: a whole multi-cluster mesh as real processes on this machine.

- ``plan``: a LocalMesh topology in, every process (argv, config, ports, readiness, order) out.
- ``runner``: starts a plan's processes, waits until they are ready, supervises them, and
  stops every one of them on Ctrl-C (or when ``snapbright up`` itself dies).
- ``endpoints``: where everything listens, as a table and as ``endpoints.json``.
"""
