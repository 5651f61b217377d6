"""Logging for the long-running commands (control plane, sidecar, gateway)."""

from __future__ import annotations

import logging


def configure() -> None:
    """INFO and above to stderr, one line each, unless the embedding program set logging up."""
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
