"""The command line as a user runs it: real processes, real ports."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import signal
import stat
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
import torch

from pt2serve.loader.errors import InvalidInput
from pt2serve.service import tensors
from pt2serve.service.cli import loop_factory
from pt2serve.service.config import load_config
from pt2serve.service.demo import demo_model
from pt2serve.service.pb import pt2serve_pb2 as pb
from pt2serve.service.pb import pt2serve_pb2_grpc as pb_grpc
from pt2serve.service.server import Pt2Server
from tests import models
from tests.conftest import CACHE, Packages

ENV = {**os.environ, "PT2SERVE_CACHE_DIR": str(CACHE), "PYTHONUNBUFFERED": "1"}


def pt2serve(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pt2serve.service.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
        check=False,
    )


@pytest.fixture
def server(packages: Packages, tmp_path: pathlib.Path) -> subprocess.Popen[str]:
    """`pt2serve serve` with no model: the bundled demo (its package is cached)."""
    log = (tmp_path / "serve.log").open("w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pt2serve.service.cli", "serve", "--grpc-port", "0", "--metrics-port", "0"],
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
        env=ENV,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            text = pathlib.Path(log.name).read_text()
            if "ready:" in text:
                break
            time.sleep(0.1)
        text = pathlib.Path(log.name).read_text()
        match = re.search(r"gRPC listening on 127\.0\.0\.1:(\d+)", text)
        assert match and "ready:" in text, text
        proc.port = int(match.group(1))  # type: ignore[attr-defined]
        proc.log = log.name  # type: ignore[attr-defined]
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        log.close()


def test_serve_then_infer_matches_eager(server: subprocess.Popen[str], tmp_path: pathlib.Path) -> None:
    target = f"127.0.0.1:{server.port}"  # type: ignore[attr-defined]
    x = torch.randn(3, 16)
    np.save(tmp_path / "x.npy", x.numpy())
    result = pt2serve(
        "infer",
        "--target",
        target,
        "--model",
        "demo",
        "--input",
        f"x={tmp_path / 'x.npy'}",
        "--save",
        str(tmp_path / "out"),
    )
    assert result.returncode == 0, result.stderr
    assert "logits: float32[3, 4]" in result.stdout
    got = torch.from_numpy(np.load(tmp_path / "out" / "logits.npy"))
    torch.testing.assert_close(got, demo_model()(x))

    random = pt2serve("infer", "--target", target, "--model", "demo", "--rows", "2")
    assert random.returncode == 0, random.stderr
    assert "logits: float32[2, 4]" in random.stdout

    missing = pt2serve("infer", "--target", target, "--model", "nope")
    assert missing.returncode != 0 and "'nope' is not served" in missing.stderr

    server.send_signal(signal.SIGTERM)
    assert server.wait(timeout=30) == 0
    log = pathlib.Path(server.log).read_text()  # type: ignore[attr-defined]
    assert "serving the bundled demo model" in log and "loaded model 'demo'" in log
    assert "shutting down" in log and "stopped" in log
    assert "event loop: uvloop.Loop" in log  # uvloop is a dependency on Linux


def test_event_loop_choice(tmp_path: pathlib.Path) -> None:
    config = tmp_path / "loop.toml"
    config.write_text('[server]\nevent_loop = "asyncio"\n')
    assert load_config(config).event_loop == "asyncio"
    assert loop_factory("asyncio") is None
    assert loop_factory("auto") is not None and loop_factory("uvloop") is not None
    config.write_text('[server]\nevent_loop = "trio"\n')
    with pytest.raises(InvalidInput, match="event_loop must be one of auto, asyncio, uvloop"):
        load_config(config)


def test_inspect_reads_a_package_without_loading(packages: Packages) -> None:
    result = pt2serve("inspect", str(packages.two_input))
    assert result.returncode == 0, result.stderr
    assert "owner: tests" in result.stdout
    assert "input  features: float32[1..32, 8]" in result.stdout
    assert "input  ids: int64[1..32, 3]" in result.stdout
    assert "proj.weight" in result.stdout
    foreign = pt2serve("inspect", str(packages.foreign))
    assert "schema (derived; batched on dim 0, at most 16 rows per run)" in foreign.stdout
    missing = pt2serve("inspect", "/nonexistent.pt2")
    assert missing.returncode == 2 and "no package file" in missing.stderr


async def test_built_unbatched_package_serves_via_config(packages: Packages, tmp_path: pathlib.Path) -> None:
    """A config file (with the older _ms batching keys) serves the unbatched package:
    its answers equal the eager module."""
    config = tmp_path / "pt2serve.toml"
    config.write_text(
        f"""
