"""Hot constant (weight) updates: chunked streaming, files, stage + swap, and a live
alternation under load where every answer must match exactly one weight set."""

from __future__ import annotations

import asyncio
import os
import pathlib
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import grpc
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from pt2serve.loader.errors import InvalidInput
from pt2serve.service import tensors
from pt2serve.service.client import constant_messages
from pt2serve.service.demo import DemoMLP, demo_model
from pt2serve.service.pb import pt2serve_pb2 as pb
from tests.conftest import Running
from tests.test_service import expect_error, outputs_of, run_request


async def constant_fqns(running: Running) -> list[str]:
    listed = await running.loader.GetConstantFqns(pb.GetConstantFqnsRequest(name="demo"))
    return [c.fqn for c in listed.constants]


def shifted_model(fqns: list[str], shift: float) -> DemoMLP:
    model = demo_model()
    with torch.no_grad():
        for fqn in fqns:
            model.get_parameter(fqn).add_(shift)
    return model


def weights_of(model: DemoMLP, fqns: list[str]) -> dict[str, torch.Tensor]:
    return {fqn: model.get_parameter(fqn).detach().clone() for fqn in fqns}


@given(
    shape=st.lists(st.integers(0, 5), max_size=3),
    chunk=st.integers(1, 64),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.int64, torch.bool]),
)
@settings(max_examples=50)
def test_chunks_reassemble_exactly(shape: list[int], chunk: int, dtype: torch.dtype) -> None:
    tensor = (torch.randn(shape) * 10).to(dtype)
    assembler = tensors.ChunkAssembler()
    done = [assembler.add(c) for c in tensors.chunk_tensor("w", tensor, chunk)]
    assert all(d is None for d in done[:-1])
    assert done[-1] is not None
    fqn, rebuilt = done[-1]
    assert fqn == "w" and rebuilt.dtype == tensor.dtype and torch.equal(rebuilt, tensor)
    assembler.finish()


def test_bad_chunks_are_refused() -> None:
    chunks = tensors.chunk_tensor("w", torch.arange(8, dtype=torch.float32), 8)
    assembler = tensors.ChunkAssembler()
    assembler.add(chunks[0])
    with pytest.raises(InvalidInput, match=r"chunks\['w'\]: chunk at byte 16, expected the next at byte 8"):
        assembler.add(chunks[2])
    with pytest.raises(InvalidInput, match=r"stream ended after 8 of 32 bytes"):
        assembler.finish()
    other = pb.TensorChunk(fqn="w", dtype=pb.FLOAT64, shape=[8], offset=8, data=b"\0" * 8)
    with pytest.raises(InvalidInput, match="dtype or shape differs"):
        assembler.add(other)
    too_long = pb.TensorChunk(fqn="v", dtype=pb.INT8, shape=[2], offset=0, data=b"\0\0\0")
    with pytest.raises(InvalidInput, match=r"chunks\['v'\]: 3 bytes sent, the constant has 2"):
        tensors.ChunkAssembler().add(too_long)


async def test_chunked_upload_staged_then_swapped(running: Running) -> None:
    fqns = await constant_fqns(running)
    new = shifted_model(fqns, 0.1)
    x = torch.randn(3, 16)
    messages = list(
        constant_messages(
            "demo",
            weights_of(new, fqns),
            use_inactive=True,
            check_full_update=True,
            label="run-7",
            chunk_bytes=100,
        )
    )
    assert len(messages) > 2 * len(fqns)  # really chunked
    staged = await running.loader.LoadConstants(iter(messages))
    assert staged.constants_version == 0 and staged.updated == len(fqns)
    before = outputs_of(await running.inference.Run(run_request("demo", x=x)))["logits"]
    torch.testing.assert_close(before, demo_model()(x))
    swapped = await running.loader.SwapConstantBuffer(pb.SwapConstantBufferRequest(name="demo"))
    assert swapped.constants_version == 1 and swapped.constants_label == "run-7"
    response = await running.inference.Run(run_request("demo", x=x))
    assert response.constants_version == 1
    torch.testing.assert_close(outputs_of(response)["logits"], new(x))
    status = (await running.loader.ListModels(pb.ListModelsRequest())).models[0]
    assert status.constants_label == "run-7" and status.constants_version == 1


