"""AccessService: the tenant's API keys and its audit log."""

from __future__ import annotations

from datetime import UTC, timedelta
from typing import Any

from grpc.aio import ServicerContext

from convergence.v1 import access_service_pb2, access_service_pb2_grpc
from convergence_server.api import convert
from convergence_server.api.context import require_caller
from convergence_server.clock import Clock
from convergence_server.domain.access import Keys, NewKey
from convergence_server.storage.records import ApiKeyRecord, AuditFilter

ApiKey = access_service_pb2.ApiKey


class AccessServicer(access_service_pb2_grpc.AccessServiceServicer):
    def __init__(self, keys: Keys, clock: Clock) -> None:
        self._keys = keys
        self._clock = clock

    def _key(self, record: ApiKeyRecord) -> access_service_pb2.ApiKey:
        return convert.api_key(record, self._clock())

    def _created(self, new: NewKey, message: str) -> access_service_pb2.CreateApiKeyResponse:
        return access_service_pb2.CreateApiKeyResponse(
            key=self._key(new.record), api_key=new.secret, message=message
        )

    async def CreateApiKey(
        self, request: access_service_pb2.CreateApiKeyRequest, context: ServicerContext[Any, Any]
    ) -> access_service_pb2.CreateApiKeyResponse:
        new = await self._keys.create(
            require_caller(),
            request.tenant_id,
            request.name,
            convert.scope_name(request.scope),
            request.expires_at.ToDatetime(UTC) if request.HasField("expires_at") else None,
        )
        return self._created(
            new, f"API key {new.record.key_id} created. Store it now: it is shown only once."
        )

    async def ListApiKeys(
        self, request: access_service_pb2.ListApiKeysRequest, context: ServicerContext[Any, Any]
    ) -> access_service_pb2.ListApiKeysResponse:
        records = await self._keys.list_keys(require_caller(), request.tenant_id)
        return access_service_pb2.ListApiKeysResponse(keys=[self._key(r) for r in records])

    async def GetApiKey(
        self, request: access_service_pb2.GetApiKeyRequest, context: ServicerContext[Any, Any]
    ) -> access_service_pb2.ApiKey:
        return self._key(await self._keys.get(require_caller(), request.tenant_id, request.key_id))

    async def RevokeApiKey(
        self, request: access_service_pb2.RevokeApiKeyRequest, context: ServicerContext[Any, Any]
    ) -> access_service_pb2.ApiKey:
        record = await self._keys.revoke(require_caller(), request.tenant_id, request.key_id)
        return self._key(record)

    async def RotateApiKey(
        self, request: access_service_pb2.RotateApiKeyRequest, context: ServicerContext[Any, Any]
    ) -> access_service_pb2.CreateApiKeyResponse:
        grace = (
            timedelta(seconds=request.grace_seconds) if request.HasField("grace_seconds") else None
        )
        old, new = await self._keys.rotate(
            require_caller(), request.tenant_id, request.key_id, grace
        )
        until = convert.when(old.expires_at)
        return self._created(
            new,
            f"API key {new.record.key_id} replaces {old.key_id}, which works until {until}. "
            "Store the new key now: it is shown only once.",
        )

    async def ListAuditLog(
        self, request: access_service_pb2.ListAuditLogRequest, context: ServicerContext[Any, Any]
    ) -> access_service_pb2.ListAuditLogResponse:
        where = AuditFilter(
            tenant_id=request.tenant_id,
            events=frozenset(request.event),
            start=(request.start_time.ToDatetime(UTC) if request.HasField("start_time") else None),
            end=request.end_time.ToDatetime(UTC) if request.HasField("end_time") else None,
        )
        rows, token = await self._keys.audit_log(
            require_caller(), where, request.limit, request.page_token
        )
        return access_service_pb2.ListAuditLogResponse(
            events=[convert.audit_event(r) for r in rows], next_page_token=token
        )
