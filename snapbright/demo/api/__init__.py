"""Generated protocol code and its sources; see scripts/protos.py."""
