"""pt2serve benchmark: closed-loop load against real servers, as ratios from one run.

For each model (the tiny demo: overhead-bound; a feed-forward stack: compute-bound)
it measures, at each concurrency, unary and streaming:

- `null`: a server of the same gRPC stack that does no model work (the wall);
- `pt2serve`: dynamic batching on;
- `no-batching`: pt2serve with max_batch_size = 1;
- `ceiling`: the model called in-process at full batch (no server at all).

Every request carries one row. Results go to docs/benchmarks.md and a PNG plot.

    python -m bench.run                      # full run (~7 minutes on 2 cores)
    python -m bench.run --quick              # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import grpc
import torch

from bench.models import WIDTH, make_ffn
from pt2serve.loader.build import build_package, cached_package
from pt2serve.loader.package import LoadOptions, ModelPackage
from pt2serve.service import tensors
from pt2serve.service.config import default_frontends
from pt2serve.service.demo import IN_FEATURES, OUT_FEATURES, demo_package
from pt2serve.service.pb import grpc_service_pb2 as v2
from pt2serve.service.pb import pt2serve_pb2 as pb

ROOT = pathlib.Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "bench-packages"
MAX_BATCH = 64


@dataclasses.dataclass(frozen=True)
class BenchModel:
    name: str
    path: pathlib.Path
    in_width: int
    out_width: int


@dataclasses.dataclass(frozen=True)
class Sample:
    model: str
    server: str
    mode: str
    concurrency: int
    throughput: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_batch: float | None


def bench_models() -> list[BenchModel]:
    source = (ROOT / "bench" / "models.py").read_text()

    def build(path: pathlib.Path) -> None:
        build_package(make_ffn(), {"x": torch.randn(2, WIDTH)}, path, max_batch_size=256)

    ffn = cached_package(CACHE, "ffn", [source], build)
    return [
        BenchModel("demo", demo_package(CACHE), IN_FEATURES, OUT_FEATURES),
        BenchModel("ffn", ffn, WIDTH, WIDTH),
    ]


# ------------------------------------------------------------------ servers
@dataclasses.dataclass(frozen=True)
class RunningServer:
    target: str  # host:port
    pid: int


@contextmanager
def server_process(argv: list[str], ready: str, env: dict[str, str]) -> Iterator[RunningServer]:
    """Start a server process; yield it once `ready` appears in its log."""
    with tempfile.NamedTemporaryFile("w+", suffix=".log") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        try:
            deadline = time.monotonic() + 180
            text = ""
            while time.monotonic() < deadline and proc.poll() is None:
                text = pathlib.Path(log.name).read_text()
                if ready in text:
                    break
                time.sleep(0.1)
            match = re.search(r"listening on (127\.0\.0\.1:\d+)", text)
            if not match or ready not in text:
                raise RuntimeError(f"server did not start:\n{text}")
            yield RunningServer(match.group(1), proc.pid)
        finally:
            proc.terminate()
            proc.wait(timeout=60)


def pt2serve_argv(
    model: BenchModel,
    max_batch: int,
    runners: int,
    config_dir: str,
    queue_delay_ms: float = 0.0,
    frontends: int | None = None,
) -> list[str]:
    """`frontends` None: the default for this machine ("auto")."""
    config = pathlib.Path(config_dir) / f"{model.name}-{max_batch}-{frontends}.toml"
    config.write_text(
        f"""
[server]
grpc_port = 0
metrics_port = 0
frontends = {'"auto"' if frontends is None else frontends}

[[models]]
name = "{model.name}"
path = "{model.path}"
num_runners = {runners}

