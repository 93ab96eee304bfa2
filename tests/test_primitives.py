"""Quantize/dequantize primitives and packing: exact where integers are involved."""

from __future__ import annotations

import pytest
import torch

from cometserve.kernels import ref
from cometserve.quant.pack import pack_int4
from cometserve.quant.primitives import dequantize_weight, quantize_weight, weight_scales


def test_pack_unpack_roundtrip_exact():
    codes = torch.randint(-8, 8, (37, 256), dtype=torch.int8)
    packed = pack_int4(codes)
    assert packed.shape == (37, 128) and packed.dtype == torch.uint8
    assert torch.equal(ref.unpack_int4(packed), codes)
    # layout: code 2i in the low nibble of byte i
    assert int(pack_int4(torch.tensor([[3, -2]], dtype=torch.int8))[0, 0]) == 0xE3


@pytest.mark.parametrize("bad", [torch.tensor([[8, 0]], dtype=torch.int8), torch.zeros(1, 3, dtype=torch.int8)])
def test_pack_rejects_bad_codes(bad):
    with pytest.raises(ValueError):
        pack_int4(bad)


@pytest.mark.parametrize("bits,group", [(4, 128), (4, 0), (8, 0)])
def test_weight_quantization_grid_and_error(bits, group):
    w = torch.randn(64, 256)
    s = weight_scales(w, bits, group)
    codes = quantize_weight(w, s, bits)
    qmax = 2 ** (bits - 1) - 1
    assert s.dtype == torch.float16 and codes.dtype == torch.int8
    assert codes.min() >= -qmax - 1 and codes.max() <= qmax
    err = (dequantize_weight(codes, s) - w).abs()
    # round to nearest: at most half a step (plus float16 scale rounding)
    step = s.float().repeat_interleave(256 // s.shape[1], dim=1)
    assert bool((err <= step * 0.5 * (1 + 1e-3) + 1e-6).all())
    # dequantize(quantize(dequantized)) is the identity on the grid
    assert torch.equal(quantize_weight(dequantize_weight(codes, s), s, bits), codes)


def test_round_half_away_from_zero():
    v = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.49999997])
    assert ref.round_half_away(v).tolist() == [-3.0, -2.0, -1.0, 1.0, 2.0, 3.0, 0.0]


def test_quant_act_blocks_grids_and_padding():
    torch.manual_seed(0)
    x = torch.randn(5, 320, dtype=torch.bfloat16)  # 2.5 blocks: the last one partial
    x[:, 7] *= 40  # an outlier channel
    perm = torch.randperm(320)
    bits = torch.tensor([8, 4, 4], dtype=torch.uint8)
    codes, scales = ref.quant_act(x, perm, bits)
    assert codes.shape == (5, 384) and scales.shape == (5, 3) and scales.dtype == torch.float32
    assert bool((codes[:, 320:] == 0).all())
    assert codes[:, :128].abs().max() == 127 and codes[:, 128:].abs().max() == 7
    xp = torch.nn.functional.pad(x.float()[:, perm], (0, 64)).view(5, 3, 128)
    deq = codes.float().view(5, 3, 128) * scales[..., None]
    assert bool(((deq - xp).abs() <= scales[..., None] * 0.5 * (1 + 1e-5)).all())


def test_quant_act_fused_norm_equals_norm_then_quant():
    torch.manual_seed(1)
    x, w = torch.randn(4, 256), torch.rand(256) + 0.5
    bits = torch.tensor([4, 8], dtype=torch.uint8)
    fused = ref.quant_act(x, None, bits, w, 1e-6)
    xn = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    assert torch.equal(fused[0], ref.quant_act(xn, None, bits)[0])


def test_kv_quantization_asymmetric_channelwise():
    torch.manual_seed(2)
    x = torch.randn(64, 2, 16) * torch.linspace(0.1, 5, 16) + 3.0
    codes, scale, zero = ref.quantize_kv(x)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15
    assert scale.shape == zero.shape == (2, 16) and scale.dtype == torch.float16
    deq = ref.dequantize_kv(codes, scale, zero, torch.float32)
    assert bool(((deq - x).abs() <= scale.float() * 0.5 + 2e-3 * x.abs()).all())
    # a constant channel is reproduced (to float16 precision) instead of dividing by zero
    flat = torch.full((64, 1, 1), 1.25)
    c, s, z = ref.quantize_kv(flat)
    assert torch.equal(ref.dequantize_kv(c, s, z, torch.float32), flat)
