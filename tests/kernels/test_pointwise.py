"""RMSNorm, rotary embedding and SiLU-and-mul kernels (kernels/pointwise.py) vs their references.

Tolerances: all three do float32 math with one final rounding, like the references; RMSNorm sums
squares in another order (relative 1e-5 in float32, one output ulp in 16-bit), SiLU's exp may differ
in its last bit. Rotary reads the same tables and does the same products: float32 within 1e-6.
The CPU suite runs the kernels through TRITON_INTERPRET=1 in a subprocess (interp.py).
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.kernels import interp

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # about one ulp of 16-bit


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.float() - b.float()).abs() / (b.float().abs() + 1e-3)).max())


def check_rms_norm(m, h, dtype, device, strided=False) -> dict:
    from cometserve.kernels import pointwise, ref

    g = torch.Generator().manual_seed(m * 7 + h)
    x = (torch.randn(m, 2 * h if strided else h, generator=g) * 4).to(dtype)
    x = x[:, ::2] if strided else x
    w = (torch.rand(h, generator=g) + 0.5).to(dtype)
    x, w = x.to(device), w.to(device)
    y, yr = pointwise.rms_norm(x, w, 1e-5), ref.rms_norm(x, w, 1e-5)
    return {"rel": _rel(y, yr), "dtype": str(y.dtype), "shape": list(y.shape)}


def check_rotary(t, hq, hkv, d, dtype, device) -> dict:
    from cometserve.kernels import pointwise, ref

    g = torch.Generator().manual_seed(t + hq + d)
    qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=g).to(dtype).to(device)
    q = qkv[:, : hq * d].view(t, hq, d)  # views of a fused projection, as the model has them
    k = qkv[:, hq * d: (hq + hkv) * d].view(t, hkv, d)
    v_before = qkv[:, (hq + hkv) * d:].clone()
    inv = 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d)
    freqs = torch.arange(64).float()[:, None] * inv[None, :]
    cos, sin = (freqs.cos() * 1.25).to(device), (freqs.sin() * 1.25).to(device)
    pos = torch.randint(0, 64, (t,), generator=g).to(device)
    qr, kr = ref.rotary_embedding(q, k, pos, cos, sin)
    qo, ko = pointwise.rotary_embedding(q, k, pos, cos, sin)
    return {"rel_q": _rel(qo, qr), "rel_k": _rel(ko, kr), "in_place": bool(qo.data_ptr() == q.data_ptr()),
            "v_untouched": bool(torch.equal(qkv[:, (hq + hkv) * d:], v_before))}


def check_silu(m, n, dtype, device) -> dict:
    from cometserve.kernels import pointwise, ref

    g = torch.Generator().manual_seed(m + n)
    x = (torch.randn(m, 2 * n, generator=g) * 3).to(dtype).to(device)
    y, yr = pointwise.silu_and_mul(x), ref.silu_and_mul(x)
    return {"rel": _rel(y, yr), "shape": list(y.shape)}


CPU_CASES = {
    "norm_m1_h576_bf16": ("norm", 1, 576, "bf16"),
    "norm_m5_h64_fp32": ("norm", 5, 64, "fp32"),
    "rope_t3_q4_kv2_d64_bf16": ("rope", 3, 4, 2, 64, "bf16"),
    "rope_t2_q3_kv3_d32_fp32": ("rope", 2, 3, 3, 32, "fp32"),
    "silu_m3_n1100_fp16": ("silu", 3, 1100, "fp16"),
    "silu_m2_n64_fp32": ("silu", 2, 64, "fp32"),
}


def run_case(kind, *args, device="cpu") -> dict:
    fn = {"norm": check_rms_norm, "rope": check_rotary, "silu": check_silu}[kind]
    return fn(*args[:-1], DTYPES[args[-1]], device)


def _interp_main() -> None:
    print("RESULTS " + json.dumps({name: run_case(*c) for name, c in CPU_CASES.items()}))


@pytest.fixture(scope="module")
def interp_results() -> dict:
    return interp.interpreted_json(["-c", "import tests.kernels.test_pointwise as t; t._interp_main()"], "RESULTS ")


def _assert_ok(res: dict, dtype: torch.dtype) -> None:
    for key in ("rel", "rel_q", "rel_k"):
        if key in res:
            assert res[key] <= TOL[dtype], res
    if "in_place" in res:
        assert res["in_place"] and res["v_untouched"], res


@pytest.mark.parametrize("name", list(CPU_CASES))
def test_interpreter_matches_reference(interp_results, name):
    _assert_ok(interp_results[name], DTYPES[CPU_CASES[name][-1]])


def test_rotary_refuses_odd_head_dim():
    from cometserve.kernels import pointwise

    q = torch.zeros(1, 2, 48)
    with pytest.raises(ValueError, match="power-of-two"):
        pointwise.rotary_embedding(q, q, torch.zeros(1, dtype=torch.long), torch.zeros(4, 24), torch.zeros(4, 24))


@pytest.mark.gpu
@pytest.mark.parametrize("case", [("norm", 1, 4096, "bf16"), ("norm", 300, 8192, "fp16"), ("norm", 7, 576, "fp32"),
                                  ("rope", 1, 32, 8, 128, "bf16"), ("rope", 257, 64, 8, 128, "fp16"),
                                  ("rope", 5, 9, 3, 64, "bf16"), ("silu", 1, 14336, "bf16"),
                                  ("silu", 513, 1536, "fp16")])
def test_gpu_matches_reference(case):
    _assert_ok(run_case(*case, device="cuda"), DTYPES[case[-1]])


@pytest.mark.gpu
def test_gpu_strided_norm():
    _assert_ok(check_rms_norm(9, 4096, torch.bfloat16, "cuda", strided=True), torch.bfloat16)
