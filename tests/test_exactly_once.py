"""Exactly once, as a property, at the engine: a real Engine (the demo model, its
intake thread on) behind its data socket, driven the way a front end drives it by
a mix that Hypothesis draws: lone requests, batches written at once, bad requests,
unknown models, deadlines that pass in the queue, cancels, then shutdown with work
still in flight. Every request gets exactly one answer frame (a cancelled one at
most one), and no answer names an id that was never sent."""

from __future__ import annotations

import asyncio
import collections
import pathlib
import socket
import tempfile
import threading
from collections.abc import Iterator

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pt2serve.scheduler.manager import ModelConfig
from pt2serve.service import ipc, links
from pt2serve.service.config import ServerConfig
from pt2serve.service.engine import Engine, data_socket
from tests.conftest import CACHE, Packages

# One step of the mix: what to send, and how many requests to write at once.
step = st.one_of(
    st.tuples(st.just("request"), st.integers(1, 8)),
    st.tuples(st.just("batch"), st.integers(2, 12)),
    st.tuples(st.just("bad"), st.sampled_from(["shape", "output", "model"])),
    st.tuples(st.just("deadline"), st.integers(1, 3)),
    st.tuples(st.just("cancel"), st.integers(0, 40)),
)


# What makes a request bad: the engine refuses it (INVALID_ARGUMENT, NOT_FOUND).
BAD: dict[str, dict[str, object]] = {
    "shape": {"width": 5},
    "output": {"outputs": ("nope",)},
    "model": {"model": "nope"},
}


def _request(request_id: int, rows: int, *, model: str = "demo", width: int = 16, **options: object) -> bytes:
    parts = ipc.pack_request(
        request_id,
        model,
        {"x": torch.randn(rows, width)},
        priority=0,
        timeout_s=options.get("timeout_s"),  # type: ignore[arg-type]
        deadline=None,
        output_names=options.get("outputs", ()),  # type: ignore[arg-type]
    )
    return b"".join(bytes(p) for p in parts)


def _frames(plan: list[tuple[str, int | str]]) -> Iterator[tuple[bytes, list[int], list[int]]]:
    """(bytes to write at once, ids of the requests in them, ids they cancel)."""
    sent: list[int] = []
    ids = iter(range(1, 1_000_000))
    for kind, arg in plan:
        if kind == "cancel":
            if sent:
                target = sent[int(arg) % len(sent)]
                yield b"".join(bytes(p) for p in ipc.pack_cancel(target)), [], [target]
            continue
        count = int(arg) if kind == "batch" else 1
        new = [next(ids) for _ in range(count)]
        if kind == "bad":
            bad = {"shape": {"width": 5}, "output": {"outputs": ("nope",)}, "model": {"model": "nope"}}[
                str(arg)
            ]
            data = _request(new[0], 1, **bad)  # type: ignore[arg-type]
        elif kind == "deadline":
            data = _request(new[0], int(arg), timeout_s=1e-6)
        else:
            data = b"".join(_request(i, int(arg) if kind == "request" else 1 + i % 3) for i in new)
        sent += new
        yield data, new, []


def _read_all(sock: socket.socket, answers: collections.Counter[int], unknown: list[int]) -> None:
    """Until the engine closes the connection: count the answer frames per id."""
    reader = links.FrameReader()
    while data := sock.recv(1 << 16):
        for frame in reader.feed(data):
            kind = frame[:1]
            if kind == ipc.RESULT:
                answers[ipc.unpack_raw_result(frame)[0]] += 1
            elif kind == ipc.ERROR:
                answers[ipc.unpack_error(frame)[0]] += 1
            elif kind != ipc.STATE:
                unknown.append(kind[0])


async def _drive(packages: Packages, plan: list[tuple[str, int | str]]) -> None:
    with tempfile.TemporaryDirectory(prefix="exactly-once-") as directory:
        run_dir = pathlib.Path(directory)
        config = ServerConfig(model_root=str(CACHE), models=(ModelConfig("demo", str(packages.demo)),))
        engine = Engine(config, run_dir)
        await engine.start()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        answers: collections.Counter[int] = collections.Counter()
        unknown: list[int] = []
        sent: list[int] = []
        cancelled: set[int] = set()
        reader = threading.Thread(target=_read_all, args=(sock, answers, unknown))
        try:
            await asyncio.to_thread(sock.connect, data_socket(run_dir))
            reader.start()
            for data, new, cancels in _frames(plan):
                await asyncio.to_thread(sock.sendall, data)
                sent += new
                cancelled.update(cancels)
                await asyncio.sleep(0)  # let the engine's loop read between writes
        finally:
            await engine.stop()  # shutdown with whatever is still in flight
            if reader.is_alive():
                await asyncio.to_thread(reader.join, 60)
            sock.close()
        assert not unknown
        assert set(answers) <= set(sent), set(answers) - set(sent)
        for request_id in sent:
            if request_id in cancelled:
                assert answers[request_id] <= 1, (request_id, answers[request_id])
            else:
                assert answers[request_id] == 1, (request_id, answers[request_id], plan)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=st.lists(step, min_size=1, max_size=12))
def test_every_request_gets_exactly_one_answer_frame(
    packages: Packages, plan: list[tuple[str, int | str]]
) -> None:
    asyncio.run(_drive(packages, plan))
