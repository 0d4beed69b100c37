"""The pt2serve process: gRPC server, health, reflection, metrics endpoint, lifecycle."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from prometheus_client import CollectorRegistry

from pt2serve.loader.native import clean_stale_extractions
from pt2serve.scheduler.dataplane import InferencePlane
from pt2serve.scheduler.manager import ModelManager
from pt2serve.service.calls import CallPolicy, Registrar
from pt2serve.service.config import ServerConfig
from pt2serve.service.contention import StarvationProbe
from pt2serve.service.errors import CallsInFlight
from pt2serve.service.health import SERVICES, ModelHealth
from pt2serve.service.kserve import SERVICE_NAME as KSERVE_SERVICE_NAME
from pt2serve.service.kserve import KServeServicer
from pt2serve.service.metrics import GrpcMetrics, new_registry, register_metrics
from pt2serve.service.pb import POOL
from pt2serve.service.pb import grpc_service_pb2_grpc as v2_grpc
from pt2serve.service.pb import pt2serve_pb2_grpc as pb_grpc
from pt2serve.service.security import read_token, server_credentials
from pt2serve.service.servicer import InferenceServicer, ModelLoaderServicer
from pt2serve.service.shutdown import drain_delay, goaway_and_finish

log = logging.getLogger(__name__)
HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


def reflection_pool() -> descriptor_pool.DescriptorPool:
    """service/pb's pool with the health and reflection protos added, so reflection
    describes every service on the port from one pool."""
    for file in (health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR):
        try:
            POOL.FindFileByName(file.name)
        except KeyError:
            POOL.AddSerializedFile(file.serialized_pb)
    return POOL


class Pt2Server:
    """Lifecycle: `await start()`, then `await stop()` (drains queued work)."""

    def __init__(
        self, config: ServerConfig, registry: CollectorRegistry | None = None, listen: str | None = None
    ) -> None:
        """`listen`: a private address to serve on instead of the configured port,
        without TLS, token or call metrics (the engine process behind front ends)."""
        self.config = config
        self._listen = listen
        self.manager = ModelManager()
        if registry is None:
            registry, metrics = new_registry(self.manager)
        else:
            metrics = register_metrics(registry, self.manager)
        self.registry = registry
        self.manager.telemetry = metrics
        self._grpc_metrics = GrpcMetrics(registry) if listen is None else GrpcMetrics.uncounted()
        self.health = ModelHealth()
        # Health follows the models, however they are loaded or unloaded.
        self.manager.on_change(self.health.set_serving)
        self.port = 0
        # True once the configured models are loaded, until shutdown begins.
        self.ready = False
        self._server: grpc.aio.Server | None = None
        self._calls = CallsInFlight()
        self._probe: asyncio.Future[None] | None = None
        # Set at the GOAWAY (service/shutdown.py): inference streams stop reading and
        # end UNAVAILABLE, health Watch streams end.
        self.draining = asyncio.Event()

    async def start(self) -> int:
        """Listen, then load the configured models; returns the bound gRPC port."""
        cfg = self.config
        for path in clean_stale_extractions():
            log.info("removed %s, left behind by a pt2serve process that no longer runs", path)
        token = None if self._listen else read_token(cfg.management_token_file)
        server = new_grpc_server(cfg)
        # Every method is wrapped once, at registration (service/calls.py): no
        # per-call interceptors.
        registrar: Any = Registrar(server, CallPolicy(self._grpc_metrics, token, self._calls, self.draining))
        add_services(
            registrar,
            self.manager,
            self.manager.data,
            cfg,
            self.health,
            self.draining,
            lambda: self.ready,
        )
        self.port = listen(server, cfg, self._listen)
        await self.health.set_server(False)
        await self.health.set_alive()
        await server.start()
        self._server = server
        if self._listen is None:
            log_listening(cfg, self.port, token)
        for model in cfg.models:
            await self.manager.load(model)
        await self.health.set_server(True)
        self.ready = True
        # This process's event loop feeds the schedulers (in an engine process the
        # front ends report theirs too): batch longer while it is starved for CPU.
        contention = self.manager.registry.contention
        probe = StarvationProbe(lambda starved: contention.report(self, starved))
        self._probe = asyncio.ensure_future(probe.run())
        return self.port

    async def stop(
        self, grace_s: float | None = None, delay_s: float | None = None, hurry: asyncio.Event | None = None
    ) -> None:
        """Shut down as service/shutdown.py describes: NOT_SERVING at once; serve on
        for the drain delay (`hurry` ends it); then GOAWAY, the calls in handlers
        finish within the grace, and the models close. Defaults: the config's
        `drain_grace_s` and `drain_delay_s`. The listener is closed even if a step
        fails."""
        cfg = self.config
        grace = cfg.drain_grace_s if grace_s is None else grace_s
        self.ready = False
        if self._probe is not None:
            self._probe.cancel()
        try:
            await self.health.set_draining()
            await drain_delay(cfg.drain_delay_s if delay_s is None else delay_s, hurry)
        finally:
            if self._server is not None:
                await goaway_and_finish(self._server, self._calls, self.draining, grace)
            else:
                self.draining.set()
        await self.manager.close(grace)
        data = self.manager.data
        log.info(
            "stopped: %d requests accepted, %d answered, %d succeeded",
            data.accepted,
            data.answered,
            data.succeeded,
        )

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


def new_grpc_server(cfg: ServerConfig) -> grpc.aio.Server:
    options: list[tuple[str, int]] = [
        ("grpc.max_receive_message_length", cfg.max_message_bytes),
        ("grpc.max_send_message_length", cfg.max_message_bytes),
    ]
    if cfg.max_concurrent_streams > 0:
        options.append(("grpc.max_concurrent_streams", cfg.max_concurrent_streams))
    if cfg.max_connection_age_s > 0:
        options += [
            ("grpc.max_connection_age_ms", int(cfg.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", int(cfg.max_connection_age_grace_s * 1000)),
        ]
    return grpc.aio.server(options=options)


def add_services(
    registrar: Any,
    manager: ModelManager,
    data: InferencePlane,
    cfg: ServerConfig,
    health: ModelHealth,
    draining: asyncio.Event,
    is_ready: Callable[[], bool],
) -> None:
    """Every service pt2serve serves, through `registrar` (service/calls.py)."""
    pb_grpc.add_ModelLoaderServicer_to_server(  # type: ignore[no-untyped-call]
        ModelLoaderServicer(manager, cfg.confine, cfg.max_tensor_bytes), registrar
    )
    pb_grpc.add_InferenceServicer_to_server(  # type: ignore[no-untyped-call]
        InferenceServicer(data, cfg.max_tensor_bytes, draining), registrar
    )
    kserve = KServeServicer(
        manager, {m.name: m for m in cfg.models}, cfg.confine, is_ready, cfg.max_tensor_bytes, draining, data
    )
    v2_grpc.add_GRPCInferenceServiceServicer_to_server(kserve, registrar)  # type: ignore[no-untyped-call]
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, registrar)
    names = (*SERVICES, KSERVE_SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME)
    reflector = reflection.aio.ReflectionServicer(names, pool=reflection_pool())  # type: ignore[attr-defined]
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(reflector, registrar)


def listen(server: grpc.aio.Server, cfg: ServerConfig, address: str | None = None) -> int:
    """Bind the configured port (TLS as configured), or `address` in plaintext."""
    if address is not None:
        port = server.add_insecure_port(address)
    elif cfg.tls_cert_file and cfg.tls_key_file:
        credentials = server_credentials(cfg.tls_cert_file, cfg.tls_key_file, cfg.tls_client_ca_file)
        port = server.add_secure_port(f"{cfg.host}:{cfg.grpc_port}", credentials)
    else:
        port = server.add_insecure_port(f"{cfg.host}:{cfg.grpc_port}")
    if port == 0:
        raise OSError(f"cannot listen on {address or f'{cfg.host}:{cfg.grpc_port}'}")
    return port


def log_listening(cfg: ServerConfig, port: int, token: str | None) -> None:
    security = "mTLS" if cfg.tls_client_ca_file else "TLS" if cfg.tls_cert_file else "plaintext"
    log.info(
        "gRPC listening on %s:%d (%s; management %s)",
        cfg.host,
        port,
        security,
        "needs the token" if token else "open: no token configured",
    )
