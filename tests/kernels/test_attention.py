"""kernels/attention.py (paged decode, chunked prefill, 16-bit paged peer) against ref.py.

Tolerance (kernel vs reference on the same quantized cache): ||out - ref|| / ||ref|| <= 1e-2 and
max |out - ref| <= 2e-2 * max |ref| (a few bf16 ulps of the largest output). Sources: the reference rounds dequantized K/V to the
16-bit dtype and the outputs to bf16 (2^-9 relative); the kernels dequantize in float16 (prefill) or
fold the scales into q and p rounded to float16 (decode). Measured ~4e-3 relative.
Plus the quantization error itself: KV4 attention vs 16-bit attention on the same inputs, reported
and bounded loosely (relative error <= 0.25 on random Gaussian K/V, a hard case for 4 bits).

CPU: the Triton kernels run under TRITON_INTERPRET=1 in one subprocess for the whole file (see
test_kv_cache.py for why); GPU (`-m gpu`): compiled, larger shapes, decode through both the CUDA
kernel (decode_cuda.py) and the Triton one.
"""

from __future__ import annotations

import pytest
import torch

from tests.kernels import interp
from tests.kernels.interp import report_cases

REL_TOL, ABS_TOL = 1e-2, 2e-2

# (name, kv_heads, gqa ratio, head_dim, group, page, steps: new tokens per sequence per step)
CPU_CASES = [
    ("gqa4_d64_ragged_chunks", 2, 4, 64, 16, 32, [[5, 40, 16], [1, 1, 1], [30, 7, 50]]),
    ("mha_d128_pages", 1, 1, 128, 16, 16, [[33, 16, 1], [1, 1, 1]]),
    ("gqa8_d64_group32", 1, 8, 64, 32, 64, [[70, 3], [1, 64]]),
]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def _check(name: str, out: torch.Tensor, want: torch.Tensor) -> None:
    want = want.to(out.device).float()
    rel, mx = _rel(out, want), float((out.float() - want).abs().max() / want.abs().max().clamp_min(1e-6))
    if not (rel <= REL_TOL and mx <= ABS_TOL) or not torch.isfinite(out).all():
        raise AssertionError(f"{name}: relative {rel:.2e}, max abs / max |ref| {mx:.2e}")


