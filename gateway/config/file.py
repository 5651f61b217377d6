"""Reading a GatewayConfig file, and the file-backed config source the gateway runs from.

The source is :class:`proxy.config.source.FileConfigSource`: re-read on SIGHUP or when the
file changes; a bad file keeps the last good config and is counted through ``on_reload``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from gateway.config.model import GatewayConfig
from proxy.config.loader import load_file
from proxy.config.source import ConfigRejected, FileConfigSource, ReloadResult

_REGISTRY = {GatewayConfig.KIND: GatewayConfig}


def load_gateway_config(path: str | Path) -> GatewayConfig:
    """The one GatewayConfig in ``path``; :class:`ConfigRejected` lists every error otherwise."""
    result = load_file(path, _REGISTRY)
    documents = result.raise_for_errors()
    if len(documents) != 1 or not isinstance(documents[0], GatewayConfig):
        raise ConfigRejected(f"{result.source}:1:1: a gateway file holds one GatewayConfig")
    return documents[0]


def gateway_config_source(
    path: Path,
    *,
    poll_interval: float = 1.0,
    on_reload: Callable[[ReloadResult], None] | None = None,
) -> FileConfigSource[GatewayConfig]:
    """A config source over ``path``; raises :class:`ConfigRejected` if the file is bad now."""
    return FileConfigSource(
        path, load_gateway_config, poll_interval=poll_interval, on_reload=on_reload
    )
