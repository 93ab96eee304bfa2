"""W4Ax GEMM kernel vs `ref.w4ax_gemm`.

Tolerances (tiered, ARCHITECTURE.md rule 4):
- exact: with all scales 1 and float32 output, Y is the integer A . W^T (the int32 block sums and
  their fp32 sum are exact below 2^24), on the split-K and the direct path;
- kernel vs reference on the same codes: fp32 output within 1e-5 of max|ref| (the kernel fuses the
  scale multiply into an FMA and sums splits in another order); 16-bit output within one ulp of
  the output dtype (rtol 2^-7 bf16, 2^-10 fp16) plus that atol.

The CPU suite runs the real Triton kernels under TRITON_INTERPRET=1 in a subprocess: the variable
must be set before triton is first imported, which other test modules of this pytest process may
already have done.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.kernels import interp

RTOL = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float32: 0.0}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _operands(m, n, k, w_bits, frac8, device, unit_scales=False, seed=0):
    from cometserve.kernels import ref
    from cometserve.scheme import num_blocks, padded_k

    g = torch.Generator().manual_seed(seed)
    nb, k_pad = num_blocks(k), padded_k(k)
    bits = torch.full((nb,), 4, dtype=torch.uint8)
    bits[torch.randperm(nb, generator=g)[: round(nb * frac8)]] = 8
    x = torch.randn(m, k, generator=g) * (1 + 20 * (torch.rand(k, generator=g) > 0.97))  # outliers
    codes, scales = ref.quant_act(x, torch.randperm(k, generator=g), bits)
    if w_bits == 4:
        qw = torch.randint(0, 256, (n, k_pad // 2), dtype=torch.uint8, generator=g)
        qw[:, k // 2:] = 0  # checkpoint zero padding past K
    else:
        qw = torch.randint(-127, 128, (n, k_pad), dtype=torch.int8, generator=g)
    ws = (torch.rand(n, nb, generator=g) * 0.02 + 1e-3).half()
    if unit_scales:
        scales, ws = torch.ones_like(scales), torch.ones_like(ws)
    bias = torch.randn(n, generator=g)
    return [t.to(device) for t in (codes, scales, qw, ws, bias)]


def check_case(m, n, k, w_bits, frac8, dtype, use_bias, device, cfg=None, unit=False) -> dict:
    """Run the kernel (default or forced config) and return error metrics vs the reference."""
    from cometserve.kernels import gemm_w4ax, ref

    codes, scales, qw, ws, bias = _operands(m, n, k, w_bits, frac8, device, unit_scales=unit)
    bias = bias if use_bias else None
    yr = ref.w4ax_gemm(codes, scales, qw, ws, bias, dtype).float()
    pq, ps = gemm_w4ax.prepare_weights(qw, ws)
    if cfg is None:
        y = gemm_w4ax.w4ax_gemm(codes, scales, pq, ps, bias, dtype)
    else:
        y = torch.full((m, n), float("nan"), dtype=dtype, device=device)  # poison: all must be written
        gemm_w4ax._launch(gemm_w4ax.GemmConfig(*cfg), codes, scales, pq, ps, bias, y)
    y = y.float()
    err = (y - yr).abs()
    atol = 1e-5 * yr.abs().max().item()
    bound = atol + RTOL[dtype] * yr.abs()
    return {"finite": bool(torch.isfinite(y).all()), "exact": bool((y == yr).all()),
            "max_excess": float((err - bound).max()), "shape": list(y.shape)}


# cases: (m, n, k, w_bits, frac8, dtype, bias, cfg = GemmConfig fields in order)
CPU_CASES = {
    "m1_w4_int4only_bf16": (1, 128, 256, 4, 0.0, "bf16", True, None),
    "m3_w4_q25_fp16_kpad": (3, 192, 320, 4, 0.25, "fp16", False, None),
    "m17_w4_int8only_bf16": (17, 256, 384, 4, 1.0, "bf16", True, None),
    "m17_w4_direct_fp32": (17, 128, 384, 4, 0.25, "fp32", True, (64, 16, 1, 2, 4, 4)),
    "m17_w4_split3_fp32": (17, 128, 384, 4, 0.25, "fp32", True, (64, 16, 3, 2, 4, 4)),
    "m2_w4_split7_bf16": (2, 128, 896, 4, 0.25, "bf16", True, (64, 16, 7, 2, 4, 4)),  # 4 + 3 in the fix-up
    "m40_w4_bm64_bf16": (40, 128, 256, 4, 0.25, "bf16", False, (128, 64, 2, 2, 4, 4)),
    "m3_w8_fp16": (3, 64, 256, 8, 0.25, "fp16", True, None),
    "m17_w8_split_fp32": (17, 128, 320, 8, 1.0, "fp32", False, (64, 32, 3, 2, 4, 4)),
    "m17_w4_nsub2_split_fp32": (17, 256, 384, 4, 0.25, "fp32", True, (128, 16, 3, 2, 4, 4, True, 2)),
    "m33_w4_nsub2_noprefetch_bf16": (33, 256, 256, 4, 0.25, "bf16", True, (128, 32, 1, 2, 4, 4, False, 2)),
}
EXACT_CASES = {
    "exact_w4_split": (17, 128, 384, 4, 0.25, "fp32", False, (64, 16, 3, 2, 4, 4)),
    "exact_w4_split7": (2, 64, 896, 4, 0.25, "fp32", False, (64, 16, 7, 1, 4, 4)),
    "exact_w4_direct": (5, 64, 320, 4, 1.0, "fp32", False, (64, 16, 1, 1, 4, 4)),
    "exact_w8": (3, 64, 256, 8, 0.0, "fp32", False, None),
    "exact_w4_nsub2": (20, 128, 384, 4, 0.25, "fp32", False, (128, 16, 2, 1, 4, 4, True, 2)),
}


def _interp_main() -> None:
    """Subprocess entry (TRITON_INTERPRET=1): every CPU case, results as JSON on stdout."""
    out = {}
    for name, (m, n, k, wb, f8, dt, b, cfg) in CPU_CASES.items():
        out[name] = check_case(m, n, k, wb, f8, DTYPES[dt], b, "cpu", cfg)
    for name, (m, n, k, wb, f8, dt, b, cfg) in EXACT_CASES.items():
        out[name] = check_case(m, n, k, wb, f8, DTYPES[dt], b, "cpu", cfg, unit=True)
    print("RESULTS " + json.dumps(out))


@pytest.fixture(scope="module")
def interp_results() -> dict:
    return interp.interpreted_json(["-c", "import tests.kernels.test_gemm_w4ax as t; t._interp_main()"], "RESULTS ")


@pytest.mark.parametrize("name", list(CPU_CASES))
def test_interpreter_matches_reference(interp_results, name):
    res = interp_results[name]
    assert res["finite"], f"{name}: unwritten or non-finite outputs"
    assert res["max_excess"] <= 0, f"{name}: error exceeds the stated tolerance by {res['max_excess']}"


@pytest.mark.parametrize("name", list(EXACT_CASES))
def test_interpreter_integer_exact(interp_results, name):
    assert interp_results[name]["exact"], f"{name}: integer accumulation is not exact"


def test_prepare_weights_layout():
    """INT4: block-half nibble split, then [N/64, nb, 64, 64] tiles; INT8: tiles only."""
    from cometserve.kernels import gemm_w4ax, ref

    n, nb = 128, 3
    qw = torch.randint(0, 256, (n, nb * 64), dtype=torch.uint8)
    ws = torch.rand(n, nb).half()
    pq, ps = gemm_w4ax.prepare_weights(qw, ws)
    assert pq.shape == qw.shape and torch.equal(ps, ws.t())
    t = pq.view(n // 64, nb, 64, 64).permute(0, 2, 1, 3).reshape(n, nb, 64).to(torch.int16)
    lo, hi = (t & 0xF).to(torch.int8), (t >> 4).to(torch.int8)
    lo, hi = torch.where(lo >= 8, lo - 16, lo), torch.where(hi >= 8, hi - 16, hi)
    assert torch.equal(torch.cat((lo, hi), -1).view(n, nb * 128), ref.unpack_int4(qw))
    q8 = torch.randint(-127, 128, (n, nb * 128), dtype=torch.int8)
    p8, _ = gemm_w4ax.prepare_weights(q8, ws)
    assert torch.equal(p8.view(n // 64, nb, 64, 128).permute(0, 2, 1, 3).reshape(n, -1), q8)


def test_can_implement_refuses_with_reason():
    from cometserve.kernels import gemm_w4ax

    ok, why = gemm_w4ax.can_implement(4096, 4096, 4, torch.device("cpu"))
    assert not ok and "CUDA" in why
    for n, k, bits, word in ((4096, 4000, 4, "128"), (100, 4096, 4, "64"), (4096, 4096, 16, "INT4")):
        ok, why = gemm_w4ax.can_implement(n, k, bits, torch.device("cuda"))
        assert not ok and word in why, why


def test_wgmma_refused_off_hopper():
    """The CUDA kernel is refused with a reason on CPU and never offered to the CPU tuner."""
    from cometserve.kernels import gemm_w4ax, gemm_wgmma

    ok, why = gemm_wgmma.can_implement(4096, 4, torch.bfloat16, torch.device("cpu"))
    assert not ok and "CUDA" in why
    assert all(c.backend == "triton" for c in gemm_w4ax.candidates(4096, 4096, 32, torch.device("cpu")))


LLAMA_SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (10240, 8192),
                (8192, 8192), (57344, 8192), (8192, 28672), (12288, 4096), (22016, 4096), (4096, 11008)]


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 3, 16, 17, 255, 4096])
@pytest.mark.parametrize("n,k", LLAMA_SHAPES)
def test_gpu_llama_shapes(m, n, k):
    res = check_case(m, n, k, 4, 0.16, torch.bfloat16, True, "cuda")
    assert res["finite"] and res["max_excess"] <= 0, res


@pytest.mark.gpu
@pytest.mark.parametrize("frac8", [0.0, 0.16, 0.25, 1.0])
@pytest.mark.parametrize("m", [1, 17, 255, 4096])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_gpu_block_maps(m, frac8, dtype):
    res = check_case(m, 4096, 4096, 4, frac8, DTYPES[dtype], False, "cuda")
    assert res["finite"] and res["max_excess"] <= 0, res


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 40, 64, 255, 4096])
@pytest.mark.parametrize("w_bits", [4, 8])
def test_gpu_integer_exact(m, w_bits):
    from cometserve.kernels import gemm_w4ax

    for cfg in gemm_w4ax.candidates(m, 6144, 32, torch.device("cuda"), w_bits, torch.float32):
        res = check_case(m, 6144, 4096, w_bits, 0.25, torch.float32, False, "cuda",
                         cfg=tuple(cfg.__dict__.values()), unit=True)
        assert res["exact"], (cfg, res)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 64])
def test_gpu_pdl_chain_equals_stream_order(m):
    """A decode-like chain (act-quant with residual + RMSNorm -> W4Ax GEMM, 12 times over one set of
    buffers) replayed from a CUDA graph with programmatic dependent launch gives the same bits as
    plain stream order: every kernel waits before it reads or overwrites what an earlier one touched."""
    from cometserve.kernels import gemm_w4ax, pdl, quant_act

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("PDL needs sm_90")
    dev, n = "cuda", 4096
    qw, ws = _operands(m, n, n, 4, 0.16, dev)[2:4]
    pq, ps = gemm_w4ax.prepare_weights(qw, ws)
    g = torch.Generator(device=dev).manual_seed(0)
    perm = torch.randperm(n, device=dev, generator=g)
    bits = torch.where(torch.rand(n // 128, device=dev, generator=g) < 0.16, 8, 4).to(torch.uint8)
    nw = torch.rand(n, device=dev, generator=g, dtype=torch.bfloat16) + 0.5
    x0 = torch.randn(m, n, device=dev, generator=g, dtype=torch.bfloat16)

    def chain():
        x, r = x0, torch.zeros_like(x0)
        for _ in range(12):
            c, s, r = quant_act.quant_act(x, perm, bits, nw, residual=r)
            x = gemm_w4ax.w4ax_gemm(c, s, pq, ps, None, torch.bfloat16) * 0.01
        return x + r

    outs = {}
    for on in (False, True):
        pdl.ENABLED = on
        try:
            chain()  # tunes and compiles outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = chain()
            graph.replay()
            torch.cuda.synchronize()
            outs[on] = out.clone()
        finally:
            pdl.ENABLED = True
    assert torch.isfinite(outs[True]).all()
    assert torch.equal(outs[True], outs[False])


@pytest.mark.gpu
@pytest.mark.parametrize("bm,stages", [(128, 4), (64, 6)])
@pytest.mark.parametrize("m", [65, 130, 255, 1000])
@pytest.mark.parametrize("split", [1, 4])
def test_gpu_wgmma_kernel(m, bm, stages, split):
    """The warp-specialized CUDA kernel, forced: ragged M (zero-filled rows), K not a multiple of the
    tile count (nor of the split: 9 blocks in 4 splits of 3, the last one empty), every output dtype,
    with and without bias; integer-exact with unit scales."""
    from cometserve.kernels import gemm_wgmma

    if not gemm_wgmma.can_implement(384, 4, torch.bfloat16, torch.device("cuda"))[0]:
        pytest.skip("needs sm_90a")
    cfg = (128, bm, split, 8, 12, stages, True, 1, "wgmma")
    for i, (dt, bias) in enumerate((("bf16", True), ("fp16", False), ("fp32", True))):
        res = check_case(m, 384, 1152, 4, 0.16 * i, DTYPES[dt], bias, "cuda", cfg=cfg)
        assert res["finite"] and res["max_excess"] <= 0, (dt, res)
    assert check_case(m, 256, 1024, 4, 0.25, torch.float32, False, "cuda", cfg=cfg, unit=True)["exact"]


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_gpu_gemv_kernel(m):
    """The CUDA GEMV, forced, each warp count: 1-4 tokens (3 runs the 4-row instance with a zero row), K
    of 9 blocks (warps with one block and with none), every output dtype with and without bias, a K of
    224 blocks (70B down_proj: activations staged past 48 KB of shared memory) and of 86;
    integer-exact with unit scales."""
    from cometserve.kernels import gemv_w4ax

    if not gemv_w4ax.can_implement(m, 384, 1152, 4, torch.bfloat16, torch.device("cuda"))[0]:
        pytest.skip("needs NVRTC and sm_80+")
    for warps in gemv_w4ax.WARPS:
        cfg = (32, 4, 1, 1, warps, 1, True, 1, "gemv")
        for i, (dt, bias) in enumerate((("bf16", True), ("fp16", False), ("fp32", True))):
            res = check_case(m, 384, 1152, 4, 0.16 * i, DTYPES[dt], bias, "cuda", cfg=cfg)
            assert res["finite"] and res["max_excess"] <= 0, (warps, dt, res)
        for k in (28672, 11008):  # 11008 at 4 tokens: staged codes under 48 KB, with the static buffer over
            res = check_case(m, 128, k, 4, 0.16, torch.bfloat16, True, "cuda", cfg=cfg)
            assert res["finite"] and res["max_excess"] <= 0, (warps, k, res)
        assert check_case(m, 256, 1024, 4, 0.25, torch.float32, False, "cuda", cfg=cfg, unit=True)["exact"]


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 3, 8, 9, 16, 17, 30, 32])
def test_gpu_gemv_mma_kernel(m):
    """The GEMV's tensor-core instances, forced, each warp count and row grouping: 1-32 tokens (one, two and four 8-token
    tiles, ragged ones with zero rows), K of 9 blocks (warps with one block and with none), every
    output dtype with and without bias, a K of 224 and of 86 blocks; integer-exact with unit scales."""
    from cometserve.kernels import gemv_w4ax

    if not gemv_w4ax.can_implement(m, 384, 1152, 4, torch.bfloat16, torch.device("cuda"), mma=True)[0]:
        pytest.skip("needs NVRTC and sm_80+")
    for warps, rows in ((w, r) for w in gemv_w4ax.warps_for(m, mma=True) for r in gemv_w4ax.rows_for(mma=True)):
        cfg = (rows, 32, 1, 1, warps, 1, True, 1, "gemv_mma")
        for i, (dt, bias) in enumerate((("bf16", True), ("fp16", False), ("fp32", True))):
            res = check_case(m, 384, 1152, 4, 0.16 * i, DTYPES[dt], bias, "cuda", cfg=cfg)
            assert res["finite"] and res["max_excess"] <= 0, (warps, dt, res)
        for k in (28672, 11008):
            res = check_case(m, 128, k, 4, 0.16, torch.bfloat16, True, "cuda", cfg=cfg)
            assert res["finite"] and res["max_excess"] <= 0, (warps, k, res)
        assert check_case(m, 256, 1024, 4, 0.25, torch.float32, False, "cuda", cfg=cfg, unit=True)["exact"]