async def test_a_broken_upload_changes_nothing_and_cannot_be_swapped(running: Running) -> None:
    fqns = await constant_fqns(running)
    new = weights_of(shifted_model(fqns, 1.0), fqns)
    messages = list(
        constant_messages("demo", new, use_inactive=True, check_full_update=False, label="", chunk_bytes=64)
    )
    x = torch.randn(2, 16)
    # Everything but the last chunk: the last constant is incomplete.
    await expect_error(
        running.loader.LoadConstants(iter(messages[:-1])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "stream ended after",
    )
    await expect_error(
        running.loader.SwapConstantBuffer(pb.SwapConstantBufferRequest(name="demo")),
        grpc.StatusCode.FAILED_PRECONDITION,
        "were not staged",
    )
    bad = pb.LoadConstantsRequest(name="demo", use_inactive=True)
    bad.chunks.append(
        pb.TensorChunk(fqn="hidden.weight", dtype=pb.FLOAT64, shape=[32, 16], data=bytes(32 * 16 * 8))
    )
    await expect_error(
        running.load_constants(bad),
        grpc.StatusCode.INVALID_ARGUMENT,
        "chunks['hidden.weight']: dtype and shape declare 4096 bytes, the constant has 2048",
    )
    response = await running.inference.Run(run_request("demo", x=x))
    assert response.constants_version == 0
    torch.testing.assert_close(outputs_of(response)["logits"], demo_model()(x))
    labels = {"model": "demo", "operation": "load_constants", "outcome": "failure"}
    assert await running.metric("pt2serve_constant_updates_total", labels) == 2


async def test_load_from_files_under_the_model_root(running: Running, tmp_path: pathlib.Path) -> None:
    root = running.model_root
    fqns = await constant_fqns(running)
    new = shifted_model(fqns, -0.2)
    weights_dir = pathlib.Path(tempfile.mkdtemp(prefix="weights-", dir=root))
    try:
        await check_file_loading(running, weights_dir, fqns, new, tmp_path)
    finally:
        shutil.rmtree(weights_dir)


async def check_file_loading(
    running: Running, weights_dir: pathlib.Path, fqns: list[str], new: DemoMLP, tmp_path: pathlib.Path
) -> None:
    rel = weights_dir.name
    state = {k: v.detach().clone().contiguous() for k, v in new.state_dict().items()}
    save_file(state, str(weights_dir / "w.safetensors"))
    torch.save(state, weights_dir / "w.pt")
    x = torch.randn(2, 16)
    response = await running.loader.LoadConstantsFromFile(
        pb.LoadConstantsFromFileRequest(name="demo", path=f"{rel}/w.safetensors", swap=True, label="st")
    )
    assert response.constants_version == 1 and response.constants_label == "st"
    assert response.updated == len(fqns)
    # out.bias is folded into the compiled model: reported, not loaded.
    assert list(response.ignored) == sorted(set(state) - set(fqns))
    got = outputs_of(await running.inference.Run(run_request("demo", x=x)))["logits"]
    expected = demo_model()
    with torch.no_grad():
        for fqn in fqns:
            expected.get_parameter(fqn).copy_(state[fqn])
    torch.testing.assert_close(got, expected(x))

    response = await running.loader.LoadConstantsFromFile(
        pb.LoadConstantsFromFileRequest(name="demo", path=str(weights_dir / "w.pt"), check_full_update=True)
    )
    assert response.constants_version == 2 and response.constants_label == ""

    outside = tmp_path / "outside.safetensors"
    save_file(state, str(outside))
    os.symlink(outside, weights_dir / "escape.safetensors")
    for path in (str(outside), "../" * 8 + str(outside).lstrip("/"), f"{rel}/escape.safetensors"):
        await expect_error(
            running.loader.LoadConstantsFromFile(pb.LoadConstantsFromFileRequest(name="demo", path=path)),
            grpc.StatusCode.PERMISSION_DENIED,
            "outside the server's model root",
        )
    await expect_error(
        running.loader.LoadConstantsFromFile(
            pb.LoadConstantsFromFileRequest(name="demo", path=f"{rel}/none")
        ),
        grpc.StatusCode.NOT_FOUND,
        "no weight file",
    )


async def test_alternating_weights_under_streaming_load(running: Running) -> None:
    """50 stage+swap cycles while a stream keeps requests in flight: no request fails,
    and each answer equals exactly the weight set its reported version names."""
    fqns = await constant_fqns(running)
    sets = [demo_model(), shifted_model(fqns, 0.05)]
    uploads = [weights_of(m, fqns) for m in sets]

    async def stage_and_swap(cycle: int) -> None:
        staged = await running.load_constants(
            *constant_messages(
                "demo", uploads[cycle % 2], use_inactive=True, check_full_update=True, label=f"c{cycle}"
            )
        )
        assert staged.constants_version == cycle - 1
        swapped = await running.loader.SwapConstantBuffer(pb.SwapConstantBufferRequest(name="demo"))
        assert swapped.constants_version == cycle

    await swap_under_stream(running, "demo", sets, stage_and_swap, cycles=50)


async def swap_under_stream(
    running: Running,
    model: str,
    sets: Sequence[torch.nn.Module],
    stage_and_swap: Callable[[int], Awaitable[None]],
    cycles: int,
) -> None:
    """Run `stage_and_swap(cycle)` for cycles 1..`cycles` (serving `sets[cycle % 2]`)
    while a stream keeps single-input requests in flight; every answer must succeed and
    equal the eager module of exactly the weight set its constants version names."""
    width = next(iter(sets[0].parameters())).shape[1]
    stop = asyncio.Event()
    checked = [0, 0]
    failures: list[str] = []
    sent: dict[str, torch.Tensor] = {}

    async def requests() -> AsyncIterator[pb.RunRequest]:
        i = 0
        while not stop.is_set():
            x = torch.randn(1 + i % 3, width)
            sent[f"q{i}"] = x
            yield run_request(model, f"q{i}", x=x)
            i += 1
            if i % 8 == 0:
                await asyncio.sleep(0.001)

    async def consume() -> None:
        async for answer in running.inference.RunStream(requests()):
            if answer.WhichOneof("result") != "response":
                failures.append(f"{answer.request_id}: {answer.error.message}")
                continue
            version = answer.response.constants_version
            (got,) = outputs_of(answer.response).values()
            x = sent.pop(answer.request_id)
            want = sets[version % 2](x)
            # Batches of other sizes round differently (about 1e-5 here); the two
            # weight sets differ by far more than the tolerance.
            if not torch.allclose(got, want, atol=1e-4):
                other = sets[(version + 1) % 2](x)
                failures.append(
                    f"{answer.request_id}: version {version} does not match its weights "
                    f"(off by {(got - want).abs().max():.3g}; "
                    f"{(got - other).abs().max():.3g} from the other set)"
                )
            checked[version % 2] += 1

    consumer = asyncio.create_task(consume())
    try:
        for cycle in range(1, cycles + 1):
            await stage_and_swap(cycle)
            await asyncio.sleep(0.002)
    finally:
        stop.set()
        await asyncio.wait_for(consumer, timeout=60)
    assert not failures, failures[:5]
    assert checked[0] > 0 and checked[1] > 0, checked
