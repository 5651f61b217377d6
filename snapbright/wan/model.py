"""What the WAN emulator is told: its links and forwards at start, and changes while it runs.

Written the way a LocalMesh topology writes a link (``latency: 80ms``, ``jitter: 2ms``,
``loss: 1%``, ``bandwidth: 100Mbps``); bandwidth may also be written as ``tc`` writes it
(``100mbit``) or as bits per second (``100000000``). A link is a pair of clusters and means
both directions unless it says ``oneWay``. A forward is one TCP listener on loopback whose
connections cross the link ``from`` → ``to`` to reach a target (a peer's gateway); their
replies cross the link back.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from typing import Annotated, Any, Self

from pydantic import (
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from proxy.config.model import Duration, FieldError, Name, Share, Spec
from snapbright.wan.core import LinkShape

__all__ = [
    "DEFAULT_ADMIN_PORT",
    "Bandwidth",
    "Forward",
    "LinkSettings",
    "LinkUpdate",
    "WanConfig",
    "format_bandwidth",
    "parse_bandwidth",
]

DEFAULT_ADMIN_PORT = 7900
"""Where the emulator's admin API listens (on 127.0.0.1) unless told otherwise."""

_BANDWIDTH = re.compile(r"^(?P<value>\d+(?:\.\d+)?)\s*(?P<unit>[A-Za-z]*)$")
# Bits per second. tc's `mbps` means megaBYTES, a topology's `Mbps` megabits: the ambiguous
# lowercase spellings are refused rather than guessed.
_BANDWIDTH_UNITS = {
    "bit": 1.0,
    "kbit": 1e3,
    "mbit": 1e6,
    "gbit": 1e9,
    "kbps": 1e3,
    "Mbps": 1e6,
    "Gbps": 1e9,
}
_UNLIMITED = frozenset({"unlimited", "none", "off"})


def parse_bandwidth(value: Any) -> int | None:
    """Bits per second from ``100Mbps``, ``100mbit``, ``512kbit`` or an integer; ``None`` for
    ``unlimited``. A clear `ValueError` for anything else."""
    if isinstance(value, bool):
        raise ValueError("must be a bandwidth such as 100Mbps, 100mbit or unlimited")
    if isinstance(value, int):
        bits = value
    elif isinstance(value, str):
        text = value.strip()
        if text.lower() in _UNLIMITED:
            return None
        match = _BANDWIDTH.match(text)
        unit = None if match is None else _BANDWIDTH_UNITS.get(match["unit"] or "bit")
        if match is None or unit is None:
            raise ValueError(
                f"invalid bandwidth {value!r}: use a number and kbps, Mbps, Gbps (megabits, "
                "as in a topology) or kbit, mbit, gbit (as tc writes them), or unlimited"
            )
        bits = int(float(match["value"]) * unit)
    else:
        raise ValueError("must be a bandwidth such as 100Mbps, 100mbit or unlimited")
    if bits <= 0:
        raise ValueError("must be above 0 bits/s (write unlimited for no cap)")
    return bits


def format_bandwidth(bits: float | None) -> str:
    """``100Mbps``-style text for bits per second; ``unlimited`` for ``None``."""
    if bits is None:
        return "unlimited"
    for unit, scale in (("Gbps", 1e9), ("Mbps", 1e6), ("kbps", 1e3)):
        if bits >= scale:
            return f"{bits / scale:g}{unit}"
    return f"{bits:g}bit"


Bandwidth = Annotated[
    int | None,
    BeforeValidator(parse_bandwidth),
    PlainSerializer(format_bandwidth, return_type=str, when_used="json"),
    WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "integer", "minimum": 1}]}),
]
"""A bandwidth in bits per second; ``None`` is unlimited."""

ClusterPair = tuple[Name, Name]


def _loopback(host: str) -> str:
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise ValueError(f"{host!r} is not a loopback address: the emulator serves this machine")
    return host


class _Settings(Spec):
    # Field names in code, camelCase in files and in the admin API.
    model_config = ConfigDict(validate_by_name=True)


