"""A front-end process: the public gRPC port (shared with the other front ends
through SO_REUSEPORT), in front of the engine process (service/engine.py).

Inference is served here: requests are decoded and checked against the schema the
engine announced, so a bad request is refused without reaching the engine; good
ones go to the engine as frames (service/ipc.py) and their answers are encoded here.
Every other RPC is forwarded to the engine unchanged, after the call wrapper here
has checked the management token and counted the call. Health mirrors the engine's
state: NOT_SERVING while the engine is away (crashed, restarting) or this front
end drains; liveness stays SERVING while the process runs.
"""

from __future__ import annotations

import asyncio
import logging
import pathlib
import time
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter

from pt2serve.scheduler.manager import ModelManager
from pt2serve.service.calls import CallPolicy, Registrar
from pt2serve.service.config import ServerConfig
from pt2serve.service.contention import StarvationProbe
from pt2serve.service.engine import data_socket, grpc_address
from pt2serve.service.errors import CallsInFlight
from pt2serve.service.forward import forwarding, served_here
from pt2serve.service.health import ModelHealth
from pt2serve.service.metrics import GrpcMetrics, Metrics
from pt2serve.service.remote import EnginePlane
from pt2serve.service.security import read_token
from pt2serve.service.server import add_services, listen, log_listening, new_grpc_server
from pt2serve.service.shutdown import drain_delay, goaway_and_finish

log = logging.getLogger(__name__)


class FrontEnd:
    """Lifecycle as Pt2Server's: `await start()`, then `await stop()`."""

    def __init__(self, config: ServerConfig, run_dir: pathlib.Path) -> None:
        self.config = config
        self.run_dir = run_dir
        registry = CollectorRegistry()  # values reach /metrics through the multiprocess files
        unexpected = Counter(
            "pt2serve_frontend_unexpected_answers",
            "Answers from the engine for a request id this front end was not waiting for "
            "(never sent, or answered already); always 0 unless something is wrong.",
            registry=registry,
        )
        self.plane = EnginePlane(Metrics(registry), unexpected.inc)
        self.plane.changed = self._state_changed
        self._grpc_metrics = GrpcMetrics(registry)
        self.health = ModelHealth()
        self.draining = asyncio.Event()
        self._calls = CallsInFlight()
        self._stop = asyncio.Event()
        self._server: grpc.aio.Server | None = None
        self._channel: grpc.aio.Channel | None = None
        self._blocking: grpc.Channel | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._models: set[str] = set()
        self._became_ready = asyncio.Event()
        self.port = 0

    async def start(self) -> int:
        cfg = self.config
        size = cfg.max_message_bytes
        options = [("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size)]
        self._channel = grpc.aio.insecure_channel(grpc_address(self.run_dir), options=options)
        self._blocking = grpc.insecure_channel(grpc_address(self.run_dir), options=options)
        token = read_token(cfg.management_token_file)
        server = new_grpc_server(cfg)
        policy = CallPolicy(self._grpc_metrics, token, self._calls, self.draining)
        registrar: Any = Registrar(server, policy, self._substitute)
        add_services(
            registrar, ModelManager(), self.plane, cfg, self.health, self.draining, lambda: self.plane.ready
        )
        self.port = listen(server, cfg)
        await self.health.set_server(False)
        await self.health.set_alive()
        await server.start()
        self._server = server
        log_listening(cfg, self.port, token)
        self._spawn(self.plane.connect(data_socket(self.run_dir), self._stop))
        self._spawn(StarvationProbe(self.plane.set_starved).run())
        return self.port

    async def stop(self, hurry: asyncio.Event | None = None) -> None:
        """Shut down as service/shutdown.py describes (`hurry` ends the drain delay);
        then wait for the engine's answers to every request accepted here (within
        the grace), and close."""
        cfg = self.config
        await self.health.set_draining()
        try:
            await drain_delay(cfg.drain_delay_s, hurry)
        finally:
            deadline = time.monotonic() + cfg.drain_grace_s
            try:
                if self._server is not None:
                    await goaway_and_finish(self._server, self._calls, self.draining, cfg.drain_grace_s)
                self.plane.closing = True
                if not await self.plane.wait_idle(deadline):
                    log.warning("drain grace over with %d request(s) unanswered", self.plane.in_flight)
            finally:
                self._stop.set()
                for task in self._tasks:
                    task.cancel()
                if self._channel is not None:
                    await self._channel.close(None)
                if self._blocking is not None:
                    self._blocking.close()

    async def wait_ready(self) -> None:
        """Until the engine has first told this front end that it is ready."""
        await self._became_ready.wait()

    def _spawn(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _state_changed(self) -> None:
        if self.plane.ready:
            self._became_ready.set()
        self._spawn(self._sync_health())

    async def _sync_health(self) -> None:
        """Health from the engine's latest state and this front end's own (idempotent:
        it always reads the current state)."""
        plane = self.plane
        await self.health.set_server(plane.ready)
        served = set(plane.state.models) if plane.connected and not plane.closing else set()
        for name in served | self._models:
            await self.health.set_serving(name, name in served)
        self._models = served

    # ------------------------------------------------------------ forwarding
    def _substitute(self, method: str, handler: Any) -> Any:
        if served_here(method):
            return handler
        return forwarding(method, handler, lambda: self._channel, lambda: self._blocking)
