"""Generated messages and stubs of the `convergence.v1` protobuf package."""
