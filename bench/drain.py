"""SIGTERM under load, side by side: how callers' calls end while a server shuts down.

    python -m bench.drain                      # both scenarios, 3 rounds each
    python -m bench.drain --scenario l4 --rounds 5

Prints each round, and writes the totals to docs/benchmarks-drain.md (`--out`).

Servers, taking turns in each round: pt2serve in its default layout (front ends and
an engine), pt2serve in one process (`--frontends 0`), and the plain grpc.aio server
of bench/null_server.py, whose SIGTERM handler sets health NOT_SERVING and calls
`server.stop(grace)` (grpc's own graceful-shutdown example).

- `l4`: a rolling restart of 3 replicas behind haproxy in TCP mode (bench/l4.py),
  8 plain tritonclient callers (no retries) calling ModelInfer in a loop.
- `single`: one server, 32 asyncio callers that never back off calling Run, SIGTERM
  after a second; calls after the listener closed fail to connect (UNAVAILABLE):
  there is no other replica.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime
import os
import pathlib
import signal
import sys
import tempfile

import grpc
import torch

from bench.l4 import Replica, Tally, rolling_restart
from bench.run import CACHE, ROOT, server_process
from pt2serve.service import tensors
from pt2serve.service.demo import demo_package
from pt2serve.service.pb import pt2serve_pb2 as pb
from pt2serve.service.pb import pt2serve_pb2_grpc as pb_grpc

PT2SERVE = [sys.executable, "-m", "pt2serve.service.cli", "serve", "--metrics-port", "0"]
# name -> (argv with {port}, the log line that says it serves)
SERVERS = {
    "pt2serve (default layout)": ([*PT2SERVE, "--grpc-port", "{port}"], "ready:"),
    "pt2serve --frontends 0": ([*PT2SERVE, "--grpc-port", "{port}", "--frontends", "0"], "ready:"),
    "plain grpc.aio, stop(grace)": (
        [sys.executable, "-m", "bench.null_server", "--port", "{port}", "--output-width", "4"],
        "listening on",
    ),
}


async def single_round(target: str, pid: int, callers: int) -> collections.Counter[str]:
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

        tasks = [asyncio.create_task(caller()) for _ in range(callers)]
        await asyncio.sleep(1.0)
        os.kill(pid, signal.SIGTERM)
        await asyncio.sleep(1.5)
        stop.set()
        await asyncio.gather(*tasks)
    return outcomes


def single(rounds: int, callers: int, env: dict[str, str]) -> dict[str, Tally]:
    totals = {name: Tally() for name in SERVERS}
    for round_ in range(1, rounds + 1):
        for name, (argv, ready) in SERVERS.items():
            argv = [a.replace("{port}", "0") for a in argv]
            with server_process(argv, ready, env) as server:
                codes = asyncio.run(single_round(server.target, server.pid, callers))
            tally = Tally(codes)
            totals[name].codes += codes
            print(f"single round {round_}, {name}: {tally.line()}")
    for name, tally in totals.items():
        print(f"single total, {name}: {tally.line()}")
    return totals


def l4(rounds: int, callers: int, env: dict[str, str]) -> dict[str, Tally]:
    totals = {name: Tally() for name in SERVERS}
    for round_ in range(1, rounds + 1):
        for name, (argv, ready) in SERVERS.items():
            with tempfile.TemporaryDirectory() as directory:
                where = pathlib.Path(directory)
                replicas = [Replica(where, f"replica{i}", argv, ready, env) for i in range(3)]
                report = rolling_restart(replicas, where, callers=callers)
            totals[name].codes += report.tally.codes
            print(f"l4 round {round_}, {name}: {report.tally.line()}; exit codes {report.exit_codes}")
    for name, tally in totals.items():
        print(f"l4 total, {name}: {tally.line()}")
    return totals


CODES = ("OK", "UNAVAILABLE", "CANCELLED")


def report(sections: dict[str, dict[str, Tally]], rounds: int) -> str:
    lines = [
        "# Shutdown under load",
        "",
        f"Written by `python -m bench.drain` ({datetime.date.today()}, {os.cpu_count()} CPUs, "
        f"{rounds} rounds, the servers taking turns; totals over the rounds). What the",
        "scenarios are: bench/drain.py; what the design is: docs/deploy.md (Shutdown).",
    ]
    for title, totals in sections.items():
        lines += ["", f"## {title}", "", "| server | calls | failed | " + " | ".join(CODES) + " | other |"]
        lines.append("|---|---|---|" + "---|" * (len(CODES) + 1))
        for name, tally in totals.items():
            other = tally.calls - sum(tally.codes[c] for c in CODES)
            cells = " | ".join(f"{tally.codes[c]:,}" for c in CODES)
            lines.append(f"| {name} | {tally.calls:,} | {tally.failed:,} | {cells} | {other:,} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenario", choices=["l4", "single", "both"], default="both")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--callers", type=int, help="default: 8 (l4), 32 (single)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks-drain.md"))
    args = parser.parse_args()
    demo_package(CACHE)
    env = {**os.environ, "PT2SERVE_CACHE_DIR": str(CACHE), "PYTHONUNBUFFERED": "1"}
    sections = {}
    if args.scenario in ("l4", "both"):
        callers = args.callers or 8
        title = f"Rolling restart behind haproxy (L4), {callers} plain tritonclient callers"
        sections[title] = l4(args.rounds, callers, env)
    if args.scenario in ("single", "both"):
        callers = args.callers or 32
        title = f"One server, {callers} callers that never back off, SIGTERM"
        sections[title] = single(args.rounds, callers, env)
    pathlib.Path(args.out).write_text(report(sections, args.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
