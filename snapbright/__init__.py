"""Snapbright: the product — CLI, process wiring, the local runtime and checks."""
