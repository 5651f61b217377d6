"""Trust bundles: the SPIFFE bundle format (a JWKS), parsed strictly, and sets of bundles.

A bundle is a JSON object (SPIFFE Trust Domain and Bundle spec, section 4)::

    {"keys": [{"kty": "EC", "crv": "P-256", "x": "…", "y": "…",
               "use": "x509-svid", "x5c": ["<base64 DER of one CA certificate>"]}],
     "spiffe_sequence": 7, "spiffe_refresh_hint": 300}

The parser rejects, with :class:`BundleError`: bodies over 1 MiB, anything that is not UTF-8
JSON, duplicate member names at any depth, NaN/Infinity, keys whose ``use`` is missing or
unknown, an ``x5c`` that is not exactly one base64 DER certificate, a certificate that is not a
CA (a leaf has no place in a bundle), key parameters (``x``/``y`` or ``n``/``e``) that do not
match the certificate, a refresh hint that is not in (0 s, 1 week], and, when it updates a known
bundle, a sequence number lower than the known one (or the same number with other contents).

Keys with ``use: "jwt-svid"`` are *ignored*, not rejected: Snapbright does not use JWT-SVIDs,
and a federated peer running SPIRE may publish them in the same bundle. Any other ``use`` is
rejected.

An empty ``keys`` list is valid: the trust domain exists but every certificate of it is
revoked, so no SVID of that domain validates.

Snapbright extension: the optional top-level member ``snapbright_intermediates`` lists the
base64 DER intermediate CA certificates the domain signs through. They are chain-building
material only, never trust anchors: an SVID still has to chain to one of ``keys``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from proxy.identity.model import TrustDomain

MAX_BUNDLE_BYTES = 1024 * 1024
MAX_REFRESH_HINT_SECONDS = 7 * 24 * 3600
X509_SVID_USE = "x509-svid"
JWT_SVID_USE = "jwt-svid"
INTERMEDIATES_MEMBER = "snapbright_intermediates"

_SHA256 = hashes.SHA256()
# cryptography's curve name -> (JWK "crv", coordinate size in bytes)
_CURVE_NAMES = {"secp256r1": ("P-256", 32), "secp384r1": ("P-384", 48), "secp521r1": ("P-521", 66)}


class BundleError(ValueError):
    """A trust bundle was rejected; ``reason`` says which rule failed."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"invalid trust bundle: {reason}")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class TrustBundle:
    """The CA certificates a trust domain vouches for its SVIDs with.

    ``roots`` are the only trust anchors; ``intermediates`` only help build chains.
    ``sequence`` increases with every change the domain publishes.
    """

    trust_domain: TrustDomain
    roots: tuple[x509.Certificate, ...]
    intermediates: tuple[x509.Certificate, ...] = ()
    sequence: int | None = None
    refresh_hint_seconds: int | None = None

    @property
    def revoked(self) -> bool:
        """True when the domain publishes no root: every certificate of it is revoked."""
        return not self.roots

    def roots_pem(self) -> bytes:
        """The roots as concatenated PEM (for ``openssl verify -CAfile`` and ``ssl``)."""
        return b"".join(root.public_bytes(serialization.Encoding.PEM) for root in self.roots)

    def digest(self) -> str:
        """A SHA-256 over the bundle's contents, stable across processes."""
        hasher = hashlib.sha256(self.trust_domain.name.encode())
        hasher.update(str(self.sequence).encode())
        for root in self.roots:
            hasher.update(b"root" + root.fingerprint(_SHA256))
        for intermediate in self.intermediates:
            hasher.update(b"intermediate" + intermediate.fingerprint(_SHA256))
        return hasher.hexdigest()