[server]
grpc_port = 0
model_root = "{packages.unbatched.parent}"

[[models]]
name = "vec"
path = "{packages.unbatched.name}"
num_runners = 2

[models.batching]
max_queue_size = 7
default_timeout_ms = 250
"""
    )
    loaded = load_config(config)
    assert loaded.grpc_port == 0
    (model,) = loaded.models
    assert model.package_path == str(packages.unbatched) and model.num_runners == 2
    assert model.batching is not None and model.batching.max_queue_size == 7
    assert model.batching.default_timeout_us == 250_000
    server = Pt2Server(dataclasses.replace(loaded, metrics_port=0))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.InferenceStub(channel)
            for _ in range(3):
                v = torch.randn(6)
                request = pb.RunRequest(model="vec", inputs={"v": tensors.tensor_to_pb(v)})
                response = await stub.Run(request)
                (got,) = tensors.tensors_from_pb(response.outputs, "outputs").values()
                torch.testing.assert_close(got, models.make_unbatched()(v))
            status = (await pb_grpc.ModelLoaderStub(channel).ListModels(pb.ListModelsRequest())).models
            assert [(m.name, m.num_runners, m.batching.default_timeout_us) for m in status] == [
                ("vec", 2, 250_000)
            ]
    finally:
        await server.stop(0)


def test_config_rejects_unknown_keys(tmp_path: pathlib.Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[[models]]\nname = "a"\npath = "a.pt2"\nrunners = 2\n')
    with pytest.raises(InvalidInput, match=r"unknown key 'runners'"):
        load_config(config)


def test_constants_commands(server: subprocess.Popen[str], tmp_path: pathlib.Path) -> None:
    from safetensors.torch import save_file

    target = f"127.0.0.1:{server.port}"  # type: ignore[attr-defined]
    listed = pt2serve("constants", "list", "--target", target, "--model", "demo")
    assert listed.returncode == 0, listed.stderr
    assert "hidden.weight (" in listed.stdout and "float32[32, 16]" in listed.stdout
    model = demo_model()
    with torch.no_grad():
        model.hidden.weight.mul_(2)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    loaded = pt2serve(
        "constants",
        "load",
        "--target",
        target,
        "--model",
        "demo",
        "--file",
        str(tmp_path / "w.safetensors"),
        "--upload",
        "--swap",
        "--label",
        "doubled",
    )
    assert loaded.returncode == 0, loaded.stderr
    assert "serving version 1 (doubled)" in loaded.stdout
    assert "ignored (not constants of the model): out.bias" in loaded.stdout
    x = torch.randn(2, 16)
    np.save(tmp_path / "x.npy", x.numpy())
    result = pt2serve(
        "infer",
        "--target",
        target,
        "--model",
        "demo",
        "--input",
        f"x={tmp_path / 'x.npy'}",
        "--save",
        str(tmp_path / "out"),
    )
    assert result.returncode == 0, result.stderr
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "out" / "logits.npy")), model(x))
    outside = pt2serve("constants", "load", "--target", target, "--model", "demo", "--file", "/etc/passwd")
    assert outside.returncode == 1 and "PERMISSION_DENIED" in outside.stderr


def test_built_packages_are_readable_by_others(packages: Packages) -> None:
    """`pt2serve build` (which made this package) leaves the mode the umask gives a
    new file, not mkstemp's 0600: a container user other than the builder reads it."""
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(packages.unbatched).st_mode) == 0o666 & ~umask
