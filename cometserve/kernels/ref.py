"""Pure-PyTorch reference of every device op: the specification the GPU kernels are tested against.

Each function here has the signature of its kernel counterpart. They run anywhere (CPU included)
and are what the model uses when no kernel can implement a shape. Numerics follow `scheme.py`:

- rounding is half away from zero, computed as `floor(|v|) + (frac(|v|) >= 0.5)` with the sign put
  back: exact in float32 (`floor(|v| + 0.5)` is not: 0.49999997 + 0.5 rounds up to 1.0), and a
  kernel reproduces it with floor, subtract and compare;
- a per-block reciprocal is taken once (`qmax / absmax`, correctly rounded division) and each
  element is multiplied by it, so a kernel that does the same gets the same codes bit for bit.
"""

from __future__ import annotations

import torch

from cometserve.scheme import BLOCK_SIZE, padded_k

INT4_QMAX = 7
INT8_QMAX = 127
KV_QMAX = 15  # asymmetric unsigned 4-bit codes 0..15
KV_MIN_SCALE = 1e-5  # a constant channel still gets a usable scale


def round_half_away(v: torch.Tensor) -> torch.Tensor:
    a = v.abs()
    fl = torch.floor(a)
    return torch.sign(v) * (fl + (a - fl >= 0.5).to(v.dtype))


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> int8 [N, K]. Byte i holds code 2i in its low nibble, code 2i+1 in its high
    nibble, each a two's-complement 4-bit number (-8..7)."""
    assert packed.dtype == torch.uint8, f"packed int4 must be uint8, got {packed.dtype}"
    p = packed.to(torch.int16)
    lo = p & 0xF
    hi = (p >> 4) & 0xF
    codes = torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    return torch.where(codes >= 8, codes - 16, codes).to(torch.int8)