class TrustBundleSet(Mapping[TrustDomain, TrustBundle]):
    """The bundles this workload trusts, one per trust domain (its own and federated ones)."""

    __slots__ = ("_bundles", "_version")

    def __init__(self, bundles: Iterable[TrustBundle] = ()) -> None:
        by_domain: dict[TrustDomain, TrustBundle] = {}
        for bundle in bundles:
            if bundle.trust_domain in by_domain:
                raise BundleError(f"two bundles for trust domain {bundle.trust_domain}")
            by_domain[bundle.trust_domain] = bundle
        self._bundles = by_domain
        hasher = hashlib.sha256()
        for domain in sorted(by_domain, key=lambda td: td.name):
            hasher.update(by_domain[domain].digest().encode())
        self._version = hasher.hexdigest()[:16]

    @property
    def version(self) -> str:
        """A content digest: equal sets have equal versions (contexts are cached by it)."""
        return self._version

    def with_bundle(self, bundle: TrustBundle) -> TrustBundleSet:
        """A new set with ``bundle`` added or replacing the one of its trust domain."""
        others = (b for td, b in self._bundles.items() if td != bundle.trust_domain)
        return TrustBundleSet((*others, bundle))

    def all_roots(self) -> tuple[x509.Certificate, ...]:
        """Every root of every domain (what a server's TLS handshake must accept)."""
        return tuple(root for bundle in self._bundles.values() for root in bundle.roots)

    def __getitem__(self, key: TrustDomain) -> TrustBundle:
        return self._bundles[key]

    def __iter__(self) -> Iterator[TrustDomain]:
        return iter(self._bundles)

    def __len__(self) -> int:
        return len(self._bundles)

    def __repr__(self) -> str:
        return f"TrustBundleSet({sorted(td.name for td in self._bundles)}, v={self._version})"


