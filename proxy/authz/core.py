"""May this caller make this request? Path normalisation and policy matching, pure.

The inbound sidecar asks :func:`authorize` once per request, after mTLS has verified the
caller's SPIFFE ID. Two rules decide:

1. Deny by default: once a service has any AuthorizationPolicy, only what a rule allows is
   allowed. A service with none accepts callers of its own trust domain only.
2. Callers from another trust domain (another cluster) are denied unless a rule names them:
   every principal carries its trust domain, so no rule allows another cluster by accident.

Paths are matched after :func:`normalise_path`, the same normalisation the request is forwarded
with, so ``/public/../admin``, ``/%61dmin`` or ``/admin;x`` cannot slip past a rule written for
``/admin`` (the istio#27409 class of bypass). A path that cannot be normalised without guessing
how the application will read it (``%2F``, ``%5C``, a backslash) is denied.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from string import ascii_letters, digits
from typing import Final

from proxy.identity.model import SpiffeId, TrustDomain
from proxy.policy.model import AuthorizationPolicy, AuthorizationRule, Principal

_UNRESERVED: Final = frozenset(ascii_letters + digits + "-._~")
# RFC 3986 pchar plus '/': everything else (space, '\', '"', non-ASCII, controls) is refused.
_PATH_CHARS: Final = re.compile(r"/[A-Za-z0-9\-._~!$&'()*+,;=:@/%]*")
# Nothing to normalise: no escape, no parameter, no empty or dot segment (the common case).
_ALREADY_NORMAL: Final = re.compile(r"(?!.*(?://|/\.\.?(?:/|$)))/[A-Za-z0-9\-_~!$&'()*+,=:@/.]*")
_HEX: Final = frozenset("0123456789abcdefABCDEF")
# Encoded separators: whether the application splits on them is its own choice, so refuse.
_AMBIGUOUS: Final = frozenset({"2F", "5C"})


@dataclass(frozen=True, slots=True)
class Verdict:
    """Allowed or not, why (for logs and the 403 body), and which policy decided."""

    allowed: bool
    reason: str
    policy: str | None = None


def normalise_path(raw: str) -> str | None:
    """The request path as rules match it, or ``None`` when it is ambiguous (deny it).

    - the query string (after ``?``) is kept apart: returned unchanged, never matched;
    - percent-encoded unreserved characters are decoded (``%61`` is ``a``, ``%2e`` is ``.``),
      other escapes are kept with upper-case hex; ``%2F`` and ``%5C`` (encoded ``/`` and
      ``\\``) and malformed escapes make the path ambiguous;
    - ``;params`` are stripped from every segment (``/admin;x`` is ``/admin``);
    - empty and ``.`` segments are dropped (``//a/./b`` is ``/a/b``), ``..`` removes the
      previous segment and never climbs above the root;
    - a path that does not start with ``/`` or holds characters outside RFC 3986 (a space, a
      backslash, non-ASCII) or a fragment is ambiguous.
    """
    path, has_query, query = raw.partition("?")
    if _ALREADY_NORMAL.fullmatch(path):
        return raw
    if _PATH_CHARS.fullmatch(path) is None:
        return None
    raw_segments = path[1:].split("/")
    segments: list[str] = []
    trailing_slash = False
    for index, raw_segment in enumerate(raw_segments):
        decoded = _decode_unreserved(raw_segment)
        if decoded is None:
            return None
        segment = decoded.partition(";")[0]
        last = index == len(raw_segments) - 1
        if segment == "..":
            if segments:
                segments.pop()
            trailing_slash = last
        elif segment in ("", "."):
            trailing_slash = last
        else:
            segments.append(segment)
            trailing_slash = False
    normalised = "/" + "/".join(segments) + ("/" if trailing_slash and segments else "")
    return normalised + (f"?{query}" if has_query else "")


def _decode_unreserved(segment: str) -> str | None:
    if "%" not in segment:
        return segment
    out: list[str] = []
    index = 0
    while index < len(segment):
        char = segment[index]
        if char != "%":
            out.append(char)
            index += 1
            continue
        escape = segment[index + 1 : index + 3]
        if len(escape) != 2 or not all(digit in _HEX for digit in escape):
            return None
        escape = escape.upper()
        if escape in _AMBIGUOUS:
            return None
        decoded = chr(int(escape, 16))
        out.append(decoded if decoded in _UNRESERVED else f"%{escape}")
        index += 3
    return "".join(out)


def authorize(
    policies: Sequence[AuthorizationPolicy],
    peer: SpiffeId | None,
    local_trust_domain: TrustDomain,
    port: int,
    method: str,
    path: str,
) -> Verdict:
    """Whether ``peer`` may call ``method path`` on ``port`` of the service ``policies`` are for.

    ``policies`` are the AuthorizationPolicies of the called service (all of them: the verdict
    does not depend on their order). ``peer`` is the caller's verified SPIFFE ID, ``None`` when
    the connection carried none. ``path`` is the raw request-target.
    """
    normalised = normalise_path(path)
    if normalised is None:
        return Verdict(False, f"path {path[:200]!r} is ambiguous or malformed")
    if peer is None:
        return Verdict(False, "the caller presented no verified SPIFFE ID")
    if not policies:
        if peer.trust_domain == local_trust_domain:
            return Verdict(True, f"no AuthorizationPolicy: callers of {local_trust_domain} allowed")
        return Verdict(
            False,
            f"{peer} is from trust domain {peer.trust_domain}, not {local_trust_domain}: "
            "callers from other clusters need an AuthorizationPolicy that allows them",
        )
    request_path = normalised.partition("?")[0]
    caller = str(peer)
    for policy in sorted(policies, key=lambda p: (p.metadata.namespace, p.metadata.name)):
        for index, rule in enumerate(policy.spec.rules):
            if _allows(rule, peer, caller, port, method, request_path):
                name = f"{policy.metadata.namespace}/{policy.metadata.name}"
                return Verdict(True, f"rule {index} of {name} allows {caller}", name)
    return Verdict(
        False, f"no AuthorizationPolicy rule allows {caller} to {method} {request_path} on {port}"
    )


def _allows(
    rule: AuthorizationRule, peer: SpiffeId, caller: str, port: int, method: str, path: str
) -> bool:
    if rule.ports and port not in rule.ports:
        return False
    if rule.methods and method not in rule.methods:
        return False
    if rule.paths and not any(_covers(prefix, path) for prefix in rule.paths):
        return False
    return any(_names(principal, peer, caller) for principal in rule.from_)


def _names(principal: Principal, peer: SpiffeId, caller: str) -> bool:
    if principal.id is not None:
        return caller == principal.id
    if principal.trust_domain is not None:
        return peer.trust_domain.name == principal.trust_domain
    prefix = principal.id_prefix
    return prefix is not None and (caller == prefix or caller.startswith(prefix + "/"))


def _covers(prefix: str, path: str) -> bool:
    """Whole-segment prefix: ``/api`` and ``/api/`` cover ``/api`` and ``/api/x``, not
    ``/apix``."""
    base = prefix.rstrip("/")
    return path == base or path.startswith(base + "/") or not base
