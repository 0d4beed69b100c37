"""CPU per request, by thread: where each server spends its time under load.

    python -m bench.cpu_per_request                  # demo model, streaming, 64 in flight
    python -m bench.cpu_per_request --model ffn --concurrency 8

Starts the null server and pt2serve side by side, drives each in turn with closed-loop
streaming load (single-row requests), and reads the user + system CPU time of every
server thread (/proc/<pid>/task/*/stat) and of the load generator over the measured
window. Prints microseconds of CPU per answered request for each kind of thread; each
figure is the median over the rounds. The load generator is this process (its CPU comes
from os.times()), so the two servers' figures also show what the client costs. The last
row, CPUs busy, is the CPU of all those threads per second, over the machine's CPUs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import ExitStack

from bench.run import (
    BenchModel,
    bench_models,
    closed_loop,
    pt2serve_argv,
    request_bytes,
    server_process,
)

TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def thread_kind(pid: int, tid: int, name: str) -> str:
    if tid == pid:
        return "event loop (main thread)"
    if name.startswith("pt2serve-"):
        return "runner threads"
    if name.startswith(("event_engine", "grpc")):
        return "gRPC core threads"
    return "other threads (gRPC poller, metrics)"


def processes(pid: int) -> list[tuple[int, str]]:
    """`pid` and, for a supervised server (`frontends = N`), its engine and front ends,
    each with the role that prefixes its threads' kinds."""
    found: list[tuple[int, str]] = []
    for task in pathlib.Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            argv = pathlib.Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            if b"--role" in argv:
                role = argv[argv.index(b"--role") + 1].decode()
                found.append((int(child), "engine" if role == "engine" else "front ends"))
    return [(pid, "supervisor" if found else ""), *found]


def cpu_by_kind(pid: int) -> dict[str, float]:
    """Seconds of CPU each kind of thread of `pid` (and of the processes it supervises)
    has used so far."""
    totals: dict[str, float] = defaultdict(float)
    for process, role in processes(pid):
        for task in pathlib.Path(f"/proc/{process}/task").iterdir():
            try:
                name = (task / "comm").read_text().strip()
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # the thread ended
            kind = thread_kind(process, int(task.name), name)
            # Fields after the name: utime and stime are the 12th and 13th.
            totals[f"{role}: {kind}" if role else kind] += (int(fields[11]) + int(fields[12])) * TICK_S
    return totals


def process_cpu() -> float:
    times = os.times()
    return times.user + times.system


def load(target: str, payloads: list[bytes], concurrency: int, duration: float) -> tuple[int, float]:
    """Requests answered and this process's CPU seconds, over `duration` of load."""
    before = process_cpu()
    _, latencies = asyncio.run(closed_loop(target, "stream", payloads, concurrency, 0.0, duration))
    return len(latencies), process_cpu() - before


def measure(
    pid: int, target: str, payloads: list[bytes], concurrency: int, duration: float
) -> dict[str, float]:
    # Warm up, then measure: the server's threads through /proc, the client's in-process.
    load(target, payloads, concurrency, 0.5)
    before = cpu_by_kind(pid)
    started = time.monotonic()
    answered, client = load(target, payloads, concurrency, duration)
    after = cpu_by_kind(pid)
    per_request = {kind: (after[kind] - before.get(kind, 0.0)) / answered * 1e6 for kind in after}
    per_request["load generator"] = client / answered * 1e6
    per_request["requests/s"] = answered / (time.monotonic() - started)
    return per_request


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="demo", choices=["demo", "ffn"])
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--duration", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--frontends", type=int, default=0, help="also pt2serve with this many front ends")
    args = parser.parse_args()
    model: BenchModel = next(m for m in bench_models() if m.name == args.model)
    payloads = [request_bytes(model, i) for i in range(64)]
    env = dict(os.environ)
    split = f"pt2serve, {args.frontends} front end(s)"
    names = ["null", "pt2serve", *([split] if args.frontends else [])]
    figures: dict[str, dict[str, list[float]]] = {name: defaultdict(list) for name in names}
    with tempfile.TemporaryDirectory() as config_dir, ExitStack() as stack:
        null_argv = [sys.executable, "-m", "bench.null_server", "--output-width", str(model.out_width)]
        servers = [
            ("null", stack.enter_context(server_process(null_argv, "null server listening", env))),
            (
                "pt2serve",
                stack.enter_context(
                    server_process(pt2serve_argv(model, 64, 1, config_dir, frontends=0), "ready:", env)
                ),
            ),
        ]
        if args.frontends:
            argv = pt2serve_argv(model, 64, 1, config_dir, frontends=args.frontends)
            servers.append((split, stack.enter_context(server_process(argv, "ready:", env))))
        for _ in range(args.rounds):
            for name, server in servers:
                measured = measure(server.pid, server.target, payloads, args.concurrency, args.duration)
                for kind, value in measured.items():
                    figures[name][kind].append(value)
    kinds = sorted({k for f in figures.values() for k in f} - {"requests/s"})
    print(
        f"# CPU per answered request (µs), {args.model}, streaming, {args.concurrency} in flight, "
        f"median of {args.rounds}\n"
    )
    print(f"| thread | {' | '.join(names)} |")
    print(f"|{' --- |' * (len(names) + 1)}")
    for kind in kinds:
        cells = [f"{statistics.median(figures[s][kind]):.0f}" if figures[s][kind] else "–" for s in figures]
        print(f"| {kind} | {' | '.join(cells)} |")
    rates = [f"{statistics.median(figures[s]['requests/s']):,.0f}" for s in figures]
    print(f"| requests/s | {' | '.join(rates)} |")
    # How busy the machine was: all threads' CPU (server and load generator) per second.
    busy = [
        statistics.median(
            sum(figures[s][k][i] for k in kinds if figures[s][k]) * figures[s]["requests/s"][i] / 1e6
            for i in range(args.rounds)
        )
        / (os.cpu_count() or 1)
        for s in figures
    ]
    print(f"| CPUs busy | {' | '.join(f'{b:.0%}' for b in busy)} |")


if __name__ == "__main__":
    main()
