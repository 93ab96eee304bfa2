"""Quantize-and-scatter of new K (after RoPE) and V into the paged INT4 KV cache.

Layout (the specification is `ref.PagedKVCache`; numbers in benchmarks/kernels/NOTES-attention.md):

- Pages of P tokens (P a multiple of the quantization group G; default P = G = 64). Per layer:
  codes uint8 [num_pages, Hkv, P, D/2], byte j of a token row = channel j (low nibble) | channel
  j + D/2 (high nibble). The "half split" lets attention widen a byte tile into two [tokens, D/2]
  operand halves with a mask and a shift, never interleaving registers (HARDWARE.md: widening is
  the cost that matters). Head-major pages make one (page, head) a contiguous 4 KB tile (D = 128).
- float16 scale and zero per (page, group, head, channel): [num_pages, Hkv, P/G, D] x 4 tensors.
  Bytes per token, Llama-3-8B (8 KV heads x 128): codes 1024 + scales 128 = 1152 vs bf16 4096: 0.28x.
- The newest, not yet full group of each sequence stays 16-bit in a window [max_seqs, Hkv, G, D]
  indexed by a per-sequence slot id. A bounded per-sequence cost (G tokens at 16 bits), not a per
  token one: keeping 16-bit values inside every page would cost 4x the codes for every page.

Write semantics: sequence b's new tokens are rows cu_seqlens_q[b] .. cu_seqlens_q[b+1]-1 of k and
v, at positions context_lens[b] - T_b .. context_lens[b] - 1. Every group that becomes full is
quantized as a whole (window rows + new rows) into its page; the rest of a partial last group goes
to the window. No per-token slot mapping is needed: block_tables and positions define every slot.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from cometserve.kernels import pdl
from cometserve.kernels.pointwise import _rotate_heads, rotary_embedding
from cometserve.kernels.ref import PagedKVCache

KV_QMAX = 15.0
KV_MIN_SCALE = 1e-5
PROMPT_CHUNK, PROMPT_WARPS = 16, 4  # write_kv's program shape for prompts


@triton.jit
def _group_offsets(tok0, pos, l0, ctx, h, slot, stride_xt, stride_xh, H: tl.constexpr, G: tl.constexpr,
                   D: tl.constexpr, d):
    """Rows `pos` [G] of one head at channels d: offsets into the window and into the new tokens,
    and which rows live in each (the window before l0, the new tokens from l0 to ctx)."""
    in_win = pos < l0
    in_new = (pos >= l0) & (pos < ctx)
    w_off = ((slot * H + h) * G + (pos % G)).to(tl.int64)[:, None] * D + d[None, :]
    x_off = (tok0 + pos - l0).to(tl.int64)[:, None] * stride_xt + h * stride_xh + d[None, :]
    return w_off, x_off, in_win[:, None], in_new[:, None]


@triton.jit
def _load_group_cols(x_ptr, w_ptr, tok0, pos, l0, ctx, h, slot, stride_xt, stride_xh, H: tl.constexpr,
                     G: tl.constexpr, D: tl.constexpr, W: tl.constexpr, col0):
    """Rows `pos` [G] of one head, channels col0 .. col0 + W: from the window if before l0, else
    from the new tokens. Returns float32 [G, W]."""
    w_off, x_off, in_win, in_new = _group_offsets(tok0, pos, l0, ctx, h, slot, stride_xt, stride_xh, H, G, D,
                                                  col0 + tl.arange(0, W))
    xw = tl.load(w_ptr + w_off, mask=in_win, other=0.0)
    xn = tl.load(x_ptr + x_off, mask=in_new, other=0.0)
    return tl.where(in_win, xw.to(tl.float32), xn.to(tl.float32))


@triton.jit
def _dequant(c, s, z):
    """Codes [G, C] of a group with its scale and zero [C] -> float32: code * scale + zero as one
    FMA, the arithmetic of both the gather and write_kv(dequantize_into=...)."""
    return tl.fma(c.to(tl.float32), s.to(tl.float32)[None, :], z.to(tl.float32)[None, :])


@triton.jit
def _quantize_cols(x):
    """x float32 [G, C] (one full group) -> codes uint8 [G, C], scale and zero float16 [C].
    Bit for bit `ref.quantize_kv`: correctly rounded divisions, round half away from zero."""
    mn = tl.min(x, axis=0)
    mx = tl.max(x, axis=0)
    scale = tl.maximum(tl.math.div_rn(mx - mn, 15.0), 1e-5).to(tl.float16)
    zero = mn.to(tl.float16)
    inv = tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale.to(tl.float32))
    v = (x - zero.to(tl.float32)[None, :]) * inv[None, :]
    a = tl.abs(v)
    fl = tl.floor(a)
    r = fl + tl.where(a - fl >= 0.5, 1.0, 0.0)
    r = tl.where(v < 0, -r, r)
    r = tl.minimum(tl.maximum(r, 0.0), 15.0)
    return r.to(tl.uint8), scale, zero


@triton.jit
def _write_one(x_ptr, w_ptr, c_ptr, s_ptr, z_ptr, o_ptr, tok0, pos, l0, ctx, h, slot, page, row, stride_xt,
               stride_xh, stride_ot, stride_oh, H: tl.constexpr, P: tl.constexpr, G: tl.constexpr,
               D: tl.constexpr, HALF: tl.constexpr, CHW: tl.constexpr, chunk, DEQ: tl.constexpr, CH: tl.constexpr):
    """Quantize channels chunk * CHW .. + CHW of each half of the full group at rows `pos` of K or V
    and store their packed codes, scales and zeros; DEQ: also store the group's new-token rows'
    dequantized values into o (rows and heads as in x, strides stride_ot, stride_oh). Channels are
    independent (one scale and zero per channel), so the group is quantized in column chunks of CH:
    [G, HALF] float32 tiles for both halves took ~200 registers a thread, which let 2 programs run
    per SM and made a decode step's write (one row per sequence, a rare full group) 36 us at 512
    sequences."""
    t = tl.arange(0, G)
    j = tl.arange(0, CH)
    c_row = ((page * H + h) * P + row + t).to(tl.int64)[:, None] * HALF
    m_row = ((page * H + h) * (P // G) + row // G).to(tl.int64) * D
    for c0 in range(chunk * CHW, chunk * CHW + CHW, CH):  # a loop, not unrolled: else the loads are hoisted
        lo = _load_group_cols(x_ptr, w_ptr, tok0, pos, l0, ctx, h, slot, stride_xt, stride_xh, H, G, D, CH, c0)
        hi = _load_group_cols(x_ptr, w_ptr, tok0, pos, l0, ctx, h, slot, stride_xt, stride_xh, H, G, D, CH,
                              c0 + HALF)
        c_lo, s_lo, z_lo = _quantize_cols(lo)
        c_hi, s_hi, z_hi = _quantize_cols(hi)
        tl.store(c_ptr + c_row + c0 + j[None, :], c_lo | (c_hi << 4))
        tl.store(s_ptr + m_row + c0 + j, s_lo)
        tl.store(s_ptr + m_row + HALF + c0 + j, s_hi)
        tl.store(z_ptr + m_row + c0 + j, z_lo)
        tl.store(z_ptr + m_row + HALF + c0 + j, z_hi)
        if DEQ:
            _, o_off, _, in_new = _group_offsets(tok0, pos, l0, ctx, h, slot, stride_ot, stride_oh, H, G, D, c0 + j)
            tl.store(o_ptr + o_off, _dequant(c_lo, s_lo, z_lo).to(o_ptr.dtype.element_ty), mask=in_new)
            tl.store(o_ptr + o_off + HALF, _dequant(c_hi, s_hi, z_hi).to(o_ptr.dtype.element_ty), mask=in_new)


@triton.jit
def _copy_tail(x_ptr, w_ptr, o_ptr, tok0, start, l0, ctx, h, slot, stride_xt, stride_xh, stride_ot, stride_oh,
               H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, CHW: tl.constexpr, chunk, DEQ: tl.constexpr):
    """Channels chunk * CHW .. + CHW of each half of the new tokens of the partial last group
    (positions max(start, l0) .. ctx - 1) into the window (DEQ: and into o), one row at a time: a
    decode step copies one row, not a masked G-row tile (measured 25 us per layer at 256 sequences
    that way)."""
    d = tl.arange(0, 2 * CHW)
    if 2 * CHW < D:  # this chunk's channels of both halves (else whole rows)
        d = chunk * CHW + d + tl.where(d >= CHW, D // 2 - CHW, 0)
    for p in range(tl.maximum(start, l0), ctx):
        x = tl.load(x_ptr + (tok0 + p - l0).to(tl.int64) * stride_xt + h * stride_xh + d)
        tl.store(w_ptr + ((slot * H + h) * G + p % G).to(tl.int64) * D + d, x.to(w_ptr.dtype.element_ty))
        if DEQ:
            tl.store(o_ptr + (tok0 + p - l0).to(tl.int64) * stride_ot + h * stride_oh + d, x.to(o_ptr.dtype.element_ty))


@triton.jit(do_not_specialize=["stride_bt"])  # the block-table width changes every step
def _write_kv_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, kw_ptr, vw_ptr, ko_ptr, vo_ptr,
    bt_ptr, cu_ptr, ctx_ptr, slot_ptr, q_ptr, pos_ptr, cos_ptr, sin_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_bt, stride_qt, stride_qh, stride_ot, stride_oh,
    H: tl.constexpr, P: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
    ROPE: tl.constexpr, QPK: tl.constexpr, BLOCK_Q: tl.constexpr, NCH: tl.constexpr, CH: tl.constexpr,
    DEQ: tl.constexpr, PDL: tl.constexpr,
):
    """Grid (B, groups touched, 2 Hkv NCH): K (even z // NCH) or V (odd) of head h = z // (2 NCH),
    channel chunk z % NCH of each half. Program (b, i, z) quantizes its chunk of group g_first + i of
    sequence b if this step fills it (DEQ: and stores those new rows' dequantized values into ko or
    vo; the partial group's rows go there as they are). Programs i = 0 alone also write their chunk
    of the partial last group to the window, after a barrier: they are the only programs that read
    the old window (g_first's rows, their chunk), so no program can overwrite window rows before
    they are read. K and V (and
    a prompt's channel chunks) in separate programs shorten each program's chain of dependent loads
    (the latency a write is made of).
    ROPE (decode: one new token per sequence): K program (b, 0, h) first rotates that token's k head
    h and its QPK query heads in place (pointwise._rotary_kernel's arithmetic), so the separate RoPE
    launch disappears from a decode step."""
    pdl.wait(PDL)  # k, v, q come from the GEMM before
    pdl.launch_dependents(PDL)
    b = tl.program_id(0)
    i = tl.program_id(1)
    h = tl.program_id(2) // (2 * NCH)
    is_k = (tl.program_id(2) // NCH) % 2 == 0
    chunk = tl.program_id(2) % NCH
    tok0 = tl.load(cu_ptr + b)
    n_new = tl.load(cu_ptr + b + 1) - tok0
    ctx = tl.load(ctx_ptr + b)
    slot = tl.load(slot_ptr + b)
    HALF: tl.constexpr = D // 2
    if ROPE:
        if is_k & (n_new > 0):
            pos_t = tl.load(pos_ptr + tok0)
            d = tl.arange(0, HALF)
            cos = tl.load(cos_ptr + pos_t * HALF + d)[None, :]
            sin = tl.load(sin_ptr + pos_t * HALF + d)[None, :]
            _rotate_heads(q_ptr, QPK, tok0 * stride_qt + h * QPK * stride_qh, stride_qh, cos, sin, HALF, BLOCK_Q)
            _rotate_heads(k_ptr, 1, tok0 * stride_kt + h * stride_kh, stride_kh, cos, sin, HALF, 2)
        tl.debug_barrier()  # the rotated k row is read back below (by other threads of this program)
    if is_k:
        x_ptr, w_ptr, c_ptr, s_ptr, z_ptr, o_ptr = k_ptr, kw_ptr, kc_ptr, ks_ptr, kz_ptr, ko_ptr
        stride_xt, stride_xh = stride_kt, stride_kh
    else:
        x_ptr, w_ptr, c_ptr, s_ptr, z_ptr, o_ptr = v_ptr, vw_ptr, vc_ptr, vs_ptr, vz_ptr, vo_ptr
        stride_xt, stride_xh = stride_vt, stride_vh
    l0 = ctx - n_new
    g = l0 // G + i
    pos = g * G + tl.arange(0, G)
    if (n_new > 0) & ((g + 1) * G <= ctx):
        page = tl.load(bt_ptr + b.to(tl.int64) * stride_bt + (g * G) // P)
        row = (g * G) % P
        _write_one(x_ptr, w_ptr, c_ptr, s_ptr, z_ptr, o_ptr, tok0, pos, l0, ctx, h, slot, page, row,
                   stride_xt, stride_xh, stride_ot, stride_oh, H, P, G, D, HALF, HALF // NCH, chunk, DEQ, CH)
    if (i == 0) & (n_new > 0) & (ctx % G != 0):
        tl.debug_barrier()
        start = ((ctx - 1) // G) * G
        _copy_tail(x_ptr, w_ptr, o_ptr, tok0, start, l0, ctx, h, slot, stride_xt, stride_xh, stride_ot, stride_oh,
                   H, G, D, HALF // NCH, chunk, DEQ)


def write_kv(k: torch.Tensor, v: torch.Tensor, cache: PagedKVCache, block_tables: torch.Tensor,
             cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, seq_slots: torch.Tensor,
             max_seqlen_q: int | None = None, rope: tuple | None = None,
             dequantize_into: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """Append k, v [num_tokens, Hkv, D] to `cache` in place (semantics: module docstring, ref.write_kv).

    block_tables int32 [B, max_pages]; cu_seqlens_q int32 [B+1]; context_lens int32 [B] (after this
    step); seq_slots int32 [B] (window row of each sequence). max_seqlen_q: the largest T_b, if the
    caller knows it (saves a device-to-host sync). rope: (q [T, Hq, D], positions [T], cos, sin) to
    rotate q and k in place first (pointwise.rotary_embedding's arguments); fused into this launch
    when every sequence brings at most one token (decode), a separate launch otherwise.
    dequantize_into: (k_out, v_out) to receive the values the cache gives back for the new rows
    (ref.write_kv); (k, v) themselves to overwrite them in place.
    """
    ok, reason = can_implement(k, cache)
    assert ok, reason
    outs = dequantize_into or (k, v)
    if dequantize_into is not None:
        ko, vo = dequantize_into
        assert ko.dtype == vo.dtype == cache.k_window.dtype and ko.stride() == vo.stride(), (
            f"dequantize_into needs two tensors of equal strides in the window's dtype {cache.k_window.dtype}")
        assert ko.shape[0] >= k.shape[0] and ko.shape[1:] == k.shape[1:] and ko.stride(-1) == 1, (
            f"dequantize_into rows {tuple(ko.shape)} do not fit k {tuple(k.shape)}")
    b = context_lens.shape[0]
    assert v.shape == k.shape, f"v {tuple(v.shape)} != k {tuple(k.shape)}"
    assert cu_seqlens_q.shape == (b + 1,) and seq_slots.shape == (b,) and block_tables.shape[0] == b
    assert k.stride(-1) == 1 and v.stride(-1) == 1, "k and v need a contiguous last dimension"
    for t in (block_tables, cu_seqlens_q, context_lens, seq_slots):
        assert t.dtype == torch.int32, f"metadata must be int32, got {t.dtype}"
    if b == 0 or k.shape[0] == 0:
        return
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    h = cache.num_kv_heads
    rope_args, q_strides, qpk = (k, k, k, k), (0, 0), 1  # unused placeholders without a fused RoPE
    if rope is not None:
        q = rope[0]
        assert q.shape[0] == k.shape[0] and q.shape[1] % h == 0 and q.stride(-1) == 1, (
            f"q {tuple(q.shape)} must be [T, a multiple of {h} heads, D]")
        if max_seqlen_q > 1:
            rotary_embedding(q, k, *rope[1:])
            rope = None
        else:
            rope_args, q_strides, qpk = rope, (q.stride(0), q.stride(1)), q.shape[1] // h
    g = cache.group_size
    groups = (max_seqlen_q + 2 * g - 2) // g  # groups a run of T tokens can touch
    # a prompt's groups in channel chunks of PROMPT_CHUNK per half, one program each (a decode step's
    # rare full group keeps one program per head, 16 channels at a time: its RoPE rotates whole rows)
    chunked = rope is None and max_seqlen_q > 1
    ch = min(PROMPT_CHUNK, cache.head_dim // 2) if chunked else 16
    nch = cache.head_dim // 2 // ch if chunked else 1
    _write_kv_kernel[(b, groups, 2 * h * nch)](
        k, v, *cache.tensors(), *outs, block_tables, cu_seqlens_q, context_lens, seq_slots, *rope_args,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), block_tables.stride(0), *q_strides,
        outs[0].stride(0), outs[0].stride(1),
        H=h, P=cache.page_size, G=g, D=cache.head_dim, ROPE=rope is not None,
        QPK=qpk, BLOCK_Q=max(2, triton.next_power_of_2(qpk)), NCH=nch, CH=ch, DEQ=dequantize_into is not None,
        num_warps=PROMPT_WARPS if chunked else 4,
        **pdl.launch_kwargs(k),
    )


@triton.jit
def _dequant_store(c_ptr, s_ptr, z_ptr, o_ptr, c_off, m_off, o_off, HALF: tl.constexpr):
    c = tl.load(c_ptr + c_off)
    lo = _dequant(c & 15, tl.load(s_ptr + m_off), tl.load(z_ptr + m_off))
    hi = _dequant(c >> 4, tl.load(s_ptr + m_off + HALF), tl.load(z_ptr + m_off + HALF))
    tl.store(o_ptr + o_off, lo.to(o_ptr.dtype.element_ty))
    tl.store(o_ptr + o_off + HALF, hi.to(o_ptr.dtype.element_ty))


@triton.jit
def _gather_one(c_ptr, s_ptr, z_ptr, w_ptr, o_ptr, page, b, g, h, ctx, rows, slot_ptr, stride_ot,
                stride_oh, H: tl.constexpr, P: tl.constexpr, G: tl.constexpr, D: tl.constexpr):
    """Group g of sequence b, head h, of K or V -> output rows `rows`: a full group dequantized (its
    page: `page`), the partial last group copied from the window."""
    HALF: tl.constexpr = D // 2
    n_full = ctx // G
    t = tl.arange(0, G)
    if g < n_full:
        j = tl.arange(0, HALF)
        row = (g * G) % P
        c_off = ((page * H + h) * P + row + t).to(tl.int64)[:, None] * HALF + j[None, :]
        m_off = ((page * H + h) * (P // G) + row // G).to(tl.int64) * D + j
        o_off = (rows * stride_ot + h * stride_oh)[:, None] + j[None, :]
        _dequant_store(c_ptr, s_ptr, z_ptr, o_ptr, c_off, m_off, o_off, HALF)
    elif g == n_full:
        d = tl.arange(0, D)
        m = (t < ctx - n_full * G)[:, None]
        slot = tl.load(slot_ptr + b)
        w_off = ((slot * H + h) * G + t).to(tl.int64)[:, None] * D + d[None, :]
        o_off = (rows * stride_ot + h * stride_oh)[:, None] + d[None, :]
        tl.store(o_ptr + o_off, tl.load(w_ptr + w_off, mask=m).to(o_ptr.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["stride_bt", "max_pages"])  # they change every step
def _gather_kv_kernel(
    kc_ptr, vc_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, kw_ptr, vw_ptr, bt_ptr, ctx_ptr, cu_k_ptr, slot_ptr,
    k_out_ptr, v_out_ptr, stride_bt, max_pages, stride_ot, stride_oh,
    H: tl.constexpr, P: tl.constexpr, G: tl.constexpr, D: tl.constexpr, PDL: tl.constexpr,
):
    """Grid (B, groups, 2 Hkv): group g of sequence b, head h, K (even z) or V (odd z) -> rows
    cu_k[b] + g*G .. of the output. K and V in separate programs: a short prefill's gather has few
    groups, and twice the programs halve its latency-bound tail."""
    pdl.wait(PDL)  # the cache was just written by write_kv
    pdl.launch_dependents(PDL)
    b = tl.program_id(0)
    g = tl.program_id(1)
    h = tl.program_id(2) // 2
    ctx = tl.load(ctx_ptr + b)
    rows = (tl.load(cu_k_ptr + b) + g * G + tl.arange(0, G)).to(tl.int64)
    # the page is loaded beside ctx, not after it (one memory round trip less in a short gather's chain)
    pi = (g * G) // P
    page = tl.load(bt_ptr + b.to(tl.int64) * stride_bt + pi, mask=pi < max_pages, other=0)
    if tl.program_id(2) % 2 == 0:
        _gather_one(kc_ptr, ks_ptr, kz_ptr, kw_ptr, k_out_ptr, page, b, g, h, ctx, rows, slot_ptr,
                    stride_ot, stride_oh, H, P, G, D)
    else:
        _gather_one(vc_ptr, vs_ptr, vz_ptr, vw_ptr, v_out_ptr, page, b, g, h, ctx, rows, slot_ptr,
                    stride_ot, stride_oh, H, P, G, D)


def gather_kv(cache: PagedKVCache, block_tables: torch.Tensor, context_lens: torch.Tensor,
              cu_seqlens_k: torch.Tensor, seq_slots: torch.Tensor, dtype: torch.dtype,
              max_context_len: int | None = None, total_tokens: int | None = None,
              head_major: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The sequences' keys and values as attention reads them, contiguous: k, v [sum(context_lens),
    Hkv, D] in `dtype`, sequence b at rows cu_seqlens_k[b] ..; full groups dequantized (code * scale
    + zero in float32, as ref.gather_kv, possibly fused into one FMA), the window copied.
    total_tokens: rows to allocate, >= sum(context_lens) (default: the exact sum, a device sync);
    max_context_len likewise saves a sync. Rows past the sum are left unwritten. head_major: store
    [Hkv, total, D] (returned as its [total, Hkv, D] view), the layout SDPA takes."""
    b = context_lens.shape[0]
    assert cu_seqlens_k.shape == (b + 1,) and cu_seqlens_k.dtype == torch.int32
    if max_context_len is None:
        max_context_len = int(context_lens.max()) if b else 0
    if total_tokens is None:
        total_tokens = int(cu_seqlens_k[-1]) if b else 0
    h, d = cache.num_kv_heads, cache.head_dim
    dev = cache.k_codes.device
    if head_major:
        k = torch.empty(h, total_tokens, d, dtype=dtype, device=dev).transpose(0, 1)
        v = torch.empty(h, total_tokens, d, dtype=dtype, device=dev).transpose(0, 1)
    else:
        k = torch.empty(total_tokens, h, d, dtype=dtype, device=dev)
        v = torch.empty_like(k)
    if total_tokens == 0:
        return k, v
    groups = max_context_len // cache.group_size + 1
    _gather_kv_kernel[(b, groups, 2 * h)](
        *cache.tensors(), block_tables, context_lens, cu_seqlens_k, seq_slots, k, v, block_tables.stride(0),
        block_tables.shape[1], k.stride(0), k.stride(1),
        H=h, P=cache.page_size, G=cache.group_size, D=d, num_warps=4, **pdl.launch_kwargs(k),
    )
    return k, v


def can_implement(k: torch.Tensor, cache: PagedKVCache) -> tuple[bool, str]:
    d = cache.head_dim
    if k.dim() != 3 or k.shape[1:] != (cache.num_kv_heads, d):
        return False, f"k must be [num_tokens, {cache.num_kv_heads}, {d}], got {tuple(k.shape)}"
    if d not in (64, 128, 256):
        return False, f"head_dim {d} not supported (64, 128, 256)"
    if cache.group_size not in (16, 32, 64, 128):
        return False, f"group size {cache.group_size} not supported (16..128, power of two)"
    if cache.page_size % cache.group_size:
        return False, f"page size {cache.page_size} is not a multiple of group {cache.group_size}"
    if k.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False, f"k dtype {k.dtype} not supported"
    if not all(t.is_contiguous() for t in cache.tensors()):
        return False, "cache tensors must be contiguous"
    return True, ""
