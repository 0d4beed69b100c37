"""Unary load the way most clients send it, from a load generator that is not Python.

    python -m bench.unary                       # demo and ffn, 64 and 1 in flight, 3 rounds
    python -m bench.unary --models demo --rounds 5 --requests 50000

h2load (Debian's nghttp2-client) sends pre-serialised single-row `Run` requests over
HTTP/2 (64 in flight = 4 connections x 16 streams), so the generator costs the machine
far less CPU than a Python client would. Three servers take turns in every round: the
null server (the same gRPC stack, no model work), pt2serve with dynamic batching and
pt2serve with batching off. Per server it reports the median requests/s, mean latency,
the ratio to the null server, the server process's CPU per answered request (user +
system, all threads, from /proc, over the whole run) and, for pt2serve, the mean batch
size. The servers were started once and warmed by the previous rounds; the first round
includes any warm-up.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from contextlib import ExitStack

import torch

from bench.run import (
    MAX_BATCH,
    ROOT,
    BenchModel,
    bench_models,
    model_counters,
    pt2serve_argv,
    request_bytes,
    server_process,
)

TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")
RUN_PATH = "/pt2serve.v1.Inference/Run"


@dataclasses.dataclass(frozen=True)
class H2loadResult:
    requests_per_s: float
    succeeded: int
    failed: int
    mean_ms: float


def parse_h2load(output: str) -> H2loadResult:
    """The numbers of one h2load run from its text output."""
    rate = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", output)
    counts = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed", output)
    latency = re.search(r"time for request:\s+\S+\s+\S+\s+([\d.]+)(us|ms|s)\b", output)
    if not (rate and counts and latency):
        raise ValueError(f"unexpected h2load output:\n{output}")
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}[latency.group(2)]
    return H2loadResult(
        float(rate.group(1)), int(counts.group(1)), int(counts.group(2)), float(latency.group(1)) * scale
    )


def grpc_frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message: no compression flag, 4-byte big-endian length."""
    return b"\0" + struct.pack(">I", len(message)) + message


def h2load(target: str, body: str, in_flight: int, requests: int) -> H2loadResult:
    connections = min(in_flight, 4)
    argv = [
        "h2load",
        f"--requests={requests}",
        f"--clients={connections}",
        f"--max-concurrent-streams={in_flight // connections}",
        "--threads=1",
        "--header=content-type: application/grpc",
        "--header=te: trailers",
        f"--data={body}",
        f"http://{target}{RUN_PATH}",
    ]
    done = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=600)
    return parse_h2load(done.stdout)