def run_attention_case(kv_heads, rep, head_dim, group, page, steps, device="cpu", dtype=torch.bfloat16,
                       seed=0, splits=(None, 1, 3)):
    """Fill a cache step by step with write_kv; after each step check prefill (the step's tokens),
    decode (one query per sequence) and the 16-bit paged peer against the references."""
    from cometserve.kernels import attention, kv_cache, ref

    gen = torch.Generator().manual_seed(seed)
    b = len(steps[0])
    total = [sum(s[i] for s in steps) for i in range(b)]
    max_pages = max(-(-t // page) for t in total) + 1
    bt = torch.randperm(b * max_pages, generator=gen).to(torch.int32).view(b, max_pages)
    slots = torch.randperm(b + 1, generator=gen)[:b].to(torch.int32)
    cache = ref.PagedKVCache.allocate(b * max_pages, kv_heads, head_dim, b + 1, dtype, device, page, group)
    ctx = torch.zeros(b, dtype=torch.int32)
    scale = head_dim**-0.5
    hq = kv_heads * rep
    for step in steps:
        n = torch.tensor(step, dtype=torch.int32)
        cu = torch.cat((torch.zeros(1, dtype=torch.int32), n.cumsum(0).to(torch.int32)))
        ctx = ctx + n
        meta = [t.to(device) for t in (bt, cu, ctx, slots)]
        k = (torch.randn(int(cu[-1]), kv_heads, head_dim, generator=gen) * 2).to(dtype).to(device)
        v = torch.randn(int(cu[-1]), kv_heads, head_dim, generator=gen).to(dtype).to(device)
        kv_cache.write_kv(k, v, cache, *meta)
        q = (torch.randn(int(cu[-1]), hq, head_dim, generator=gen) * 2).to(dtype).to(device)
        want = ref.prefill_attention(q, cache, *meta, scale)
        for impl in ("fused", "flash") if device == "cuda" else ("fused",):
            _check(f"prefill {impl} step {step}",
                   attention.prefill_attention(q, cache, *meta, scale, config={"impl": impl}), want)
        if device == "cuda":  # the engine's host-side hints: the gather then allocates exactly sum(ctx) rows
            _check(f"prefill flash, host hints, step {step}",
                   attention.prefill_attention(q, cache, *meta, scale, int(n.max()), int(ctx.max()),
                                               config={"impl": "flash"}, total_context=int(ctx.sum())), want)
        qd = (torch.randn(b, hq, head_dim, generator=gen) * 2).to(dtype).to(device)
        bt_d, _, ctx_d, slots_d = meta
        want = ref.decode_attention(qd, cache, bt_d, ctx_d, slots_d, scale)
        for impl in ("cuda", "triton") if device == "cuda" else ("triton",):
            for ns in splits:
                out = attention.decode_attention(qd, cache, bt_d, ctx_d, slots_d, scale, num_splits=ns,
                                                 config={"impl": impl})
                _check(f"decode {impl} splits={ns} step {step}", out, want)
    kp = torch.randn(b * max_pages, kv_heads, page, head_dim, generator=gen).to(dtype).to(device)
    vp = torch.randn(b * max_pages, kv_heads, page, head_dim, generator=gen).to(dtype).to(device)
    want = ref.decode_attention_bf16(qd, kp, vp, bt_d, ctx_d, scale)
    for ns in splits:
        _check(f"bf16 paged splits={ns}", attention.decode_attention_bf16(qd, kp, vp, bt_d, ctx_d, scale,
                                                                          num_splits=ns), want)


def quantization_error(device="cpu", dtype=torch.bfloat16, length=300, kv_heads=2, rep=4, head_dim=64):
    """Relative error of attention over the KV4 cache vs 16-bit attention on the same inputs."""
    from cometserve.kernels import ref

    gen = torch.Generator().manual_seed(1)
    pages = -(-length // 64)
    cache = ref.PagedKVCache.allocate(pages, kv_heads, head_dim, 1, dtype, device, 64, 64)
    k = torch.randn(length, kv_heads, head_dim, generator=gen).to(dtype).to(device)
    v = torch.randn(length, kv_heads, head_dim, generator=gen).to(dtype).to(device)
    q = torch.randn(length, kv_heads * rep, head_dim, generator=gen).to(dtype).to(device)
    i32 = {"dtype": torch.int32, "device": device}
    meta = (torch.arange(pages, **i32)[None], torch.tensor([0, length], **i32), torch.tensor([length], **i32),
            torch.zeros(1, **i32))
    ref.write_kv(k, v, cache, *meta)
    out = ref.prefill_attention(q, cache, *meta, head_dim**-0.5)
    exact = ref.attention(q, k, v, torch.arange(length, device=device), head_dim**-0.5)
    return _rel(out, exact)


def _main() -> None:
    report_cases(CPU_CASES, run_attention_case)


@pytest.fixture(scope="module")
def interpreted_report():
    return interp.interpreted_report(__file__)


@pytest.mark.parametrize("name", [c[0] for c in CPU_CASES])
def test_attention_interpreted_vs_ref(interpreted_report, name):
    assert interpreted_report[name] == "ok", interpreted_report[name]


def test_kv4_attention_error_vs_16bit():
    err = quantization_error()
    print(f"KV4 vs bf16 attention, relative error {err:.3f}")
    assert err <= 0.25


def test_ref_paged_matches_plain_cache_numerics():
    """The paged reference reads exactly what the contiguous plain cache (model path) reads."""
    from cometserve.kernels import ref
    from cometserve.model.plain_cache import LayerCache

    gen = torch.Generator().manual_seed(2)
    cache = ref.PagedKVCache.allocate(4, 2, 64, 1, torch.bfloat16, "cpu", 64, 64)
    plain = LayerCache(2, 64, torch.bfloat16, "cpu", 4, 64)
    i32 = {"dtype": torch.int32}
    bt, ctx = torch.tensor([[3, 1, 0, 2]], **i32), 0
    for n in (70, 1, 60):
        k, v = torch.randn(n, 2, 64, generator=gen).bfloat16(), torch.randn(n, 2, 64, generator=gen).bfloat16()
        ctx += n
        ref.write_kv(k, v, cache, bt, torch.tensor([0, n], **i32), torch.tensor([ctx], **i32),
                     torch.zeros(1, **i32))
        keys, values = plain.update(k, v)
        gk, gv = ref.gather_kv(cache, bt[0], ctx, 0, torch.bfloat16)
        assert torch.equal(gk, keys) and torch.equal(gv, values)


@pytest.mark.parametrize("length", [100, 128, 300])
def test_one_prompt_over_its_own_rows_equals_the_cache_path(length):
    """A whole prompt through own_rows_into + write_kv(dequantize_into=) + flash_own_rows (SDPA, pad
    rows zeroed in head-major buffers where sdpa_rows pads) gives ref.prefill_attention's output over
    the cache it wrote, float32 on the CPU (the reference's write; the kernel's is tested against it
    in test_kv_cache)."""
    pytest.importorskip("triton")
    from cometserve.kernels import prefill_flash, ref

    gen = torch.Generator().manual_seed(3)
    hq, hkv, d = 8, 2, 64
    cache = ref.PagedKVCache.allocate(8, hkv, d, 1, torch.float32, "cpu", 64, 64)
    i32 = {"dtype": torch.int32}
    bt, cu, ctx, slot = torch.tensor([[5, 2, 7, 0, 1]], **i32), torch.tensor([0, length], **i32), \
        torch.tensor([length], **i32), torch.zeros(1, **i32)
    qkv = torch.randn(length, (hq + 2 * hkv) * d, generator=gen)
    q, k, v = (qkv[:, a * d:b * d].view(length, -1, d) for a, b in ((0, hq), (hq, hq + hkv), (hq + hkv, hq + 2 * hkv)))
    into = prefill_flash.own_rows_into(k, v, 0, [0, length])
    assert (into[0] is k) == (prefill_flash.sdpa_rows(length) == length)
    assert into[0].shape[0] == prefill_flash.sdpa_rows(length)
    ref.write_kv(k, v, cache, bt, cu, ctx, slot, dequantize_into=into)
    got = prefill_flash.flash_own_rows(q, *into, cu, length, d**-0.5)
    want = ref.prefill_attention(q, cache, bt, cu, ctx, slot, d**-0.5)
    assert got.shape == want.shape and float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())


def test_can_implement_refuses_with_reason():
    pytest.importorskip("triton")
    from cometserve.kernels import attention, ref

    cache = ref.PagedKVCache.allocate(1, 2, 64, 1, torch.bfloat16, "cpu", 64, 64)
    ok, reason = attention.can_implement(torch.zeros(1, 6, 64, dtype=torch.bfloat16)[:, :3], cache)
    assert not ok and "multiple" in reason
    ok, reason = attention.can_implement(torch.zeros(1, 4, 64, dtype=torch.float16), cache)
    assert not ok and "window dtype" in reason


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kv_heads,rep,head_dim,page", [(8, 4, 128, 64), (4, 1, 64, 128), (2, 7, 128, 64)])
def test_attention_gpu_vs_ref(dtype, kv_heads, rep, head_dim, page):
    steps = [[1000, 1, 64, 300, 63], [1] * 5, [130, 64, 1, 2, 1], [1] * 5]
    run_attention_case(kv_heads, rep, head_dim, 64, page, steps, device="cuda", dtype=dtype,
                       splits=(None, 1, 5))


@pytest.mark.gpu
@pytest.mark.parametrize("kv_heads,rep,head_dim,group,page", [(2, 8, 64, 16, 32), (1, 16, 128, 32, 64),
                                                              (2, 4, 128, 128, 128), (1, 12, 64, 64, 64)])
def test_attention_gpu_groups_and_gqa(kv_heads, rep, head_dim, group, page):
    """CUDA decode tiles of 16/32/64 tokens, two tiles per 128-token group, 8/12/16 query heads per KV head."""
    steps = [[300, 1, 64, 130], [1] * 4, [70, 2, 1, 63]]
    run_attention_case(kv_heads, rep, head_dim, group, page, steps, device="cuda", splits=(None, 1, 3))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_gpu_single_sequence(dtype):
    """One sequence: prefill's flash path takes SDPA (whole prompt, then after a prefix)."""
    run_attention_case(8, 4, 128, 64, 64, [[1000], [1], [130]], device="cuda", dtype=dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [1, 5, 12])
def test_decode_gpu_pdl_chain_same_bits(splits):
    """The CUDA decode kernels launched with programmatic dependent launch right after the KV write
    that produces their newest token (a PDL kernel too), replayed from a CUDA graph: the same bits as
    eager launches without PDL, and the reference's values."""
    from cometserve.kernels import attention, kv_cache, pdl, ref

    torch.manual_seed(0)
    lens, hkv, rep, d, page = [700, 63, 1, 333, 1500], 8, 4, 128, 64  # 63 + 1: the write fills a group
    i32 = {"dtype": torch.int32, "device": "cuda"}
    b = len(lens)
    max_pages = -(-(max(lens) + 1) // page)
    bt = torch.randperm(b * max_pages, device="cuda").to(torch.int32).view(b, max_pages)
    cache = ref.PagedKVCache.allocate(bt.numel(), hkv, d, b, torch.bfloat16, "cuda", page, 64)
    n = torch.tensor(lens, **i32)
    slots = torch.arange(b, **i32)
    k, v = (torch.randn(sum(lens), hkv, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    kv_cache.write_kv(k, v, cache, bt, torch.cat((torch.zeros(1, **i32), n.cumsum(0).to(torch.int32))), n, slots)
    ctx, cu1 = n + 1, torch.arange(b + 1, **i32)  # one new token per sequence
    k1, v1, q = (torch.randn(b, h, d, device="cuda", dtype=torch.bfloat16) for h in (hkv, hkv, hkv * rep))
    saved = [t.clone() for t in cache.tensors()]

    def step():
        kv_cache.write_kv(k1, v1, cache, bt, cu1, ctx, slots, 1)
        return attention.decode_attention(q, cache, bt, ctx, slots, d**-0.5, max_context_len=max(lens) + 1,
                                          num_splits=splits, config={"impl": "cuda"})

    def restore():
        for t, s in zip(cache.tensors(), saved):
            t.copy_(s)

    try:
        pdl.ENABLED = False
        want = step()
        _check(f"decode splits={splits}", want, ref.decode_attention(q, cache, bt, ctx, slots, d**-0.5))
        pdl.ENABLED = True
        restore()
        step()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        restore()
        graph.replay()
        torch.cuda.synchronize()
    finally:
        pdl.ENABLED = True
    assert torch.equal(out, want)


@pytest.mark.gpu
def test_kv4_attention_error_vs_16bit_gpu():
    assert quantization_error(device="cuda", length=4000, kv_heads=8, head_dim=128) <= 0.25


if __name__ == "__main__":
    _main()
