"""Routing: which upstream an SNI name reaches, and which names are refused."""
