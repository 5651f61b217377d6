"""East-west gateway: SNI routing of cross-cluster mTLS, admission, probe endpoint."""
