"""The topology of a local mesh (`snapbright up`): the LocalMesh kind and the built-in default."""
