"""SIGTERM under load: how callers' calls end while pt2serve drains.

    python -m bench.drain                # 10 rounds, 32 callers
    python -m bench.drain --rounds 3 --callers 64

Each round starts `pt2serve serve` (the demo model), lets CALLERS closed-loop unary
callers run for a second, sends SIGTERM and keeps calling for 1.5 s. A caller that
gets UNAVAILABLE waits 10 ms and calls again (what a retrying client does). It
prints, per round, the calls that ended OK, UNAVAILABLE and anything else (CANCELLED:
calls gRPC dropped as the listener closed, which clients do not retry).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import signal
import sys

import grpc
import torch

from bench.run import CACHE, server_process
from pt2serve.service import tensors
from pt2serve.service.demo import demo_package
from pt2serve.service.pb import pt2serve_pb2 as pb
from pt2serve.service.pb import pt2serve_pb2_grpc as pb_grpc


async def one_round(target: str, pid: int, callers: int) -> collections.Counter[str]:
    outcomes: collections.Counter[str] = collections.Counter()
    stop = asyncio.Event()
    request = pb.RunRequest(model="demo", inputs={"x": tensors.tensor_to_pb(torch.randn(2, 16))})
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.InferenceStub(channel)  # type: ignore[no-untyped-call]

        async def caller() -> None:
            while not stop.is_set():
                try:
                    await stub.Run(request, timeout=20)
                    outcomes["OK"] += 1
                except grpc.aio.AioRpcError as exc:
                    outcomes[exc.code().name] += 1
                    if exc.code() == grpc.StatusCode.UNAVAILABLE:
                        await asyncio.sleep(0.01)

        tasks = [asyncio.create_task(caller()) for _ in range(callers)]
        await asyncio.sleep(1.0)
        os.kill(pid, signal.SIGTERM)
        await asyncio.sleep(1.5)
        stop.set()
        await asyncio.gather(*tasks)
    return outcomes


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--callers", type=int, default=32)
    args = parser.parse_args()
    demo_package(CACHE)
    env = {**os.environ, "PT2SERVE_CACHE_DIR": str(CACHE)}
    argv = [sys.executable, "-m", "pt2serve.service.cli", "serve", "--grpc-port", "0", "--metrics-port", "0"]
    total: collections.Counter[str] = collections.Counter()
    for round_ in range(1, args.rounds + 1):
        with server_process(argv, "ready:", env) as server:
            outcomes = asyncio.run(one_round(server.target, server.pid, args.callers))
        total += outcomes
        print(f"round {round_}: " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())))
    print("total: " + ", ".join(f"{k} {v}" for k, v in sorted(total.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
