"""Every kind of document Snapbright reads, in one registry, and loading files against it."""