class LinkSettings(_Settings):
    """A link at start: both directions alike unless ``oneWay`` (then ``between[0]`` →
    ``between[1]`` only). The same fields, units and defaults as a topology's WanLink."""

    between: ClusterPair
    latency: Duration = 0.0
    jitter: Duration = 0.0
    loss: Share = 0.0
    bandwidth: Bandwidth = None
    one_way: bool = False

    @model_validator(mode="after")
    def _valid_shape(self) -> Self:
        if self.between[0] == self.between[1]:
            raise FieldError(("between", 1), "a cluster has no link to itself")
        try:
            self.shape()
        except ValueError as error:
            raise FieldError((), str(error)) from None
        return self

    def shape(self) -> LinkShape:
        """What each direction of this link does."""
        return LinkShape(
            latency=self.latency,
            jitter=self.jitter,
            loss=self.loss,
            bandwidth=None if self.bandwidth is None else float(self.bandwidth),
        )


class Forward(_Settings):
    """One listener: connections to ``listen_host:listen_port`` cross ``link`` (from, to) to
    reach ``target_host:target_port``. Port 0 picks a free port."""

    link: ClusterPair
    listen_host: str = "127.0.0.1"
    listen_port: int = Field(default=0, ge=0, le=65535)
    target_host: str = Field(min_length=1)
    target_port: int = Field(ge=1, le=65535)

    @field_validator("listen_host")
    @classmethod
    def _listen_on_loopback(cls, host: str) -> str:
        return _loopback(host)

    @model_validator(mode="after")
    def _two_clusters(self) -> Self:
        if self.link[0] == self.link[1]:
            raise FieldError(("link", 1), "a forward crosses a link between two clusters")
        return self


class WanConfig(_Settings):
    """Everything the emulator starts with."""

    admin_host: str = "127.0.0.1"
    admin_port: int = Field(default=DEFAULT_ADMIN_PORT, ge=0, le=65535)
    links: tuple[LinkSettings, ...] = ()
    forwards: tuple[Forward, ...] = ()
    seed: int | None = None

    @field_validator("admin_host")
    @classmethod
    def _admin_on_loopback(cls, host: str) -> str:
        return _loopback(host)

    @model_validator(mode="after")
    def _links_once(self) -> Self:
        seen: set[tuple[str, str]] = set()
        for index, link in enumerate(self.links):
            a, b = link.between
            directions = {(a, b)} if link.one_way else {(a, b), (b, a)}
            if directions & seen:
                raise FieldError(("links", index, "between"), f"{a} and {b} are linked twice")
            seen |= directions
        return self

    def shapes(self) -> dict[tuple[str, str], LinkShape]:
        """The shape of every directed link: configured ones, and the rest of the pairs that
        forwards cross as plain loopback (so they can be shaped later)."""
        shapes: dict[tuple[str, str], LinkShape] = {}
        for forward in self.forwards:
            a, b = forward.link
            shapes[(a, b)] = shapes[(b, a)] = LinkShape()
        for link in self.links:
            a, b = link.between
            shapes[(a, b)] = link.shape()
            if not link.one_way:
                shapes[(b, a)] = link.shape()
        return shapes


class LinkUpdate(_Settings):
    """A change to a running link: only the fields given change (``bandwidth: unlimited``
    removes the cap). Applies to both directions unless ``oneWay``."""

    latency: Duration | None = None
    jitter: Duration | None = None
    loss: Share | None = None
    bandwidth: Bandwidth = None
    unlimited: bool = False
    partition: bool | None = None
    reset: bool | None = None
    one_way: bool = False

    @model_validator(mode="before")
    @classmethod
    def _unlimited_is_explicit(cls, data: Any) -> Any:
        # `bandwidth: unlimited` parses to None, which also means "not given": keep the two
        # apart with a flag of our own.
        bandwidth = data.get("bandwidth") if isinstance(data, dict) else None
        if isinstance(bandwidth, str) and bandwidth.strip().lower() in _UNLIMITED:
            data = {k: v for k, v in data.items() if k != "bandwidth"} | {"unlimited": True}
        return data

    def apply(self, shape: LinkShape) -> LinkShape:
        """``shape`` with this change; `ValueError` if the result is not a valid link."""
        changes: dict[str, Any] = {}
        for name in ("latency", "jitter", "loss", "partition", "reset"):
            value = getattr(self, name)
            if value is not None:
                changes[name] = value
        if self.unlimited:
            changes["bandwidth"] = None
        elif self.bandwidth is not None:
            changes["bandwidth"] = float(self.bandwidth)
        return dataclasses.replace(shape, **changes)
