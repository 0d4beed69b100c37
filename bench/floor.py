"""The floor of a lone request: what the least server that runs the model across a
process hop costs, one request at a time, next to the null server and pt2serve.

    python -m bench.floor                       # demo model, 4 rounds
    python -m bench.floor --rounds 3 --requests 3000 --out ''

Each floor server is the null server (bench/null_server.py: the gRPC stack, request
decoder and per-method wrapper of pt2serve's front ends) with one thing added:

- `null + model`: it runs the model on its own event loop (the model's C ABI, as
  pt2serve's runners call it) and answers with the outputs;
- `null + hop`: it sends the request's tensor bytes to a second process over a Unix
  socket, in length-prefixed frames as pt2serve's front ends and engine do, and
  answers with the reply, which that process sends at once (zeros);
- `null + hop + model`: the second process runs the model on its event loop;
- `null + hop + runner thread`: the second process runs the model on a worker thread,
  which writes the answer itself. This is pt2serve's engine path for a lone request
  (read, hand to a runner, run, answer from the runner) without its checks,
  scheduler, metrics or named outputs.

Then pt2serve, one process and two front ends. h2load sends single-row `Run` requests
one at a time, and the servers take turns (bench/unary.py). Nothing here is shipped
as a server: the floors run the model with none of pt2serve's checks.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import pathlib
import queue
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from contextlib import ExitStack
from typing import Any

import torch

from bench import null_server, unary
from bench.run import MAX_BATCH, ROOT, BenchModel, bench_models, pt2serve_argv, server_process
from pt2serve.loader.dtypes import RawTensor
from pt2serve.loader.native import NativeContainer
from pt2serve.service import tensors
from pt2serve.service.pb import pt2serve_pb2 as pb

# A frame: u64 request id, u32 payload length, then the payload (float32 bytes).
HEAD = struct.Struct("<QI")
ENGINE_MODES = ("echo", "loop", "thread")
FLOORS = {
    "null + model": ["--model-here"],
    "null + hop": ["--engine-mode", "echo"],
    "null + hop + model": ["--engine-mode", "loop"],
    "null + hop + runner thread": ["--engine-mode", "thread"],
}


def load(package: str) -> NativeContainer:
    torch.set_num_threads(1)  # as pt2serve's runners on two CPUs
    return NativeContainer(package, "model", num_runners=1, device="cpu", single_threaded=False)


def run_model(container: NativeContainer, payload: bytes | bytearray | memoryview) -> bytes:
    """The model's first output for one float32 row, as bytes."""
    row = torch.frombuffer(bytearray(payload), dtype=torch.float32).view(1, -1)
    output: bytes = container.run([row])[0].contiguous().numpy().tobytes()
    return output


