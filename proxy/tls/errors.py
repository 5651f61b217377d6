"""The error the TLS engine raises (apart from it: the engine is compiled, see proxy/native.py).

mypyc cannot compile a subclass of a built-in exception other than Exception itself, and
callers catch this one as a ConnectionError.
"""

from __future__ import annotations


class TlsError(ConnectionError):
    """A TLS handshake or record failure.

    ``reason`` is a short label (``plaintext``, ``untrusted-chain``, ``expired``,
    ``not-yet-valid``, ``invalid-purpose``, ``no-certificate``, ``handshake-timeout``,
    ``handshake-failed``); ``verify_code`` is OpenSSL's X509_V_ERR code when the peer's
    certificate failed verification, else 0.
    """

    def __init__(self, reason: str, detail: str, verify_code: int = 0) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.verify_code = verify_code
