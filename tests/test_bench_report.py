"""The benchmark report: verdicts and the estimate of what the machine allows are
computed from the samples, not written by hand."""

from __future__ import annotations

import argparse
import pathlib
from typing import Any

import torch

from bench.run import Sample, write_report


def sample(model: str, server: str, concurrency: int, throughput: float, p50_ms: float) -> Sample:
    return Sample(model, server, "stream", concurrency, throughput, p50_ms, p50_ms, p50_ms, None)


def test_report_ratios_and_machine_estimate(tmp_path: pathlib.Path) -> None:
    samples = [
        sample("ffn", "null", 64, 6000.0, 10.0),
        sample("ffn", "pt2serve", 64, 3000.0, 20.0),
        sample("ffn", "no-batching", 64, 600.0, 90.0),
        sample("ffn", "null", 1, 1000.0, 0.5),
        sample("ffn", "pt2serve", 1, 900.0, 0.7),
        sample("demo", "null", 64, 8000.0, 8.0),
        sample("demo", "pt2serve", 64, 6800.0, 9.0),
    ]
    args = argparse.Namespace(
        target_mode="stream", queue_delay_ms=0.0, runners=1, omp_threads=0, warmup=0.5, duration=2.0, rounds=3
    )
    out = tmp_path / "benchmarks.md"
    verdicts = write_report(samples, {"ffn": 12000.0, "demo": 2_000_000.0}, args, out)

    assert "| ffn: pt2serve / null at 64 in flight | 0.50× | ≥ 0.7× | missed |" in verdicts
    assert "| ffn: pt2serve / no-batching at 64 in flight | 5.00× | ≥ 4.0× | met |" in verdicts
    assert "| demo: pt2serve / null at 64 in flight | 0.85× | ≥ 0.8× | met |" in verdicts
    assert "| ffn: p50 at concurrency 1, pt2serve − null | +0.20 ms | ≤ 0.3 ms | met |" in verdicts
    text = out.read_text()
    # 1 / (1/6000 + 1/12000) = 4000 requests/s: two thirds of the null server.
    assert "| ffn | 6,000 | 12,000 | 4,000 | 0.67× |" in text
    assert "| demo | 8,000 | 2,000,000 | 7,968 | 1.00× |" in text
    assert out.with_suffix(".png").stat().st_size > 0


def test_h2load_output_is_parsed() -> None:
    from bench.unary import grpc_frame, parse_h2load

    output = """
finished in 8.96s, 2230.98 req/s, 219.41KB/s
requests: 20000 total, 20000 started, 20000 done, 19990 succeeded, 10 failed, 0 errored, 0 timeout
status codes: 20000 2xx, 0 3xx, 0 4xx, 0 5xx
                     min         max         mean         sd        +/- sd
time for request:      707us      4.91ms       881us       147us    91.07%
"""
    result = parse_h2load(output)
    assert (result.requests_per_s, result.succeeded, result.failed) == (2230.98, 19990, 10)
    assert abs(result.mean_ms - 0.881) < 1e-9
    assert grpc_frame(b"abc") == b"\x00\x00\x00\x00\x03abc"


def test_floor_frames_and_model_answers(packages: Any, eager_demo: torch.nn.Module) -> None:
    """bench.floor's floors answer as the model does, whatever the socket cuts."""
    from bench.floor import HEAD, Frames, load, run_model

    frames = Frames()
    stream = b"".join(HEAD.pack(i, len(p)) + p for i, p in ((1, b"abcd"), (2, b""), (3, b"\0" * 9)))
    got = [f for cut in range(0, len(stream), 5) for f in frames.feed(stream[cut : cut + 5])]
    assert got == [(1, b"abcd"), (2, b""), (3, b"\0" * 9)]

    row = torch.randn(1, 16)
    answer = run_model(load(str(packages.demo)), row.numpy().tobytes())
    expected = eager_demo(row)
    torch.testing.assert_close(torch.frombuffer(bytearray(answer), dtype=torch.float32).view(1, -1), expected)
