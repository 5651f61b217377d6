"""East-west gateway: SNI routing of cross-cluster mTLS, admission, probe endpoint."""

# gateway.forward is compiled with the data plane's hot path (proxy/native.py): importing
# proxy first decides whether the compiled modules may run, before any of them is imported.
import proxy as _proxy  # noqa: F401
