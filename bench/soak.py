"""Soak: pt2serve at saturation for 10 minutes, sampling its memory, queue and errors.

    python -m bench.soak                 # 10 minutes, writes docs/soak.md
    python -m bench.soak --minutes 1     # a shorter look

The load is closed-loop streaming with single-row requests on the demo model plus a
share of malformed requests (wrong shape) that must be refused. Every 10 s it records
the server's resident memory (from /proc) and pt2serve_queue_depth (from /metrics);
the client counts answers by status. It passes when resident memory after the first minute grows
by under 5% and no request fails other than the malformed ones.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import re
import sys
import tempfile
import time
import urllib.request

import grpc
import torch

from bench.run import CACHE, ROOT, server_process
from pt2serve.service import tensors
from pt2serve.service.demo import IN_FEATURES, demo_package
from pt2serve.service.pb import pt2serve_pb2 as pb

SAMPLE_S = 10.0


def rss_mb(pid: int) -> float:
    match = re.search(r"VmRSS:\s+(\d+) kB", pathlib.Path(f"/proc/{pid}/status").read_text())
    assert match
    return int(match.group(1)) / 1024


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(("pt2serve_queue_depth{", "pt2serve_inference_requests_total{")):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


async def load(target: str, stop: asyncio.Event, counts: dict[str, int], concurrency: int) -> None:
    good = [
        pb.RunRequest(
            model="demo", request_id="ok", inputs={"x": tensors.tensor_to_pb(torch.randn(1, IN_FEATURES))}
        )
        for _ in range(32)
    ]
    bad = pb.RunRequest(model="demo", request_id="bad", inputs={"x": tensors.tensor_to_pb(torch.randn(1, 3))})
    async with grpc.aio.insecure_channel(target) as channel:
        stub = channel.stream_stream(
            "/pt2serve.v1.Inference/RunStream",
            request_serializer=pb.RunRequest.SerializeToString,
            response_deserializer=pb.RunStreamResponse.FromString,
        )

        async def worker(w: int) -> None:
            call = stub(None)
            i = w
            while not stop.is_set():
                request = bad if i % 50 == 0 else good[i % len(good)]
                await call.write(request)
                answer: pb.RunStreamResponse = await call.read()  # type: ignore[assignment]
                if answer.WhichOneof("result") == "response":
                    kind = "ok"
                elif answer.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]:
                    kind = f"error:{answer.request_id}"
                else:
                    kind = f"other:{answer.request_id}:{answer.error.code}"
                counts[kind] = counts.get(kind, 0) + 1
                i += concurrency
            await call.done_writing()

        await asyncio.gather(*(worker(w) for w in range(concurrency)))


async def soak(
    target: str, pid: int, metrics_port: int, minutes: float, concurrency: int
) -> list[dict[str, float]]:
    stop = asyncio.Event()
    counts: dict[str, int] = {}
    task = asyncio.create_task(load(target, stop, counts, concurrency))
    samples = []
    started = time.monotonic()
    last = 0
    try:
        while (elapsed := time.monotonic() - started) < minutes * 60:
            await asyncio.sleep(SAMPLE_S)
            metrics = await asyncio.to_thread(scrape, metrics_port)
            done = sum(counts.values())
            sample = {
                "t": round(time.monotonic() - started),
                "rss_mb": rss_mb(pid),
                "queue": sum(v for k, v in metrics.items() if k.startswith("pt2serve_queue_depth")),
                "ok": counts.get("ok", 0),
                "refused_bad": counts.get("error:bad", 0),
                "other_errors": sum(v for k, v in counts.items() if k not in ("ok", "error:bad")),
                "rps": (done - last) / SAMPLE_S,
            }
            last = done
            samples.append(sample)
            print(sample, flush=True)
            del elapsed
    finally:
        stop.set()
        await task
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--out", default=str(ROOT / "docs" / "soak.md"))
    args = parser.parse_args()
    package = demo_package(CACHE)
    with tempfile.TemporaryDirectory() as tmp:
        metrics_port = 18502
        config = pathlib.Path(tmp) / "soak.toml"
        config.write_text(
            f"[server]\ngrpc_port = 0\nmetrics_port = {metrics_port}\n\n"
            f'[[models]]\nname = "demo"\npath = "{package}"\n'
        )
        argv = [sys.executable, "-m", "pt2serve.service.cli", "serve", "--config", str(config)]
        with server_process(argv, "ready:", dict(os.environ)) as server:
            samples = asyncio.run(
                soak(server.target, server.pid, metrics_port, args.minutes, args.concurrency)
            )
    warm = next((s for s in samples if s["t"] >= 60), samples[0])
    growth = (samples[-1]["rss_mb"] - warm["rss_mb"]) / warm["rss_mb"] * 100
    other = samples[-1]["other_errors"]
    lines = [
        "# Soak",
        "",
        f"Written by `python -m bench.soak --minutes {args.minutes:g}`: the demo model at saturation",
        f"({args.concurrency} streams, closed loop, single-row requests, 1 in 50 malformed) on",
        "this 2-core machine, sampled every 10 s. The load generator shares the machine.",
        "",
        f"- Resident memory after warm-up (t = {warm['t']:.0f} s): {warm['rss_mb']:.1f} MB; at the end: "
        f"{samples[-1]['rss_mb']:.1f} MB; growth {growth:+.2f}% (target < 5%: "
        f"{'met' if growth < 5 else 'missed'}).",
        f"- Requests answered: {samples[-1]['ok']:,} OK, {samples[-1]['refused_bad']:,} malformed "
        f"answered INVALID_ARGUMENT on their request id, {other:.0f} other errors.",
        "",
        "| t (s) | RSS (MB) | queue depth | req/s | OK (cumulative) | malformed refused | other errors |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *(
            f"| {s['t']:.0f} | {s['rss_mb']:.1f} | {s['queue']:.0f} | {s['rps']:,.0f} | {s['ok']:,.0f} | "
            f"{s['refused_bad']:,.0f} | {s['other_errors']:.0f} |"
            for s in samples
        ),
        "",
    ]
    pathlib.Path(args.out).write_text("\n".join(lines))
    print(lines[6])
    print(lines[7])


if __name__ == "__main__":
    main()
