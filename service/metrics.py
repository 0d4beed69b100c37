"""Prometheus metrics: the `Telemetry` the scheduler reports to, a collector for
live state, the standard gRPC server metrics (applied by service/calls.py), and the
/metrics HTTP endpoint. Everything takes an explicit registry.

The metric list, with meanings and example PromQL, is in docs/metrics.md.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pt2serve.loader.errors import ErrorKind
from pt2serve.scheduler.manager import ModelManager

# Sub-millisecond buckets: queueing and overhead live there (the defaults start at 5 ms).
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
LOAD_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def grpc_code_name(kind: ErrorKind | None) -> str:
    return "OK" if kind is None else kind.name


class Metrics:
    """Implements scheduler.telemetry.Telemetry with Prometheus metrics."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._children: dict[tuple[Any, ...], Any] = {}
        # request_finished's two children by (model, outcome): one lookup a request.
        self._finished: dict[tuple[str, ErrorKind | None], tuple[Any, Any]] = {}
        r = registry
        self.requests = Counter(
            "pt2serve_inference_requests",
            "Inference requests answered, by gRPC status code.",
            ["model", "code"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "pt2serve_inference_request_duration_seconds",
            "Time from accepting a request to its answer (queue + compute + split).",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_seconds = Histogram(
            "pt2serve_queue_duration_seconds",
            "Time a request waited in the queue before its batch started.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.compute_seconds = Histogram(
            "pt2serve_compute_duration_seconds",
            "Time one batch took on a runner (concatenate, run, split).",
            ["model", "device"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_rows = Histogram(
            "pt2serve_batch_size_rows",
            "Rows per executed batch.",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.batches = Counter(
            "pt2serve_batches", "Batches executed, by outcome.", ["model", "device", "outcome"], registry=r
        )
        self.rows = Counter("pt2serve_inferred_rows", "Rows (samples) computed.", ["model"], registry=r)
        self.cancelled = Counter(
            "pt2serve_inference_cancelled_requests",
            "Requests whose caller went away before the answer.",
            ["model"],
            registry=r,
        )
        self.model_loads = Counter(
            "pt2serve_model_loads", "Model load attempts, by outcome.", ["model", "outcome"], registry=r
        )
        self.model_unloads = Counter("pt2serve_model_unloads", "Models unloaded.", ["model"], registry=r)
        self.load_seconds = Histogram(
            "pt2serve_model_load_duration_seconds",
            "Time to load a model package.",
            ["model"],
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self.constant_updates = Counter(
            "pt2serve_constant_updates",
            "Constant (weight) operations, by operation and outcome.",
            ["model", "operation", "outcome"],
            registry=r,
        )
        self.constant_update_seconds = Histogram(
            "pt2serve_constant_update_duration_seconds",
            "Time a constant operation took, waiting for running batches included.",
            ["model", "operation"],
            buckets=LOAD_BUCKETS,
            registry=r,
        )

    # Telemetry ------------------------------------------------------------
    # These run for every request on the event loop; `labels()` is a locked dict
    # lookup, so each label set's child is looked up once and kept.
    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def batch_finished(
        self,
        model: str,
        device: str,
        rows: int,
        queue_waits: Sequence[float],
        compute_seconds: float,
        ok: bool,
    ) -> None:
        queue = self._child(self.queue_seconds, model)
        for wait in queue_waits:
            queue.observe(wait)
        self._child(self.compute_seconds, model, device).observe(compute_seconds)
        self._child(self.batches, model, device, "success" if ok else "failure").inc()
        if ok:
            self._child(self.batch_rows, model).observe(rows)
            self._child(self.rows, model).inc(rows)

    def request_finished(self, model: str, outcome: ErrorKind | None, seconds: float) -> None:
        children = self._finished.get((model, outcome))
        if children is None:
            children = self._finished[model, outcome] = (
                self._child(self.requests, model, grpc_code_name(outcome)),
                self._child(self.request_seconds, model) if outcome is None else None,
            )
        count, latency = children
        count.inc()
        if latency is not None:
            latency.observe(seconds)

    def request_cancelled(self, model: str, seconds: float) -> None:
        self.cancelled.labels(model).inc()
        self.requests.labels(model, "CANCELLED").inc()

    def model_loaded(self, model: str, seconds: float, ok: bool) -> None:
        self.model_loads.labels(model, "success" if ok else "failure").inc()
        if ok:
            self.load_seconds.labels(model).observe(seconds)

    def model_unloaded(self, model: str) -> None:
        self.model_unloads.labels(model).inc()

    def constants_updated(self, model: str, operation: str, ok: bool, seconds: float, version: int) -> None:
        self.constant_updates.labels(model, operation, "success" if ok else "failure").inc()
        self.constant_update_seconds.labels(model, operation).observe(seconds)


class ModelStateCollector(Collector):
    """Live per-model state, read at scrape time."""

    def __init__(self, manager: ModelManager) -> None:
        self._manager = manager

    def collect(self) -> Iterator[GaugeMetricFamily]:
        ready = GaugeMetricFamily(
            "pt2serve_model_ready", "1 while the model is loaded and serving.", labels=["model"]
        )
        depth = GaugeMetricFamily(
            "pt2serve_queue_depth", "Requests waiting in the model's queue.", labels=["model"]
        )
        capacity = GaugeMetricFamily(
            "pt2serve_queue_capacity", "The model's max_queue_size.", labels=["model"]
        )
        in_flight = GaugeMetricFamily(
            "pt2serve_batches_in_flight", "Batches computing right now.", labels=["model"]
        )
        runners = GaugeMetricFamily(
            "pt2serve_runners", "Runners that can compute batches at once (all devices).", labels=["model"]
        )
        version = GaugeMetricFamily(
            "pt2serve_constants_version", "Version of the constants being served.", labels=["model"]
        )
        updated = GaugeMetricFamily(
            "pt2serve_constants_last_update_timestamp_seconds",
            "Unix time the served constants last changed (0: as compiled).",
            labels=["model"],
        )
        for model in self._manager.models():
            name = model.name
            ready.add_metric([name], 1.0)
            depth.add_metric([name], model.queue_depth)
            capacity.add_metric([name], model.batching.max_queue_size)
            in_flight.add_metric([name], model.batches_in_flight)
            runners.add_metric([name], model.runners)
            version.add_metric([name], model.constants_version)
            updated.add_metric([name], model.constants_updated_at)
        yield from (ready, depth, capacity, in_flight, runners, version, updated)
        yield GaugeMetricFamily(
            "pt2serve_cpu_contended",
            "1 while an event loop that feeds the schedulers is starved for CPU (batches then wait "
            "up to contended_delay_us for more rows).",
            value=1.0 if self._manager.registry.contention.contended else 0.0,
        )


class GrpcMetrics:
    """The standard gRPC server metrics (go-grpc-prometheus names and labels).
    `uncounted()` counts nothing: the engine's internal server, whose calls the
    front ends count already."""

    @classmethod
    def uncounted(cls) -> GrpcMetrics:
        metrics = cls.__new__(cls)
        metrics.counted = False
        return metrics

    def __init__(self, registry: CollectorRegistry) -> None:
        self.counted = True
        labels = ["grpc_type", "grpc_service", "grpc_method"]
        self.started = Counter(
            "grpc_server_started", "RPCs started on the server.", labels, registry=registry
        )
        self.handled = Counter(
            "grpc_server_handled", "RPCs completed on the server.", [*labels, "grpc_code"], registry=registry
        )
        self.received = Counter(
            "grpc_server_msg_received", "Stream messages received on the server.", labels, registry=registry
        )
        self.sent = Counter(
            "grpc_server_msg_sent", "Stream messages sent by the server.", labels, registry=registry
        )
        self.seconds = Histogram(
            "grpc_server_handling_seconds",
            "Time from the start of an RPC to its status.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

    def for_method(self, kind: str, service: str, method: str) -> MethodMetrics:
        return MethodMetrics(self, (kind, service, method))


class MethodMetrics:
    """One method's series, looked up once when the method is registered."""

    def __init__(self, metrics: GrpcMetrics, labels: tuple[str, str, str]) -> None:
        self._metrics = metrics
        self._labels = labels
        self._handled: dict[grpc.StatusCode, Any] = {}
        if not metrics.counted:
            self.started = self.received = self.sent = _NOT_COUNTED
            return
        self.started = metrics.started.labels(*labels)
        self.received = metrics.received.labels(*labels)
        self.sent = metrics.sent.labels(*labels)
        self._seconds = metrics.seconds.labels(*labels)

    def finish(self, started: float, code: grpc.StatusCode) -> None:
        if not self._metrics.counted:
            return
        handled = self._handled.get(code)
        if handled is None:
            handled = self._handled[code] = self._metrics.handled.labels(*self._labels, code.name)
        handled.inc()
        self._seconds.observe(time.perf_counter() - started)


class _NotCounted:
    def inc(self, amount: float = 1.0) -> None:
        pass


_NOT_COUNTED: Any = _NotCounted()


def register_metrics(registry: CollectorRegistry, manager: ModelManager) -> Metrics:
    """pt2serve's metrics and the live model state, in `registry`."""
    metrics = Metrics(registry)
    registry.register(ModelStateCollector(manager))
    return metrics


def new_registry(manager: ModelManager) -> tuple[CollectorRegistry, Metrics]:
    """A registry with pt2serve's metrics, live model state, process and platform metrics."""
    registry = CollectorRegistry()
    metrics = register_metrics(registry, manager)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry, metrics


class MergedCollector(Collector):
    """Several collectors' metrics as one: families of the same name become one
    family, and samples with the same name and labels are added up. The engine
    serves its own metrics (kept in memory) together with the front ends' (from
    prometheus_client's multiprocess files) this way; a counter or histogram that
    both count (requests refused by a front end, answered by the engine) is then one
    series, as in a single process."""

    def __init__(self, *sources: Collector) -> None:
        self._sources = sources

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        indexes: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], int]] = {}
        for source in self._sources:
            for family in source.collect():
                merged = families.get(family.name)
                if merged is None:
                    merged = Metric(family.name, family.documentation, family.type, family.unit)
                    families[family.name] = merged
                    indexes[family.name] = {}
                index = indexes[family.name]
                for sample in family.samples:
                    key = (sample.name, tuple(sorted(sample.labels.items())))
                    at = index.get(key)
                    if at is None:
                        index[key] = len(merged.samples)
                        merged.samples.append(sample)
                    else:
                        known = merged.samples[at]
                        merged.samples[at] = known._replace(value=known.value + sample.value)
        yield from families.values()


def multiprocess_values() -> None:
    """Make metrics created from now on write to prometheus_client's multiprocess
    files (`PROMETHEUS_MULTIPROC_DIR`), naming this process's files by a pid read
    once (and again after a fork) rather than by a getpid() system call on every
    increment, which prometheus_client's default makes: measured, the largest part
    of a metric update's cost in a front end (docs/performance.md)."""
    from prometheus_client import values

    pid = [os.getpid()]
    os.register_at_fork(after_in_child=lambda: pid.__setitem__(0, os.getpid()))
    values.ValueClass = values.MultiProcessValue(process_identifier=lambda: pid[0])  # type: ignore[no-untyped-call]


class MetricsServer:
    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self.port = server.server_port
        self._server = server
        self._thread = thread

    def shutdown(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def start_metrics_server(host: str, port: int, registry: CollectorRegistry) -> MetricsServer:
    server, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsServer(server, thread)
