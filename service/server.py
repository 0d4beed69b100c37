"""The pt2serve process: gRPC server, health, reflection, metrics endpoint, lifecycle."""

from __future__ import annotations

import logging

import grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from loader.native import clean_stale_extractions
from scheduler.manager import ModelManager
from service.config import ServerConfig
from service.errors import DomainErrorInterceptor
from service.health import SERVICES, ModelHealth
from service.kserve import SERVICE_NAME as KSERVE_SERVICE_NAME
from service.kserve import KServeServicer, add_kserve_to_server
from service.metrics import GrpcMetricsInterceptor, new_registry, register_metrics
from service.pb import pt2serve_pb2_grpc as pb_grpc
from service.security import ManagementAuthInterceptor, read_token, server_credentials
from service.servicer import InferenceServicer, ModelLoaderServicer

log = logging.getLogger(__name__)


class Pt2Server:
    """Lifecycle: `await start()`, then `await stop()` (drains queued work)."""

    def __init__(self, config: ServerConfig, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.manager = ModelManager()
        if registry is None:
            registry, metrics = new_registry(self.manager)
        else:
            metrics = register_metrics(registry, self.manager)
        self.registry = registry
        self.manager.telemetry = metrics
        self._grpc_metrics = GrpcMetricsInterceptor(registry)
        self.health = ModelHealth()
        self.port = 0
        # True once the configured models are loaded, until shutdown begins.
        self.ready = False
        self._server: grpc.aio.Server | None = None

    async def start(self) -> int:
        """Listen, then load the configured models; returns the bound gRPC port."""
        cfg = self.config
        for path in clean_stale_extractions():
            log.info("removed %s, left behind by a pt2serve process that no longer runs", path)
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
        interceptors: list[grpc.aio.ServerInterceptor] = [self._grpc_metrics]  # type: ignore[type-arg]
        token = read_token(cfg.management_token_file)
        if token:
            interceptors.append(ManagementAuthInterceptor(token))
        interceptors.append(DomainErrorInterceptor())
        server = grpc.aio.server(interceptors=interceptors, options=options)
        pb_grpc.add_ModelLoaderServicer_to_server(  # type: ignore[no-untyped-call]
            ModelLoaderServicer(self.manager, self.health, cfg.confine, cfg.max_tensor_bytes), server
        )
        pb_grpc.add_InferenceServicer_to_server(  # type: ignore[no-untyped-call]
            InferenceServicer(self.manager, cfg.max_tensor_bytes), server
        )
        kserve = KServeServicer(
            self.manager,
            {m.name: m for m in cfg.models},
            cfg.confine,
            lambda: self.ready,
            cfg.max_tensor_bytes,
        )
        add_kserve_to_server(kserve, server)
        from grpc_health.v1 import health_pb2_grpc

        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, server)
        reflection.enable_server_reflection(
            (*SERVICES, KSERVE_SERVICE_NAME, "grpc.health.v1.Health", reflection.SERVICE_NAME), server
        )
        address = f"{cfg.host}:{cfg.grpc_port}"
        if cfg.tls_cert_file and cfg.tls_key_file:
            credentials = server_credentials(cfg.tls_cert_file, cfg.tls_key_file, cfg.tls_client_ca_file)
            self.port = server.add_secure_port(address, credentials)
        else:
            self.port = server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot listen on {cfg.host}:{cfg.grpc_port}")
        await self.health.set_server(False)
        await self.health.set_alive()
        await server.start()
        self._server = server
        security = "mTLS" if cfg.tls_client_ca_file else "TLS" if cfg.tls_cert_file else "plaintext"
        log.info(
            "gRPC listening on %s:%d (%s; management %s)",
            cfg.host,
            self.port,
            security,
            "needs the token" if token else "open: no token configured",
        )
        for model in cfg.models:
            await self.manager.load(model)
            await self.health.set_serving(model.name, True)
        await self.health.set_server(True)
        self.ready = True
        return self.port

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop taking new calls, let queued and running requests finish within the
        grace, then close every model."""
        grace = self.config.drain_grace_s if grace_s is None else grace_s
        self.ready = False
        await self.health.set_server(False)
        for model in self.manager.models():
            await self.health.set_serving(model.config.name, False)
        await self.manager.close(grace)
        if self._server is not None:
            await self._server.stop(grace)
        manager = self.manager
        log.info(
            "stopped: %d requests accepted, %d answered, %d succeeded",
            manager.accepted,
            manager.answered,
            manager.succeeded,
        )

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()
