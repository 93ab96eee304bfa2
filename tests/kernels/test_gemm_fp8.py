"""The prefill W4Ax path on cuBLAS block-scaled FP8 (kernels/gemm_fp8.py) vs `ref.w4ax_gemm`.

Exactness where it can be seen: the weight expansion and the INT8 high/low split are exact in e4m3,
so the CPU interpreter checks them bit for bit (expanded codes == 16 * the checkpoint's codes;
high * 16 * scale + low * scale rebuilds every INT8 block). On the GPU the whole GEMM must match the
reference within the bf16 output's rounding (rtol 2^-7) plus 1e-5 of max|Y| (the float32 scaling
runs in cuBLAS's order), for Llama shapes, M from 512 to 4096 and block maps with 0-100% INT8.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.kernels import interp
from tests.kernels.test_gemm_w4ax import LLAMA_SHAPES, _operands


def check_expand_split(m, n, k, frac8, per_channel, device) -> dict:
    from cometserve.kernels import gemm_fp8, gemm_w4ax, ref

    codes, scales, qw, ws, _ = _operands(m, n, k, 4, frac8, device)
    if per_channel:
        ws = ws[:, :1].contiguous()
    nb = scales.shape[1]
    big = codes.view(m, nb, 128).abs().amax((0, 2)) > 7  # the INT8 blocks _operands drew
    bits = torch.where(big, 8, 4).to(torch.uint8)
    p = gemm_fp8.plan(bits)
    pq, ps = gemm_w4ax.prepare_weights(qw, ws)
    w8, w8s = gemm_fp8.expand_weights(pq, ps, p)
    src = p.src.long()
    want = ref.weight_codes(qw).float().view(n, nb, 128)[:, src].reshape(n, -1) * 16
    want_s = ws.float().expand(n, nb)[:, src].t() / 16
    a8, a8s = gemm_fp8.split_activations(codes, scales, p)
    parts = (a8.float().view(a8.shape[0], -1, 128) * a8s[:, :, None])[:m]  # [M, nb', 128]
    rebuilt = torch.zeros(m, nb, 128, dtype=torch.float32, device=device).index_add_(1, src, parts)
    deq = codes.float().view(m, nb, 128) * scales[:, :, None]
    return {"w_exact": bool(torch.equal(w8.float(), want)), "ws_exact": bool(torch.equal(w8s, want_s)),
            "a_rebuilt": float((rebuilt - deq).abs().max() / deq.abs().max()),
            "pad_rows_zero": bool((a8.float()[m:] == 0).all() and (a8s[m:] == 0).all()),
            "a_rows": a8.shape[0], "a_scale_strides": list(a8s.stride())}


CPU_CASES = {
    "m3_k384_int8_third": (3, 128, 384, 0.3, False),
    "m17_k256_int4_only": (17, 64, 256, 0.0, False),
    "m16_k512_per_channel": (16, 128, 512, 0.3, True),
}


def _interp_main() -> None:
    print("RESULTS " + json.dumps({name: check_expand_split(*c, "cpu") for name, c in CPU_CASES.items()}))


@pytest.fixture(scope="module")
def interp_results() -> dict:
    return interp.interpreted_json(["-c", "import tests.kernels.test_gemm_fp8 as t; t._interp_main()"], "RESULTS ")


@pytest.mark.parametrize("name", list(CPU_CASES))
def test_interpreter_expand_and_split_exact(interp_results, name):
    res = interp_results[name]
    m = CPU_CASES[name][0]
    assert res["w_exact"] and res["ws_exact"] and res["pad_rows_zero"], res
    assert res["a_rebuilt"] <= 1e-7, res  # exact up to float32 rounding of the products
    assert res["a_rows"] == -(-m // 16) * 16 and res["a_scale_strides"][0] == 1, res


def test_plan_orders_blocks():
    from cometserve.kernels import gemm_fp8

    p = gemm_fp8.plan(torch.tensor([4, 8, 4, 8], dtype=torch.uint8))
    assert p.src.tolist() == [0, 1, 2, 3, 1, 3]
    assert p.part.tolist() == [gemm_fp8.COPY, gemm_fp8.HIGH, gemm_fp8.COPY, gemm_fp8.HIGH, gemm_fp8.LOW, gemm_fp8.LOW]


def test_can_implement_refuses():
    from cometserve.kernels import gemm_fp8

    assert not gemm_fp8.can_implement(4096, 4096, 4, torch.bfloat16, torch.device("cpu"))[0]
    ok, why = gemm_fp8.can_implement(4096, 4096, 8, torch.bfloat16, torch.device("cuda"))
    assert not ok and "INT4" in why
    ok, why = gemm_fp8.can_implement(4096, 4096, 4, torch.float16, torch.device("cuda"))
    assert not ok and "bfloat16" in why


def _gpu_case(m, n, k, frac8, bias=True) -> dict:
    from cometserve.kernels import gemm_fp8, gemm_w4ax, ref

    codes, scales, qw, ws, b = _operands(m, n, k, 4, frac8, "cuda")
    nb = scales.shape[1]
    bits = torch.full((nb,), 4, dtype=torch.uint8, device="cuda")
    bits[torch.randperm(nb, generator=torch.Generator().manual_seed(1))[: round(nb * frac8)].cuda()] = 8
    codes, scales = ref.quant_act(torch.randn(m, k, device="cuda") * 3, None, bits)
    b = b.to(torch.bfloat16).float() if bias else None  # a model's bias is 16-bit
    yr = ref.w4ax_gemm(codes, scales, qw, ws, b, torch.float32)
    pq, ps = gemm_w4ax.prepare_weights(qw, ws)
    y = gemm_fp8.w4ax_gemm(codes, scales, pq, ps, b, torch.bfloat16, gemm_fp8.plan(bits)).float()
    bound = 1e-5 * yr.abs().max() + 2.0**-7 * yr.abs()
    return {"finite": bool(torch.isfinite(y).all()), "max_excess": float(((y - yr).abs() - bound).max())}


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 17, 1000, 4096])
@pytest.mark.parametrize("n,k", LLAMA_SHAPES[:4] + LLAMA_SHAPES[8:])
def test_gpu_llama_shapes(m, n, k):
    res = _gpu_case(m, n, k, 0.16)
    assert res["finite"] and res["max_excess"] <= 0, res


@pytest.mark.gpu
@pytest.mark.parametrize("frac8", [0.0, 0.16, 0.25, 1.0])
@pytest.mark.parametrize("m", [513, 2048])
def test_gpu_block_maps(m, frac8):
    res = _gpu_case(m, 4096, 4096, frac8, bias=False)
    assert res["finite"] and res["max_excess"] <= 0, res


@pytest.mark.gpu
@pytest.mark.parametrize("m", [17, 1000, 1500])
def test_gpu_quant_linear_takes_the_fused_fp8_operand(m):
    """A W4Ax layer on CUDA: from MIN_M rows the act-quant writes the FP8 operand and the layer
    keeps its first M output rows (M = 1500 pads to 1504); below, the int8 path. Both against the
    reference act-quant + GEMM (act-quant bit-exact without RMSNorm; the GEMM's bound as above)."""
    from cometserve.kernels import gemm_fp8, ref
    from cometserve.model.layers.linear import QuantLinear

    k, n = 4096, 2048
    g = torch.Generator().manual_seed(m)
    layer = QuantLinear(k, n, True, 4, 128, True, True, True)
    with torch.no_grad():
        layer.qweight.copy_(torch.randint(0, 256, layer.qweight.shape, generator=g).to(torch.uint8))
        layer.w_scales.copy_((torch.rand(layer.w_scales.shape, generator=g) * 0.02 + 0.01).half())
        layer.bias.copy_(torch.randn(n, generator=g).bfloat16().float())
        layer.block_bits[torch.randperm(k // 128, generator=g)[:5]] = 8
        layer.perm.copy_(torch.randperm(k, generator=g).int())
    layer = layer.cuda()
    layer.prepare(torch.bfloat16)
    x = (torch.randn(m, k, generator=g) * 3).bfloat16().cuda()
    codes, _ = layer._ops.quant_act(x, layer.perm, layer.block_bits, None, 1e-6, True)
    assert codes.dtype == (torch.float8_e4m3fn if m >= gemm_fp8.MIN_M else torch.int8)
    y = layer(x).float()
    rc, rs = ref.quant_act(x, layer.perm, layer.block_bits, None, 1e-6, True)
    yr = ref.w4ax_gemm(rc, rs, layer.qweight, layer.w_scales, layer.bias.float(), torch.float32)
    assert y.shape == (m, n) and torch.isfinite(y).all()
    assert ((y - yr).abs() - (1e-5 * yr.abs().max() + 2.0**-7 * yr.abs())).max() <= 0
