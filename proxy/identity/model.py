"""SPIFFE IDs and trust domains: a strict parser and formatter, no I/O.

A SPIFFE ID is ``spiffe://<trust-domain><path>`` (SPIFFE ID spec, sections 2.1-2.3):

- the scheme is exactly ``spiffe`` in lowercase, followed by ``://``;
- the trust domain is 1-255 characters of ``[a-z0-9.-_]`` (lowercase only), so there is no
  room for a port, userinfo, percent-encoding, query or fragment;
- the path is empty (the ID of the trust domain itself) or ``/``-separated segments of
  ``[A-Za-z0-9.-_]``; no empty, ``.`` or ``..`` segment, no trailing slash;
- the whole ID is at most 2048 bytes.

These values are parsed on every handshake, so they are plain frozen dataclasses rather than
pydantic documents; constructing one directly validates it just the same.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SCHEME_PREFIX = "spiffe://"
MAX_ID_LENGTH = 2048
MAX_TRUST_DOMAIN_LENGTH = 255

_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?")


class SpiffeIdError(ValueError):
    """A string is not a valid SPIFFE ID or trust domain; ``reason`` says which rule failed."""

    def __init__(self, value: str, reason: str) -> None:
        super().__init__(f"invalid SPIFFE ID {value!r}: {reason}")
        self.value = value
        self.reason = reason


def _check_trust_domain(name: str, original: str) -> None:
    if not name:
        raise SpiffeIdError(original, "trust domain is empty")
    if len(name) > MAX_TRUST_DOMAIN_LENGTH:
        raise SpiffeIdError(
            original, f"trust domain is longer than {MAX_TRUST_DOMAIN_LENGTH} characters"
        )
    if _TRUST_DOMAIN.fullmatch(name) is None:
        if ":" in name:
            reason = "trust domain must not carry a port"
        elif "@" in name:
            reason = "trust domain must not carry userinfo"
        elif name.lower() != name and _TRUST_DOMAIN.fullmatch(name.lower()):
            reason = "trust domain must be lowercase"
        else:
            reason = "trust domain may hold only a-z, 0-9, '.', '-' and '_'"
        raise SpiffeIdError(original, reason)


def _check_path(path: str, original: str) -> None:
    if not path:
        return
    if not path.startswith("/"):
        raise SpiffeIdError(original, "path must start with '/'")
    if path.endswith("/"):
        raise SpiffeIdError(original, "path must not end with '/'")
    for segment in path[1:].split("/"):
        if not segment:
            raise SpiffeIdError(original, "path has an empty segment")
        if segment in (".", ".."):
            raise SpiffeIdError(original, "path has a '.' or '..' segment")
        if _SEGMENT.fullmatch(segment) is None:
            raise SpiffeIdError(
                original, f"path segment {segment!r} may hold only A-Z, a-z, 0-9, '.', '-', '_'"
            )


@dataclass(frozen=True, slots=True)
class TrustDomain:
    """A SPIFFE trust domain, e.g. ``us-west.acme``: one per cluster in Snapbright."""

    name: str

    def __post_init__(self) -> None:
        _check_trust_domain(self.name, self.name)

    @classmethod
    def parse(cls, text: str) -> TrustDomain:
        """Parse ``example.org`` or ``spiffe://example.org`` (an ID with no path)."""
        if "://" in text:
            spiffe_id = SpiffeId.parse(text)
            if spiffe_id.path:
                raise SpiffeIdError(text, "a trust domain ID has no path")
            return spiffe_id.trust_domain
        return cls(text)

    @classmethod
    def for_cluster(cls, cluster: str, mesh: str) -> TrustDomain:
        """The trust domain of a cluster in a mesh: ``<cluster>.<mesh>``."""
        if _LABEL.fullmatch(cluster) is None:
            raise SpiffeIdError(cluster, "cluster must be a DNS label (a-z, 0-9 and '-')")
        if not mesh or not all(_LABEL.fullmatch(label) for label in mesh.split(".")):
            raise SpiffeIdError(mesh, "mesh must be a dot-separated list of DNS labels")
        return cls(f"{cluster}.{mesh}")

    @property
    def spiffe_id(self) -> SpiffeId:
        """``spiffe://<trust-domain>``: the ID of the domain itself (roots carry it)."""
        return SpiffeId(self, "")

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """A SPIFFE ID: a trust domain and a path (empty for the trust domain's own ID)."""

    trust_domain: TrustDomain
    path: str

    def __post_init__(self) -> None:
        _check_path(self.path, f"{SCHEME_PREFIX}{self.trust_domain.name}{self.path}")
        if len(SCHEME_PREFIX) + len(self.trust_domain.name) + len(self.path) > MAX_ID_LENGTH:
            raise SpiffeIdError(str(self)[:64] + "…", f"longer than {MAX_ID_LENGTH} bytes")

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        """Parse ``spiffe://<trust-domain>[/<path>]`` strictly; raise :class:`SpiffeIdError`."""
        if len(text.encode("utf-8", "surrogatepass")) > MAX_ID_LENGTH:
            raise SpiffeIdError(text[:64] + "…", f"longer than {MAX_ID_LENGTH} bytes")
        if not text.startswith(SCHEME_PREFIX):
            if text[: len(SCHEME_PREFIX)].lower() == SCHEME_PREFIX:
                raise SpiffeIdError(text, "scheme must be lowercase 'spiffe'")
            raise SpiffeIdError(text, "scheme must be 'spiffe://'")
        rest = text[len(SCHEME_PREFIX) :]
        for mark, what in (("?", "query"), ("#", "fragment"), ("%", "percent-encoding")):
            if mark in rest:
                raise SpiffeIdError(text, f"a SPIFFE ID has no {what}")
        name, slash, path = rest.partition("/")
        _check_trust_domain(name, text)
        path = slash + path
        _check_path(path, text)
        return cls(TrustDomain(name), path)

    @classmethod
    def workload(cls, trust_domain: TrustDomain, namespace: str, service_account: str) -> SpiffeId:
        """The ID of a workload: ``spiffe://<td>/ns/<namespace>/sa/<service-account>``."""
        for what, value in (("namespace", namespace), ("service account", service_account)):
            if "/" in value or not value:
                raise SpiffeIdError(value, f"{what} must be one non-empty path segment")
        return cls(trust_domain, f"/ns/{namespace}/sa/{service_account}")

    def __str__(self) -> str:
        return f"{SCHEME_PREFIX}{self.trust_domain.name}{self.path}"
