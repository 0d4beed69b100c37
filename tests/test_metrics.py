"""Metrics: unit tests on a fresh registry, the live server's exposition, promtool,
and a real Prometheus server scraping a running pt2serve."""

from __future__ import annotations

import asyncio
import json
import pathlib
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import grpc
import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pt2serve.loader.errors import ErrorKind
from pt2serve.service import tensors
from pt2serve.service.metrics import MergedCollector, Metrics
from pt2serve.service.pb import pt2serve_pb2 as pb
from tests.conftest import Running, require_tool
from tests.test_service import expect_error, run_request


def test_metrics_record_into_a_fresh_registry() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.batch_finished("m", "cpu", 3, [0.001, 0.002], 0.004, True)
    metrics.batch_finished("m", "cpu", 1, [0.0001], 0.0, False)
    metrics.request_finished("m", None, 0.01)
    metrics.request_finished("m", ErrorKind.INVALID_ARGUMENT, 0.0)
    metrics.request_cancelled("m", 0.5)
    metrics.model_loaded("m", 1.5, True)
    metrics.constants_updated("m", "load_constants", False, 0.1, 0)
    value = registry.get_sample_value
    assert value("pt2serve_batch_size_rows_count", {"model": "m"}) == 1
    assert value("pt2serve_batch_size_rows_sum", {"model": "m"}) == 3
    assert value("pt2serve_inferred_rows_total", {"model": "m"}) == 3
    assert value("pt2serve_queue_duration_seconds_count", {"model": "m"}) == 3
    assert value("pt2serve_queue_duration_seconds_bucket", {"model": "m", "le": "0.0001"}) == 1
    assert value("pt2serve_batches_total", {"model": "m", "device": "cpu", "outcome": "failure"}) == 1
    assert value("pt2serve_inference_requests_total", {"model": "m", "code": "OK"}) == 1
    assert value("pt2serve_inference_requests_total", {"model": "m", "code": "INVALID_ARGUMENT"}) == 1
    assert value("pt2serve_inference_requests_total", {"model": "m", "code": "CANCELLED"}) == 1
    assert value("pt2serve_model_loads_total", {"model": "m", "outcome": "success"}) == 1
    labels = {"model": "m", "operation": "load_constants", "outcome": "failure"}
    assert value("pt2serve_constant_updates_total", labels) == 1


async def produce_traffic(running: Running) -> None:
    """5 good requests, 1 bad input, 1 unknown model, 1 good and 1 bad constant update."""
    for _ in range(5):
        await running.inference.Run(run_request("demo", x=torch.randn(2, 16)))
    await expect_error(
        running.inference.Run(run_request("demo", x=torch.randn(2, 3))), grpc.StatusCode.INVALID_ARGUMENT
    )
    await expect_error(
        running.inference.Run(run_request("nope", x=torch.randn(2, 3))), grpc.StatusCode.NOT_FOUND
    )
    weight = tensors.tensor_to_pb(torch.zeros(32, 16))
    await running.load_constants(pb.LoadConstantsRequest(name="demo", constants={"hidden.weight": weight}))
    bad = tensors.tensor_to_pb(torch.zeros(3, 3))
    await expect_error(
        running.load_constants(pb.LoadConstantsRequest(name="demo", constants={"hidden.weight": bad})),
        grpc.StatusCode.INVALID_ARGUMENT,
    )


