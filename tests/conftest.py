"""Session fixtures: real `.pt2` packages, compiled once and cached.

Packages are specific to the torch version and CPU ISA, so they are built here,
cached under .cache/test-packages keyed by torch version, ISA and model source,
and never committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import json
import os
import pathlib
import shutil
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from pt2serve.loader.build import build_package, cached_package
from pt2serve.scheduler.manager import ModelConfig
from pt2serve.service.config import configure
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
    """Tests that take `running` (a server with the served models) or `layout` (to
    start servers of their own with `serving`) run once per layout."""
    marker = metafunc.definition.get_closest_marker("layouts")
    layouts = marker.args if marker is not None else LAYOUTS
    unknown = set(layouts) - set(LAYOUTS)
    assert not unknown, f"unknown layouts {unknown}"
    if "running" in metafunc.fixturenames:
        metafunc.parametrize("running", layouts, indirect=True)
    elif "layout" in metafunc.fixturenames:
        metafunc.parametrize("layout", layouts)


@dataclass
class Served:
    """A running server on one layout. `server` is the in-process Pt2Server on the
    one-process layout, else None; `log` is the log file where the server runs in
    processes of its own (else None: its records reach pytest's caplog)."""

    layout: str
    server: Pt2Server | None
    target: str
    model_root: pathlib.Path
    metrics_url: str
    log: pathlib.Path | None
    # Begin shutdown as SIGTERM does, and wait until it is over.
    shut_down: Callable[[], Awaitable[None]]

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


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | pathlib.Path):
        return json.dumps(str(value))
    return str(value)


def models_toml(models: tuple[ModelConfig, ...]) -> str:
    text = ""
    for m in models:
        text += f"[[models]]\nname = {_toml(m.name)}\npath = {_toml(m.package_path)}\n"
        text += f"num_runners = {m.num_runners}\n"
        if m.weights is not None:
            text += f"weights = {_toml(m.weights)}\nweights_label = {_toml(m.weights_label or '')}\n"
    return text


def _written(path: pathlib.Path, text: str) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@contextlib.asynccontextmanager
async def serving(
    layout: str, directory: pathlib.Path, models: tuple[ModelConfig, ...], **keys: object
) -> AsyncIterator[Served]:
    """A server on `layout` with `models` and the [server] `keys` of a config file
    (the same file on every layout: deploy/config.example.toml names them)."""
    from tests.fleet import Replica  # the subprocess helpers

    table = {"model_root": CACHE, "drain_grace_s": 5, **keys}
    lines = "".join(f"{key} = {_toml(value)}\n" for key, value in table.items())
    if layout == "one-process":
        text = f"[server]\ngrpc_port = 0\nmetrics_port = 0\n{lines}{models_toml(models)}"
        server = Pt2Server(configure(_written(directory / "server.toml", text)))
        await server.start()
        metrics = start_metrics_server("127.0.0.1", 0, server.registry)
        try:
            yield Served(
                layout,
                server,
                f"127.0.0.1:{server.port}",
                CACHE,
                f"http://127.0.0.1:{metrics.port}/metrics",
                None,
                server.stop,
            )
        finally:
            await server.stop(0, 0)
            metrics.shutdown()
        return
    replica = Replica(directory, "front-ends", f"frontends = 2\n{lines}{models_toml(models)}")
    replica.start()
    try:
        await asyncio.to_thread(replica.wait_ready)
        metrics_url = f"http://127.0.0.1:{replica.metrics_port}/metrics"

        async def shut_down() -> None:
            code = await asyncio.to_thread(replica.stop)
            assert code == 0, replica.log.read_text()[-3000:]

        yield Served(layout, None, replica.address, CACHE, metrics_url, replica.log, shut_down)
        await shut_down()
    finally:
        replica.kill()


@dataclass
class Running(Served):
    """`Served` with the served models, and a channel and stubs to it."""

    channel: grpc.aio.Channel
    loader: pb_grpc.ModelLoaderStub
    inference: pb_grpc.InferenceStub

    def load_constants(self, *requests: pb.LoadConstantsRequest) -> Any:
        """The client-streaming LoadConstants call with the given messages."""
        return self.loader.LoadConstants(iter(requests))

    @property
    def in_process(self) -> Pt2Server:
        assert self.server is not None, f"the {self.layout} layout has no in-process server"
        return self.server


def served_models(packages: Packages) -> tuple[ModelConfig, ...]:
    return (
        ModelConfig("demo", str(packages.demo), num_runners=2),
        ModelConfig("two", str(packages.two_input)),
        ModelConfig("vec", str(packages.unbatched)),
    )


@pytest.fixture
async def running(
    request: pytest.FixtureRequest, packages: Packages, tmp_path: pathlib.Path
) -> AsyncIterator[Running]:
    async with serving(request.param, tmp_path / "server", served_models(packages)) as served:
        channel = grpc.aio.insecure_channel(served.target)
        fields = {f.name: getattr(served, f.name) for f in dataclasses.fields(served)}
        stubs = {"loader": pb_grpc.ModelLoaderStub(channel), "inference": pb_grpc.InferenceStub(channel)}
        try:
            yield Running(**fields, channel=channel, **stubs)
        finally:
            await channel.close()


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