class Frames:
    """Cuts a byte stream into (request id, payload) frames."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes | bytearray | memoryview) -> list[tuple[int, bytes]]:
        self._buffer += data
        frames = []
        while len(self._buffer) >= HEAD.size:
            request_id, size = HEAD.unpack_from(self._buffer)
            if len(self._buffer) < HEAD.size + size:
                break
            frames.append((request_id, bytes(self._buffer[HEAD.size : HEAD.size + size])))
            del self._buffer[: HEAD.size + size]
        return frames


# ------------------------------------------------------------ second process
def engine(path: str, mode: str, package: str, output_width: int) -> None:
    """Answer frames on the Unix socket `path`: zeros (echo), or the model's outputs
    computed on the event loop (loop) or on a worker thread that writes the answer
    itself (thread)."""
    container = None if mode == "echo" else load(package)
    jobs: queue.SimpleQueue[tuple[socket.socket, threading.Lock, int, bytes]] = queue.SimpleQueue()

    def answer(conn: socket.socket, lock: threading.Lock, request_id: int, payload: bytes) -> None:
        output = bytes(4 * output_width) if container is None else run_model(container, payload)
        with lock:
            conn.sendall(HEAD.pack(request_id, len(output)) + output)

    def worker() -> None:
        while True:
            answer(*jobs.get())

    async def main() -> None:
        loop = asyncio.get_running_loop()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(8)
        threading.Thread(target=worker, daemon=True).start()

        def readable(conn: socket.socket, lock: threading.Lock, frames: Frames, inbox: bytearray) -> None:
            size = conn.recv_into(inbox)
            if not size:
                loop.remove_reader(conn.fileno())
                conn.close()
                return
            for request_id, payload in frames.feed(memoryview(inbox)[:size]):
                if mode == "thread":
                    jobs.put((conn, lock, request_id, payload))
                else:
                    answer(conn, lock, request_id, payload)

        def accept() -> None:
            conn, _ = listener.accept()
            loop.add_reader(conn.fileno(), readable, conn, threading.Lock(), Frames(), bytearray(1 << 16))

        loop.add_reader(listener.fileno(), accept)
        print("floor engine listening", flush=True)
        await asyncio.Event().wait()

    try:
        import uvloop  # as pt2serve's engine, where installed

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())


# ---------------------------------------------------------------- front end
class FloorInference(null_server.NullInference):
    """The null server, answering with the model's outputs: computed here on the
    event loop (`container`), or by the process at `engine_path`."""

    def __init__(self, output_width: int, container: NativeContainer | None, engine_path: str | None) -> None:
        super().__init__(output_width)
        self._container = container
        self._engine_path = engine_path
        self._link: _EngineLink | None = None
        self._ids = itertools.count(1)

    async def Run(self, request: pb.RunRequest, context: Any) -> pb.RunResponse:
        inputs = tensors.raw_tensors_from_pb(request.inputs, "inputs")
        (row,) = inputs.values()
        if self._container is not None:
            output = run_model(self._container, row.data)
        else:
            output = await self._ask(bytes(row.data))
        answer = RawTensor(torch.float32, (1, len(output) // 4), output)
        return pb.RunResponse(
            model=request.model,
            request_id=request.request_id,
            outputs={"output": tensors.tensor_to_pb(answer)},
        )

    async def _ask(self, payload: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        if self._link is None:
            assert self._engine_path is not None
            _, self._link = await loop.create_unix_connection(_EngineLink, self._engine_path)
        request_id = next(self._ids)
        future: asyncio.Future[bytes] = loop.create_future()
        self._link.pending[request_id] = future
        self._link.write(HEAD.pack(request_id, len(payload)) + payload)
        return await future


class _EngineLink(asyncio.Protocol):
    def __init__(self) -> None:
        self.pending: dict[int, asyncio.Future[bytes]] = {}
        self._frames = Frames()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def write(self, data: bytes) -> None:
        assert self._transport is not None
        self._transport.write(data)

    def data_received(self, data: bytes) -> None:
        for request_id, payload in self._frames.feed(data):
            future = self.pending.pop(request_id, None)
            if future is not None and not future.done():
                future.set_result(payload)

    def connection_lost(self, exc: Exception | None) -> None:
        for future in self.pending.values():
            if not future.done():
                future.set_exception(ConnectionError("the floor engine went away"))


def serve_floor(args: argparse.Namespace) -> None:
    container = load(args.package) if args.model_here else None
    engine_path = None
    child = None
    if args.engine_mode:
        engine_path = os.path.join(tempfile.mkdtemp(prefix="pt2serve-floor-"), "engine.sock")
        argv = [
            sys.executable,
            "-m",
            "bench.floor",
            "--engine",
            engine_path,
            "--engine-mode",
            args.engine_mode,
        ]
        argv += ["--package", args.package, "--output-width", str(args.output_width)]
        child = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        assert child.stdout is not None
        if "listening" not in child.stdout.readline():
            raise SystemExit("the floor engine did not start")
    try:
        asyncio.run(null_server.serve(args.port, FloorInference(args.output_width, container, engine_path)))
    finally:
        if child is not None:
            child.kill()
            child.wait()
        if engine_path is not None:
            shutil.rmtree(os.path.dirname(engine_path), ignore_errors=True)


def floor_argv(model: BenchModel, extra: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "bench.floor", "--serve", "--package", str(model.path),
        "--output-width", str(model.out_width), *extra,
    ]  # fmt: skip


# ---------------------------------------------------------------- the bench
def measure(model: BenchModel, args: argparse.Namespace) -> list[unary.Row]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    null_argv = [sys.executable, "-m", "bench.null_server", "--output-width", str(model.out_width)]
    with tempfile.TemporaryDirectory() as config_dir, ExitStack() as stack:
        argvs = {"null": (null_argv, "null server listening")}
        for name, extra in FLOORS.items():
            argvs[name] = (floor_argv(model, extra), "null server listening")
        argvs["pt2serve, 1 process"] = (pt2serve_argv(model, MAX_BATCH, 1, config_dir, frontends=0), "ready:")
        argvs["pt2serve, 2 front ends"] = (
            pt2serve_argv(model, MAX_BATCH, 1, config_dir, frontends=2),
            "ready:",
        )
        running = {}
        for name, (argv, ready) in argvs.items():
            process = stack.enter_context(server_process(argv, ready, env))
            running[name] = (process.target, process.pid)
        # bench.unary sends requests // 6 one at a time.
        counts = argparse.Namespace(rounds=args.rounds, requests=args.requests * 6)
        return unary.measure(model, running, [1], counts)


def document(table: str, args: argparse.Namespace) -> str:
    return (
        "# The floor of a lone request\n\n"
        "Written by `python -m bench.floor` (see its docstring): single-row native `Run` "
        f"requests one at a time from h2load, {args.rounds} rounds of {args.requests:,} "
        "requests; the servers run side by side and take turns. Only differences within "
        "one run are meaningful.\n\n"
        f"- Machine: {os.cpu_count()} CPUs; torch {torch.__version__}\n\n"
        f"{table}\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--requests", type=int, default=3_000, help="requests per server per round")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks-floor.md"), help="'' to skip")
    # One floor server, or its second process (run by the bench itself).
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--engine-mode", choices=ENGINE_MODES, help=argparse.SUPPRESS)
    parser.add_argument("--model-here", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--package", help=argparse.SUPPRESS)
    parser.add_argument("--output-width", type=int, default=4, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine:
        engine(args.engine, args.engine_mode, args.package, args.output_width)
        return
    if args.serve:
        serve_floor(args)
        return
    if shutil.which("h2load") is None:
        raise SystemExit("h2load not found: apt-get install nghttp2-client")
    (model,) = [m for m in bench_models() if m.name == "demo"]
    table = unary.report(measure(model, args))
    print(table)
    if args.out:
        pathlib.Path(args.out).write_text(document(table, args))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
