"""Staged swaps of a model with buffers (BatchNorm running statistics, a registered
buffer). The runtime copies every buffer a staging call leaves out from the active
buffer, so staging constant by constant used to serve new parameters with the old
statistics. Every entry point must serve exactly the new weight set after a swap."""

from __future__ import annotations

import asyncio
import pathlib
import shutil
import tempfile
from collections.abc import Awaitable, Callable

import pytest
import torch
from safetensors.torch import save_file

from pt2serve.service.cli import main as cli_main
from pt2serve.service.client import constant_messages
from pt2serve.service.pb import pt2serve_pb2 as pb
from tests import models
from tests.conftest import Packages, Running
from tests.test_constants import swap_under_stream
from tests.test_service import outputs_of, run_request

NEW_SEED = 11


def state_of(module: torch.nn.Module, fqns: list[str]) -> dict[str, torch.Tensor]:
    state = module.state_dict()
    return {fqn: state[fqn].detach().clone().contiguous() for fqn in fqns}


def new_norm(fqns: list[str]) -> models.NormNet:
    """The compiled module with every updatable constant from another seed; the
    constants compiled into the code (head.bias, small enough to fold) stay."""
    module = models.make_norm()
    module.load_state_dict({**module.state_dict(), **state_of(models.make_norm(NEW_SEED), fqns)})
    return module


async def load_norm(running: Running, packages: Packages, name: str = "norm", devices: int = 1) -> list[str]:
    await running.loader.LoadModel(
        pb.LoadModelRequest(name=name, package_path=str(packages.norm), device_indices=[-1] * devices)
    )
    listed = await running.loader.GetConstantFqns(pb.GetConstantFqnsRequest(name=name))
    fqns = [c.fqn for c in listed.constants]
    # The point of the model: buffers are constants of the compiled package.
    assert {"bn.running_mean", "bn.running_var", "scale"} <= set(fqns), fqns
    return fqns


async def served(running: Running, name: str, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    response = await running.inference.Run(run_request(name, x=x))
    return outputs_of(response)["y"], response.constants_version


def weights_dir(running: Running) -> pathlib.Path:
    return pathlib.Path(tempfile.mkdtemp(prefix="weights-", dir=running.model_root))


async def swap_by_load_constants(running: Running, name: str, state: dict[str, torch.Tensor]) -> None:
    # Chunked: each constant arrives, and is staged, on its own.
    await running.load_constants(
        *constant_messages(name, state, use_inactive=True, check_full_update=True, label="", chunk_bytes=256)
    )
    await running.loader.SwapConstantBuffer(pb.SwapConstantBufferRequest(name=name))


async def swap_by_update_constant_buffer(running: Running, name: str, state: dict[str, torch.Tensor]) -> None:
    listed = await running.loader.GetConstantFqns(pb.GetConstantFqnsRequest(name=name))
    internal = {c.fqn: c.internal_name for c in listed.constants}
    from pt2serve.service import tensors

    request = pb.UpdateConstantBufferRequest(name=name, use_inactive=True, validate_full_updates=True)
    for fqn, tensor in state.items():
        request.constants[internal[fqn]].CopyFrom(tensors.tensor_to_pb(tensor))
    await running.loader.UpdateConstantBuffer(request)
    await running.loader.SwapConstantBuffer(pb.SwapConstantBufferRequest(name=name))


async def swap_by_file(running: Running, name: str, state: dict[str, torch.Tensor]) -> None:
    directory = weights_dir(running)
    try:
        save_file(state, str(directory / "w.safetensors"))
        await running.loader.LoadConstantsFromFile(
            pb.LoadConstantsFromFileRequest(name=name, path=f"{directory.name}/w.safetensors", swap=True)
        )
    finally:
        shutil.rmtree(directory)


async def swap_by_cli(running: Running, name: str, state: dict[str, torch.Tensor]) -> None:
    directory = weights_dir(running)
    try:
        save_file(state, str(directory / "w.safetensors"))
        argv = ["constants", "load", "--target", running.target, "--model", name]
        argv += ["--file", f"{directory.name}/w.safetensors", "--swap"]
        assert await asyncio.to_thread(cli_main, argv) == 0
    finally:
        shutil.rmtree(directory)


ENTRY_POINTS: dict[str, Callable[[Running, str, dict[str, torch.Tensor]], Awaitable[None]]] = {
    "LoadConstants": swap_by_load_constants,
    "UpdateConstantBuffer": swap_by_update_constant_buffer,
    "LoadConstantsFromFile": swap_by_file,
    "cli": swap_by_cli,
}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
async def test_a_staged_swap_serves_the_new_buffers(running: Running, packages: Packages, entry: str) -> None:
    fqns = await load_norm(running, packages)
    old, new = models.make_norm(), new_norm(fqns)
    x = torch.randn(5, 8)
    before, version = await served(running, "norm", x)
    torch.testing.assert_close(before, old(x))
    await ENTRY_POINTS[entry](running, "norm", state_of(new, fqns))
    after, swapped = await served(running, "norm", x)
    assert swapped == version + 1
    torch.testing.assert_close(after, new(x))


async def test_staging_buffers_then_parameters_in_two_uploads(running: Running, packages: Packages) -> None:
    """Buffers staged by one upload survive the staging calls of a later one."""
    fqns = await load_norm(running, packages)
    new = new_norm(fqns)
    state = state_of(new, fqns)
    buffers = {k: v for k, v in state.items() if k in ("bn.running_mean", "bn.running_var", "scale")}
    parameters = {k: v for k, v in state.items() if k not in buffers}
    for part in (buffers, parameters):
        await running.load_constants(
            *constant_messages("norm", part, use_inactive=True, check_full_update=False, label="")
        )
    await running.loader.SwapConstantBuffer(pb.SwapConstantBufferRequest(name="norm"))
    x = torch.randn(3, 8)
    torch.testing.assert_close((await served(running, "norm", x))[0], new(x))


# Runs each binding directly in process: one process only.
@pytest.mark.layouts("one-process")
async def test_both_bindings_swap_to_the_new_buffers(running: Running, packages: Packages) -> None:
    fqns = await load_norm(running, packages, name="normpair", devices=2)
    new = new_norm(fqns)
    await swap_by_file(running, "normpair", state_of(new, fqns))
    model = running.server.manager.get("normpair")
    x = torch.randn(2, 8)
    for binding in model.bindings:
        torch.testing.assert_close(binding.run([x.clone()])[0], new(x))


async def test_no_answer_mixes_weight_sets_during_swaps(running: Running, packages: Packages) -> None:
    """20 chunked stage+swap cycles under a stream: each answer equals the eager
    module of exactly the weight set its version names."""
    fqns = await load_norm(running, packages)
    sets = [models.make_norm(), new_norm(fqns)]
    uploads = [state_of(m, fqns) for m in sets]

    async def stage_and_swap(cycle: int) -> None:
        await swap_by_load_constants(running, "norm", uploads[cycle % 2])

    await swap_under_stream(running, "norm", sets, stage_and_swap, cycles=20)
