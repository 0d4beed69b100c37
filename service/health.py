"""grpc.health.v1 for the server as a whole ("") and for each model by name."""

from __future__ import annotations

from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]

from service.pb import pt2serve_pb2

SERVICES = tuple(s.full_name for s in pt2serve_pb2.DESCRIPTOR.services_by_name.values())


class ModelHealth:
    def __init__(self) -> None:
        self.servicer = health_aio.HealthServicer()

    async def set_server(self, serving: bool) -> None:
        status = _status(serving)
        await self.servicer.set("", status)
        for service in SERVICES:
            await self.servicer.set(service, status)

    async def set_serving(self, model: str, serving: bool) -> None:
        await self.servicer.set(model, _status(serving))

    async def shutdown(self) -> None:
        await self.servicer.enter_graceful_shutdown()


def _status(serving: bool) -> health_pb2.HealthCheckResponse.ServingStatus.ValueType:
    return health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
