"""Benchmarks: `make bench` runs `python -m bench.api_overhead`."""
