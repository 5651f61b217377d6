"""The `snapbright` command line: one module per command group, composed in app.py."""
