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


def quant_act(
    x: torch.Tensor,
    perm: torch.Tensor | None,
    block_bits: torch.Tensor,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused [RMSNorm ->] gather by `perm` -> per-token per-block symmetric quantization.

    x: [M, K] float; perm: [K] int (new channel j reads old channel perm[j]) or None;
    block_bits: [num_blocks] int, 4 or 8; norm_weight: [K] in the original channel order.
    Returns a_codes int8 [M, K_pad] (zero padded past K) and a_scales float32 [M, num_blocks].
    The normalized activation is kept in float32 (no rounding to 16-bit before quantizing).
    """
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
    qmax = torch.where(block_bits.to(x.device) == 8, INT8_QMAX, INT4_QMAX).float()  # [nb]
    absmax = xf.abs().amax(-1)  # [M, nb]
    inv = torch.where(absmax > 0, qmax / absmax, torch.zeros_like(absmax))
    codes = round_half_away(xf * inv.unsqueeze(-1))
    codes = torch.maximum(torch.minimum(codes, qmax[:, None]), -qmax[:, None])
    return codes.view(m, k_pad).to(torch.int8), absmax / qmax


def prepare_weights(qweight: torch.Tensor, w_scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference reads the checkpoint's plain layout: nothing to prepare."""
    return qweight, w_scales


def w4ax_gemm(
    a_codes: torch.Tensor,
    a_scales: torch.Tensor,
    qweight: torch.Tensor,
    w_scales: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Y[M, N] = sum over K blocks b of int32(A_b . W_b^T) * a_scale[m, b] * w_scale[n, b] (+ bias).

    a_codes int8 [M, K_pad]; a_scales float32 [M, nb]; qweight uint8 [N, K_pad/2] (INT4) or int8
    [N, K_pad] (INT8); w_scales float16 [N, nb] or [N, 1] (per output channel).
    The per-block integer products are computed in float32, which is exact: every partial sum is an
    integer below 128 * 127 * 127 < 2^24. The epilogue is float32, blocks summed in order.
    """
    m, k_pad = a_codes.shape
    w = weight_codes(qweight)
    n = w.shape[0]
    nb = k_pad // BLOCK_SIZE
    assert w.shape[1] == k_pad, f"weight K {w.shape[1]} != activation K {k_pad}"
    assert a_scales.shape == (m, nb), f"a_scales {tuple(a_scales.shape)} != {(m, nb)}"
    assert w_scales.shape[0] == n and w_scales.shape[1] in (1, nb), f"w_scales {tuple(w_scales.shape)}"
    ws = w_scales.float().expand(n, nb)
    out = torch.zeros(m, n, dtype=torch.float32, device=a_codes.device)
    for b in range(nb):
        blk = slice(b * BLOCK_SIZE, (b + 1) * BLOCK_SIZE)
        acc = a_codes[:, blk].float() @ w[:, blk].float().T  # exact integers
        out += acc * a_scales[:, b : b + 1] * ws[:, b]
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
    t, hq, d = q.shape
    n_rep = hq // k.shape[1]
    kf = k.float().repeat_interleave(n_rep, dim=1)
    vf = v.float().repeat_interleave(n_rep, dim=1)
    scores = torch.einsum("thd,lhd->htl", q.float(), kf) * scale
    key_pos = torch.arange(k.shape[0], device=q.device)
    mask = key_pos[None, :] > q_positions[:, None].to(q.device)  # [T, L]
    scores = scores.masked_fill(mask[None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("htl,lhd->thd", probs, vf).to(q.dtype)
