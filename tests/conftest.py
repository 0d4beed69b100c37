"""Session fixtures: real `.pt2` packages, compiled once and cached.

Packages are specific to the torch version and CPU ISA, so they are built here,
cached under .cache/test-packages keyed by torch version, ISA and model source,
and never committed.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import pathlib
import shutil
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from pt2serve.loader.build import build_package, cached_package
from pt2serve.scheduler.manager import ModelConfig
from pt2serve.service.config import ServerConfig
from pt2serve.service.demo import demo_package
from pt2serve.service.metrics import start_metrics_server
from pt2serve.service.pb import pt2serve_pb2 as pb
from pt2serve.service.pb import pt2serve_pb2_grpc as pb_grpc
from pt2serve.service.server import Pt2Server
from tests import models

ROOT = pathlib.Path(__file__).resolve().parent.parent
CACHE = pathlib.Path(os.environ.get("PT2SERVE_TEST_CACHE", ROOT / ".cache" / "test-packages"))
MODELS_SOURCE = inspect.getsource(models)


def require_tool(name: str) -> str:
    """The path of an external tool. `make test` installs them (`make tools`); a
    missing one fails the test, naming what to install, and is never skipped."""
    path = shutil.which(name) or shutil.which(name, path=os.path.dirname(sys.executable))
    if path is None:
        pytest.fail(
            f"{name} is not installed: run `make tools` (Prometheus, promtool) or `pip install -e '.[dev]'`"
        )
    return path


@dataclass(frozen=True)
class Packages:
    demo: pathlib.Path
    two_input: pathlib.Path
    unbatched: pathlib.Path
    foreign: pathlib.Path
    static: pathlib.Path
    norm: pathlib.Path


def _build_two_input(path: pathlib.Path) -> None:
    build_package(
        models.make_two_input(),
        models.two_input_example(),
        path,
        max_batch_size=32,
        output_names=["mixed", "peak"],
        metadata={"owner": "tests"},
    )


def _build_unbatched(path: pathlib.Path) -> None:
    # Through the CLI, so `pt2serve build` is exercised on a real compile.
    from pt2serve.service.cli import main

    code = main(
        [
            "build",
            "tests.models:make_unbatched",
            "--example-input",
            "v=6",
            "--no-batch",
            "-o",
            str(path),
        ]
    )
    assert code == 0


def _build_foreign(path: pathlib.Path) -> None:
    """A package compiled without pt2serve: no schema in its metadata."""
    example = models.two_input_example()
    batch = torch.export.Dim("batch", min=1, max=16)
    exported = torch.export.export(
        models.make_two_input(),
        tuple(example.values()),
        dynamic_shapes={"features": {0: batch}, "ids": {0: batch}},
    )
    torch._inductor.aoti_compile_and_package(exported, package_path=str(path))


def _build_static(path: pathlib.Path) -> None:
    """The demo MLP compiled at exactly 4 rows: the server pads smaller batches."""
    from pt2serve.service.demo import demo_model

    build_package(demo_model(), {"x": torch.randn(4, 16)}, path, static_batch=4, output_names=["logits"])


def _build_norm(path: pathlib.Path) -> None:
    build_package(models.make_norm(), {"x": torch.randn(4, 8)}, path, max_batch_size=32, output_names=["y"])


@pytest.fixture(scope="session")
def packages() -> Packages:
    return Packages(
        demo=demo_package(CACHE),
        two_input=cached_package(CACHE, "two_input", [MODELS_SOURCE], _build_two_input),
        unbatched=cached_package(CACHE, "unbatched", [MODELS_SOURCE], _build_unbatched),
        foreign=cached_package(CACHE, "foreign", [MODELS_SOURCE], _build_foreign),
        static=cached_package(
            CACHE, "static", [MODELS_SOURCE, inspect.getsource(_build_static)], _build_static
        ),
        norm=cached_package(CACHE, "norm", [MODELS_SOURCE, inspect.getsource(_build_norm)], _build_norm),
    )


# The process layouts every public-contract test runs on: the one-process server and
# the engine behind front ends (the default on more than one CPU). A test of one
# layout's own behaviour names it: @pytest.mark.layouts("one-process").
LAYOUTS = ("one-process", "front-ends")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "layouts(*names): the process layouts a test using `running` runs on (default: all)"
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "running" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("layouts")
        layouts = marker.args if marker is not None else LAYOUTS
        unknown = set(layouts) - set(LAYOUTS)
        assert not unknown, f"unknown layouts {unknown}"
        metafunc.parametrize("running", layouts, indirect=True)


@dataclass
class Running:
    """A server with the served models, on one layout, and a channel to it.
    `server` is the in-process Pt2Server on the one-process layout, else None."""

    layout: str
    server: Pt2Server | None
    channel: grpc.aio.Channel
    loader: pb_grpc.ModelLoaderStub
    inference: pb_grpc.InferenceStub
    target: str
    model_root: pathlib.Path
    metrics_url: str
    # The server's log file, where it runs in processes of its own (else None:
    # its records reach pytest's caplog).
    log: pathlib.Path | None = None

    def load_constants(self, *requests: pb.LoadConstantsRequest) -> Any:
        """The client-streaming LoadConstants call with the given messages."""
        return self.loader.LoadConstants(iter(requests))

    @property
    def in_process(self) -> Pt2Server:
        assert self.server is not None, f"the {self.layout} layout has no in-process server"
        return self.server

    async def exposition(self) -> str:
        """/metrics as Prometheus scrapes it (every process of the layout)."""
        return await asyncio.to_thread(_scrape, self.metrics_url)

    async def metrics(self) -> Callable[..., float | None]:
        """One scrape of /metrics, read like `CollectorRegistry.get_sample_value`."""
        samples = {
            (sample.name, tuple(sorted(sample.labels.items()))): float(sample.value)
            for family in text_string_to_metric_families(await self.exposition())
            for sample in family.samples
        }

        def value(name: str, labels: dict[str, str] | None = None) -> float | None:
            return samples.get((name, tuple(sorted((labels or {}).items()))))

        return value

    async def metric(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        return (await self.metrics())(name, labels)


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as response:
        return str(response.read().decode())


def served_models(packages: Packages) -> tuple[ModelConfig, ...]:
    return (
        ModelConfig("demo", str(packages.demo), num_runners=2),
        ModelConfig("two", str(packages.two_input)),
        ModelConfig("vec", str(packages.unbatched)),
    )


def models_toml(models: tuple[ModelConfig, ...]) -> str:
    return "".join(
        f'[[models]]\nname = "{m.name}"\npath = "{m.package_path}"\nnum_runners = {m.num_runners}\n'
        for m in models
    )


@pytest.fixture
async def running(
    request: pytest.FixtureRequest, packages: Packages, tmp_path: pathlib.Path
) -> AsyncIterator[Running]:
    layout: str = request.param
    models = served_models(packages)
    if layout == "one-process":
        config = ServerConfig(grpc_port=0, metrics_port=0, model_root=str(CACHE), models=models)
        server: Pt2Server | None = Pt2Server(config)
        assert server is not None
        await server.start()
        metrics = start_metrics_server("127.0.0.1", 0, server.registry)
        target = f"127.0.0.1:{server.port}"
        metrics_url = f"http://127.0.0.1:{metrics.port}/metrics"
        stop: Any = server.stop
        log = None
    else:
        from tests.fleet import Replica  # the subprocess helpers

        server, metrics = None, None
        replica = Replica(
            tmp_path / "server",
            "front-ends",
            f'frontends = 2\nmodel_root = "{CACHE}"\ndrain_grace_s = 5\n' + models_toml(models),
        )
        replica.start()
        await asyncio.to_thread(replica.wait_ready)
        target = replica.address
        metrics_url = f"http://127.0.0.1:{replica.metrics_port}/metrics"
        log = replica.log

        async def stop(grace: float) -> None:
            try:
                code = await asyncio.to_thread(replica.stop)
                assert code == 0, replica.log.read_text()[-3000:]
            finally:
                replica.kill()

    channel = grpc.aio.insecure_channel(target)
    try:
        yield Running(
            layout,
            server,
            channel,
            pb_grpc.ModelLoaderStub(channel),
            pb_grpc.InferenceStub(channel),
            target,
            CACHE,
            metrics_url,
            log,
        )
    finally:
        await channel.close()
        await stop(0)
        if metrics is not None:
            metrics.shutdown()


@pytest.fixture
def eager_demo() -> Iterator[torch.nn.Module]:
    from pt2serve.service.demo import demo_model

    yield demo_model()


async def until(condition: object, what: str, limit_s: float = 30.0) -> None:
    """Poll `condition` every 10 ms, failing after `limit_s`: for server state that
    emits no event a client can wait on (queue depth; readiness is checked over the
    wire, as probes do)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if await condition():  # type: ignore[operator]
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")
