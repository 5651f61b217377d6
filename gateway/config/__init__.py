"""The gateway configuration document and how it is loaded."""
