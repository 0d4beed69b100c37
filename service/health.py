"""grpc.health.v1: the server as a whole (""), each service, each model by name, and
two names for Kubernetes probes: "readiness" (SERVING once the configured models are
loaded, NOT_SERVING while draining) and "liveness" (SERVING until the process exits,
so a draining pod is not killed early)."""

from __future__ import annotations

from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]

from pt2serve.service.pb import pt2serve_pb2

SERVICES = tuple(s.full_name for s in pt2serve_pb2.DESCRIPTOR.services_by_name.values())
LIVENESS = "liveness"
READINESS = "readiness"


class ModelHealth:
    def __init__(self) -> None:
        self.servicer = health_aio.HealthServicer()
        self._models: set[str] = set()
        # Once shutdown begins, nothing but liveness is SERVING again.
        self._draining = False

    async def set_alive(self) -> None:
        await self.servicer.set(LIVENESS, _status(True))

    async def set_server(self, serving: bool) -> None:
        status = _status(serving and not self._draining)
        for service in ("", READINESS, *SERVICES):
            await self.servicer.set(service, status)

    async def set_serving(self, model: str, serving: bool) -> None:
        self._models.add(model)
        await self.servicer.set(model, _status(serving and not self._draining))

    async def set_draining(self) -> None:
        """Shutdown has begun: the server, readiness and every model NOT_SERVING for
        good; liveness stays SERVING until the process exits."""
        self._draining = True
        await self.set_server(False)
        for model in self._models:
            await self.servicer.set(model, _status(False))


def _status(serving: bool) -> health_pb2.HealthCheckResponse.ServingStatus.ValueType:
    return health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
