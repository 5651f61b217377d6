"""SNI: the ClientHello parser the gateway routes by."""
