"""Client stubs for the Convergence service.

The generated modules live in `convergence.v1` (e.g. `convergence.v1.run_service_pb2_grpc`),
produced from `protos/convergence/v1` by `make proto`.
"""
