"""Convergence: a multi-tenant data-pipeline service.

Layers import downward only: `api` (proto <-> domain) -> `domain` -> `storage` / `engine`.
`create_server(config)` in `app` builds the whole thing.
"""

__version__ = "0.1.0"
