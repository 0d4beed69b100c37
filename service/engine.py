"""The engine process: the model registry, the schedulers and runners, and constant
operations, behind gRPC front-end processes (service/frontend.py).

It listens on two Unix sockets in the run directory the supervisor made (mode 0700):

- `engine.sock`, the data path: front ends send validated requests as frames
  (service/ipc.py); the engine queues them on the same data plane as the single-
  process server and writes each answer back on the connection it came from. A
  connection's frames are read in one pass per wakeup. While nothing is in flight,
  the intake thread reads instead of the event loop and runs a lone request itself
  (service/intake.py, `engine_intake`). A batch of a few requests that finishes with
  nothing queued is answered by its runner thread, the moment it has run (no wait
  for the event loop to wake); the answers of a bigger batch or of a busy queue, and
  errors, leave from the loop, those of one loop pass in one write.
- `engine-grpc.sock`, every other RPC: a Pt2Server without TLS, token or call
  metrics (the front end checked and counted the call), which front ends forward
  to unchanged.

On connect and whenever the models change, each front end is told what is served
(`EngineState`: readiness, and each model's schema and row limit), so that it can
refuse bad requests itself and report health that agrees with the engine's.
"""

from __future__ import annotations

import asyncio
import logging
import pathlib
import socket
import time
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.registry import Collector

from pt2serve.loader.dtypes import AnyTensor
from pt2serve.loader.errors import ExecutionFailed, Pt2ServeError
from pt2serve.scheduler.batcher import ModelScheduler
from pt2serve.scheduler.batches import RunResult
from pt2serve.scheduler.dataplane import InferenceOptions, InferenceResult, Ticket, accept, named_outputs
from pt2serve.service import ipc, links
from pt2serve.service.config import ServerConfig
from pt2serve.service.intake import Intake
from pt2serve.service.metrics import MergedCollector
from pt2serve.service.server import Pt2Server

log = logging.getLogger(__name__)
DATA_SOCKET = "engine.sock"
GRPC_SOCKET = "engine-grpc.sock"


def data_socket(run_dir: pathlib.Path) -> str:
    return str(run_dir / DATA_SOCKET)


def grpc_address(run_dir: pathlib.Path) -> str:
    return f"unix:{run_dir / GRPC_SOCKET}"


