"""Paged attention over the INT4 KV cache (layout: kernels/kv_cache.py, spec: ref.PagedKVCache).
Every query reads the cache after the step's write: full groups from pages, the partial last group
from the 16-bit window. Measurements behind each choice: benchmarks/kernels/NOTES-attention.md.

Decode streams the cache (floor: KV bytes over HBM bandwidth). On CUDA it runs decode_cuda.py's
kernel (warp-owned tiles, MMA fragments built in registers); the Triton kernel here is the portable
path (CPU interpreter, config impl="triton"): split-KV (flash-decoding) with a merge kernel, one
program per KV head's query group (rows padded to 16), no per-element dequantization (scores =
(q * k_scale) . codes + q . k_zero; p @ V = (p @ codes) * v_scale + sum(p) * v_zero), codes widened
by `prmt` + `lop3` + `hsub2` exponent tricks.
Prefill is tensor-core bound: the fast path (prefill_flash.py) dequantizes into contiguous 16-bit K/V
(kv_cache.gather_kv, a few % of the time) and runs PyTorch's flash kernels; the fused Triton kernel
(groups dequantized in registers) is the portable path, ~2x slower on H100. A prompt with no cached
prefix needs neither: the engine has write_kv store its dequantized rows where flash reads them
(prefill_flash.flash_own_rows)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from cometserve.kernels import decode_cuda
from cometserve.kernels.prefill_flash import prefill_flash
from cometserve.kernels.ref import PagedKVCache

LOG2E = 1.4426950408889634


@triton.jit
def _widen_codes(b, USE_ASM: tl.constexpr):
    """uint8 [N, C] -> (low nibbles, high nibbles) as float16 code values 0..15."""
    if USE_ASM:
        lo, hi = tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 t0, t1, z, m0, m1;
            mov.b32 z, 0;
            prmt.b32 t0, $4, z, 0x4140;
            prmt.b32 t1, $4, z, 0x4342;
            lop3.b32 $0, t0, 0x000F000F, 0x64006400, 0xEA;
            lop3.b32 $1, t1, 0x000F000F, 0x64006400, 0xEA;
            lop3.b32 $2, t0, 0x00F000F0, 0x54005400, 0xEA;
            lop3.b32 $3, t1, 0x00F000F0, 0x54005400, 0xEA;
            mov.b32 m0, 0x64006400;
            mov.b32 m1, 0x54005400;
            sub.f16x2 $0, $0, m0;
            sub.f16x2 $1, $1, m0;
            sub.f16x2 $2, $2, m1;
            sub.f16x2 $3, $3, m1;
            }""",
            constraints="=r,=r,=r,=r,r",
            args=[b],
            dtype=(tl.float16, tl.float16),
            is_pure=True,
            pack=4,
        )
    else:
        lo = (b & 15).to(tl.float16)
        hi = (b >> 4).to(tl.float16)
    return lo, hi


@triton.jit
def _mm(a, b, USE_ASM: tl.constexpr):
    """tl.dot of two 16-bit tiles with float32 accumulation. The CPU interpreter multiplies bfloat16
    tiles as raw integers (Triton 3.9), so off the GPU the operands are widened first."""
    if USE_ASM:
        return tl.dot(a, b)
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")


@triton.jit
def _load_rows16(x_ptr, base, n_valid, G: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr, col0: tl.constexpr):
    """Rows base .. base+G (contiguous [*, D] rows of a 16-bit tensor), channels col0 .. col0+HALF."""
    t = tl.arange(0, G)
    j = col0 + tl.arange(0, HALF)
    off = (base + t).to(tl.int64)[:, None] * D + j[None, :]
    return tl.load(x_ptr + off, mask=(t < n_valid)[:, None], other=0.0)


