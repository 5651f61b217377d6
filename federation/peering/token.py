"""The peering token's text form: compact, copy-pasteable, and decoded strictly.

A token is ``sbpt1.<payload>.<check>``: ``sbpt1`` names the format and its version, the
payload is base64url (no padding) of a JSON object, and the check is base64url of the first
9 bytes of the payload's SHA-256. The check catches a token damaged in copying; it is no
signature, since whoever holds a token holds its secret anyway. What keeps a forged token
harmless is elsewhere: the accepting side redeems only a secret it issued, once.

Decoding refuses, with a :class:`TokenError` that says why: another prefix or version, more
than :data:`MAX_TOKEN_CHARS`, characters outside base64url, a damaged check, JSON that is not
one object of exactly the known members, duplicate members, NaN or infinities, values of the
wrong type or shape, a token id that does not belong to its secret, and an expired token.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
from typing import Any

from federation.peering.model import (
    GatewayAddress,
    PeeringToken,
    PeeringValueError,
    TokenError,
    token_id_for,
)
from proxy.identity.model import SpiffeIdError, TrustDomain

PREFIX = "sbpt1"
MAX_TOKEN_CHARS = 64 * 1024
"""A token carries one trust bundle (a few KiB): anything far larger is not a token."""

_CHECK_BYTES = 9
_B64URL = re.compile(r"[A-Za-z0-9_-]+")
_MEMBERS = frozenset(
    {"id", "cluster", "mesh", "trustDomain", "gateways", "trustBundle", "secret", "expiresAt"}
)


def encode_token(token: PeeringToken) -> str:
    """The text form of ``token`` (what ``snapbright peering token`` prints)."""
    document = {
        "id": token.token_id,
        "cluster": token.cluster,
        "mesh": token.mesh,
        "trustDomain": token.trust_domain.name,
        "gateways": [str(gateway) for gateway in token.gateways],
        "trustBundle": token.trust_bundle_json,
        "secret": _b64(token.secret),
        "expiresAt": token.expires_at,
    }
    payload = _b64(json.dumps(document, separators=(",", ":"), allow_nan=False).encode())
    return f"{PREFIX}.{payload}.{_check(payload)}"


def decode_token(text: str, *, now: float) -> PeeringToken:
    """Parse a token's text form strictly and check that it has not expired at ``now``."""
    if not isinstance(text, str):
        raise TokenError("a token must be text")
    if len(text) > MAX_TOKEN_CHARS:
        raise TokenError(f"token is longer than {MAX_TOKEN_CHARS} characters")
    # A pasted token often brings a newline or spaces around it; inside, none are allowed.
    text = text.strip()
    parts = text.split(".")
    if parts[0] != PREFIX:
        if parts[0].startswith("sbpt"):
            raise TokenError(f"token version {parts[0]!r} is not supported (this reads {PREFIX})")
        raise TokenError(f"not a Snapbright peering token (it must start with {PREFIX}.)")
    if len(parts) != 3:
        raise TokenError(f"a token has three dot-separated parts, this one has {len(parts)}")
    payload, check = parts[1], parts[2]
    for part, what in ((payload, "payload"), (check, "check")):
        if _B64URL.fullmatch(part) is None:
            raise TokenError(f"token {what} holds characters outside base64url")
    if check != _check(payload):
        raise TokenError("token is damaged (its check does not match): copy it again")
    token = _token_of(_document(_unb64(payload, "payload")))
    if now >= token.expires_at:
        raise TokenError(f"token expired {now - token.expires_at:.0f} s ago: generate a new one")
    return token


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str, what: str) -> bytes:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise TokenError(f"token {what} is not valid base64url") from None
    # Only the canonical encoding is accepted, so one token has one text form.
    if _b64(raw) != text:
        raise TokenError(f"token {what} is not canonical base64url")
    return raw


def _check(payload: str) -> str:
    return _b64(hashlib.sha256(payload.encode("ascii")).digest()[:_CHECK_BYTES])


def _document(raw: bytes) -> dict[str, Any]:
    try:
        document = json.loads(
            raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constant
        )
    except TokenError:
        raise
    except (UnicodeDecodeError, RecursionError, ValueError):
        raise TokenError("token payload is not a JSON document") from None
    if not isinstance(document, dict):
        raise TokenError("token payload must be a JSON object")
    missing = sorted(_MEMBERS - document.keys())
    unknown = sorted(document.keys() - _MEMBERS)
    if missing:
        raise TokenError(f"token lacks {', '.join(missing)}")
    if unknown:
        raise TokenError(f"token has unknown members {', '.join(unknown)}")
    return document


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise TokenError(f"token payload has member {key!r} twice")
        result[key] = value
    return result


def _no_constant(name: str) -> Any:
    raise TokenError(f"token payload holds {name}, which JSON does not allow")


def _token_of(document: dict[str, Any]) -> PeeringToken:
    for member in ("id", "cluster", "mesh", "trustDomain", "trustBundle", "secret"):
        if not isinstance(document[member], str):
            raise TokenError(f"token member {member!r} must be a string")
    gateways = document["gateways"]
    if not isinstance(gateways, list) or not all(isinstance(g, str) for g in gateways):
        raise TokenError("token member 'gateways' must be a list of host:port strings")
    expires_at = document["expiresAt"]
    if isinstance(expires_at, bool) or not isinstance(expires_at, int | float):
        raise TokenError("token member 'expiresAt' must be a number of seconds since the epoch")
    if not math.isfinite(expires_at):
        raise TokenError("token member 'expiresAt' must be finite")
    secret = _unb64(document["secret"], "secret") if document["secret"] else b""
    if document["id"] != token_id_for(secret):
        raise TokenError("token id does not belong to its secret")
    try:
        return PeeringToken(
            token_id=document["id"],
            cluster=document["cluster"],
            mesh=document["mesh"],
            trust_domain=TrustDomain(document["trustDomain"]),
            gateways=tuple(GatewayAddress.parse(gateway) for gateway in gateways),
            trust_bundle_json=document["trustBundle"],
            secret=secret,
            expires_at=float(expires_at),
        )
    except TokenError:
        raise
    except (PeeringValueError, SpiffeIdError) as error:
        raise TokenError(f"token is invalid: {error}") from None