def weight_codes(qweight: torch.Tensor) -> torch.Tensor:
    """The weight's integer codes [N, K_pad] from its plain storage (uint8 = packed INT4, int8 = INT8)."""
    if qweight.dtype == torch.uint8:
        return unpack_int4(qweight)
    assert qweight.dtype == torch.int8, f"qweight must be uint8 (int4) or int8, got {qweight.dtype}"
    return qweight


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as Llama defines it (normalize in float32, cast back, then scale)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rotary_embedding(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE of q [T, Hq, D] and k [T, Hkv, D] at `positions` [T], with the float32 tables
    cos/sin [max_positions, D/2] (attention scaling folded in). The kernel rotates in place."""
    c, s = cos[positions][:, None, :], sin[positions][:, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        a, b = x.float().chunk(2, dim=-1)
        return torch.cat((a * c - b * s, b * c + a * s), dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2N] = [gate | up] -> silu(gate) * up [..., N] (float32 math, one rounding)."""
    gate, up = x.float().chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(x.dtype)


def hadamard(n: int = BLOCK_SIZE, device=None) -> torch.Tensor:
    """The orthonormal Sylvester-Hadamard matrix [n, n] (n a power of two), float32."""
    h = torch.ones(1, 1, device=device)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h / n**0.5


HADAMARD_NORM = 128**-0.5  # rounded to float32 where it is applied, in the kernel and here


def fwht(x: torch.Tensor) -> torch.Tensor:
    """x [..., 128] float32 -> x @ hadamard(128), as the kernels compute it: seven butterfly stages
    (pairs h apart, h = 1, 2, ..., 64, giving (a + b, a - b)) then one multiply by 128^-1/2. Each
    add is an exactly specified float32 rounding, so kernel and reference agree bit for bit."""
    lead, n = x.shape[:-1], x.shape[-1]
    h = 1
    while h < n:
        pairs = x.reshape(*lead, n // (2 * h), 2, h)
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2).reshape(*lead, n)
        h *= 2
    return x * torch.tensor(HADAMARD_NORM, dtype=torch.float32, device=x.device)


def quant_act(
    x: torch.Tensor,
    perm: torch.Tensor | None,
    block_bits: torch.Tensor,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    rotate: bool = False,
    gated: bool = False,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Fused [residual add ->] [RMSNorm or SiLU-and-multiply ->] gather by `perm` -> [Hadamard
    rotation of INT4 blocks ->] per-token per-block symmetric quantization.

    x: [M, K] float, or [M, 2K] = [gate | up] with `gated` (quantizes silu_and_mul(x), rounded to
    x's dtype as that op returns it); perm: [K] int (new channel j reads old channel perm[j]) or
    None; block_bits: [num_blocks] int, 4 or 8; norm_weight: [K] in the original channel order.
    Returns a_codes int8 [M, K_pad] (zero padded past K) and a_scales float32 [M, num_blocks], and
    with `residual` [M, K] also x + residual (x's dtype), the tensor that is then normalized.
    The normalized activation is kept in float32 (no rounding to 16-bit before quantizing).
    """
    if residual is not None:
        assert not gated, "a gated input takes no residual"
        total = x + residual
        return (*quant_act(total, perm, block_bits, norm_weight, eps, rotate), total)
    if gated:
        assert norm_weight is None, "a gated input takes no RMSNorm"
        x = silu_and_mul(x)
    m, k = x.shape
    nb = block_bits.numel()
    k_pad = padded_k(k)
    assert nb * BLOCK_SIZE == k_pad, f"block_bits has {nb} blocks, K={k} needs {k_pad // BLOCK_SIZE}"
    xf = x.float()
    if norm_weight is not None:
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.float()
    if perm is not None:
        xf = xf[:, perm.long()]
    xf = torch.nn.functional.pad(xf, (0, k_pad - k)).view(m, nb, BLOCK_SIZE)
    int4 = block_bits.to(x.device) == 4
    if rotate and bool(int4.any()):
        xf = torch.where(int4[None, :, None], fwht(xf), xf)
    qmax = torch.where(int4, INT4_QMAX, INT8_QMAX).float()  # [nb]
    absmax = xf.abs().amax(-1)  # [M, nb]
    inv = torch.where(absmax > 0, qmax / absmax, torch.zeros_like(absmax))
    codes = round_half_away(xf * inv.unsqueeze(-1))
    codes = torch.maximum(torch.minimum(codes, qmax[:, None]), -qmax[:, None])
    return codes.view(m, k_pad).to(torch.int8), absmax / qmax


def prepare_weights(qweight: torch.Tensor, w_scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's layout: codes widened once to float32 [N, K_pad] (exact), scales float32
    [N, nb or 1], so each call is one batched float matmul instead of an unpack per call."""
    return weight_codes(qweight).float(), w_scales.float()


def w4ax_gemm(
    a_codes: torch.Tensor,
    a_scales: torch.Tensor,
    qweight: torch.Tensor,
    w_scales: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Y[M, N] = sum over K blocks b of int32(A_b . W_b^T) * a_scale[m, b] * w_scale[n, b] (+ bias).

    a_codes int8 [M, K_pad]; a_scales float32 [M, nb]; qweight uint8 [N, K_pad/2] (INT4), int8
    [N, K_pad] (INT8) or float32 codes (prepare_weights); w_scales [N, nb] or [N, 1] (per output
    channel), float16 (or float32 from prepare_weights).
    The per-block integer products are computed in float32, which is exact: every partial sum is an
    integer below 128 * 127 * 127 < 2^24. The epilogue is float32.
    """
    m, k_pad = a_codes.shape
    w = qweight if qweight.dtype == torch.float32 else weight_codes(qweight).float()
    n = w.shape[0]
    nb = k_pad // BLOCK_SIZE
    assert w.shape[1] == k_pad, f"weight K {w.shape[1]} != activation K {k_pad}"
    assert a_scales.shape == (m, nb), f"a_scales {tuple(a_scales.shape)} != {(m, nb)}"
    assert w_scales.shape[0] == n and w_scales.shape[1] in (1, nb), f"w_scales {tuple(w_scales.shape)}"
    a = a_codes.float().view(m, nb, BLOCK_SIZE).transpose(0, 1)  # [nb, M, 128]
    wb = w.view(n, nb, BLOCK_SIZE).permute(1, 2, 0)  # [nb, 128, N]
    ws = w_scales.float().expand(n, nb)
    out = torch.zeros(m, n, dtype=torch.float32, device=a_codes.device)
    step = max(1, (1 << 26) // max(1, m * n))  # blocks per batched product: bounds the [nb, M, N] buffer
    for b in range(0, nb, step):
        acc = torch.bmm(a[b : b + step], wb[b : b + step])  # exact integers
        out += (acc * a_scales.T[b : b + step, :, None] * ws.T[b : b + step, None, :]).sum(0)
    if bias is not None:
        out += bias.float()
    return out.to(out_dtype)


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One channel-wise group: x [G, H, D] (G tokens) -> codes uint8 [G, H, D] in 0..15, and float16
    scale and zero [H, D] (one pair per head and channel: asymmetric, COMET section 3.2)."""
    xf = x.float()
    mn = xf.amin(0)
    mx = xf.amax(0)
    scale = ((mx - mn) / KV_QMAX).clamp(min=KV_MIN_SCALE).half()
    zero = mn.half()
    inv = 1.0 / scale.float()
    codes = round_half_away((xf - zero.float()) * inv).clamp(0, KV_QMAX)
    return codes.to(torch.uint8), scale, zero


def dequantize_kv(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """codes [G, H, D], scale/zero [H, D] -> [G, H, D] in `dtype`."""
    return (codes.float() * scale.float() + zero.float()).to(dtype)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_positions: torch.Tensor, scale: float
) -> torch.Tensor:
    """Causal attention of T queries over L cached keys of one sequence, GQA by head repetition.

    q: [T, Hq, D]; k, v: [L, Hkv, D] (key j sits at position j); q_positions: [T].
    Query i sees keys 0..q_positions[i]. Softmax in float32. Returns [T, Hq, D] in q's dtype.
    """
    hq = q.shape[1]
    n_rep = hq // k.shape[1]
    kf = k.float().repeat_interleave(n_rep, dim=1)
    vf = v.float().repeat_interleave(n_rep, dim=1)
    scores = torch.einsum("thd,lhd->htl", q.float(), kf) * scale
    key_pos = torch.arange(k.shape[0], device=q.device)
    mask = key_pos[None, :] > q_positions[:, None].to(q.device)  # [T, L]
    scores = scores.masked_fill(mask[None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("htl,lhd->thd", probs, vf).to(q.dtype)


# ---- paged INT4 KV cache (kv_cache.py, attention.py) ----
#
# Layout (one PagedKVCache per decoder layer; see kernels/kv_cache.py for why):
#   k_codes, v_codes  uint8   [num_pages, Hkv, P, D/2]   byte j of a token row holds channel j in its low
#                                                         nibble and channel j + D/2 in its high nibble
#   k_scales, k_zeros, v_scales, v_zeros
#                     float16 [num_pages, Hkv, P/G, D]    one (scale, zero) per group of G tokens
#   k_window, v_window 16-bit [max_seqs, Hkv, G, D]       the partial newest group of each sequence slot;
#                                                         token at position p sits at row p % G
# Sequence b owns pages block_tables[b, :]; token position p lives in page block_tables[b, p // P] at
# row p % P once its group (p // G) is full, and in k_window[seq_slots[b], :, p % G] before that.
# context_lens[b] counts the sequence's tokens AFTER this step's write: attention reads groups
# 0 .. context_lens // G - 1 quantized and the last context_lens % G tokens from the window.


class PagedKVCache:
    """The tensors of one layer's paged INT4 KV cache (layout above)."""

    def __init__(self, k_codes, v_codes, k_scales, k_zeros, v_scales, v_zeros, k_window, v_window):
        self.k_codes, self.v_codes = k_codes, v_codes
        self.k_scales, self.k_zeros, self.v_scales, self.v_zeros = k_scales, k_zeros, v_scales, v_zeros
        self.k_window, self.v_window = k_window, v_window

    @property
    def page_size(self) -> int:
        return self.k_codes.shape[2]

    @property
    def group_size(self) -> int:
        return self.k_window.shape[2]

    @property
    def num_kv_heads(self) -> int:
        return self.k_codes.shape[1]

    @property
    def head_dim(self) -> int:
        return self.k_codes.shape[3] * 2

    @classmethod
    def allocate(cls, num_pages: int, num_kv_heads: int, head_dim: int, max_seqs: int, dtype: torch.dtype,
                 device, page_size: int = 64, group_size: int = 64) -> PagedKVCache:
        assert page_size % group_size == 0, f"page size {page_size} must be a multiple of group {group_size}"
        assert head_dim % 2 == 0, f"head_dim {head_dim} must be even (two codes per byte)"
        codes = (num_pages, num_kv_heads, page_size, head_dim // 2)
        meta = (num_pages, num_kv_heads, page_size // group_size, head_dim)
        win = (max_seqs, num_kv_heads, group_size, head_dim)
        u8, f16 = torch.uint8, torch.float16
        return cls(
            torch.zeros(codes, dtype=u8, device=device), torch.zeros(codes, dtype=u8, device=device),
            torch.ones(meta, dtype=f16, device=device), torch.zeros(meta, dtype=f16, device=device),
            torch.ones(meta, dtype=f16, device=device), torch.zeros(meta, dtype=f16, device=device),
            torch.zeros(win, dtype=dtype, device=device), torch.zeros(win, dtype=dtype, device=device),
        )

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.k_codes, self.v_codes, self.k_scales, self.k_zeros, self.v_scales, self.v_zeros,
                self.k_window, self.v_window)

    def clone(self) -> PagedKVCache:
        return PagedKVCache(*(t.clone() for t in self.tensors()))

    def bytes_per_token(self) -> float:
        """Paged bytes per token (codes + scales and zeros), the window excluded (per sequence)."""
        p, g = self.page_size, self.group_size
        code = 2 * self.num_kv_heads * self.head_dim // 2
        meta = 4 * self.num_kv_heads * self.head_dim * 2 / g
        return (code * p + meta * p) / p


def pack_kv_codes(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 [..., D] in 0..15 -> [..., D/2]: channel j low nibble, channel j + D/2 high nibble."""
    half = codes.shape[-1] // 2
    return codes[..., :half] | (codes[..., half:] << 4)


def unpack_kv_codes(packed: torch.Tensor) -> torch.Tensor:
    return torch.cat((packed & 0xF, packed >> 4), dim=-1)


def _store_group(cache: PagedKVCache, page: int, row: int, k: torch.Tensor, v: torch.Tensor) -> None:
    """Quantize one full group k, v [G, Hkv, D] into page `page` at token row `row`."""
    g = k.shape[0]
    for x, codes_t, scales_t, zeros_t in ((k, cache.k_codes, cache.k_scales, cache.k_zeros),
                                          (v, cache.v_codes, cache.v_scales, cache.v_zeros)):
        codes, scale, zero = quantize_kv(x)
        codes_t[page, :, row:row + g] = pack_kv_codes(codes.permute(1, 0, 2))
        scales_t[page, :, row // g] = scale
        zeros_t[page, :, row // g] = zero


def write_kv(k: torch.Tensor, v: torch.Tensor, cache: PagedKVCache, block_tables: torch.Tensor,
             cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, seq_slots: torch.Tensor,
             max_seqlen_q: int | None = None, rope: tuple | None = None,
             dequantize_into: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """Append new k, v [num_tokens, Hkv, D] (K after RoPE) to the cache, in place.

    Sequence b's new tokens are rows cu_seqlens_q[b] .. cu_seqlens_q[b+1]-1, at positions ending at
    context_lens[b] - 1 (context_lens counts them). Every group that becomes full is quantized as a
    whole into its page; the tokens of a still-partial last group go to the 16-bit window.
    rope: (q, positions, cos, sin): first rotate q and k IN PLACE (`rotary_embedding`).
    dequantize_into: (k_out, v_out) [>= num_tokens, Hkv, D] in the window's dtype: then store at the
    new rows' indices what `gather_kv` gives back for those positions (full groups dequantized, the
    partial group as the window holds it); (k, v) themselves to overwrite them in place. A chunk that
    starts at position 0 then attends over these rows, no gather needed.
    """
    if rope is not None:
        q, positions, cos, sin = rope
        rq, rk = rotary_embedding(q, k, positions, cos, sin)
        q.copy_(rq)
        k.copy_(rk)
    gsz, psz = cache.group_size, cache.page_size
    for b in range(context_lens.shape[0]):
        t0, t1 = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        ctx, slot = int(context_lens[b]), int(seq_slots[b])
        l0 = ctx - (t1 - t0)
        g_first = l0 // gsz
        start = g_first * gsz  # first position of the first group touched
        ks = torch.cat((cache.k_window[slot, :, : l0 - start].transpose(0, 1), k[t0:t1].to(cache.k_window.dtype)))
        vs = torch.cat((cache.v_window[slot, :, : l0 - start].transpose(0, 1), v[t0:t1].to(cache.v_window.dtype)))
        n_full = (ctx - start) // gsz
        for i in range(n_full):
            pos = start + i * gsz
            page = int(block_tables[b, pos // psz])
            _store_group(cache, page, pos % psz, ks[i * gsz:(i + 1) * gsz], vs[i * gsz:(i + 1) * gsz])
        rest = ks.shape[0] - n_full * gsz
        cache.k_window[slot, :, :rest] = ks[n_full * gsz:].transpose(0, 1)
        cache.v_window[slot, :, :rest] = vs[n_full * gsz:].transpose(0, 1)
        if dequantize_into is not None:
            kk, vv = gather_kv(cache, block_tables[b], ctx, slot, cache.k_window.dtype)
            dequantize_into[0][t0:t1], dequantize_into[1][t0:t1] = kk[l0:], vv[l0:]


def gather_kv(cache: PagedKVCache, block_table: torch.Tensor, context_len: int, slot: int,
              dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's keys and values [L, Hkv, D] as attention reads them: full groups dequantized
    (in float32, then rounded to `dtype`, as the plain cache does), the partial group 16-bit."""
    gsz, psz = cache.group_size, cache.page_size
    n_full = context_len // gsz
    out = []
    for codes_t, scales_t, zeros_t, win in ((cache.k_codes, cache.k_scales, cache.k_zeros, cache.k_window),
                                            (cache.v_codes, cache.v_scales, cache.v_zeros, cache.v_window)):
        parts = []
        for g in range(n_full):
            page, row = int(block_table[g * gsz // psz]), g * gsz % psz
            codes = unpack_kv_codes(codes_t[page, :, row:row + gsz]).permute(1, 0, 2)  # [G, Hkv, D]
            parts.append(dequantize_kv(codes, scales_t[page, :, row // gsz], zeros_t[page, :, row // gsz], dtype))
        parts.append(win[slot, :, : context_len - n_full * gsz].transpose(0, 1).to(dtype))
        out.append(torch.cat(parts))
    return out[0], out[1]


def decode_attention(q: torch.Tensor, cache: PagedKVCache, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, seq_slots: torch.Tensor, scale: float,
                     max_context_len: int | None = None, num_splits: int | None = None) -> torch.Tensor:
    """One query per sequence, q [B, Hq, D] at position context_lens[b] - 1 -> [B, Hq, D]."""
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        ctx = int(context_lens[b])
        k, v = gather_kv(cache, block_tables[b], ctx, int(seq_slots[b]), q.dtype)
        pos = torch.tensor([ctx - 1], device=q.device)
        out[b] = attention(q[b:b + 1], k, v, pos, scale)[0]
    return out


def prefill_attention(q: torch.Tensor, cache: PagedKVCache, block_tables: torch.Tensor,
                      cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, seq_slots: torch.Tensor,
                      scale: float, max_seqlen_q: int | None = None,
                      max_context_len: int | None = None, total_context: int | None = None) -> torch.Tensor:
    """Causal attention of new tokens q [num_tokens, Hq, D] (sequence b: rows cu_seqlens_q[b]..,
    positions context_lens[b] - T_b ..) over the cached prefix and themselves -> [num_tokens, Hq, D].
    max_seqlen_q, max_context_len, total_context: the kernels' host-side hints, unused here."""
    out = torch.empty_like(q)
    for b in range(context_lens.shape[0]):
        t0, t1, ctx = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1]), int(context_lens[b])
        k, v = gather_kv(cache, block_tables[b], ctx, int(seq_slots[b]), q.dtype)
        pos = torch.arange(ctx - (t1 - t0), ctx, device=q.device)
        out[t0:t1] = attention(q[t0:t1], k, v, pos, scale)
    return out


def decode_attention_bf16(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                          block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                          max_context_len: int | None = None, num_splits: int | None = None) -> torch.Tensor:
    """The 16-bit paged peer: k_pages, v_pages [num_pages, Hkv, P, D], token p in page
    block_tables[b, p // P] row p % P; q [B, Hq, D] -> [B, Hq, D]."""
    psz = k_pages.shape[2]
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        ctx = int(context_lens[b])
        pages = block_tables[b, : -(-ctx // psz)].long()
        k = k_pages[pages].permute(0, 2, 1, 3).reshape(-1, *k_pages.shape[1:2], k_pages.shape[3])[:ctx]
        v = v_pages[pages].permute(0, 2, 1, 3).reshape(-1, *v_pages.shape[1:2], v_pages.shape[3])[:ctx]
        out[b] = attention(q[b:b + 1], k, v, torch.tensor([ctx - 1], device=q.device), scale)[0]
    return out


def quantize_rows_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] float -> (codes int8 [N, K], scales float32 [N]): per row symmetric, round
    half away from zero (absmax / 127; an all-zero row gets scale 0 and codes 0)."""
    w = weight.float()
    absmax = w.abs().amax(dim=1)
    inv = torch.where(absmax > 0, INT8_QMAX / torch.where(absmax > 0, absmax, 1.0), 0.0)
    codes = round_half_away(w * inv[:, None]).clamp(-INT8_QMAX, INT8_QMAX).to(torch.int8)
    return codes, absmax / INT8_QMAX


def w8a16_logits(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] float, codes int8 [N, K], scales float32 [N] -> float32 [M, N] = (x . codes^T) * scales:
    a weight-only INT8 matrix (the LM head's), the activations as they are."""
    return (x.float() @ codes.float().t()) * scales.float()