[models.batching]
max_batch_size = {max_batch}
max_queue_size = 4096
max_queue_delay_us = {round(queue_delay_ms * 1000) if max_batch > 1 else 0}
"""
    )
    return [sys.executable, "-m", "pt2serve.service.cli", "serve", "--config", str(config)]


# ------------------------------------------------------------------ load
def request_bytes(model: BenchModel, index: int, protocol: str = "native") -> bytes:
    x = torch.randn(1, model.in_width, generator=torch.Generator().manual_seed(index))
    if protocol == "v2":
        v2_request = v2.ModelInferRequest(model_name=model.name)
        v2_request.inputs.add(name="x", datatype="FP32", shape=[1, model.in_width])
        v2_request.raw_input_contents.append(x.numpy().tobytes())
        return v2_request.SerializeToString()
    request = pb.RunRequest(model=model.name, inputs={"x": tensors.tensor_to_pb(x)})
    return request.SerializeToString()


# mode -> (unary method, streaming method); "v2-*" modes use the KServe v2 endpoint.
METHODS = {
    "unary": "/pt2serve.v1.Inference/Run",
    "stream": "/pt2serve.v1.Inference/RunStream",
    "v2-unary": "/inference.GRPCInferenceService/ModelInfer",
    "v2-stream": "/inference.GRPCInferenceService/ModelStreamInfer",
}


def model_counters(target: str, model: str) -> tuple[int, int] | None:
    """(batches, rows) so far, or None for a server without statistics."""
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(
            "/pt2serve.v1.ModelLoader/ListModels",
            request_serializer=pb.ListModelsRequest.SerializeToString,
            response_deserializer=pb.ListModelsResponse.FromString,
        )
        try:
            response = call(pb.ListModelsRequest(), timeout=10)
        except grpc.RpcError:
            return None
    for status in response.models:
        if status.name == model:
            return status.statistics.batches, status.statistics.rows
    return None


async def closed_loop(
    target: str, mode: str, payloads: list[bytes], concurrency: int, warmup: float, duration: float
) -> tuple[float, list[float]]:
    """`concurrency` workers, each with one request in flight; (requests/s, latencies)."""
    options = [("grpc.max_receive_message_length", 1 << 28), ("grpc.max_send_message_length", 1 << 28)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        await channel.channel_ready()
        loop = asyncio.get_running_loop()
        start = loop.time() + warmup
        end = start + duration
        latencies: list[float] = []

        async def unary(worker: int) -> None:
            call = channel.unary_unary(METHODS[mode], None, None)
            i = worker
            while (now := loop.time()) < end:
                await call(payloads[i % len(payloads)])
                done = loop.time()
                if now >= start:
                    latencies.append(done - now)
                i += concurrency

        async def stream(worker: int) -> None:
            call = channel.stream_stream(METHODS[mode], None, None)(None)
            i = worker
            while (now := loop.time()) < end:
                await call.write(payloads[i % len(payloads)])
                answer: bytes = await call.read()  # type: ignore[assignment]
                done = loop.time()
                if i < concurrency:
                    _check_stream_answer(mode, answer)
                if now >= start:
                    latencies.append(done - now)
                i += concurrency
            await call.done_writing()

        worker = stream if mode.endswith("stream") else unary
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return len(latencies) / duration, latencies


def _check_stream_answer(mode: str, answer: bytes) -> None:
    if mode == "v2-stream":
        message = v2.ModelStreamInferResponse.FromString(answer).error_message
    else:
        message = pb.RunStreamResponse.FromString(answer).error.message
    if message:
        raise RuntimeError(message)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3


def measure_once(
    model: BenchModel,
    server: str,
    target: str,
    mode: str,
    payloads: list[bytes],
    concurrency: int,
    warmup: float,
    duration: float,
) -> Sample:
    before = model_counters(target, model.name)
    throughput, latencies = asyncio.run(closed_loop(target, mode, payloads, concurrency, warmup, duration))
    after = model_counters(target, model.name)
    mean_batch = None
    if before is not None and after is not None and after[0] > before[0]:
        mean_batch = (after[1] - before[1]) / (after[0] - before[0])
    return Sample(
        model.name,
        server,
        mode,
        concurrency,
        throughput,
        percentile(latencies, 0.5),
        percentile(latencies, 0.9),
        percentile(latencies, 0.99),
        mean_batch,
    )


def median_sample(samples: list[Sample]) -> Sample:
    """Each figure's median over rounds (the machine's noise comes in bursts)."""

    def mid(values: list[float]) -> float:
        return statistics.median(values)

    batches = [s.mean_batch for s in samples if s.mean_batch is not None]
    first = samples[0]
    return dataclasses.replace(
        first,
        throughput=mid([s.throughput for s in samples]),
        p50_ms=mid([s.p50_ms for s in samples]),
        p90_ms=mid([s.p90_ms for s in samples]),
        p99_ms=mid([s.p99_ms for s in samples]),
        mean_batch=mid(batches) if batches else None,
    )


def measure(
    model: BenchModel,
    targets: dict[str, str],
    modes: list[str],
    concurrencies: list[int],
    warmup: float,
    duration: float,
    rounds: int,
) -> list[Sample]:
    """Every point on every server, the servers taking turns `rounds` times, so
    the figures compared in a ratio were measured minutes apart at most."""
    samples = []
    for mode in modes:
        payloads = [request_bytes(model, i, "v2" if mode.startswith("v2") else "native") for i in range(64)]
        for concurrency in concurrencies:
            taken: dict[str, list[Sample]] = {server: [] for server in targets}
            for _ in range(rounds):
                for server, target in targets.items():
                    if mode.startswith("v2") and server == "null":
                        continue  # the null server speaks only the native protocol
                    taken[server].append(
                        measure_once(model, server, target, mode, payloads, concurrency, warmup, duration)
                    )
            for server, runs in taken.items():
                if not runs:
                    continue
                sample = median_sample(runs)
                print(
                    f"{model.name:5} {server:12} {mode:9} c={concurrency:<4} {sample.throughput:8.0f} req/s  "
                    f"p50 {sample.p50_ms:6.2f} ms  p99 {sample.p99_ms:6.2f} ms  "
                    f"batch {'-' if sample.mean_batch is None else f'{sample.mean_batch:.1f}'}  "
                    f"(median of {len(runs)}: {', '.join(f'{r.throughput:.0f}' for r in runs)} req/s)",
                    flush=True,
                )
                samples.append(sample)
    return samples


def ceiling(model: BenchModel, runners: int, duration: float) -> float:
    """Rows/s with the model called in-process at full batch from `runners` threads."""
    package = ModelPackage.load(str(model.path), LoadOptions(num_runners=runners))
    x = torch.randn(MAX_BATCH, model.in_width)
    package.run([x.clone()])
    counts = [0] * runners
    stop = time.perf_counter() + duration

    def work(slot: int) -> None:
        while time.perf_counter() < stop:
            package.run([x.clone()])
            counts[slot] += 1

    threads = [threading.Thread(target=work, args=(i,)) for i in range(runners)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    package.close()
    return sum(counts) * MAX_BATCH / elapsed


def ceiling_in_subprocess(model: BenchModel, runners: int, duration: float, env: dict[str, str]) -> float:
    """`ceiling` in a fresh process, so it runs with the servers' OpenMP settings."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.run",
            "--ceiling-of",
            str(model.path),
            str(model.in_width),
            str(runners),
            str(duration),
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ report
def write_report(
    samples: list[Sample],
    ceilings: dict[str, float],
    args: argparse.Namespace,
    out: pathlib.Path,
    unary_table: str = "",
) -> list[str]:
    def find(model: str, server: str, mode: str, concurrency: int) -> Sample | None:
        for s in samples:
            if (s.model, s.server, s.mode, s.concurrency) == (model, server, mode, concurrency):
                return s
        return None

    verdicts = []

    def ratio(label: str, num: Sample | None, den: Sample | None, target: float) -> None:
        if num is None or den is None:
            return
        value = num.throughput / den.throughput
        verdicts.append(
            f"| {label} | {value:.2f}× | ≥ {target}× | {'met' if value >= target else 'missed'} |"
        )

    mode = args.target_mode
    for model in ("ffn", "demo"):
        null64 = find(model, "null", mode, 64)
        ratio(
            f"{model}: pt2serve / null at 64 in flight",
            find(model, "pt2serve", mode, 64),
            null64,
            0.7 if model == "ffn" else 0.8,
        )
        if model == "ffn":
            ratio(
                f"{model}: pt2serve / no-batching at 64 in flight",
                find(model, "pt2serve", mode, 64),
                find(model, "no-batching", mode, 64),
                4.0,
            )
    for model in ("demo", "ffn"):
        a, b = find(model, "pt2serve", mode, 1), find(model, "null", mode, 1)
        if a and b:
            delta = a.p50_ms - b.p50_ms
            verdicts.append(
                f"| {model}: p50 at concurrency 1, pt2serve − null | {delta:+.2f} ms | ≤ 0.3 ms | "
                f"{'met' if delta <= 0.3 else 'missed'} |"
            )

    # What any server could reach here: one that costs no more per request than the
    # null server and runs every row at the in-process ceiling. When the null server
    # keeps both cores busy (bench.cpu_per_request: about 90 %), its CPU per request is
    # 1/N of the machine and a row at the ceiling 1/C, so the best is 1/(1/N + 1/C).
    bounds = []
    for model, ceiling in ceilings.items():
        null64 = find(model, "null", mode, 64)
        if null64 is not None:
            best = 1.0 / (1.0 / null64.throughput + 1.0 / ceiling)
            bounds.append(
                f"| {model} | {null64.throughput:,.0f} | {ceiling:,.0f} | {best:,.0f} | "
                f"{best / null64.throughput:.2f}× |"
            )

    lines = [
        "# Benchmarks",
        "",
        "Written by `python -m bench.run` (see its docstring). Closed-loop load: each of",
        "`concurrency` client workers keeps one single-row request in flight. Client and server",
        "share the machine, so only ratios from one run are meaningful. Where the time goes,",
        "and why targets are missed on a 2-core machine: [performance.md](performance.md).",
        "",
        f"- Machine: {os.cpu_count()} CPUs; torch {torch.__version__}; "
        f"ISA {torch.backends.cpu.get_cpu_capability()}",
        f'- pt2serve (streams section): the default process layout (`frontends = "auto"`: '
        f"{default_frontends()} front end(s) here), max_batch_size {MAX_BATCH}, "
        f"max_queue_delay {args.queue_delay_ms} ms, "
        f"num_runners {args.runners}, "
        f"OMP_NUM_THREADS={args.omp_threads or 'unset'}; "
        f"{args.warmup:g} s warm-up and {args.duration:g} s measured per sample; each point is the "
        f"median of {args.rounds} samples, the three servers running side by side and taking turns",
        "- Models: `demo` (16→32→4 MLP, overhead-bound); `ffn` (two 512→2048→512 feed-forward "
        "blocks, 17 MB of weights, compute-bound)",
        "",
        *(
            [
                "## Unary, from h2load (the primary mode)",
                "",
                "Single-row native `Run` requests, pre-serialised, from h2load (64 in flight = 4",
                "connections × 16 streams; 1 in flight). Servers: the null server (one process);",
                "pt2serve in one process; pt2serve with an engine process behind 1 and 2 front",
                "ends; batching off (2 front ends, max_batch_size 1). CPU/request: user + system",
                "CPU of every process of the server (supervisor, engine, front ends) per answered",
                f"request. Medians of {args.rounds} rounds of {args.unary_requests:,} requests",
                "(1/6 as many at 1 in flight), the servers taking turns. × best possible: the",
                "share of 1/(1/N + 1/C) below.",
                "",
                unary_table,
                "",
            ]
            if unary_table
            else []
        ),
        "## Streams: targets (ratios from this run, " + mode + ")",
        "",
        "| what | measured | target | |",
        "| --- | --- | --- | --- |",
        *verdicts,
        "",
        "## In-process ceiling (model called directly at full batch, no server)",
        "",
        "| model | rows/s |",
        "| --- | --- |",
        *(f"| {m} | {v:,.0f} |" for m, v in ceilings.items()),
        "",
        "## What this machine allows at 64 in flight (estimate)",
        "",
        "A server that costs no more CPU per request than the null server, and runs every row",
        "at the in-process ceiling (full batches, no waiting), would reach 1/(1/N + 1/C)",
        "requests/s, N being the null server's rate and C the ceiling: both use the same two",
        "cores, which the null server alone keeps about 90 % busy (`python -m bench.cpu_per_request`).",
        "Real batches at 64 in flight are smaller than full, so real servers stay below this.",
        "",
        "| model | null req/s (N) | ceiling rows/s (C) | best possible req/s | best / null |",
        "| --- | --- | --- | --- | --- |",
        *bounds,
        "",
        "## All points",
        "",
        "| model | server | mode | concurrency | req/s | p50 ms | p90 ms | p99 ms | mean batch |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in samples:
        batch = "" if s.mean_batch is None else f"{s.mean_batch:.1f}"
        lines.append(
            f"| {s.model} | {s.server} | {s.mode} | {s.concurrency} | {s.throughput:,.0f} | "
            f"{s.p50_ms:.2f} | {s.p90_ms:.2f} | {s.p99_ms:.2f} | {batch} |"
        )
    lines += ["", "![throughput by concurrency](benchmarks.png)", ""]
    out.write_text("\n".join(lines))
    plot(samples, ceilings, out.with_suffix(".png"))
    return verdicts


def plot(samples: list[Sample], ceilings: dict[str, float], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({s.model for s in samples})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        for server in ("null", "pt2serve", "no-batching"):
            for mode, style in (("unary", "-"), ("stream", "--")):
                points = sorted(
                    (s.concurrency, s.throughput)
                    for s in samples
                    if (s.model, s.server, s.mode) == (model, server, mode)
                )
                if points:
                    xs, ys = zip(*points, strict=True)
                    ax.plot(xs, ys, style, marker="o", label=f"{server} ({mode})")
        highest = max((s.throughput for s in samples if s.model == model), default=0.0)
        if model in ceilings and ceilings[model] <= 3 * highest:
            ax.axhline(ceilings[model], color="grey", linestyle=":", label="in-process ceiling (rows/s)")
        elif model in ceilings:
            ax.set_title(f"{model} (in-process ceiling {ceilings[model]:,.0f} rows/s, off scale)")
        ax.set_xscale("log", base=2)
        if not ax.get_title():
            ax.set_title(model)
        ax.set_xlabel("requests in flight")
        ax.set_ylabel("requests/s (1 row each)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="short smoke run")
    parser.add_argument("--duration", type=float, default=2.0, help="seconds measured per sample")
    parser.add_argument(
        "--rounds", type=int, default=3, help="samples per point; the servers take turns, medians reported"
    )
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--concurrency", default="1,8,64,128")
    parser.add_argument("--modes", default="unary,stream")
    parser.add_argument("--models", default="demo,ffn")
    parser.add_argument("--runners", type=int, default=1)
    parser.add_argument("--queue-delay-ms", type=float, default=0.0, help="pt2serve's max_queue_delay")
    parser.add_argument("--omp-threads", type=int, default=0, help="OMP_NUM_THREADS for servers (0: unset)")
    parser.add_argument("--target-mode", default="stream", choices=["unary", "stream"])
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    parser.add_argument(
        "--unary-requests",
        type=int,
        default=20_000,
        help="h2load requests per unary run at 64 in flight (0: skip the h2load unary section)",
    )
    parser.add_argument(
        "--ceiling-of", nargs=4, metavar=("PATH", "WIDTH", "RUNNERS", "SECONDS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.ceiling_of:
        path, width, runners, seconds = args.ceiling_of
        model = BenchModel("ceiling", pathlib.Path(path), int(width), 0)
        print(ceiling(model, int(runners), float(seconds)))
        return
    if args.quick:
        args.duration, args.warmup, args.concurrency, args.rounds = 1.0, 0.3, "1,64", 1
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    modes = args.modes.split(",")
    env = dict(os.environ)
    if args.omp_threads:
        env["OMP_NUM_THREADS"] = str(args.omp_threads)
    wanted = set(args.models.split(","))
    samples: list[Sample] = []
    ceilings: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as config_dir:
        for model in (m for m in bench_models() if m.name in wanted):
            ceilings[model.name] = ceiling_in_subprocess(model, args.runners, min(args.duration, 3.0), env)
            print(f"{model.name}: in-process ceiling {ceilings[model.name]:,.0f} rows/s", flush=True)
            servers: list[tuple[str, list[str], str]] = [
                (
                    "null",
                    [sys.executable, "-m", "bench.null_server", "--output-width", str(model.out_width)],
                    "null server listening",
                ),
                (
                    "pt2serve",
                    pt2serve_argv(model, MAX_BATCH, args.runners, config_dir, args.queue_delay_ms),
                    "ready:",
                ),
                ("no-batching", pt2serve_argv(model, 1, args.runners, config_dir), "ready:"),
            ]
            with ExitStack() as stack:
                targets = {
                    server: stack.enter_context(server_process(argv, ready, env)).target
                    for server, argv, ready in servers
                }
                samples += measure(
                    model, targets, modes, concurrencies, args.warmup, args.duration, args.rounds
                )
    unary_table = ""
    if args.unary_requests:
        # The primary mode: unary, as most clients call, from h2load (bench/unary.py).
        from bench import unary

        if shutil.which("h2load") is None:
            raise SystemExit("h2load not found (apt-get install nghttp2-client), or pass --unary-requests 0")
        unary_args = argparse.Namespace(rounds=args.rounds, requests=args.unary_requests)
        models = [m for m in bench_models() if m.name in wanted]
        rows = unary.run_all(models, unary.SERVERS, [64, 1], unary_args)
        unary_table = unary.report(rows, ceilings)
        print(unary_table, flush=True)
    verdicts = write_report(samples, ceilings, args, pathlib.Path(args.out), unary_table)
    print("\n".join(verdicts))


if __name__ == "__main__":
    main()
