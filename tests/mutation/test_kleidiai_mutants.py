"""Tests that kill mutmut's survivors in kleidiai.py (mutation/README.md): the read-back's blocks, its
exactness check, and where the scales stop being readable."""

from __future__ import annotations

import pytest
import torch

from ventoux import kleidiai
from ventoux.qlinear import quantize_int4

pytestmark = pytest.mark.skipif(not hasattr(torch.ops.aten, "_dyn_quant_matmul_4bit"),
                                reason="PyTorch before 2.6 has no KleidiAI ops")


def _packed(n=16, k=128, group=32, seed=0):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    qweight, scales, zeros = quantize_int4(w, group)
    return qweight, kleidiai.pack(qweight, scales, zeros, group)


@pytest.mark.parametrize("rows", [16, 24, 64])
def test_read_back_in_blocks_of_any_size_covers_every_byte(rows):
    qweight, t = _packed()  # 64 bytes a row: blocks of 16 and 24 rows leave a last, partial block
    assert torch.equal(kleidiai.unpack(t["packed"], t["scales"], t["unread"], 32, 128, rows=rows), qweight)


@pytest.mark.parametrize("factor", [2.0, 0.5, 3.0])
def test_read_back_through_the_wrong_scales_raises_rather_than_returning_codes(factor):
    _, t = _packed()
    with pytest.raises(RuntimeError, match="^KleidiAI's packed int4 weight did not read back exactly$"):
        kleidiai.unpack(t["packed"], t["scales"] * factor, t["unread"], 32, 128)


def test_scales_from_two_to_the_minus_100_to_two_to_the_100_are_read_back():
    s = torch.tensor([[2.0**-100, 2.0**100, 2.0**-101, 2.0**101, 0.0, -(2.0**100), 1.0]])
    assert kleidiai.unread(s).tolist() == [[False, False, True, True, True, False, False]]
    assert kleidiai.unread(s.to(torch.bfloat16)).tolist() == [[False, False, True, True, True, False, False]]


def test_the_ops_are_cpu_only():
    assert kleidiai.has_ops("cpu") and not kleidiai.has_ops("cuda") and not kleidiai.has_ops("meta")


def test_read_back_off_by_a_fraction_raises_even_where_it_would_round_to_the_right_codes():
    qweight, t = _packed()
    slightly_off = t["scales"].float() * (1 + 1.5e-4)  # reads up to about 0.3 off: each still rounds to its code
    with pytest.raises(RuntimeError, match="did not read back exactly"):
        kleidiai.unpack(t["packed"], slightly_off, t["unread"], 32, 128)


@pytest.mark.parametrize("d0, divisor", [(4, 2), (-3, 3)])
def test_integer_read_backs_whose_even_code_leaves_minus_8_to_7_raise(d0, divisor):
    # every byte holds d0 and 0; through scales divided by `divisor` each reads exactly as (divisor * d0, 0):
    # an integer read, and a code of 8 or -9, one past either end of int4
    qweight = torch.full((16, 64), (d0 + 8) | (8 << 4), dtype=torch.uint8)
    scales, zeros = torch.ones(16, 4, dtype=torch.bfloat16), torch.zeros(16, 4, dtype=torch.bfloat16)
    t = kleidiai.pack(qweight, scales, zeros, 32)
    assert torch.equal(kleidiai.unpack(t["packed"], t["scales"], t["unread"], 32, 128), qweight)
    with pytest.raises(RuntimeError, match="did not read back exactly"):
        kleidiai.unpack(t["packed"], t["scales"].float() / divisor, t["unread"], 32, 128)
