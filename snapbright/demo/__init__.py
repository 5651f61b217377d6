"""The demo app: an HTTP and gRPC echo that `snapbright up` runs as each service replica."""
