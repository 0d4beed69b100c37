"""Graceful drain: health turns NOT_SERVING, new calls get UNAVAILABLE, queued and
running requests finish, the process exits 0."""

from __future__ import annotations

import asyncio
import collections
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
from tests.conftest import CACHE, Packages, until
from tests.test_service import expect_error, outputs_of, run_request

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def test_drain_finishes_queued_work_and_refuses_new_calls(packages: Packages) -> None:
    config = ServerConfig(
        grpc_port=0, metrics_port=0, model_root=str(CACHE), models=(ModelConfig("demo", str(packages.demo)),)
    )
    server = Pt2Server(config)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    inference = pb_grpc.InferenceStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    gate = threading.Event()
    try:
        for service in ("readiness", "liveness", ""):
            assert (await health.Check(health_pb2.HealthCheckRequest(service=service))).status == SERVING
        scheduler = server.manager.get("demo").scheduler
        # Hold the runner so requests stay queued while the drain starts.
        hold = asyncio.ensure_future(scheduler.exclusive(lambda: gate.wait(30), bump_version=False))
        xs = [torch.randn(1 + i % 3, 16) for i in range(10)]
        queued = [
            asyncio.ensure_future(inference.Run(run_request("demo", f"q{i}", x=x))) for i, x in enumerate(xs)
        ]

        async def all_queued() -> bool:
            return scheduler.queue_depth == len(xs)

        await until(all_queued, "requests to queue")
        stopping = asyncio.ensure_future(server.stop(grace_s=30))

        async def not_ready() -> bool:
            check = await health.Check(health_pb2.HealthCheckRequest(service="readiness"))
            return check.status == NOT_SERVING

        await until(not_ready, "readiness NOT_SERVING")
        assert (await health.Check(health_pb2.HealthCheckRequest(service="liveness"))).status == SERVING
        assert (await health.Check(health_pb2.HealthCheckRequest(service="demo"))).status == NOT_SERVING
        await expect_error(
            inference.Run(run_request("demo", x=torch.randn(1, 16))),
            grpc.StatusCode.UNAVAILABLE,
            "shutting down",
        )
        assert not any(task.done() for task in queued)
        gate.set()
        await hold
        responses = await asyncio.gather(*queued)
        eager = demo_model()
        for x, response in zip(xs, responses, strict=True):
            torch.testing.assert_close(outputs_of(response)["logits"], eager(x))
        await stopping
    finally:
        gate.set()
        await channel.close()
        await server.stop(0)


def test_sigterm_under_load_loses_nothing(packages: Packages, tmp_path: pathlib.Path) -> None:
    log = tmp_path / "serve.log"
    env = {**os.environ, "PT2SERVE_CACHE_DIR": str(CACHE), "PYTHONUNBUFFERED": "1"}
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pt2serve.service.cli",
                "serve",
                "--grpc-port",
                "0",
                "--metrics-port",
                "0",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
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
    ok = sum(1 for code, _ in outcomes if code == grpc.StatusCode.OK)
    assert ok == succeeded > 10
    # The rest were refused without being run, with UNAVAILABLE, which clients retry.
    # None was CANCELLED: the listener stays open, answering UNAVAILABLE, until the
    # callers have stopped calling (gRPC cancels the calls it holds as it closes).
    refused = collections.Counter(code.name for code, _ in outcomes if code != grpc.StatusCode.OK)
    assert set(refused) <= {"UNAVAILABLE"}, refused
    assert grpc.StatusCode.UNAVAILABLE in {code for code, when in outcomes if when == "after"}


CALLERS = 32


async def _load_then_sigterm(target: str, proc: subprocess.Popen[bytes]) -> list[tuple[grpc.StatusCode, str]]:
    outcomes: list[tuple[grpc.StatusCode, str]] = []
    sent_sigterm = asyncio.Event()
    stop = asyncio.Event()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.InferenceStub(channel)

        async def worker() -> None:
            while not stop.is_set():
                when = "after" if sent_sigterm.is_set() else "before"
                try:
                    await stub.Run(run_request("demo", x=torch.randn(2, 16)), timeout=20)
                    outcomes.append((grpc.StatusCode.OK, when))
                    if len(outcomes) >= 50:
                        warmed.set()
                except grpc.aio.AioRpcError as exc:
                    outcomes.append((exc.code(), when))
                    if exc.code() == grpc.StatusCode.UNAVAILABLE and when == "after":
                        refused.set()
                    if exc.code() == grpc.StatusCode.UNAVAILABLE:
                        # A client's retry pacing: without it a refused caller
                        # spins on the loop the other callers share.
                        await asyncio.sleep(0.01)

        warmed = asyncio.Event()
        refused = asyncio.Event()
        workers = [asyncio.create_task(worker()) for _ in range(CALLERS)]
        await asyncio.wait_for(warmed.wait(), 60)  # load is flowing
        proc.send_signal(signal.SIGTERM)
        sent_sigterm.set()
        # Once refused, callers go elsewhere (as balancing clients do); the server
        # then closes its listener after the quiet window, and exits.
        await asyncio.wait_for(refused.wait(), 60)
        stop.set()
        await asyncio.gather(*workers)
        await asyncio.to_thread(proc.wait, 60)
    return outcomes


async def test_streams_end_unavailable_when_the_server_drains(packages: Packages) -> None:
    """A stream open when shutdown begins: every request the server read is answered
    (all OK), then the call ends UNAVAILABLE, telling the client to send the rest on
    a new stream; the server does not wait out its grace for the stream."""
    config = ServerConfig(
        grpc_port=0, metrics_port=0, model_root=str(CACHE), models=(ModelConfig("demo", str(packages.demo)),)
    )
    server = Pt2Server(config)
    await server.start()
    answered: list[str] = []
    flowing = threading.Event()

    def requests() -> Iterator[pb.RunRequest]:
        for i in range(100_000):
            yield run_request("demo", str(i), x=torch.randn(1, 16))

    def consume() -> grpc.RpcError:
        # The synchronous client, as Pt2ServeClient: gRPC's asyncio client reports a
        # write that races the server's status as INTERNAL instead of that status.
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
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

    consumer = asyncio.ensure_future(asyncio.to_thread(consume))
    await asyncio.to_thread(flowing.wait, 60)
    started = time.monotonic()
    await server.stop(grace_s=30)
    error = await consumer
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error  # type: ignore[attr-defined]
    assert "draining" in (error.details() or "")  # type: ignore[attr-defined]
    assert time.monotonic() - started < 15, "the stream ended by itself, not at the grace"
    assert len(answered) == len(set(answered)) >= 50