class Engine:
    def __init__(self, config: ServerConfig, run_dir: pathlib.Path) -> None:
        self.run_dir = run_dir
        self.server = Pt2Server(config, CollectorRegistry(), listen=grpc_address(run_dir))
        self.links: set[_Link] = set()
        self._listener: socket.socket | None = None
        self._intake_on = config.engine_intake
        self.intake: Intake | None = None
        self._loop: asyncio.AbstractEventLoop  # set by start()

    def served_registry(self, front_ends_dir: str | None) -> CollectorRegistry:
        """/metrics for every process: the engine's metrics (in memory, with the live
        model state) and the front ends' (multiprocess files in `front_ends_dir`),
        each series once, plus the engine's process metrics."""
        from prometheus_client import multiprocess

        sources: list[Collector] = [self.server.registry]
        if front_ends_dir:
            sources.append(multiprocess.MultiProcessCollector(None, path=front_ends_dir))  # type: ignore[no-untyped-call]
        registry = CollectorRegistry()
        registry.register(MergedCollector(*sources))
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        return registry

    async def start(self) -> None:
        path = data_socket(self.run_dir)
        for left in (pathlib.Path(path), self.run_dir / GRPC_SOCKET):
            left.unlink(missing_ok=True)  # left by an engine that crashed
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(64)
        listener.setblocking(False)
        self._listener = listener
        asyncio.get_running_loop().add_reader(listener.fileno(), self._accept)

        async def changed(model: str, serving: bool) -> None:
            self.broadcast()

        self.server.manager.on_change(changed)
        await self.server.start()
        self.broadcast()
        if self._intake_on:
            self._loop = asyncio.get_running_loop()
            self.intake = Intake(self._loop, lambda: self.links, self._run_now, self._idle)
            self.intake.start()

    async def stop(self) -> None:
        if self.intake is not None:
            await self.intake.stop()  # the loop reads from here on
            log.info(
                "intake: ran %d requests itself; gave the connections back %d times",
                self.intake.ran,
                self.intake.handed_back,
            )
            self.intake = None
        self.server.ready = False
        self.broadcast()
        # The front ends have shut down already (the supervisor stops them first):
        # no drain delay on the private socket.
        await self.server.stop(delay_s=0)
        if self._listener is not None:
            asyncio.get_running_loop().remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
        for link in list(self.links):
            link.close()

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors, say: the front end retries
                log.error("could not accept a front end's connection: %s", exc)
                return
            link = _Link(self, sock)
            if self.intake is not None:
                self.intake.add(link)
                self.intake.offer()

    def offer(self) -> None:
        """The connections go to the intake thread if nothing is in flight."""
        if self.intake is not None:
            self.intake.offer()

    def _idle(self) -> bool:
        return not any(link.tickets for link in self.links)

    def _run_now(self, link: links.SocketLink, frame: bytearray) -> bool:
        """On the intake thread: run a request frame at once and answer it, if its
        model is idle (ModelScheduler.run_alone); False if nothing ran (and nothing
        was sent): the loop queues it as usual, and answers any error."""
        if frame[:1] != ipc.REQUEST:
            return False
        started = time.monotonic()
        request = ipc.unpack_request(frame)
        model = self.server.manager.registry.find(request.model)
        if model is None:
            return False
        try:
            inputs = accept(
                model.schema, request.model, request.inputs, request.output_names, model.batching.row_limit
            )
        except Pt2ServeError:
            return False
        scheduler = model.scheduler
        run_error: BaseException | None = None
        try:
            ran = scheduler.run_alone(
                inputs, priority=request.priority, timeout_s=request.timeout_s, deadline=request.deadline
            )
        except Exception as exc:
            log.warning("model %r: run failed: %s", request.model, exc)
            run_error = ExecutionFailed(f"model {request.model!r}: run failed: {exc}")
            ran = None
        if ran is None:
            if run_error is None:
                return False
            outcome: InferenceResult | BaseException = run_error
        else:
            outcome = named_outputs(
                request.model, model.schema.output_names, request.output_names, RunResult(ran[0], ran[1])
            )
        frame_out, error = answer_frame(request.request_id, outcome)
        link.write(frame_out)
        rows = inputs[0].shape[0] if scheduler.batched else 1
        compute = 0.0 if ran is None else ran[2]
        elapsed = time.monotonic() - started
        try:
            self._loop.call_soon_threadsafe(
                self._ran_now, scheduler, request.model, rows, compute, elapsed, run_error, error
            )
        except RuntimeError:  # the loop has closed (shutting down): answered, not counted
            log.warning("request %d answered after the event loop closed", request.request_id)
        return True

    def _ran_now(
        self,
        scheduler: ModelScheduler,
        model: str,
        rows: int,
        compute: float,
        elapsed: float,
        run_error: BaseException | None,
        error: BaseException | None,
    ) -> None:
        scheduler.ran_alone(rows, compute, run_error)
        self.server.manager.data.ran_alone(model, elapsed, error)

    def state(self) -> ipc.EngineState:
        models = {m.name: ipc.ModelView(m.schema, m.batching.row_limit) for m in self.server.manager.models()}
        return ipc.EngineState(ready=self.server.ready, models=models)

    def broadcast(self) -> None:
        frame = ipc.pack_state(self.state())
        for link in self.links:
            # Written at once, before the answer of the call that changed the models
            # (LoadModel) can reach its client.
            link.send(frame, now=True)


