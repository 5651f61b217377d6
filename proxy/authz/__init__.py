"""Authorization of inbound calls by SPIFFE ID: path normalisation and policy matching."""
