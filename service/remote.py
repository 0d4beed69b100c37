"""A front end's data plane: inference answered by the engine process over the
Unix socket (service/ipc.py), with `infer` and `submit` as `DataPlane` has them.
Requests are checked against the schema the engine announced before anything is
sent; the engine answers each on the connection it came from.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import logging
import time
from collections.abc import Callable

from pt2serve.loader.errors import ErrorKind, Pt2ServeError, Unavailable
from pt2serve.scheduler.dataplane import Decode, InferenceResult, OnDone, accept
from pt2serve.scheduler.registry import UNKNOWN_MODEL_LABEL
from pt2serve.scheduler.telemetry import Telemetry
from pt2serve.service import ipc, links

log = logging.getLogger(__name__)
RECONNECT_S = 0.05
# Ids of requests withdrawn (cancelled) while the engine had them, whose answer may
# still arrive: remembered this many deep, so that any other answer for an id that
# is not waiting is known to be one this front end never expected.
WITHDRAWN_KEPT = 1 << 16


class _Pending:
    __slots__ = ("future", "on_done", "label", "started")

    def __init__(self, future: asyncio.Future[InferenceResult], on_done: OnDone | None, label: str) -> None:
        self.future = future
        self.on_done = on_done
        self.label = label
        self.started = time.monotonic()


def _settle(pending: _Pending, outcome: InferenceResult | Pt2ServeError) -> None:
    if isinstance(outcome, InferenceResult):
        pending.future.set_result(outcome)
    else:
        pending.future.set_exception(outcome)
        pending.future.exception()  # retrieved: a stream may hear it via on_done only
    if pending.on_done is not None:
        pending.on_done(outcome)


class RemoteTicket:
    __slots__ = ("_plane", "_id", "future")

    def __init__(self, plane: EnginePlane, request_id: int, future: asyncio.Future[InferenceResult]) -> None:
        self._plane = plane
        self._id = request_id
        self.future = future

    def cancel(self) -> None:
        self._plane.withdraw(self._id)


class EnginePlane:
    """The data plane of a front end: `infer` and `submit` as `DataPlane` has them,
    answered by the engine process."""

    def __init__(self, telemetry: Telemetry, unexpected: Callable[[], None] = lambda: None) -> None:
        """`unexpected` counts an answer for an id that is not waiting and was not
        withdrawn: never sent, or answered already (the engine answers each once)."""
        self.state = ipc.EngineState()
        self._unexpected = unexpected
        self._withdrawn: collections.OrderedDict[int, None] = collections.OrderedDict()
        # Set once the front end's calls are over (after the GOAWAY): a request that
        # still comes is refused with UNAVAILABLE.
        self.closing = False
        self._telemetry = telemetry
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._link: _EngineLink | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self.changed: Callable[[], None] = lambda: None
        # This front end's event loop is starved for CPU (service/contention.py);
        # the engine batches longer while any front end is.
        self.starved = False

    @property
    def connected(self) -> bool:
        return self._link is not None

    @property
    def ready(self) -> bool:
        return self.connected and self.state.ready and not self.closing

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    async def infer(self, model: str, decode: Decode) -> InferenceResult:
        request_id = self._send(model, decode, None)
        future = self._pending[request_id].future
        try:
            return await future
        except asyncio.CancelledError:
            self.withdraw(request_id)
            raise

    def submit(self, model: str, decode: Decode, on_done: OnDone | None = None) -> RemoteTicket:
        request_id = self._send(model, decode, on_done)
        return RemoteTicket(self, request_id, self._pending[request_id].future)

    def _send(self, model: str, decode: Decode, on_done: OnDone | None) -> int:
        view = self.state.models.get(model)
        label = model if view is not None else UNKNOWN_MODEL_LABEL
        try:
            if self.closing:
                raise Unavailable("the server is shutting down")
            link = self._link
            if link is None or not self.state.ready:
                raise Unavailable("the engine process is not ready (starting or restarting); try again")
            inputs, options = decode()
            if view is not None:
                # (The engine takes the inputs by name: their order is not sent.)
                accept(view.schema, model, inputs, options.output_names, view.row_limit)
            # A model this front end has not heard of yet (loaded a moment ago
            # through another front end) is the engine's to find or refuse.
            frame = ipc.pack_request(
                request_id := next(self._ids),
                model,
                inputs,
                priority=options.priority,
                timeout_s=options.timeout_s,
                deadline=options.deadline,
                output_names=options.output_names,
            )
        except Pt2ServeError as exc:
            self._telemetry.request_finished(label, exc.kind, 0.0)
            raise
        future: asyncio.Future[InferenceResult] = link.loop.create_future()
        self._pending[request_id] = _Pending(future, on_done, label)
        self._idle.clear()
        link.send(frame)
        return request_id

    def withdraw(self, request_id: int) -> None:
        pending = self._pop(request_id)
        if pending is None:
            return
        pending.future.cancel()
        if self._link is not None:
            self._withdrawn[request_id] = None
            if len(self._withdrawn) > WITHDRAWN_KEPT:
                self._withdrawn.popitem(last=False)
            self._link.send(ipc.pack_cancel(request_id))

    def _pop(self, request_id: int) -> _Pending | None:
        pending = self._pending.pop(request_id, None)
        if not self._pending:
            self._idle.set()
        return pending

    def answered(self, request_id: int, outcome: InferenceResult | Pt2ServeError) -> None:
        pending = self._pop(request_id)
        if pending is not None:
            _settle(pending, outcome)
        elif request_id in self._withdrawn:  # its cancel came too late: answered anyway
            del self._withdrawn[request_id]
        else:
            self._unexpected()
            log.warning("the engine answered request %d, which this front end is not waiting for", request_id)

    def attach(self, link: _EngineLink) -> None:
        self._link = link
        if self.starved:
            link.send(ipc.pack_starved(True))

    def set_starved(self, starved: bool) -> None:
        self.starved = starved
        if self._link is not None:
            self._link.send(ipc.pack_starved(starved))

    def detach(self) -> None:
        """The engine is gone: every request it held is answered UNAVAILABLE, so
        clients send it again (to this server once the engine is back, or another)."""
        self._link = None
        self.state = ipc.EngineState()
        self._withdrawn.clear()  # a new engine knows none of them
        pending, self._pending = self._pending, {}
        self._idle.set()
        for entry in pending.values():
            self._telemetry.request_finished(
                entry.label, ErrorKind.UNAVAILABLE, time.monotonic() - entry.started
            )
            _settle(entry, Unavailable("the engine process stopped before answering; try again"))
        self.changed()

    def set_state(self, state: ipc.EngineState) -> None:
        self.state = state
        self.changed()

    async def wait_idle(self, deadline: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), max(deadline - time.monotonic(), 0.0))
        except TimeoutError:
            return False
        return True

    async def connect(self, path: str, stop: asyncio.Event) -> None:
        """Stay connected to the engine until `stop`; reconnect whenever it restarts."""
        loop = asyncio.get_running_loop()
        logged = False
        while not stop.is_set():
            lost: asyncio.Future[None] = loop.create_future()
            try:
                await loop.create_unix_connection(functools.partial(_EngineLink, self, lost), path)
            except OSError:
                if not logged:
                    log.info("waiting for the engine at %s", path)
                    logged = True
                await asyncio.sleep(RECONNECT_S)  # no event to wait on: the engine is another process
                continue
            logged = False
            log.info("connected to the engine")
            await lost
            log.warning("lost the engine connection; answering UNAVAILABLE until it is back")


class _EngineLink(links.FrameLink):
    def __init__(self, plane: EnginePlane, lost: asyncio.Future[None]) -> None:
        super().__init__()
        self._plane = plane
        self._lost = lost

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._plane.attach(self)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._plane.detach()
        if not self._lost.done():
            self._lost.set_result(None)

    def received(self, frame: bytearray) -> None:
        kind = frame[:1]
        if kind == ipc.RESULT:
            request_id, version, outputs = ipc.unpack_raw_result(frame)
            self._plane.answered(request_id, InferenceResult(outputs, version))
        elif kind == ipc.ERROR:
            self._plane.answered(*ipc.unpack_error(frame))
        elif kind == ipc.STATE:
            self._plane.set_state(ipc.unpack_state(frame))
