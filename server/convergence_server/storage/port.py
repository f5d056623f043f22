"""The storage port: what the domain needs from a backend. Adapters take and return records."""

from __future__ import annotations

from typing import Protocol

from convergence_server.storage.records import ApiKeyRecord, TenantRecord


class Store(Protocol):
    """A backend holding the central dataset and one dataset per tenant.

    Every method may raise `convergence_server.errors.Unavailable` when the backend
    cannot be reached.
    """

    kind: str

    async def ping(self) -> None:
        """Returns when the backend answers a trivial query."""

    async def schema_version(self) -> int:
        """The newest migration applied to the central dataset."""

    async def central_table_columns(self) -> dict[str, frozenset[str]]:
        """The column names of every table in the central dataset, by table name."""

    async def probe_dataset_creation(self) -> None:
        """Creates and drops a scratch dataset, proving the permission to create one."""

    async def dataset_exists(self, dataset_id: str) -> bool:
        """Whether a dataset of that name exists (as the backend compares names)."""

    async def get_tenant(self, tenant_id: str) -> TenantRecord | None: ...

    async def tenant_ids_equal_ignoring_case(self, tenant_id: str) -> list[str]:
        """Existing tenant ids equal to `tenant_id` when case is ignored."""

    async def create_tenant(
        self, tenant: TenantRecord, key: ApiKeyRecord, commit_by: float | None = None
    ) -> tuple[str, ...]:
        """Atomically stores the tenant and its key and creates its dataset.

        Returns the names of the objects created in the dataset. Raises `AlreadyExists`
        when the tenant or its dataset exists, and `DeadlineExceeded` when the commit would
        come after `commit_by` (a `time.monotonic()` value). On any failure, and when the
        awaiting task is cancelled, nothing is left behind.
        """

    async def get_api_key(self, key_id: str) -> ApiKeyRecord | None: ...

    async def close(self) -> None: ...