def parse_bundle(
    trust_domain: TrustDomain, body: bytes | str, previous: TrustBundle | None = None
) -> TrustBundle:
    """Parse a SPIFFE bundle of ``trust_domain``; ``previous`` is the known bundle, if any."""
    raw = body.encode("utf-8") if isinstance(body, str) else body
    if len(raw) > MAX_BUNDLE_BYTES:
        raise BundleError(f"body is larger than {MAX_BUNDLE_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BundleError("body is not UTF-8") from None
    try:
        document = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except BundleError:
        raise
    except RecursionError:
        raise BundleError("JSON is nested too deeply") from None
    except ValueError as error:
        raise BundleError(f"not JSON: {error}") from None
    if not isinstance(document, dict):
        raise BundleError("top level must be a JSON object")
    bundle = _bundle_from_document(trust_domain, document)
    if previous is not None:
        _check_update(previous, bundle)
    return bundle


def format_bundle(bundle: TrustBundle) -> bytes:
    """The SPIFFE JSON form of ``bundle`` (what :func:`parse_bundle` reads back)."""
    document: dict[str, Any] = {"keys": [_jwk_of(root) for root in bundle.roots]}
    if bundle.sequence is not None:
        document["spiffe_sequence"] = bundle.sequence
    if bundle.refresh_hint_seconds is not None:
        document["spiffe_refresh_hint"] = bundle.refresh_hint_seconds
    if bundle.intermediates:
        document[INTERMEDIATES_MEMBER] = [_b64_der(cert) for cert in bundle.intermediates]
    return (json.dumps(document, indent=2) + "\n").encode()


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise BundleError(f"duplicate JSON member {key!r}")
        result[key] = value
    return result


def _no_constant(name: str) -> Any:
    raise BundleError(f"JSON constant {name} is not allowed")


def _bundle_from_document(trust_domain: TrustDomain, document: dict[str, Any]) -> TrustBundle:
    keys = document.get("keys")
    if not isinstance(keys, list):
        raise BundleError("'keys' must be a list")
    sequence = document.get("spiffe_sequence")
    if sequence is not None and (not _is_int(sequence) or sequence < 0):
        raise BundleError("'spiffe_sequence' must be a non-negative integer")
    hint = document.get("spiffe_refresh_hint")
    if hint is not None:
        if not _is_int(hint):
            raise BundleError("'spiffe_refresh_hint' must be an integer number of seconds")
        if not 0 < hint <= MAX_REFRESH_HINT_SECONDS:
            raise BundleError("'spiffe_refresh_hint' must be more than 0 s and at most 1 week")
    roots: list[x509.Certificate] = []
    for index, key in enumerate(keys):
        root = _root_of_jwk(trust_domain, index, key)
        if root is not None:
            roots.append(root)
    if len({root.fingerprint(_SHA256) for root in roots}) != len(roots):
        raise BundleError("the same certificate appears twice in 'keys'")
    intermediates = _intermediates(document.get(INTERMEDIATES_MEMBER, []))
    return TrustBundle(trust_domain, tuple(roots), intermediates, sequence, hint)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _root_of_jwk(trust_domain: TrustDomain, index: int, key: object) -> x509.Certificate | None:
    where = f"keys[{index}]"
    if not isinstance(key, dict):
        raise BundleError(f"{where} must be a JSON object")
    use = key.get("use")
    if use == JWT_SVID_USE:
        return None
    if use != X509_SVID_USE:
        raise BundleError(f"{where}.use must be {X509_SVID_USE!r} (or {JWT_SVID_USE!r}, ignored)")
    x5c = key.get("x5c")
    if not isinstance(x5c, list) or len(x5c) != 1:
        raise BundleError(f"{where}.x5c must hold exactly one certificate")
    cert = _certificate(x5c[0], f"{where}.x5c[0]")
    if not _is_ca(cert):
        raise BundleError(f"{where}.x5c[0] is not a CA certificate (cA must be true)")
    _check_claimed_domain(cert, trust_domain, where)
    expected = _jwk_of(cert)
    for member in ("kty", "crv", "x", "y", "n", "e"):
        if key.get(member) != expected.get(member):
            raise BundleError(f"{where}.{member} does not match the certificate's public key")
    return cert


def _certificate(value: object, where: str) -> x509.Certificate:
    if not isinstance(value, str):
        raise BundleError(f"{where} must be a base64 string")
    try:
        der = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BundleError(f"{where} is not valid base64") from None
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError:
        raise BundleError(f"{where} is not a DER certificate") from None


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False
    except ValueError:  # duplicate or malformed extensions
        return False


def _check_claimed_domain(cert: x509.Certificate, trust_domain: TrustDomain, where: str) -> None:
    # A root need not name its domain, but one that names another domain is a mix-up.
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith("spiffe://") and uri != str(trust_domain.spiffe_id):
            raise BundleError(f"{where} names {uri}, not {trust_domain.spiffe_id}")


def _intermediates(value: object) -> tuple[x509.Certificate, ...]:
    if not isinstance(value, list):
        raise BundleError(f"'{INTERMEDIATES_MEMBER}' must be a list")
    certs = []
    for index, item in enumerate(value):
        where = f"{INTERMEDIATES_MEMBER}[{index}]"
        cert = _certificate(item, where)
        if not _is_ca(cert):
            raise BundleError(f"{where} is not a CA certificate")
        certs.append(cert)
    return tuple(certs)


def _check_update(previous: TrustBundle, bundle: TrustBundle) -> None:
    if previous.trust_domain != bundle.trust_domain:
        raise BundleError(f"update for {bundle.trust_domain} given a bundle of another domain")
    if previous.sequence is None:
        return
    if bundle.sequence is None:
        raise BundleError("update drops 'spiffe_sequence' that the known bundle had")
    if bundle.sequence < previous.sequence:
        raise BundleError(
            f"sequence went backwards ({bundle.sequence} < known {previous.sequence})"
        )
    if bundle.sequence == previous.sequence and bundle.digest() != previous.digest():
        raise BundleError(f"sequence {bundle.sequence} is unchanged but the keys changed")


def _b64url(number: int, size: int) -> str:
    return base64.urlsafe_b64encode(number.to_bytes(size, "big")).rstrip(b"=").decode()


def _b64_der(cert: x509.Certificate) -> str:
    return base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()


def _jwk_of(cert: x509.Certificate) -> dict[str, Any]:
    key = cert.public_key()
    jwk: dict[str, Any]
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in _CURVE_NAMES:
            raise BundleError(f"unsupported curve {key.curve.name}")
        crv, size = _CURVE_NAMES[key.curve.name]
        numbers = key.public_numbers()
        jwk = {
            "kty": "EC",
            "crv": crv,
            "x": _b64url(numbers.x, size),
            "y": _b64url(numbers.y, size),
        }
    elif isinstance(key, rsa.RSAPublicKey):
        rsa_numbers = key.public_numbers()
        jwk = {
            "kty": "RSA",
            "n": _b64url(rsa_numbers.n, (rsa_numbers.n.bit_length() + 7) // 8),
            "e": _b64url(rsa_numbers.e, (rsa_numbers.e.bit_length() + 7) // 8),
        }
    else:
        raise BundleError(f"unsupported key type {type(key).__name__}")
    jwk["use"] = X509_SVID_USE
    jwk["x5c"] = [_b64_der(cert)]
    return jwk