def cpu_seconds(pid: int) -> float:
    """User + system CPU so far of a process and every process under it (a
    supervisor's engine and front ends), all threads."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    total = (int(fields[11]) + int(fields[12])) * TICK_S
    for child in children(pid):
        total += cpu_seconds(child)
    return total


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in pathlib.Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:
            pass
    return found


@dataclasses.dataclass
class Row:
    model: str
    server: str
    in_flight: int
    rates: list[float] = dataclasses.field(default_factory=list)
    means_ms: list[float] = dataclasses.field(default_factory=list)
    cpu_us: list[float] = dataclasses.field(default_factory=list)
    batch: list[float] = dataclasses.field(default_factory=list)
    failed: int = 0


def measure(
    model: BenchModel, servers: dict[str, tuple[str, int]], in_flight: Sequence[int], args: argparse.Namespace
) -> list[Row]:
    with tempfile.NamedTemporaryFile(suffix=".bin") as body:
        body.write(grpc_frame(request_bytes(model, 0)))
        body.flush()
        rows = {(name, n): Row(model.name, name, n) for name in servers for n in in_flight}
        for _ in range(args.rounds):
            for n in in_flight:
                for name, (target, pid) in servers.items():
                    counters = model_counters(target, model.name)
                    cpu = cpu_seconds(pid)
                    # Fewer requests one at a time: the run then takes about as long.
                    count = args.requests if n > 1 else max(args.requests // 6, 100)
                    result = h2load(target, body.name, n, count)
                    cpu = cpu_seconds(pid) - cpu
                    row = rows[(name, n)]
                    row.rates.append(result.requests_per_s)
                    row.means_ms.append(result.mean_ms)
                    row.failed += result.failed
                    row.cpu_us.append(cpu / result.succeeded * 1e6 if result.succeeded else 0.0)
                    after = model_counters(target, model.name)
                    if counters is not None and after is not None and after[0] > counters[0]:
                        row.batch.append((after[1] - counters[1]) / (after[0] - counters[0]))
    return list(rows.values())


def report(rows: list[Row], ceilings: dict[str, float] | None = None) -> str:
    """The table; with the models' in-process ceilings (rows/s at full batch), also
    each server's share of the best possible rate, 1/(1/N + 1/C) (bench.run)."""
    ceilings = ceilings or {}
    lines = [
        "| model | server | in flight | req/s (median) | rounds | × null | × best possible | mean latency | "
        "CPU/request | × null CPU | mean batch | failed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    null = {(r.model, r.in_flight): r for r in rows if r.server == "null"}
    for row in rows:
        rate = statistics.median(row.rates)
        cpu = statistics.median(row.cpu_us)
        base = null.get((row.model, row.in_flight))
        ratio = f"{rate / statistics.median(base.rates):.2f}" if base else "-"
        cpu_ratio = f"{cpu / statistics.median(base.cpu_us):.2f}" if base else "-"
        batch = f"{statistics.median(row.batch):.1f}" if row.batch else "-"
        best = "-"
        if base and row.model in ceilings and row.server != "null":
            possible = 1.0 / (1.0 / statistics.median(base.rates) + 1.0 / ceilings[row.model])
            best = f"{rate / possible:.0%}"
        lines.append(
            f"| {row.model} | {row.server} | {row.in_flight} | {rate:,.0f} | "
            f"{', '.join(f'{r:,.0f}' for r in row.rates)} | {ratio} | {best} | "
            f"{statistics.median(row.means_ms):.2f} ms | {cpu:.0f} µs | {cpu_ratio} | {batch} | "
            f"{row.failed} |"
        )
    return "\n".join(lines)


SERVERS = ("null", "1 process", "1 front end", "2 front ends", "no-batching")


def run_all(
    models: Sequence[BenchModel], servers: Sequence[str], in_flight: Sequence[int], args: argparse.Namespace
) -> list[Row]:
    """Every server of `servers` for each model, side by side, taking turns. `args`
    carries `rounds` and `requests`."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as config_dir:
        for model in models:
            null_argv = [sys.executable, "-m", "bench.null_server", "--output-width", str(model.out_width)]
            argvs = {
                "null": (null_argv, "null server listening"),
                "1 process": (pt2serve_argv(model, MAX_BATCH, 1, config_dir, frontends=0), "ready:"),
                "1 front end": (pt2serve_argv(model, MAX_BATCH, 1, config_dir, frontends=1), "ready:"),
                "2 front ends": (pt2serve_argv(model, MAX_BATCH, 1, config_dir, frontends=2), "ready:"),
                "no-batching": (pt2serve_argv(model, 1, 1, config_dir, frontends=2), "ready:"),
            }
            with ExitStack() as stack:
                running = {}
                for name in servers:
                    argv, ready = argvs[name]
                    process = stack.enter_context(server_process(argv, ready, env))
                    running[name] = (process.target, process.pid)
                rows += measure(model, running, in_flight, args)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="demo,ffn")
    parser.add_argument("--in-flight", default="64,1")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=20_000, help="per run at 64 in flight (1/6 at 1)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks-unary.md"), help="'' to skip")
    parser.add_argument("--servers", default=",".join(SERVERS), help="which of the servers to run")
    args = parser.parse_args()
    if shutil.which("h2load") is None:
        raise SystemExit("h2load not found: apt-get install nghttp2-client")
    models = [m for m in bench_models() if m.name in args.models.split(",")]
    in_flight = [int(n) for n in args.in_flight.split(",")]
    rows = run_all(models, args.servers.split(","), in_flight, args)
    table = report(rows)
    print(table)
    if args.out:
        pathlib.Path(args.out).write_text(document(table, args))
        print(f"wrote {args.out}")


def document(table: str, args: argparse.Namespace) -> str:
    return (
        "# Unary benchmark (h2load)\n\n"
        "Written by `python -m bench.unary` (see its docstring): single-row native `Run` "
        "requests, pre-serialised, from h2load; the servers run side by side and take "
        f"turns ({', '.join(args.servers.split(','))}), {args.rounds} rounds of "
        f"{args.requests:,} requests at 64 in flight "
        f"({max(args.requests // 6, 100):,} at 1). Only ratios within one run are "
        "meaningful: client and servers share the machine.\n\n"
        f"- Machine: {os.cpu_count()} CPUs; torch {torch.__version__}\n"
        f"- pt2serve: max_batch_size {MAX_BATCH}, num_runners 1, front ends as named (the engine "
        "behind them), default batching settings; no-batching: 2 front ends, max_batch_size 1\n\n"
        f"{table}\n"
    )


if __name__ == "__main__":
    main()
