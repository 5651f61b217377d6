"""Target selection: a target cluster by weight, then an endpoint by power of two choices."""
