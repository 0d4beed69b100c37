"""Wire tensors: every dtype and layout round-trips exactly."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pt2serve.loader.errors import InvalidInput
from pt2serve.loader.schema import DTYPES
from pt2serve.service import tensors
from pt2serve.service.pb import pt2serve_pb2 as pb


@given(
    dtype=st.sampled_from(sorted(DTYPES)),
    shape=st.lists(st.integers(0, 4), max_size=3),
    transpose=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_round_trip_is_exact(dtype: str, shape: list[int], transpose: bool, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    tensor = (torch.randn(shape, generator=g) * 50).to(DTYPES[dtype])
    if transpose and tensor.dim() >= 2:
        tensor = tensor.transpose(0, 1)  # not contiguous: sent in row-major order
    wire = tensors.tensor_to_pb(tensor)
    assert list(wire.shape) == list(tensor.shape)
    assert len(wire.data) == tensor.numel() * tensor.element_size()
    back = tensors.tensor_from_pb(wire, "t")
    assert back.dtype == tensor.dtype and torch.equal(back, tensor)


def test_bytes_are_little_endian_row_major() -> None:
    wire = tensors.tensor_to_pb(torch.tensor([[1, 2], [3, 4]], dtype=torch.int16).t())
    assert wire.data == bytes([1, 0, 3, 0, 2, 0, 4, 0])


def test_decoded_tensor_owns_writable_memory() -> None:
    back = tensors.tensor_from_pb(tensors.tensor_to_pb(torch.ones(3)), "t")
    back.add_(1)
    assert torch.equal(back, torch.full((3,), 2.0))


@pytest.mark.parametrize(
    ("message", "fragment"),
    [
        (
            pb.Tensor(dtype=pb.FLOAT32, shape=[2], data=b"\0" * 7),
            "f: data has 7 bytes, shape [2] of float32 needs 8",
        ),
        (
            pb.Tensor(dtype=pb.DTYPE_UNSPECIFIED, shape=[1], data=b"\0"),
            "f: dtype DTYPE_UNSPECIFIED is not supported",
        ),
        (pb.Tensor(dtype=99, shape=[1], data=b"\0"), "f: dtype 99 is not supported"),  # type: ignore[arg-type]
        (pb.Tensor(dtype=pb.INT8, shape=[-2], data=b""), "f: negative dimension in shape [-2]"),
    ],
)
def test_malformed_tensors_name_the_field(message: pb.Tensor, fragment: str) -> None:
    with pytest.raises(InvalidInput) as info:
        tensors.tensor_from_pb(message, "f")
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("shape", "data"),
    [
        ([4, 4], b"\0" * 64),  # 64 bytes of float32, over a 32-byte limit
        ([1 << 20, 1 << 20], b""),  # 4 TiB declared, no data sent
        ([0, 1 << 40], b""),  # no elements, but a span no tensor could have
        ([3, -1], b""),
    ],
)
def test_declared_sizes_are_bounded_before_any_allocation(shape: list[int], data: bytes) -> None:
    with pytest.raises(InvalidInput, match="f: "):
        tensors.tensor_from_pb(pb.Tensor(dtype=pb.FLOAT32, shape=shape, data=data), "f", max_bytes=32)


def test_a_tensor_at_the_limit_is_accepted() -> None:
    wire = pb.Tensor(dtype=pb.FLOAT32, shape=[2, 4], data=b"\0" * 32)
    assert tensors.tensor_from_pb(wire, "f", max_bytes=32).shape == (2, 4)
