"""The reference W4Ax linear against float64 on the same integer codes, and FMPQ's permutation
invariance (the permuted layer computes the original function)."""

from __future__ import annotations

import pytest
import torch

from cometserve.kernels import ref
from cometserve.quant.pack import pack_int4
from cometserve.quant.primitives import quantize_weight, weight_scales


def _float64_w4ax(codes, a_scales, w_codes, w_scales, bias):
    m, k = codes.shape
    nb = k // 128
    ws = w_scales.double().expand(w_codes.shape[0], nb)
    out = torch.zeros(m, w_codes.shape[0], dtype=torch.float64)
    for b in range(nb):
        s = slice(b * 128, (b + 1) * 128)
        out += (codes[:, s].double() @ w_codes[:, s].double().T) * a_scales[:, b : b + 1].double() * ws[:, b]
    return out + (bias.double() if bias is not None else 0)


@pytest.mark.parametrize("w_bits,group", [(4, 128), (4, 0), (8, 0)])
@pytest.mark.parametrize("m", [1, 3, 17])
def test_w4ax_reference_equals_float64(w_bits, group, m):
    torch.manual_seed(m)
    k, n = 384, 96
    x = torch.randn(m, k)
    bits = torch.tensor([8, 4, 4], dtype=torch.uint8)
    codes, a_scales = ref.quant_act(x, torch.randperm(k), bits)
    w = torch.randn(n, k)
    w_scales = weight_scales(w, w_bits, group)
    w_codes = quantize_weight(w, w_scales, w_bits)
    qweight = pack_int4(w_codes) if w_bits == 4 else w_codes
    bias = torch.randn(n)
    got = ref.w4ax_gemm(codes, a_scales, qweight, w_scales, bias, torch.float32)
    want = _float64_w4ax(codes, a_scales, w_codes, w_scales, bias)
    # the integer part is exact; the float32 epilogue rounds each block's contribution once
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max())


@pytest.mark.parametrize("w_bits,group", [(4, 128), (4, 0), (8, 0)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_float_ops_equal_reference(w_bits, group, out_dtype):
    """The CPU/fallback path (one float32 matmul of scaled codes) against float64 and against
    ref.w4ax_gemm: the same function up to float32 summation order."""
    from cometserve.model.layers.linear import FloatOps

    torch.manual_seed(w_bits + group)
    m, k, n = 19, 640, 80
    x = torch.randn(m, k) * (1 + 30 * (torch.rand(k) > 0.95))
    codes, a_scales = ref.quant_act(x, torch.randperm(k), torch.tensor([8, 4, 4, 8, 4], dtype=torch.uint8))
    w = torch.randn(n, k)
    w_scales = weight_scales(w, w_bits, group)
    w_codes = quantize_weight(w, w_scales, w_bits)
    qweight = pack_int4(w_codes) if w_bits == 4 else w_codes
    bias = torch.randn(n).to(out_dtype)
    got = FloatOps.w4ax_gemm(codes, a_scales, *FloatOps.prepare_weights(qweight, w_scales), bias, out_dtype)
    assert got.dtype == out_dtype and got.shape == (m, n)
    want = _float64_w4ax(codes, a_scales, w_codes, w_scales, bias.float())
    rtol = 1e-5 if out_dtype == torch.float32 else 2.0**-8
    assert torch.allclose(got.double(), want, rtol=rtol, atol=1e-5 * want.abs().max())
    same = ref.w4ax_gemm(codes, a_scales, qweight, w_scales, bias, out_dtype)
    assert torch.allclose(got.float(), same.float(), rtol=rtol, atol=1e-5 * same.float().abs().max())


def test_integer_accumulation_is_exact():
    """With unit scales the output is the integer dot product itself, at the extremes of the grid."""
    codes = torch.full((2, 256), 127, dtype=torch.int8)
    codes[1] = -127
    w_codes = torch.full((3, 256), -8, dtype=torch.int8)
    out = ref.w4ax_gemm(codes, torch.ones(2, 2), pack_int4(w_codes), torch.ones(3, 2, dtype=torch.float16),
                        None, torch.float64)
    assert out[0, 0].item() == 127 * -8 * 256 and out[1, 2].item() == 127 * 8 * 256


def test_permutation_invariance_in_16bit():
    """Permuting the activation channels and the weight's K columns together leaves Y unchanged."""
    torch.manual_seed(3)
    x = torch.randn(7, 576, dtype=torch.float64)
    w = torch.randn(64, 576, dtype=torch.float64)
    perm = torch.randperm(576)
    assert torch.allclose(x[:, perm] @ w[:, perm].T, x @ w.T, rtol=1e-12, atol=1e-10)


def test_folded_down_permutation_equals_original_mlp(tmp_path):
    """Permuting gate/up output rows and down's K columns (the fold FMPQ uses for down_proj's input)
    gives the same MLP output in 16-bit arithmetic."""
    torch.manual_seed(4)
    h, i = 64, 160
    x = torch.randn(5, h, dtype=torch.float64)
    gate, up, down = torch.randn(i, h, dtype=torch.float64), torch.randn(i, h, dtype=torch.float64), torch.randn(h, i, dtype=torch.float64)
    perm = torch.randperm(i)

    def mlp(g, u, d):
        return (torch.nn.functional.silu(x @ g.T) * (x @ u.T)) @ d.T

    assert torch.allclose(mlp(gate[perm], up[perm], down[:, perm]), mlp(gate, up, down), rtol=1e-12, atol=1e-10)


def test_hadamard_rotation_of_int4_blocks_is_exact_in_16bit():
    """Rotating the INT4 blocks of X and of W's K columns by the same orthonormal Hadamard matrix
    leaves X W^T unchanged; INT8 blocks are left alone."""
    torch.manual_seed(5)
    h = ref.hadamard(128).double()
    assert torch.allclose(h @ h.T, torch.eye(128, dtype=torch.float64), atol=1e-12)
    x, w = torch.randn(3, 256, dtype=torch.float64), torch.randn(8, 256, dtype=torch.float64)
    rot = torch.block_diag(torch.eye(128, dtype=torch.float64), h)  # blocks [8, 4]
    assert torch.allclose((x @ rot) @ (w @ rot).T, x @ w.T, atol=1e-10)


def test_quant_act_rotates_only_int4_blocks():
    torch.manual_seed(6)
    x = torch.randn(4, 256)
    bits = torch.tensor([8, 4], dtype=torch.uint8)
    plain, _ = ref.quant_act(x, None, bits)
    rotated, _ = ref.quant_act(x, None, bits, rotate=True)
    assert torch.equal(rotated[:, :128], plain[:, :128])
    want, _ = ref.quant_act(ref.fwht(x[:, 128:]), None, bits[1:])
    assert torch.equal(rotated[:, 128:], want)
