"""`snapbright check` and `snapbright status`: the status value, the pure checks, the shell."""