class _Link(links.SocketLink):
    """One front end's data connection, and the sink its answers take when a runner
    thread sends them itself (scheduler.batches.AnswerSink)."""

    def __init__(self, engine: Engine, sock: socket.socket) -> None:
        super().__init__(sock, asyncio.get_running_loop())
        self._engine = engine
        self._data = engine.server.manager.data
        self._contention = engine.server.manager.registry.contention
        self.tickets: dict[int, Ticket] = {}
        # Answers a runner thread has put and not yet flushed.
        self._early: list[Any] = []
        engine.links.add(self)
        self.send(ipc.pack_state(engine.state()))

    def connection_lost(self, exc: Exception | None) -> None:
        # The front end is gone: withdraw what it was waiting for.
        self._engine.links.discard(self)
        self._contention.report(self, False)
        tickets, self.tickets = self.tickets, {}
        for ticket in tickets.values():
            ticket.cancel()
        self.loop.call_soon(self._engine.offer)

    def received(self, frame: bytearray) -> None:
        kind = frame[:1]
        if kind == ipc.REQUEST:
            self._request(ipc.unpack_request(frame))
        elif kind == ipc.CANCEL:
            ticket = self.tickets.pop(ipc.unpack_id(frame), None)
            if ticket is not None:
                ticket.cancel()
                if not self.tickets:
                    self.loop.call_soon(self._engine.offer)
        elif kind == ipc.STARVED:
            self._contention.report(self, ipc.unpack_starved(frame))
        else:
            log.error("front end sent an unknown frame %r; closing its connection", kind)
            self.close()

    def _request(self, request: ipc.Request) -> None:
        request_id = request.request_id
        options = InferenceOptions(
            priority=request.priority,
            timeout_s=request.timeout_s,
            deadline=request.deadline,
            output_names=request.output_names,
        )

        def decode() -> tuple[Mapping[str, AnyTensor], InferenceOptions]:
            return request.inputs, options

        def done(outcome: InferenceResult | BaseException) -> None:
            self.tickets.pop(request_id, None)
            self._answer(request_id, outcome)
            if not self.tickets:
                self.loop.call_soon(self._engine.offer)  # once the batch has let go of its runner

        try:
            # The front end validated the inputs against the same schema; the data
            # plane checks them again (a few comparisons), in case the model was
            # replaced while the request was on its way.
            self.tickets[request_id] = self._data.submit(request.model, decode, done, self, request_id)
        except Pt2ServeError as exc:
            self.send(ipc.pack_error(request_id, exc))
        except Exception as exc:
            # A bug must cost this request, not the connection and every request
            # of the front end waiting on it.
            log.exception("request %d could not be queued", request_id)
            self.send(ipc.pack_error(request_id, ExecutionFailed(f"internal error: {exc}")))

    def put(self, key: Any, result: RunResult) -> bool:
        """On a runner thread: frame one answer (`key` is its Ticket)."""
        ticket: Ticket = key
        named = ticket.named(result)
        if not isinstance(named, InferenceResult):
            return False
        try:
            frame = ipc.pack_result(ticket.key, named.constants_version, named.outputs)
        except Pt2ServeError:  # a dtype the wire does not carry: the loop says so
            return False
        self._early.append(frame)
        return True

    def flush(self) -> None:
        """On a runner thread: write the answers put so far, in one write."""
        frames, self._early = self._early, []
        self.write([part for frame in frames for part in frame])

    def _answer(self, request_id: int, outcome: InferenceResult | BaseException) -> None:
        if isinstance(outcome, InferenceResult) and outcome.delivered:  # a runner thread sent it
            return
        self.send(answer_frame(request_id, outcome)[0])


def answer_frame(
    request_id: int, outcome: InferenceResult | BaseException
) -> tuple[list[Any], Pt2ServeError | None]:
    """The frame that answers a request with `outcome`, and the error it carries
    (None: the outputs)."""
    if isinstance(outcome, InferenceResult):
        try:
            return ipc.pack_result(request_id, outcome.constants_version, outcome.outputs), None
        except Pt2ServeError as exc:  # an output of a dtype the wire does not carry
            outcome = ExecutionFailed(f"model answered, but {exc}")
    if not isinstance(outcome, Pt2ServeError):
        log.error("request failed: %r", outcome)
        outcome = ExecutionFailed(f"internal error: {outcome}")
    return ipc.pack_error(request_id, outcome), outcome
