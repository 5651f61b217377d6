"""Tests of `snapbright up`: the plan, the runner, endpoints.json, the CLI end to end."""
