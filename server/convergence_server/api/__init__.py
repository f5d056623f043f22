"""API: gRPC servicers and interceptors translating between protos and the domain."""