def test_merged_collector_adds_up_the_same_series_from_every_source() -> None:
    engine, front_end = CollectorRegistry(), CollectorRegistry()
    for registry, answered, refused in ((engine, 3, 0), (front_end, 0, 2)):
        metrics = Metrics(registry)
        for _ in range(answered):
            metrics.request_finished("m", None, 0.002)
        for _ in range(refused):
            metrics.request_finished("m", ErrorKind.INVALID_ARGUMENT, 0.0)
    front_end_only = CollectorRegistry()
    Metrics(front_end_only).request_finished("other", None, 0.5)
    merged = CollectorRegistry()
    merged.register(MergedCollector(engine, front_end, front_end_only))
    text = generate_latest(merged).decode()
    types = [line for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(types) == len(set(types))
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    requests = "pt2serve_inference_requests_total"
    assert samples[(requests, (("code", "OK"), ("model", "m")))] == 3
    assert samples[(requests, (("code", "INVALID_ARGUMENT"), ("model", "m")))] == 2
    assert samples[(requests, (("code", "OK"), ("model", "other")))] == 1
    duration = "pt2serve_inference_request_duration_seconds"
    assert samples[(f"{duration}_count", (("model", "m"),))] == 3
    assert samples[(f"{duration}_bucket", (("le", "0.0025"), ("model", "m")))] == 3
    assert samples[(f"{duration}_bucket", (("le", "0.001"), ("model", "m")))] == 0


async def test_server_exports_what_happened(running: Running) -> None:
    await produce_traffic(running)
    value = await running.metrics()
    assert value("pt2serve_inference_requests_total", {"model": "demo", "code": "OK"}) == 5
    assert value("pt2serve_inference_requests_total", {"model": "demo", "code": "INVALID_ARGUMENT"}) == 1
    assert value("pt2serve_inference_requests_total", {"model": "_unknown", "code": "NOT_FOUND"}) == 1
    assert value("pt2serve_inferred_rows_total", {"model": "demo"}) == 10
    assert value("pt2serve_inference_request_duration_seconds_count", {"model": "demo"}) == 5
    ok = {"model": "demo", "operation": "load_constants", "outcome": "success"}
    failed = {**ok, "outcome": "failure"}
    assert value("pt2serve_constant_updates_total", ok) == 1
    assert value("pt2serve_constant_updates_total", failed) == 1
    assert value("pt2serve_constants_version", {"model": "demo"}) == 1
    assert value("pt2serve_constants_last_update_timestamp_seconds", {"model": "demo"}) == pytest.approx(
        time.time(), abs=60
    )
    assert value("pt2serve_model_ready", {"model": "two"}) == 1
    assert value("pt2serve_queue_depth", {"model": "demo"}) == 0
    assert value("pt2serve_runners", {"model": "demo"}) == 2
    assert value("pt2serve_model_loads_total", {"model": "demo", "outcome": "success"}) == 1
    grpc_labels = {"grpc_type": "unary", "grpc_service": "pt2serve.v1.Inference", "grpc_method": "Run"}
    assert value("grpc_server_started_total", grpc_labels) == 7
    assert value("grpc_server_handled_total", {**grpc_labels, "grpc_code": "OK"}) == 5
    assert value("grpc_server_handled_total", {**grpc_labels, "grpc_code": "INVALID_ARGUMENT"}) == 1
    assert value("grpc_server_handled_total", {**grpc_labels, "grpc_code": "NOT_FOUND"}) == 1
    assert value("grpc_server_handling_seconds_count", grpc_labels) == 7
    assert value("process_resident_memory_bytes") is not None


async def test_stream_messages_are_counted(running: Running) -> None:
    async def requests():  # type: ignore[no-untyped-def]
        for i in range(4):
            yield run_request("demo", f"r{i}", x=torch.randn(1, 16))

    answers = [r async for r in running.inference.RunStream(requests())]
    assert len(answers) == 4
    labels = {"grpc_type": "bidi_stream", "grpc_service": "pt2serve.v1.Inference", "grpc_method": "RunStream"}
    value = await running.metrics()
    assert value("grpc_server_msg_received_total", labels) == 4
    assert value("grpc_server_msg_sent_total", labels) == 4
    assert value("grpc_server_handled_total", {**labels, "grpc_code": "OK"}) == 1
    assert value("pt2serve_inference_requests_total", {"model": "demo", "code": "OK"}) == 4


async def test_promtool_accepts_the_exposition(running: Running, tmp_path: pathlib.Path) -> None:
    promtool = require_tool("promtool")
    await produce_traffic(running)
    exposition = (await running.exposition()).encode()
    result = await asyncio.to_thread(
        subprocess.run, [promtool, "check", "metrics"], input=exposition, capture_output=True, check=False
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prometheus_query(port: int, query: str) -> float | None:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=5) as response:
        body = json.load(response)
    result = body["data"]["result"]
    return float(result[0]["value"][1]) if result else None


async def test_real_prometheus_scrapes_the_server(running: Running, tmp_path: pathlib.Path) -> None:
    prometheus = require_tool("prometheus")
    scraped = urllib.parse.urlsplit(running.metrics_url).netloc
    web_port = free_port()
    (tmp_path / "prometheus.yml").write_text(
        f"""
global:
  scrape_interval: 1s
scrape_configs:
  - job_name: pt2serve
    static_configs:
      - targets: ["{scraped}"]
"""
    )
    proc = await asyncio.create_subprocess_exec(
        prometheus,
        f"--config.file={tmp_path / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{web_port}",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await produce_traffic(running)
        queries = {
            'sum(pt2serve_inference_requests_total{model="demo",code="OK"})': 5.0,
            'sum(pt2serve_constant_updates_total{model="demo",outcome="success"})': 1.0,
            'sum(pt2serve_constant_updates_total{model="demo",outcome="failure"})': 1.0,
        }
        seen: dict[str, float | None] = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                seen = {q: await asyncio.to_thread(prometheus_query, web_port, q) for q in queries}
            except OSError:
                seen = {}
            if seen == queries:
                break
            await asyncio.sleep(0.5)
        assert seen == queries
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), timeout=30)
