"""Graceful shutdown (service/shutdown.py): NOT_SERVING at once, the drain delay,
GOAWAY, calls in progress finish, the process exits 0; no call is refused because
the server drains."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pt2serve.scheduler.manager import ModelConfig
from pt2serve.service.config import ServerConfig
from pt2serve.service.demo import demo_model
from pt2serve.service.pb import pt2serve_pb2 as pb
from pt2serve.service.pb import pt2serve_pb2_grpc as pb_grpc
from pt2serve.service.server import Pt2Server
from tests.conftest import CACHE, Packages, Served, serving, until
from tests.test_service import outputs_of, run_request

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def test_shutdown_serves_through_the_delay_then_finishes_queued_work(packages: Packages) -> None:
    """NOT_SERVING at once (liveness stays SERVING); calls keep being taken during the
    drain delay, never refused; after the GOAWAY every call taken is answered."""
    config = ServerConfig(
        grpc_port=0, metrics_port=0, model_root=str(CACHE), models=(ModelConfig("demo", str(packages.demo)),)
    )
    server = Pt2Server(config)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    inference = pb_grpc.InferenceStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    gate = threading.Event()
    hurry = asyncio.Event()
    try:
        for service in ("readiness", "liveness", "", "demo"):
            assert (await health.Check(health_pb2.HealthCheckRequest(service=service))).status == SERVING
        scheduler = server.manager.get("demo").scheduler
        # Hold the runner so requests stay queued while shutdown begins.
        hold = asyncio.ensure_future(scheduler.exclusive(lambda: gate.wait(30), bump_version=False))
        xs = [torch.randn(1 + i % 3, 16) for i in range(10)]
        calls = [
            asyncio.ensure_future(inference.Run(run_request("demo", f"q{i}", x=x))) for i, x in enumerate(xs)
        ]

        async def queued(n: int) -> bool:
            return scheduler.queue_depth == n

        await until(functools.partial(queued, len(xs)), "requests to queue")
        stopping = asyncio.ensure_future(server.stop(grace_s=30, delay_s=120, hurry=hurry))

        async def not_ready() -> bool:
            check = await health.Check(health_pb2.HealthCheckRequest(service="readiness"))
            return check.status == NOT_SERVING

        await until(not_ready, "readiness NOT_SERVING")
        assert (await health.Check(health_pb2.HealthCheckRequest(service="liveness"))).status == SERVING
        for service in ("", "demo"):
            assert (await health.Check(health_pb2.HealthCheckRequest(service=service))).status == NOT_SERVING
        # The drain delay: a new call is taken like any other.
        x = torch.randn(2, 16)
        xs.append(x)
        calls.append(asyncio.ensure_future(inference.Run(run_request("demo", "late", x=x))))
        await until(functools.partial(queued, len(xs)), "the late request to queue")
        assert not server.draining.is_set() and not stopping.done()
        hurry.set()  # a second signal: GOAWAY now

        async def goaway() -> bool:
            return server.draining.is_set()

        await until(goaway, "the GOAWAY")
        assert not any(call.done() for call in calls)
        gate.set()
        await hold
        responses = await asyncio.gather(*calls)
        eager = demo_model()
        for x, response in zip(xs, responses, strict=True):
            torch.testing.assert_close(outputs_of(response)["logits"], eager(x))
        await stopping
    finally:
        gate.set()
        await channel.close()
        await server.stop(0, 0)


LAYOUT_FLAGS = {"one-process": ["--frontends", "0"], "front-ends": ["--frontends", "2"]}


def test_sigterm_under_load_answers_every_call_it_took(
    packages: Packages, tmp_path: pathlib.Path, layout: str
) -> None:
    """32 callers that never back off, one server, SIGTERM: every call the server took
    is answered OK (calls keep being taken through the drain delay), none is refused
    because it drains, and the process exits 0. With
    no other replica to go to, calls after the listener closed fail to connect."""
    log = tmp_path / "serve.log"
    env = {**os.environ, "PT2SERVE_CACHE_DIR": str(CACHE), "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "pt2serve.service.cli", "serve", "--grpc-port", "0", "--metrics-port", "0"]
    argv += ["--drain-delay-s", "0.5"]  # served on through the delay, after SIGTERM
    with log.open("w") as out:
        proc = subprocess.Popen([*argv, *LAYOUT_FLAGS[layout]], stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        # The child logs to a file (a pipe nobody drains could block it): polled.
        while "ready:" not in log.read_text() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", log.read_text())
        assert match, log.read_text()
        outcomes = asyncio.run(_load_then_sigterm(f"127.0.0.1:{match.group(1)}", proc))
        assert proc.wait(timeout=30) == 0, log.read_text()
        counts = re.search(
            r"stopped: (\d+) requests accepted, (\d+) answered, (\d+) succeeded", log.read_text()
        )
        assert counts, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    accepted, answered, succeeded = (int(n) for n in counts.groups())
    # Every request the server accepted was answered, successfully, and the client
    # received each of those answers.
    assert accepted == answered == succeeded
    ok = sum(1 for outcome in outcomes if outcome.code == grpc.StatusCode.OK)
    assert ok == succeeded > 10
    assert any(outcome.after and outcome.code == grpc.StatusCode.OK for outcome in outcomes)
    # None was refused by pt2serve for draining: what failed, failed to reach it.
    refused = [o.details for o in outcomes if o.code not in {grpc.StatusCode.OK, grpc.StatusCode.CANCELLED}]
    assert all(o.after for o in outcomes if o.code != grpc.StatusCode.OK)
    assert not [d for d in refused if "shutting down" in d or "draining" in d], refused[:3]
    assert {o.code for o in outcomes} <= {
        grpc.StatusCode.OK,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
    }
    cancelled = sum(1 for o in outcomes if o.code == grpc.StatusCode.CANCELLED)
    print(f"{layout}: {ok} OK, {len(refused)} failed to connect, {cancelled} CANCELLED")


CALLERS = 32


@dataclasses.dataclass(frozen=True, slots=True)
class Outcome:
    code: grpc.StatusCode
    details: str
    after: bool  # sent after SIGTERM


async def _load_then_sigterm(target: str, proc: subprocess.Popen[bytes]) -> list[Outcome]:
    outcomes: list[Outcome] = []
    sent_sigterm = asyncio.Event()
    stop = asyncio.Event()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.InferenceStub(channel)

        async def worker() -> None:
            while not stop.is_set():
                after = sent_sigterm.is_set()
                try:
                    await stub.Run(run_request("demo", x=torch.randn(2, 16)), timeout=20)
                    outcomes.append(Outcome(grpc.StatusCode.OK, "", after))
                    if len(outcomes) >= 50:
                        warmed.set()
                except grpc.aio.AioRpcError as exc:
                    outcomes.append(Outcome(exc.code(), exc.details() or "", after))
                    if after and exc.code() == grpc.StatusCode.UNAVAILABLE:
                        gone.set()

        warmed = asyncio.Event()
        gone = asyncio.Event()
        workers = [asyncio.create_task(worker()) for _ in range(CALLERS)]
        await asyncio.wait_for(warmed.wait(), 60)  # load is flowing
        proc.send_signal(signal.SIGTERM)
        sent_sigterm.set()
        # The listener closes after the GOAWAY: callers' new connections are refused.
        await asyncio.wait_for(gone.wait(), 60)
        stop.set()
        await asyncio.gather(*workers)
        await asyncio.to_thread(proc.wait, 60)
    return outcomes


async def test_streams_end_unavailable_when_the_server_drains(
    packages: Packages, tmp_path: pathlib.Path, layout: str
) -> None:
    """A stream open when shutdown begins: every request the server read is answered
    (all OK), then the call ends UNAVAILABLE, telling the client to send the rest on
    a new stream. A health Watch open at the same time sees NOT_SERVING, then ends.
    The server waits out its grace for neither."""
    models = (ModelConfig("demo", str(packages.demo)),)
    async with serving(layout, tmp_path / "server", models, drain_grace_s=30) as served:
        await _stream_and_watch_through_shutdown(served)


async def _stream_and_watch_through_shutdown(served: Served) -> None:
    answered: list[str] = []
    flowing = threading.Event()

    def requests() -> Iterator[pb.RunRequest]:
        for i in range(100_000):
            yield run_request("demo", str(i), x=torch.randn(1, 16))

    def consume() -> grpc.RpcError:
        # The synchronous client, as Pt2ServeClient: gRPC's asyncio client reports a
        # write that races the server's status as INTERNAL instead of that status.
        with grpc.insecure_channel(served.target) as channel:
            stub = pb_grpc.InferenceStub(channel)
            try:
                for answer in stub.RunStream(requests()):
                    assert answer.WhichOneof("result") == "response", answer.error.message
                    answered.append(answer.request_id)
                    if len(answered) == 50:
                        flowing.set()
            except grpc.RpcError as exc:
                return exc
        raise AssertionError("the stream ended without a status")

    async def watch() -> list[int]:
        seen: list[int] = []
        async with grpc.aio.insecure_channel(served.target) as channel:
            call = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service="readiness")
            )
            async for answer in call:
                seen.append(answer.status)
                if len(seen) == 1:
                    watching.set()
            assert await call.code() == grpc.StatusCode.OK
        return seen

    watching = asyncio.Event()
    watcher = asyncio.ensure_future(watch())
    consumer = asyncio.ensure_future(asyncio.to_thread(consume))
    await asyncio.to_thread(flowing.wait, 60)
    await asyncio.wait_for(watching.wait(), 30)
    started = time.monotonic()
    await served.shut_down()
    assert await watcher == [SERVING, NOT_SERVING]
    error = await consumer
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error  # type: ignore[attr-defined]
    assert "draining" in (error.details() or "")  # type: ignore[attr-defined]
    assert time.monotonic() - started < 15, "the stream ended by itself, not at the grace"
    assert len(answered) == len(set(answered)) >= 50
