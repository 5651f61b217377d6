"""Tests of federation.catalog."""
