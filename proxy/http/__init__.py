"""The sidecar's HTTP/1.1 forwarding path: a strict downstream server and a pooled upstream client.

`serve_outbound` starts the outbound listener: the app calls ``http://<service>/…`` through it,
requests are routed on the Host header through a `Router`, and forwarded over keep-alive
connections pooled per endpoint. Parsing is llhttp (httptools) with its lenient flags off, plus
the checks llhttp leaves to us; every message is re-framed, so what reaches either side is
unambiguous.
"""

from proxy.http.core import (
    EndpointAddress,
    Overloaded,
    RoundRobinRoute,
    Route,
    Router,
    StaticEndpoint,
    StaticRouter,
)
from proxy.http.model import Failure, Limits, Timeouts
from proxy.http.server import OutboundServer, serve_outbound

__all__ = [
    "EndpointAddress",
    "Failure",
    "Limits",
    "OutboundServer",
    "Overloaded",
    "RoundRobinRoute",
    "Route",
    "Router",
    "StaticEndpoint",
    "StaticRouter",
    "Timeouts",
    "serve_outbound",
]
