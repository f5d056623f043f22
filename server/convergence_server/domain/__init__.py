"""Domain: what the service does, free of gRPC and of any storage backend's details."""
