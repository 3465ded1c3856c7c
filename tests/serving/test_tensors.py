"""torch <-> moemesh.v1.Tensor round trips, bit-exact for every wire dtype."""

from __future__ import annotations

import pytest
import torch

from moemesh.serving.tensors import TORCH_TO_WIRE, from_proto, to_proto
from moemesh.v1 import common_pb2, expert_pb2


def _sample(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=gen) * 100).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -(2**31)), min(info.max, 2**31 - 1), shape, generator=gen, dtype=torch.int64).to(dtype)


@pytest.mark.parametrize("dtype", list(TORCH_TO_WIRE), ids=str)
@pytest.mark.parametrize("shape", [(3, 5), (), (0, 4), (2, 3, 4)], ids=str)
def test_round_trip_is_bit_exact(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    tensor = _sample(dtype, shape)
    wire = expert_pb2.ExpertRequest(hidden=to_proto(tensor)).SerializeToString()
    back = from_proto(expert_pb2.ExpertRequest.FromString(wire).hidden)
    assert back.dtype == dtype and tuple(back.shape) == shape
    assert torch.equal(_bytes(back), _bytes(tensor))


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bytes (NaN-safe, sign-of-zero-safe comparison)."""
    return tensor.reshape(-1).view(torch.uint8)


def test_bfloat16_bits_and_extremes_survive() -> None:
    tensor = torch.tensor([1.0, -0.0, float("inf"), float("-inf"), 3.3895e38, 1e-38], dtype=torch.bfloat16)
    back = from_proto(to_proto(tensor))
    assert torch.equal(back.view(torch.int16), tensor.view(torch.int16))
    assert torch.isnan(from_proto(to_proto(torch.tensor([float("nan")], dtype=torch.bfloat16)))).all()


def test_non_contiguous_input_is_encoded_in_logical_order() -> None:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    assert torch.equal(from_proto(to_proto(base.t())), base.t().contiguous())
    assert torch.equal(from_proto(to_proto(base[:, ::2])), base[:, ::2].contiguous())


def test_writable_copy_is_independent() -> None:
    msg = to_proto(torch.ones(4))
    copy = from_proto(msg, writable=True)
    copy += 1
    assert torch.equal(from_proto(msg), torch.ones(4))


def test_wrong_byte_count_names_the_field() -> None:
    msg = to_proto(torch.ones(2, 2))
    msg.shape[:] = [2, 3]
    with pytest.raises(ValueError, match=r"hidden.data: 16 bytes, expected 24 for float32\[2, 3\]"):
        from_proto(msg, name="hidden")


def test_unsupported_dtypes_are_rejected_both_ways() -> None:
    with pytest.raises(ValueError, match="float64"):
        to_proto(torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="weights.dtype: unsupported dtype DTYPE_UNSPECIFIED"):
        from_proto(common_pb2.Tensor(shape=[1], data=b"\0\0\0\0"), name="weights")


def test_external_payload_is_not_implemented_yet() -> None:
    msg = common_pb2.Tensor(dtype=common_pb2.DTYPE_FLOAT32, shape=[1], external=common_pb2.ExternalPayload(nbytes=4))
    with pytest.raises(NotImplementedError, match="hidden: external payloads"):
        from_proto(msg, name="hidden")
