"""Files people write: the shared document shape, value types, and the YAML loader."""