@triton.jit
def _online_update(s, m_i, l_i, acc_lo, acc_hi):
    """Online softmax in base 2: returns p (unnormalized), new max, new sum, rescaled accumulators."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_new = l_i * alpha + tl.sum(p, 1)
    return p, m_new, l_new, acc_lo * alpha[:, None], acc_hi * alpha[:, None]


@triton.jit
def _int4_tiles(kc_ptr, vc_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, page, h, row, ok, H: tl.constexpr,
                P: tl.constexpr, G: tl.constexpr, D: tl.constexpr):
    """One group's packed K and V codes [G, D/2] and its scales/zeros as (low, high) float32 halves
    [D/2], masked by ok."""
    HALF: tl.constexpr = D // 2
    t = tl.arange(0, G)
    j = tl.arange(0, HALF)
    c_off = ((page * H + h) * P + row + t).to(tl.int64)[:, None] * HALF + j[None, :]
    m_off = ((page * H + h) * (P // G) + row // G).to(tl.int64) * D + j
    n_ok = tl.where(ok, G, 0)  # masks built by comparisons (the interpreter refuses `tensor & scalar`)
    c_ok = (t < n_ok)[:, None]
    m_ok = (j * 0 + n_ok) > 0
    kb = tl.load(kc_ptr + c_off, mask=c_ok, other=0)
    vb = tl.load(vc_ptr + c_off, mask=c_ok, other=0)
    meta = (tl.load(ks_ptr + m_off, mask=m_ok, other=0.0).to(tl.float32),
            tl.load(ks_ptr + m_off + HALF, mask=m_ok, other=0.0).to(tl.float32),
            tl.load(kz_ptr + m_off, mask=m_ok, other=0.0).to(tl.float32),
            tl.load(kz_ptr + m_off + HALF, mask=m_ok, other=0.0).to(tl.float32),
            tl.load(vs_ptr + m_off, mask=m_ok, other=0.0).to(tl.float32),
            tl.load(vs_ptr + m_off + HALF, mask=m_ok, other=0.0).to(tl.float32),
            tl.load(vz_ptr + m_off, mask=m_ok, other=0.0).to(tl.float32),
            tl.load(vz_ptr + m_off + HALF, mask=m_ok, other=0.0).to(tl.float32))
    return kb, vb, meta


@triton.jit
def _int4_update(q_lo, q_hi, kb, vb, meta, ok, m_i, l_i, acc_lo, acc_hi, USE_ASM: tl.constexpr):
    """Online-softmax update with one INT4 group, never dequantizing a K or V element:
    scores = (q * k_scale) . codes + q . k_zero; p @ V = (p @ codes) * v_scale + sum(p) * v_zero."""
    ks_lo, ks_hi, kz_lo, kz_hi, vs_lo, vs_hi, vz_lo, vz_hi = meta
    k_lo, k_hi = _widen_codes(kb, USE_ASM)
    bias = tl.sum(q_lo * kz_lo[None, :], 1) + tl.sum(q_hi * kz_hi[None, :], 1)
    qs_lo = (q_lo * ks_lo[None, :]).to(tl.float16)
    qs_hi = (q_hi * ks_hi[None, :]).to(tl.float16)
    qk = tl.dot(qs_lo, tl.trans(k_lo)) + tl.dot(qs_hi, tl.trans(k_hi)) + bias[:, None]
    qk = tl.where(ok, qk, float("-inf"))
    p, m_i, l_i, acc_lo, acc_hi = _online_update(qk, m_i, l_i, acc_lo, acc_hi)
    v_lo, v_hi = _widen_codes(vb, USE_ASM)
    p16 = p.to(tl.float16)
    p_sum = tl.sum(p16.to(tl.float32), 1)[:, None]
    acc_lo += tl.dot(p16, v_lo) * vs_lo[None, :] + p_sum * vz_lo[None, :]
    acc_hi += tl.dot(p16, v_hi) * vs_hi[None, :] + p_sum * vz_hi[None, :]
    return m_i, l_i, acc_lo, acc_hi


@triton.jit
def _update16(q16_lo, q16_hi, k_ptr, v_ptr, base, n_valid, sm_scale, m_i, l_i, acc_lo, acc_hi,
              G: tl.constexpr, D: tl.constexpr, ON_GPU: tl.constexpr):
    """Online-softmax update with G 16-bit tokens (rows base.. of [*, D] K and V; n_valid live)."""
    HALF: tl.constexpr = D // 2
    k_lo = _load_rows16(k_ptr, base, n_valid, G, D, HALF, 0)
    k_hi = _load_rows16(k_ptr, base, n_valid, G, D, HALF, HALF)
    v_lo = _load_rows16(v_ptr, base, n_valid, G, D, HALF, 0)
    v_hi = _load_rows16(v_ptr, base, n_valid, G, D, HALF, HALF)
    qk = (_mm(q16_lo, tl.trans(k_lo), ON_GPU) + _mm(q16_hi, tl.trans(k_hi), ON_GPU)) * sm_scale
    qk = tl.where((tl.arange(0, G) < n_valid)[None, :], qk, float("-inf"))
    p, m_i, l_i, acc_lo, acc_hi = _online_update(qk, m_i, l_i, acc_lo, acc_hi)
    acc_lo += _mm(p.to(v_lo.dtype), v_lo, ON_GPU)
    acc_hi += _mm(p.to(v_hi.dtype), v_hi, ON_GPU)
    return m_i, l_i, acc_lo, acc_hi


# the split count and its length are arguments, not constants: an eager decode (a mixed step's
# decodes, whose batch changes every step) would otherwise compile a kernel per split count
@triton.jit(do_not_specialize=["groups_per_split", "splits"])
def _decode_kernel(
    q_ptr, kc_ptr, vc_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, kw_ptr, vw_ptr,
    bt_ptr, ctx_ptr, slot_ptr, o_ptr, part_o_ptr, part_ml_ptr,
    stride_qb, stride_qh, stride_ob, stride_oh, stride_bt,
    sm_scale, groups_per_split, splits,
    H: tl.constexpr, REP: tl.constexpr, M: tl.constexpr, P: tl.constexpr, G: tl.constexpr,
    D: tl.constexpr, ONE_SPLIT: tl.constexpr, KV16: tl.constexpr, USE_ASM: tl.constexpr, ON_GPU: tl.constexpr,
):
    """Grid (B, Hkv, splits). KV16: the 16-bit paged peer (kc_ptr/vc_ptr are [pages, Hkv, P, D]
    16-bit pages, every token paged, no window)."""
    HALF: tl.constexpr = D // 2
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.program_id(2)
    ctx = tl.load(ctx_ptr + b)
    if KV16:
        n_full = tl.cdiv(ctx, G)
    else:
        n_full = ctx // G
    rows = tl.arange(0, M)
    row_ok = rows < REP
    j = tl.arange(0, HALF)
    q_off = b.to(tl.int64) * stride_qb + (h * REP + rows)[:, None] * stride_qh + j[None, :]
    q16_lo = tl.load(q_ptr + q_off, mask=row_ok[:, None], other=0.0)
    q16_hi = tl.load(q_ptr + q_off + HALF, mask=row_ok[:, None], other=0.0)
    q_lo = q16_lo.to(tl.float32) * sm_scale  # the fold path: scale rides on q (log2 domain)
    q_hi = q16_hi.to(tl.float32) * sm_scale
    m_i = tl.full([M], float("-inf"), tl.float32)
    l_i = tl.zeros([M], tl.float32)
    acc_lo = tl.zeros([M, HALF], tl.float32)
    acc_hi = tl.zeros([M, HALF], tl.float32)
    g0 = s * groups_per_split
    g1 = tl.minimum(g0 + groups_per_split, n_full)
    if KV16:
        for g in range(g0, g1):
            page = tl.load(bt_ptr + b.to(tl.int64) * stride_bt + (g * G) // P)
            m_i, l_i, acc_lo, acc_hi = _update16(q16_lo, q16_hi, kc_ptr, vc_ptr, (page * H + h) * P + (g * G) % P,
                                                 ctx - g * G, sm_scale, m_i, l_i, acc_lo, acc_hi, G, D, ON_GPU)
    else:
        for g in range(g0, g1):
            page = tl.load(bt_ptr + b.to(tl.int64) * stride_bt + (g * G) // P)
            kb, vb, meta = _int4_tiles(kc_ptr, vc_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, page, h, (g * G) % P,
                                       g < g1, H, P, G, D)
            m_i, l_i, acc_lo, acc_hi = _int4_update(q_lo, q_hi, kb, vb, meta, g < g1,
                                                    m_i, l_i, acc_lo, acc_hi, USE_ASM)
    if not KV16:
        n_win = ctx - n_full * G
        if (n_win > 0) & (n_full >= g0) & (n_full < g0 + groups_per_split):
            slot = tl.load(slot_ptr + b)
            m_i, l_i, acc_lo, acc_hi = _update16(q16_lo, q16_hi, kw_ptr, vw_ptr, (slot * H + h) * G, n_win,
                                                 sm_scale, m_i, l_i, acc_lo, acc_hi, G, D, ON_GPU)
    hq = h * REP + rows
    if ONE_SPLIT:
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        o_off = b.to(tl.int64) * stride_ob + hq[:, None] * stride_oh + j[None, :]
        tl.store(o_ptr + o_off, (acc_lo / l_safe[:, None]).to(o_ptr.dtype.element_ty), mask=row_ok[:, None])
        tl.store(o_ptr + o_off + HALF, (acc_hi / l_safe[:, None]).to(o_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:
        # partials: part_o [B, Hq, splits, D] float32, part_ml [B, Hq, splits, 2] (max, sum)
        idx = ((b * (H * REP) + hq) * splits + s).to(tl.int64)
        tl.store(part_o_ptr + idx[:, None] * D + j[None, :], acc_lo, mask=row_ok[:, None])
        tl.store(part_o_ptr + idx[:, None] * D + HALF + j[None, :], acc_hi, mask=row_ok[:, None])
        tl.store(part_ml_ptr + idx * 2, m_i, mask=row_ok)
        tl.store(part_ml_ptr + idx * 2 + 1, l_i, mask=row_ok)


@triton.jit(do_not_specialize=["splits"])
def _merge_splits_kernel(part_o_ptr, part_ml_ptr, o_ptr, stride_ob, stride_oh, splits, HQ: tl.constexpr,
                         SPLITS_P2: tl.constexpr, D: tl.constexpr):
    """Grid (B * Hq): out = sum_s 2^(m_s - m) o_s / sum_s 2^(m_s - m) l_s."""
    pid = tl.program_id(0)
    b = pid // HQ
    hq = pid % HQ
    sp = tl.arange(0, SPLITS_P2)
    ok = sp < splits
    idx = pid.to(tl.int64) * splits + sp
    m = tl.load(part_ml_ptr + idx * 2, mask=ok, other=float("-inf"))
    l_s = tl.load(part_ml_ptr + idx * 2 + 1, mask=ok, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.where(m == float("-inf"), 0.0, tl.exp2(m - m_max))
    d = tl.arange(0, D)
    o = tl.load(part_o_ptr + idx[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
    out = tl.sum(o * w[:, None], 0) / tl.sum(l_s * w, 0)
    tl.store(o_ptr + b.to(tl.int64) * stride_ob + hq * stride_oh + d, out.to(o_ptr.dtype.element_ty))


# Launch parameters (sweeps: NOTES-attention.md); decode_attention(config=...) overrides them.
DECODE_CONFIG = {"num_warps": 4, "num_stages": 2, "use_asm": True}
PREFILL_CONFIG = {"rows": 64, "num_warps": 4, "num_stages": 2, "impl": "auto"}


def _num_splits(batch: int, kv_heads: int, num_groups: int) -> int:
    """~8 programs per SM (132 SMs), >= 2 groups per split (sweep: NOTES-attention.md)."""
    want = max(1, -(-8 * 132 // (batch * kv_heads)))
    return max(1, min(want, -(-num_groups // 2), 64))


def _launch_decode(q, kv16, tensors, block_tables, context_lens, seq_slots, scale, max_context_len,
                   num_splits, num_kv_heads, page_size, group_size, head_dim, config):
    cfg = {**DECODE_CONFIG, **{k: v for k, v in (config or {}).items() if k in DECODE_CONFIG}}
    b, hq, d = q.shape
    assert d == head_dim, f"q head_dim {d} != cache {head_dim}"
    assert hq % num_kv_heads == 0, f"query heads {hq} not a multiple of KV heads {num_kv_heads}"
    assert q.stride(-1) == 1, "q needs a contiguous last dimension"
    assert context_lens.dtype == torch.int32 and block_tables.dtype == torch.int32
    if max_context_len is None:
        max_context_len = int(context_lens.max())
    num_groups = -(-max_context_len // group_size) + 1  # + the window
    splits = num_splits or _num_splits(b, num_kv_heads, num_groups)
    gps = -(-num_groups // splits)
    splits = -(-num_groups // gps)
    out = torch.empty_like(q)
    rep = hq // num_kv_heads
    f32 = {"dtype": torch.float32, "device": q.device}  # split partials: [B, Hq, splits, D] and (max, sum)
    part_o = torch.empty(b, hq, splits, d, **f32) if splits > 1 else out
    part_ml = torch.empty(b, hq, splits, 2, **f32) if splits > 1 else out
    _decode_kernel[(b, num_kv_heads, splits)](
        q, *tensors, block_tables, context_lens, seq_slots, out, part_o, part_ml,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        scale * LOG2E, gps, splits,
        H=num_kv_heads, REP=rep, M=max(16, triton.next_power_of_2(rep)), P=page_size, G=group_size,
        D=d, ONE_SPLIT=splits == 1, KV16=kv16, USE_ASM=q.is_cuda and cfg["use_asm"], ON_GPU=q.is_cuda,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if splits > 1:
        _merge_splits_kernel[(b * hq,)](
            part_o, part_ml, out, out.stride(0), out.stride(1), splits,
            HQ=hq, SPLITS_P2=triton.next_power_of_2(splits), D=d, num_warps=4,
        )
    return out


def decode_attention(q: torch.Tensor, cache: PagedKVCache, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, seq_slots: torch.Tensor, scale: float,
                     max_context_len: int | None = None, num_splits: int | None = None,
                     config: dict | None = None) -> torch.Tensor:
    """q [B, Hq, D] (sequence b's query at position context_lens[b] - 1) -> [B, Hq, D] in q's dtype.

    block_tables int32 [B, max_pages], context_lens int32 [B] (after the step's write), seq_slots
    int32 [B]. max_context_len: max(context_lens) if known on the host (saves a sync; CUDA graphs
    need it: it sets the grid). num_splits, config (benchmarks): the split count, DECODE_CONFIG or
    decode_cuda.DECODE_CUDA_CONFIG entries, and "impl": "auto" (CUDA where it can), "cuda", "triton".
    """
    ok, reason = can_implement(q, cache)
    assert ok, reason
    impl = (config or {}).get("impl", "auto")
    if impl != "triton":
        ok, reason = decode_cuda.can_implement(q, cache)
        assert ok or impl == "auto", reason
        if ok:
            return decode_cuda.decode(q, cache, block_tables, context_lens, seq_slots, scale, max_context_len,
                                      num_splits, config)
    return _launch_decode(q, False, cache.tensors(), block_tables, context_lens, seq_slots, scale,
                          max_context_len, num_splits, cache.num_kv_heads, cache.page_size,
                          cache.group_size, cache.head_dim, config)


def decode_attention_bf16(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                          block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                          max_context_len: int | None = None, num_splits: int | None = None,
                          config: dict | None = None) -> torch.Tensor:
    """The 16-bit paged peer of decode_attention: k_pages, v_pages [num_pages, Hkv, P, D] in q's dtype."""
    assert k_pages.is_contiguous() and v_pages.is_contiguous() and k_pages.dtype == q.dtype
    psz = k_pages.shape[2]
    tensors = (k_pages, v_pages) + (k_pages,) * 6  # no scales, zeros or window: placeholders
    return _launch_decode(q, True, tensors, block_tables, context_lens, context_lens, scale, max_context_len,
                          num_splits, k_pages.shape[1], psz, 64 if psz % 64 == 0 else psz, k_pages.shape[3], config)


@triton.jit
def _dequant(cb, s_lo, s_hi, z_lo, z_hi, USE_ASM: tl.constexpr):
    """Codes uint8 [G, D/2] -> float16 values (low, high halves): code * scale + zero in registers."""
    c_lo, c_hi = _widen_codes(cb, USE_ASM)
    x_lo = c_lo * s_lo.to(tl.float16)[None, :] + z_lo.to(tl.float16)[None, :]
    x_hi = c_hi * s_hi.to(tl.float16)[None, :] + z_hi.to(tl.float16)[None, :]
    return x_lo, x_hi


@triton.jit
def _attend_tile(q_lo, q_hi, k_lo, k_hi, v_lo, v_hi, visible, m_i, l_i, acc_lo, acc_hi):
    qk = tl.dot(q_lo, tl.trans(k_lo)) + tl.dot(q_hi, tl.trans(k_hi))
    qk = tl.where(visible, qk, float("-inf"))
    p, m_i, l_i, acc_lo, acc_hi = _online_update(qk, m_i, l_i, acc_lo, acc_hi)
    acc_lo += tl.dot(p.to(v_lo.dtype), v_lo)
    acc_hi += tl.dot(p.to(v_hi.dtype), v_hi)
    return m_i, l_i, acc_lo, acc_hi


@triton.jit
def _prefill_kernel(
    q_ptr, kc_ptr, vc_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, kw_ptr, vw_ptr,
    bt_ptr, cu_ptr, ctx_ptr, slot_ptr, o_ptr,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_bt, sm_scale,
    H: tl.constexpr, REP: tl.constexpr, ROWS: tl.constexpr, P: tl.constexpr, G: tl.constexpr,
    D: tl.constexpr, USE_ASM: tl.constexpr,
):
    """Grid (query blocks, B, Hkv). A block is ROWS rows = BLOCK_T tokens x REP query heads (row r:
    token r // REP, head r % REP of KV head h's group); rows past BLOCK_T * REP are padding."""
    HALF: tl.constexpr = D // 2
    BLOCK_T: tl.constexpr = ROWS // REP
    mb = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    tok0 = tl.load(cu_ptr + b)
    n_new = tl.load(cu_ptr + b + 1) - tok0
    if mb * BLOCK_T < n_new:
        ctx = tl.load(ctx_ptr + b)
        l0 = ctx - n_new
        r = tl.arange(0, ROWS)
        tok = mb * BLOCK_T + r // REP
        row_ok = (r < BLOCK_T * REP) & (tok < n_new)
        qpos = l0 + tok
        hq = h * REP + r % REP
        j = tl.arange(0, HALF)
        q_off = (tok0 + tok).to(tl.int64)[:, None] * stride_qt + hq[:, None] * stride_qh + j[None, :]
        # scale folded into q before the float16 cast (log2 domain for exp2)
        q_lo = (tl.load(q_ptr + q_off, mask=row_ok[:, None], other=0.0).to(tl.float32) * sm_scale).to(tl.float16)
        q_hi = (tl.load(q_ptr + q_off + HALF, mask=row_ok[:, None], other=0.0).to(tl.float32) * sm_scale).to(tl.float16)
        m_i = tl.full([ROWS], float("-inf"), tl.float32)
        l_i = tl.zeros([ROWS], tl.float32)
        acc_lo = tl.zeros([ROWS, HALF], tl.float32)
        acc_hi = tl.zeros([ROWS, HALF], tl.float32)
        n_full = ctx // G
        last_pos = l0 + tl.minimum(n_new, (mb + 1) * BLOCK_T) - 1
        g_end = tl.minimum(n_full, last_pos // G + 1)
        first_masked = (l0 + mb * BLOCK_T) // G  # groups before this one are fully visible
        t = tl.arange(0, G)
        for g in range(g_end):
            page = tl.load(bt_ptr + b.to(tl.int64) * stride_bt + (g * G) // P)
            row = (g * G) % P
            kb, vb, meta = _int4_tiles(kc_ptr, vc_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, page, h, row, g < g_end,
                                       H, P, G, D)
            ks_lo, ks_hi, kz_lo, kz_hi, vs_lo, vs_hi, vz_lo, vz_hi = meta
            k_lo, k_hi = _dequant(kb, ks_lo, ks_hi, kz_lo, kz_hi, USE_ASM)
            v_lo, v_hi = _dequant(vb, vs_lo, vs_hi, vz_lo, vz_hi, USE_ASM)
            visible = ((g * G + t)[None, :] <= qpos[:, None]) | (g < first_masked)
            m_i, l_i, acc_lo, acc_hi = _attend_tile(q_lo, q_hi, k_lo, k_hi, v_lo, v_hi, visible,
                                                    m_i, l_i, acc_lo, acc_hi)
        n_win = ctx - n_full * G
        if (n_win > 0) & (n_full * G <= last_pos):
            slot = tl.load(slot_ptr + b)
            base = (slot * H + h) * G
            k_lo = _load_rows16(kw_ptr, base, n_win, G, D, HALF, 0).to(tl.float16)
            k_hi = _load_rows16(kw_ptr, base, n_win, G, D, HALF, HALF).to(tl.float16)
            v_lo = _load_rows16(vw_ptr, base, n_win, G, D, HALF, 0).to(tl.float16)
            v_hi = _load_rows16(vw_ptr, base, n_win, G, D, HALF, HALF).to(tl.float16)
            visible = ((n_full * G + t)[None, :] <= qpos[:, None]) & (t < n_win)[None, :]
            m_i, l_i, acc_lo, acc_hi = _attend_tile(q_lo, q_hi, k_lo, k_hi, v_lo, v_hi, visible,
                                                    m_i, l_i, acc_lo, acc_hi)
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        o_off = (tok0 + tok).to(tl.int64)[:, None] * stride_ot + hq[:, None] * stride_oh + j[None, :]
        tl.store(o_ptr + o_off, (acc_lo / l_safe[:, None]).to(o_ptr.dtype.element_ty), mask=row_ok[:, None])
        tl.store(o_ptr + o_off + HALF, (acc_hi / l_safe[:, None]).to(o_ptr.dtype.element_ty), mask=row_ok[:, None])


def prefill_attention(q: torch.Tensor, cache: PagedKVCache, block_tables: torch.Tensor,
                      cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, seq_slots: torch.Tensor,
                      scale: float, max_seqlen_q: int | None = None, max_context_len: int | None = None,
                      config: dict | None = None, total_context: int | None = None) -> torch.Tensor:
    """Chunked prefill: q [num_tokens, Hq, D], sequence b's rows cu_seqlens_q[b] .. at positions
    context_lens[b] - T_b .. context_lens[b] - 1, causal over the cache (read after the step's
    write) -> [num_tokens, Hq, D].

    Two implementations (config["impl"]; "auto" takes "flash" on CUDA):
    - "flash": kv_cache.gather_kv dequantizes the sequences' pages and windows into contiguous
      16-bit K/V (one memory-bound pass, ~2-8% of the attention time at these lengths), then
      FlashAttention-2 varlen (GQA and bottom-right causal built in), or SDPA for one sequence, runs on them.
    - "fused": one Triton kernel that dequantizes each K/V group to float16 in registers (q is cast
      to float16 after the softmax scale: |q * scale| must stay under 65504). ~2x slower than
      flash on H100 (NOTES-attention.md); kept as the portable path (CPU interpreter, no flash).
    max_seqlen_q, max_context_len: host-side maxima if known (each saves a device sync);
    total_context: sum(context_lens) if known on the host (the "flash" gather then allocates exactly
    that many rows; else batch x max_context_len, a bound that needs no sync).
    """
    ok, reason = can_implement(q, cache)
    assert ok, reason
    b = context_lens.shape[0]
    assert cu_seqlens_q.shape == (b + 1,) and q.stride(-1) == 1
    for t in (block_tables, cu_seqlens_q, context_lens, seq_slots):
        assert t.dtype == torch.int32, f"metadata must be int32, got {t.dtype}"
    if q.shape[0] == 0:
        return torch.empty_like(q)
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    cfg = {**PREFILL_CONFIG, **(config or {})}
    impl = cfg["impl"] if cfg["impl"] != "auto" else ("flash" if q.is_cuda else "fused")
    if impl == "flash":
        return prefill_flash(q, cache, block_tables, cu_seqlens_q, context_lens, seq_slots, scale,
                             max_seqlen_q, max_context_len, total_context)
    out = torch.empty_like(q)
    hkv = cache.num_kv_heads
    rep = q.shape[1] // hkv
    rows = max(cfg["rows"], triton.next_power_of_2(rep))
    grid = (triton.cdiv(max_seqlen_q, rows // rep), b, hkv)
    _prefill_kernel[grid](
        q, *cache.tensors(), block_tables, cu_seqlens_q, context_lens, seq_slots, out,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0), scale * LOG2E,
        H=hkv, REP=rep, ROWS=rows, P=cache.page_size, G=cache.group_size, D=cache.head_dim,
        USE_ASM=q.is_cuda, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out


def can_implement(q: torch.Tensor, cache: PagedKVCache) -> tuple[bool, str]:
    """Whether the kernels take these shapes; q is [B or num_tokens, Hq, D]."""
    if q.dim() != 3:
        return False, f"q must be [tokens, heads, head_dim], got {tuple(q.shape)}"
    hq, d = q.shape[1], q.shape[2]
    if d != cache.head_dim:
        return False, f"q head_dim {d} != cache head_dim {cache.head_dim}"
    if d not in (64, 128, 256):
        return False, f"head_dim {d} not supported (64, 128, 256)"
    if hq % cache.num_kv_heads:
        return False, f"query heads {hq} not a multiple of KV heads {cache.num_kv_heads}"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return False, f"q dtype {q.dtype} not supported (float16, bfloat16)"
    if cache.k_window.dtype != q.dtype:
        return False, f"window dtype {cache.k_window.dtype} != q dtype {q.dtype}"
    if cache.group_size not in (16, 32, 64, 128) or cache.page_size % cache.group_size:
        return False, f"group {cache.group_size} / page {cache.page_size} not supported"
    return True, ""
