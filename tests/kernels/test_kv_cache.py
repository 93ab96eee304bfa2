"""kernels/kv_cache.py write_kv against ref.write_kv: codes, scales, zeros and window bit for bit.

CPU: the Triton kernel runs under TRITON_INTERPRET=1 in a subprocess (the variable must be set before
triton is imported, and other test modules of this pytest process may import it first). The
subprocess runs every case of this file once and reports each by name; the tests read the report.
GPU (`-m gpu`): the compiled kernel, larger shapes.
"""

from __future__ import annotations

import pytest
import torch

from tests.kernels import interp
from tests.kernels.interp import report_cases

# (name, kv_heads, head_dim, group, page, steps: new tokens per sequence per step, q heads per kv
# head: 0 = no RoPE, else q and k are rotated by write_kv's `rope`, fused into decode steps;
# dequantize: "" / "in_place" (k and v's rows overwritten with what the cache gives back) /
# "head_major" (stored into head-major buffers with spare rows, as a padded SDPA input))
CPU_CASES = [
    ("d64_g16_p32_ragged", 2, 64, 16, 32, [[5, 40, 16], [1, 1, 1], [30, 7, 50], [1, 1, 1]], 0),
    ("d64_g16_p32_ragged_dequantize", 2, 64, 16, 32, [[5, 40, 16], [1, 1, 1], [30, 7, 50]], 0, "in_place"),
    ("d128_g32_p32_rope_dequantize", 1, 128, 32, 32, [[64, 31, 70], [1, 1, 1], [33, 1, 2]], 2, "head_major"),
    ("d128_g16_p16_decode", 1, 128, 16, 16, [[15, 16, 17], [1, 1, 1], [1, 1, 1]], 0),
    ("d64_g32_p64_chunks", 2, 64, 32, 64, [[33, 64], [70, 1], [95, 31]], 0),
    ("d64_g16_p16_rope_gqa4", 2, 64, 16, 16, [[15, 3, 16], [1, 1, 1], [1, 1, 1], [4, 1, 2]], 4),
    ("d128_g16_p32_rope_mha", 1, 128, 16, 32, [[16, 1], [1, 1], [1, 1]], 1),
]


