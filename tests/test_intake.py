"""The engine's intake (service/intake.py): a lone request is run by the thread that
reads it; anything else goes to the event loop, which answers it as before. A real
engine in this process with the demo package, and the test as its front end on
engine.sock."""

from __future__ import annotations

import asyncio
import pathlib
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import torch

from pt2serve.loader.errors import ErrorKind, Pt2ServeError
from pt2serve.scheduler.config import BatchingConfig, ModelConfig
from pt2serve.service import ipc, links
from pt2serve.service.config import ServerConfig
from pt2serve.service.engine import Engine, data_socket
from pt2serve.service.intake import Intake
from tests.conftest import Packages, until


class Client(links.FrameLink):
    """A front end's end of engine.sock: every frame the engine sends, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.frames: asyncio.Queue[bytearray] = asyncio.Queue()

    def received(self, frame: bytearray) -> None:
        self.frames.put_nowait(frame)

    def request(
        self, request_id: int, x: torch.Tensor, model: str = "demo", **options: object
    ) -> list[object]:
        settings: dict[str, object] = {"priority": 0, "timeout_s": None, "deadline": None, **options}
        return ipc.pack_request(request_id, model, {"x": x}, output_names=(), **settings)  # type: ignore[arg-type]

    async def answer(self) -> tuple[int, torch.Tensor | Pt2ServeError]:
        frame = await asyncio.wait_for(self.frames.get(), 30)
        if frame[:1] == ipc.ERROR:
            return ipc.unpack_error(frame)
        assert frame[:1] == ipc.RESULT, bytes(frame[:1])
        request_id, _, outputs = ipc.unpack_raw_result(frame)
        (output,) = outputs.values()
        return request_id, output.tensor()  # type: ignore[union-attr]

    async def ask(self, request_id: int, x: torch.Tensor, **options: object) -> torch.Tensor | Pt2ServeError:
        self.send(self.request(request_id, x, **options), now=True)
        answered, outcome = await self.answer()
        assert answered == request_id
        return outcome


@dataclass
class Served:
    engine: Engine
    path: str

    async def connect(self) -> Client:
        _, client = await asyncio.get_running_loop().create_unix_connection(Client, self.path)
        state = await asyncio.wait_for(client.frames.get(), 30)
        assert state[:1] == ipc.STATE
        return client

    async def connect_to_intake(self) -> tuple[Client, Intake]:
        """A connection, once the intake reads it."""
        client = await self.connect()
        intake = self.engine.intake
        assert intake is not None
        await until(lambda: _true(intake.reading), "the intake reads")
        return client, intake


async def serve(packages: Packages, *, intake: bool) -> AsyncIterator[Served]:
    run_dir = pathlib.Path(tempfile.mkdtemp(prefix="pt2i"))  # short: Unix socket paths
    # No batching waits: whether a lone request may run at once is the test's to say.
    batching = BatchingConfig(max_batch_size=16, adaptive_delay_us=0)
    model = ModelConfig("demo", str(packages.demo), num_runners=1, batching=batching)
    config = ServerConfig(grpc_port=0, metrics_port=0, engine_intake=intake, models=(model,))
    engine = Engine(config, run_dir)
    await engine.start()
    try:
        yield Served(engine, data_socket(run_dir))
    finally:
        await engine.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture
async def served(packages: Packages) -> AsyncIterator[Served]:
    async for s in serve(packages, intake=True):
        yield s


def counted(served: Served) -> tuple[int, int]:
    """(requests answered by the data plane, requests in the scheduler's batches)."""
    model = served.engine.server.manager.registry.get("demo")
    return served.engine.server.manager.data.answered, model.scheduler.stats.requests


async def test_lone_requests_run_on_the_intake_thread_and_equal_eager(
    served: Served, eager_demo: torch.nn.Module
) -> None:
    client, intake = await served.connect_to_intake()
    for i in range(20):
        x = torch.randn(1 + i % 3, 16)
        torch.testing.assert_close(await client.ask(i, x), eager_demo(x))
    # (Counted once the answer has left: it may reach the test first.)
    await until(lambda: _true(intake.ran == 20), "20 requests run by the intake")
    assert intake.handed_back == 0
    # Counted once each, by the loop, after the answers left.
    await until(lambda: _true(counted(served) == (20, 20)), "20 requests counted")
    stats = served.engine.server.manager.registry.get("demo").scheduler.stats
    assert stats.batches == 20


async def test_requests_read_together_go_to_the_loop_to_batch(
    served: Served, eager_demo: torch.nn.Module
) -> None:
    client, intake = await served.connect_to_intake()
    xs = [torch.randn(1, 16) for _ in range(16)]
    # One write of 16 frames: read at once, they are the loop's to batch.
    client.send([part for i, x in enumerate(xs) for part in client.request(i, x)], now=True)
    answers = dict([await client.answer() for _ in xs])
    for i, x in enumerate(xs):
        torch.testing.assert_close(answers[i], eager_demo(x))
    assert intake.ran == 0 and intake.handed_back == 1
    stats = served.engine.server.manager.registry.get("demo").scheduler.stats
    assert stats.requests == 16 and stats.batches < 16
    # Idle again: the intake reads, and runs the next lone request itself.
    await runs_on_the_intake(client, intake, eager_demo, torch.randn(1, 16))


async def test_what_the_intake_does_not_run_gets_the_loops_answer(
    served: Served, eager_demo: torch.nn.Module
) -> None:
    client, intake = await served.connect_to_intake()
    cases = [
        ({"model": "nope"}, torch.randn(1, 16), ErrorKind.NOT_FOUND),
        ({}, torch.randn(1, 16, dtype=torch.float64), ErrorKind.INVALID_ARGUMENT),
        ({}, torch.randn(1, 15), ErrorKind.INVALID_ARGUMENT),
        ({"priority": 7}, torch.randn(1, 16), ErrorKind.INVALID_ARGUMENT),
        ({"deadline": time.monotonic() - 1}, torch.randn(1, 16), ErrorKind.DEADLINE_EXCEEDED),
        ({"timeout_s": 0.0}, torch.randn(1, 16), ErrorKind.DEADLINE_EXCEEDED),
    ]
    for i, (options, x, kind) in enumerate(cases):
        await until(lambda: _true(intake.reading), "the intake reads")
        outcome = await client.ask(i, x, **options)
        assert isinstance(outcome, Pt2ServeError) and outcome.kind == kind, (options, outcome)
    assert intake.ran == 0 and intake.handed_back == len(cases)
    # A cancel of a request that is not queued changes nothing.
    client.send(ipc.pack_cancel(12345), now=True)
    await until(lambda: _true(intake.handed_back == len(cases) + 1), "the cancel handed to the loop")
    await runs_on_the_intake(client, intake, eager_demo, torch.randn(2, 16))


async def test_a_closed_connection_is_dropped_and_the_others_stay_with_the_intake(
    served: Served, eager_demo: torch.nn.Module
) -> None:
    first, second = await served.connect(), await served.connect()
    engine = served.engine
    intake = engine.intake
    assert intake is not None
    await until(lambda: _true(len(engine.links) == 2 and intake.reading), "two links, read by the intake")
    first.close()
    await until(lambda: _true(len(engine.links) == 1), "the closed link is dropped")
    for i in range(10):
        x = torch.randn(1, 16)
        torch.testing.assert_close(await second.ask(i, x), eager_demo(x))
    # The end of a connection is handed to the loop once, not over and over.
    await until(lambda: _true(intake.ran == 10), "10 requests run by the intake")
    assert intake.handed_back <= 1


async def test_without_the_intake_the_loop_answers(packages: Packages, eager_demo: torch.nn.Module) -> None:
    async for loop_only in serve(packages, intake=False):
        assert loop_only.engine.intake is None
        client = await loop_only.connect()
        for i in range(5):
            x = torch.randn(1, 16)
            torch.testing.assert_close(await client.ask(i, x), eager_demo(x))
        data = loop_only.engine.server.manager.data
        await until(lambda: _true(data.answered == 5), "5 requests counted")  # noqa: B023


async def runs_on_the_intake(client: Client, intake: Intake, eager: torch.nn.Module, x: torch.Tensor) -> None:
    """Once the intake reads, a lone request is answered as eager, by the intake."""
    await until(lambda: _true(intake.reading), "the intake reads")
    ran = intake.ran
    torch.testing.assert_close(await client.ask(1000 + ran, x), eager(x))
    await until(lambda: _true(intake.ran == ran + 1), "the lone request run by the intake")


async def _true(value: bool) -> bool:
    return value


async def test_a_failing_intake_thread_leaves_the_connections_to_the_loop(
    served: Served,
    eager_demo: torch.nn.Module,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    client, intake = await served.connect_to_intake()

    def broken(self: links.SocketLink) -> list[bytearray] | None:
        raise RuntimeError("a bug in the intake")

    monkeypatch.setattr(links.SocketLink, "pull", broken)
    x = torch.randn(1, 16)
    torch.testing.assert_close(await client.ask(1, x), eager_demo(x))
    assert "the intake thread failed" in caplog.text
    assert not intake.reading and intake.ran == 0
    for i in range(3):  # the loop keeps reading: the thread never takes them again
        torch.testing.assert_close(await client.ask(2 + i, x), eager_demo(x))
    assert not intake.reading
