"""The shape every policy and config document shares, and the value types they use.

Documents are Kubernetes-style (``apiVersion``, ``kind``, ``metadata``, ``spec``) and are
validated once, at the edge, into frozen values. Durations are written as ``250ms``, ``2s``,
``1m`` or ``1h`` and held as float seconds; shares are written as ``5%`` (or a number between 0
and 1) and held as a float between 0 and 1.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, ClassVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    WithJsonSchema,
)
from pydantic.alias_generators import to_camel

API_VERSION = "snapbright.io/v1alpha1"

_DURATION = re.compile(r"^(?P<value>\d+(?:\.\d+)?)(?P<unit>us|µs|ms|s|m|h)$")
_UNIT_SECONDS = {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DNS_LABEL = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"


def _parse_duration(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, str):
        raise ValueError("must be a duration string such as 250ms, 2s or 1m")
    match = _DURATION.match(value.strip())
    if match is None:
        raise ValueError(f"invalid duration {value!r}: use a number and us, ms, s, m or h")
    return float(match["value"]) * _UNIT_SECONDS[match["unit"]]


def _format_duration(seconds: float) -> str:
    if seconds >= 1 and float(seconds).is_integer():
        return f"{int(seconds)}s"
    return f"{round(seconds * 1000, 3):g}ms"


def _parse_share(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("must be a percentage such as 5% or a number between 0 and 1")
    if isinstance(value, str):
        text = value.strip()
        if not text.endswith("%"):
            raise ValueError(f"invalid share {value!r}: write a percentage such as 5%")
        try:
            share = float(text[:-1]) / 100.0
        except ValueError:
            raise ValueError(f"invalid share {value!r}: write a percentage such as 5%") from None
    elif isinstance(value, int | float):
        share = float(value)
    else:
        raise ValueError("must be a percentage such as 5% or a number between 0 and 1")
    if not 0.0 <= share <= 1.0:
        raise ValueError("must be between 0% and 100%")
    return share


Duration = Annotated[
    float,
    BeforeValidator(_parse_duration),
    PlainSerializer(_format_duration, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "pattern": r"^\d+(\.\d+)?(us|µs|ms|s|m|h)$"}),
]
"""A duration written as ``250ms``/``2s``/``1m``, held as seconds."""

Share = Annotated[
    float,
    BeforeValidator(_parse_share),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": r"^\d+(\.\d+)?%$"},
                {"type": "number", "minimum": 0, "maximum": 1},
            ]
        }
    ),
]
"""A share of traffic written as ``5%`` or ``0.05``, held as a float in [0, 1]."""

Name = Annotated[str, Field(pattern=_DNS_LABEL, max_length=63)]
"""A DNS-label name (services, clusters, namespaces): lowercase, digits and ``-``."""


_MESH = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")
_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}$")


def _ip(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address") from None


def _loopback(value: str) -> str:
    if not ipaddress.ip_address(value).is_loopback:
        raise ValueError("must be a loopback address: only this host may reach it")
    return value


def _mesh(value: str) -> str:
    if len(value) > 200 or _MESH.match(value) is None:
        raise ValueError("must be dot-separated DNS labels (a-z, 0-9 and '-')")
    return value


def _host_port(value: str) -> str:
    if _HOST_PORT.match(value) is None or not 1 <= int(value.rpartition(":")[2]) <= 65535:
        raise ValueError(f"{value!r} is not host:port (port 1-65535)")
    return value


IpAddress = Annotated[str, AfterValidator(_ip)]
"""An IPv4 or IPv6 address, held in its canonical text form."""
LoopbackAddress = Annotated[str, AfterValidator(_ip), AfterValidator(_loopback)]
"""An address only this host can reach (admin listeners)."""
MeshName = Annotated[str, AfterValidator(_mesh)]
"""A mesh name: dot-separated DNS labels (it ends every trust domain: ``<cluster>.<mesh>``)."""
HostPort = Annotated[str, AfterValidator(_host_port)]
"""``host:port`` or ``[v6]:port``."""
ListenPort = Annotated[int, Field(ge=0, le=65535)]
"""A port to listen on; 0 takes any free port (tests, ``snapbright up``)."""


class Frozen(BaseModel):
    """Base of every validated value: immutable, unknown fields rejected, no coercion."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class Metadata(Frozen):
    """Who a document is: its name, namespace and labels."""

    name: Name
    namespace: Name = "default"
    labels: dict[str, str] = Field(default_factory=dict)


class Document(Frozen):
    """A Kubernetes-style document. Subclasses fix ``KIND`` and type ``spec``."""

    KIND: ClassVar[str] = ""

    apiVersion: str = Field(pattern=f"^{re.escape(API_VERSION)}$")
    kind: str
    metadata: Metadata


class FieldError(ValueError):
    """A check on a whole model that knows which field is wrong.

    Raise it from a model validator with ``loc`` relative to that model and spelled as in the
    file (aliases: ``("perTryTimeout",)``, ``("peerings", 1)``); the loader appends it to the
    model's own location, so the error points at the field's line and column, not the model.
    """

    def __init__(self, loc: tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc
        self.message = message


class Spec(Frozen):
    """Base of a document's ``spec`` values: camelCase keys in files, snake_case in code."""

    model_config = ConfigDict(alias_generator=to_camel)