def run_write_case(kv_heads, head_dim, group, page, steps, qpk=0, dequantize="", device="cpu",
                   dtype=torch.bfloat16, seed=0):
    """Drive ref.write_kv and kernels.write_kv through the same steps; raise on the first mismatch.
    With RoPE (qpk > 0) the reference gets q and k rotated by the separate kernel
    (pointwise.rotary_embedding): the fused rotation must equal it bit for bit. With dequantize, the
    rows it stores must equal kernels.gather_kv's rows for them bit for bit (one arithmetic), and
    the reference's within one rounding; spare rows stay untouched."""
    from cometserve.kernels import kv_cache, pointwise, ref

    gen = torch.Generator().manual_seed(seed)
    b = len(steps[0])
    total = [sum(s[i] for s in steps) for i in range(b)]
    max_pages = max(-(-t // page) for t in total) + 1
    block_tables = torch.randperm(b * max_pages, generator=gen).to(torch.int32).view(b, max_pages)
    seq_slots = torch.randperm(b + 2, generator=gen)[:b].to(torch.int32)
    c_ref = ref.PagedKVCache.allocate(b * max_pages, kv_heads, head_dim, b + 2, dtype, "cpu", page, group)
    c_ref.k_window.normal_(generator=gen)  # stale window rows must never leak into codes
    ctx = torch.zeros(b, dtype=torch.int32)
    c_dev = None
    for step in steps:
        n = torch.tensor(step, dtype=torch.int32)
        cu = torch.cat((torch.zeros(1, dtype=torch.int32), n.cumsum(0).to(torch.int32)))
        ctx = ctx + n
        k = (torch.randn(int(cu[-1]), kv_heads, head_dim, generator=gen) * 3 + 1).to(dtype)
        v = torch.randn(int(cu[-1]), kv_heads, head_dim, generator=gen).to(dtype)
        k[:, 0, 0] = 0.25  # a constant channel: the minimum scale
        if c_dev is None:
            c_dev = ref.PagedKVCache(*(t.to(device, copy=True) for t in c_ref.tensors()))  # on the CPU too
        dev = [t.to(device) for t in (block_tables, cu, ctx, seq_slots)]
        k_dev, rope = k.to(device).clone(), None  # never the reference's tensor (dequantize writes both)
        if qpk:
            q = torch.randn(k.shape[0], kv_heads * qpk, head_dim, generator=gen).to(dtype).to(device)
            pos = torch.cat([torch.arange(int(c) - int(t), int(c)) for c, t in zip(ctx, n)]).to(device)
            freqs = torch.arange(4096).float()[:, None] * (0.5 ** torch.arange(head_dim // 2).float())[None, :]
            tables = (freqs.cos().to(device), freqs.sin().to(device))
            q_want, k_want = pointwise.rotary_embedding(q.clone(), k_dev.clone(), pos, *tables)
            k, rope = k_want.cpu(), (q, pos, *tables)
        v_dev = v.to(device).clone()
        outs_ref, outs_dev = (k, v), (k_dev, v_dev)
        if dequantize == "head_major":  # NaN-filled, 3 spare rows
            outs_ref, outs_dev = ([torch.full((kv_heads, k.shape[0] + 3, head_dim), float("nan"), dtype=dtype,
                                              device=d).transpose(0, 1) for _ in range(2)] for d in ("cpu", device))
        ref.write_kv(k, v, c_ref, block_tables, cu, ctx, seq_slots, dequantize_into=outs_ref if dequantize else None)
        kv_cache.write_kv(k_dev, v_dev, c_dev, *dev, rope=rope, dequantize_into=outs_dev if dequantize else None)
        if qpk and not (torch.equal(rope[0], q_want) and (dequantize == "in_place" or torch.equal(k_dev, k_want))):
            raise AssertionError(f"fused RoPE differs from pointwise.rotary_embedding after step {step}")
        names = ("k_codes", "v_codes", "k_scales", "k_zeros", "v_scales", "v_zeros", "k_window", "v_window")
        for name, a, d in zip(names, c_ref.tensors(), c_dev.tensors()):
            if "window" in name:  # only rows holding live tokens are defined
                for i in range(b):
                    r = int(ctx[i]) % group
                    s = int(seq_slots[i])
                    if not torch.equal(a[s, :, :r], d[s, :, :r].cpu()):
                        raise AssertionError(f"{name} differs (sequence {i}) after step {step}")
            elif not torch.equal(a, d.cpu()):
                raise AssertionError(f"{name}: {int((a != d.cpu()).sum())} entries differ after step {step}")
        gathered = _check_gather(c_dev, block_tables.to(device), ctx.to(device), seq_slots.to(device), dtype)
        if dequantize:
            _check_dequantized(outs_dev, outs_ref, gathered, cu, ctx, dtype)


def _check_dequantized(outs_dev, outs_ref, gathered, cu, ctx, dtype):
    """write_kv(dequantize_into=...)'s rows: gather_kv's rows of the same positions bit for bit, the
    reference's within one rounding of the 16-bit value; rows past the step's tokens untouched."""
    gk, gv, cu_k = gathered
    n = int(cu[-1])
    if not all(bool(o[n:].isnan().all()) for o in outs_dev):
        raise AssertionError("write_kv stored past the step's rows")
    for i in range(ctx.shape[0]):
        t0, t1, c = int(cu[i]), int(cu[i + 1]), int(ctx[i])
        g0 = int(cu_k[i]) + c - (t1 - t0)
        for got, gat, want in ((outs_dev[0], gk, outs_ref[0]), (outs_dev[1], gv, outs_ref[1])):
            if not torch.equal(got[t0:t1], gat[g0:g0 + t1 - t0]):
                raise AssertionError(f"dequantized rows differ from gather_kv's (sequence {i})")
            _within_one_rounding(got[t0:t1].cpu(), want[t0:t1], dtype, f"dequantized rows (sequence {i})")


def _within_one_rounding(got, want, dtype, what):
    ulp = want.float().abs().clamp_min(1e-3) * (2.0**-7 if dtype == torch.bfloat16 else 2.0**-10)
    if not bool(((got.float() - want.float()).abs() <= ulp).all()):
        raise AssertionError(f"{what} differ from the reference's")


def _check_gather(cache, block_tables, context_lens, seq_slots, dtype):
    """kernels.gather_kv (contiguous dequantized K/V) against ref.gather_kv: equal up to one rounding
    of the 16-bit output (the kernel may fuse code * scale + zero into one FMA)."""
    from cometserve.kernels import kv_cache, ref

    cu = torch.zeros(context_lens.shape[0] + 1, dtype=torch.int32, device=context_lens.device)
    cu[1:] = torch.cumsum(context_lens, 0)
    k, v = kv_cache.gather_kv(cache, block_tables, context_lens, cu, seq_slots, dtype)
    for i in range(context_lens.shape[0]):
        rk, rv = ref.gather_kv(cache, block_tables[i], int(context_lens[i]), int(seq_slots[i]), dtype)
        for got, want in ((k[int(cu[i]):int(cu[i + 1])], rk), (v[int(cu[i]):int(cu[i + 1])], rv)):
            _within_one_rounding(got.cpu(), want.cpu(), dtype, f"gather_kv (sequence {i})")
    return k, v, cu


def _main() -> None:
    report_cases(CPU_CASES, run_write_case)


@pytest.fixture(scope="module")
def interpreted_report():
    return interp.interpreted_report(__file__)


@pytest.mark.parametrize("name", [c[0] for c in CPU_CASES])
def test_write_kv_interpreted_bit_exact(interpreted_report, name):
    assert interpreted_report[name] == "ok", interpreted_report[name]


def test_kv_bytes_per_token_under_0_3x_bf16():
    from cometserve.kernels import ref

    cache = ref.PagedKVCache.allocate(1, 8, 128, 1, torch.bfloat16, "cpu", 64, 64)
    bf16 = 2 * 8 * 128 * 2
    assert cache.bytes_per_token() / bf16 <= 0.3


def test_can_implement_refuses_with_reason():
    pytest.importorskip("triton")
    from cometserve.kernels import kv_cache, ref

    cache = ref.PagedKVCache.allocate(1, 2, 96, 1, torch.bfloat16, "cpu", 64, 64)
    ok, reason = kv_cache.can_implement(torch.zeros(3, 2, 96), cache)
    assert not ok and "head_dim" in reason
    cache = ref.PagedKVCache.allocate(1, 2, 64, 1, torch.bfloat16, "cpu", 64, 64)
    ok, reason = kv_cache.can_implement(torch.zeros(3, 4, 64), cache)
    assert not ok and "num_tokens" in reason


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim,page", [(128, 64), (64, 128)])
def test_write_kv_gpu_bit_exact(dtype, head_dim, page):
    steps = [[1000, 1, 64, 300, 63], [1] * 5, [130, 64, 1, 2, 1], [1] * 5]
    run_write_case(8, head_dim, 64, page, steps, device="cuda", dtype=dtype)
    run_write_case(8, head_dim, 64, page, steps + [[1] * 5] * 3, qpk=4, device="cuda", dtype=dtype)
    for how in ("in_place", "head_major"):
        run_write_case(8, head_dim, 64, page, [[1000, 64, 1, 300, 63], [1] * 5, [130, 64, 1, 2, 1]], qpk=4,
                       dequantize=how, device="cuda", dtype=dtype)


if __name__ == "__main__":
    _main()
