"""W4Ax GEMM for Hopper: Y[M, N] = sum_b int32(A_b . W_b^T) * a_scale[m, b] * w_scale[n, b] (+ bias).

Hopper has no INT4 tensor cores (HARDWARE.md: `mma.sync` s4 is emulated, 26x slower than s8), so
weights stay 4-bit in memory and are widened in registers right before INT8 `tl.dot`s:

- Mask widening (COMET section 4.3): a packed byte keeps each 4-bit code in the HIGH nibble of an
  int8 (`x & 0xF0`, `(x << 4) & 0xF0`), i.e. code * 16, done as one 32-bit op per 4 bytes with
  `inline_asm_elementwise(pack=4)`. The int32 block sums are then exactly 16x the true ones (still
  integers, |16 * 128 * 8 * 127| < 2^22), and the final fp32 sum is multiplied by 1/16 (a power of
  two: exact).
- `prepare_weights` splits each 128-channel block in halves: byte j of a block holds channel j in
  its low nibble and channel j + 64 in its high nibble, so the two masks give two [BN, 64] operands
  for two K=64 dots against the two activation half-tiles: no interleaving shuffle in registers.
- Swap AB: the widened weights are the A operand (the one wgmma reads from registers) and the
  kernel computes the transposed tile Y^T[BN, BM]; the activation tile is B, through shared memory.
  With weights as B, Triton would round-trip them through shared memory (measured 0.9-1.16x vs
  1.41-1.66x cuBLAS bf16 at large M).
- Per-block int32 -> fp32 with the magic-number trick (add 0x4B400000, reinterpret, subtract
  1.5 * 2^23): two full-rate ops instead of I2F, which issues at a quarter of the FP32 rate and
  would compete with the tensor cores here (one conversion per output element per 128 K).
- Small M (decode) is a weight stream: split-K over the 128-channel blocks fills all SMs; each split
  writes an fp32 partial, the last split of a tile (counted on a semaphore) sums the partials in
  split order (deterministic), adds the bias, stores Y and resets the semaphore: ONE launch, no
  memset.

Activation codes are always int8 containers (scheme.py), so the GEMM never needs the block map.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from cometserve.scheme import BLOCK_SIZE

HALF = BLOCK_SIZE // 2  # channels per nibble half of a block
# constants visible inside @triton.jit functions must be tl.constexpr globals
_BLK = tl.constexpr(BLOCK_SIZE)
_HALF = tl.constexpr(HALF)
_MAGIC_I32 = tl.constexpr(0x4B400000)  # bit pattern of 1.5 * 2^23: its mantissa ulp is 1.0
_MAGIC_F32 = tl.constexpr(12582912.0)


@triton.jit
def _widen_int4(wp, USE_ASM: tl.constexpr):
    """uint8 [BN, 64] packed -> (low, high) int8 [BN, 64] codes * 16 (see module doc)."""
    if USE_ASM:
        # one 32-bit shl/and per 4 packed bytes: the shift's bleed into the neighbour byte's low
        # nibble is masked off, so the op stays byte-wise (elementwise for pack=4).
        lo, hi = tl.inline_asm_elementwise(
            asm="{ .reg .b32 t; shl.b32 t, $2, 4; and.b32 $0, t, 0xF0F0F0F0; and.b32 $1, $2, 0xF0F0F0F0; }",
            constraints="=r,=r,r",
            args=[wp],
            dtype=(tl.int8, tl.int8),
            is_pure=True,
            pack=4,
        )
    else:  # the interpreter runs no PTX: same bits with byte ops
        lo = ((wp << 4) & 0xF0).to(tl.uint8).to(tl.int8, bitcast=True)
        hi = (wp & 0xF0).to(tl.uint8).to(tl.int8, bitcast=True)
    return lo, hi


@triton.jit
def _block_dot(a_ptr, w_ptr, offs_m, offs_n, offs_h, b, mask_m, stride_am, stride_wn,
               W_BITS: tl.constexpr, USE_ASM: tl.constexpr):
    """int32 [BN, BM] = W_b . A_b^T over one 128-channel block b (x16 for INT4 weights)."""
    a_base = a_ptr + offs_m[None, :] * stride_am + b * _BLK + offs_h[:, None]  # [64, BM]
    a_lo = tl.load(a_base, mask=mask_m[None, :], other=0)
    a_hi = tl.load(a_base + _HALF, mask=mask_m[None, :], other=0)
    if W_BITS == 4:
        wp = tl.load(w_ptr + offs_n[:, None] * stride_wn + b * _HALF + offs_h[None, :])
        w_lo, w_hi = _widen_int4(wp, USE_ASM)
    else:
        w_base = w_ptr + offs_n[:, None] * stride_wn + b * _BLK + offs_h[None, :]
        w_lo = tl.load(w_base)
        w_hi = tl.load(w_base + _HALF)
    d = tl.dot(w_lo, a_lo, out_dtype=tl.int32)
    return tl.dot(w_hi, a_hi, d, out_dtype=tl.int32)


@triton.jit
def _load_scales(as_ptr, ws_ptr, offs_m, offs_n, mask_m, b, stride_asm, stride_wsb):
    """a_scale[BM] fp32 and w_scale[BN] -> fp32 of block b. Called one block ahead: Triton's
    pipeliner leaves these small loads synchronous, and each would expose a full memory latency."""
    a_s = tl.load(as_ptr + offs_m * stride_asm + b, mask=mask_m, other=0.0)
    w_s = tl.load(ws_ptr + b * stride_wsb + offs_n).to(tl.float32)
    return a_s, w_s


@triton.jit
def _epilogue(acc, y_ptr, bias_ptr, offs_m, offs_n, mask_m, stride_ym,
              W_BITS: tl.constexpr, HAS_BIAS: tl.constexpr):
    if W_BITS == 4:
        acc = acc * 0.0625  # undo the x16 of mask widening: exact (power of two)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n).to(tl.float32)[:, None]
    y = acc.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None], y, mask=mask_m[None, :])


@triton.jit
def _w4ax_kernel(
    a_ptr, as_ptr, w_ptr, ws_ptr, bias_ptr, y_ptr, part_ptr, sem_ptr,  # pointers
    M, N, NB, SPLIT_K,  # dims (SPLIT_K: K splits, runtime so one binary serves every split)
    stride_am, stride_asm, stride_wn, stride_wsb, stride_ym,  # strides
    W_BITS: tl.constexpr, HAS_BIAS: tl.constexpr, USE_SPLIT: tl.constexpr,  # meta
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, GROUP_N: tl.constexpr,
    USE_ASM: tl.constexpr, MAGIC_CVT: tl.constexpr,
):
    # grouped tile order: GROUP_N weight tiles sweep all activation tiles together, so a weight
    # tile is read from DRAM once per group and the activation tiles stay in L2.
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_n = N // BLOCK_N
    num_pid_m = tl.cdiv(M, BLOCK_M)
    width = GROUP_N * num_pid_m
    first_n = (pid // width) * GROUP_N
    group = tl.minimum(num_pid_n - first_n, GROUP_N)
    pid_n = first_n + (pid % width) % group
    pid_m = (pid % width) // group

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_h = tl.arange(0, _HALF)
    mask_m = offs_m < M
    per_split = tl.cdiv(NB, SPLIT_K)
    b_lo = pid_k * per_split
    b_hi = tl.minimum(b_lo + per_split, NB)

    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    a_s, w_s = _load_scales(as_ptr, ws_ptr, offs_m, offs_n, mask_m, b_lo, stride_asm, stride_wsb)
    for b in range(b_lo, b_hi):
        nxt = tl.minimum(b + 1, b_hi - 1)
        a_s_next, w_s_next = _load_scales(as_ptr, ws_ptr, offs_m, offs_n, mask_m, nxt, stride_asm,
                                          stride_wsb)
        d = _block_dot(a_ptr, w_ptr, offs_m, offs_n, offs_h, b, mask_m, stride_am, stride_wn,
                       W_BITS, USE_ASM)
        if MAGIC_CVT:
            f = (d + _MAGIC_I32).to(tl.float32, bitcast=True) - _MAGIC_F32
        else:
            f = d.to(tl.float32)
        acc += f * (w_s[:, None] * a_s[None, :])
        a_s, w_s = a_s_next, w_s_next

    if USE_SPLIT:
        # partial [SPLIT_K, M, N] fp32; the last split to arrive reduces in split order.
        tile_ptrs = offs_m[None, :] * N + offs_n[:, None]
        tl.store(part_ptr + pid_k * M * N + tile_ptrs, acc, mask=mask_m[None, :])
        tl.debug_barrier()  # every thread's partial stored before the release below
        tile = pid_n * num_pid_m + pid_m
        arrived = tl.atomic_add(sem_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            for s in range(SPLIT_K):
                acc += tl.load(part_ptr + s * M * N + tile_ptrs, mask=mask_m[None, :], other=0.0,
                               cache_modifier=".cg")
            tl.atomic_xchg(sem_ptr + tile, 0, sem="relaxed", scope="gpu")  # ready for the next call
            _epilogue(acc, y_ptr, bias_ptr, offs_m, offs_n, mask_m, stride_ym, W_BITS, HAS_BIAS)
    else:
        _epilogue(acc, y_ptr, bias_ptr, offs_m, offs_n, mask_m, stride_ym, W_BITS, HAS_BIAS)


# ---------------------------------------------------------------------------------------------
# launcher: configurations, the tuned table, checks, allocation, launch


@dataclass(frozen=True)
class GemmConfig:
    block_n: int  # weight rows per tile (the wgmma M side: 64 per warpgroup)
    block_m: int  # tokens per tile (the wgmma N side: 16..256)
    split_k: int
    group_n: int = 8
    num_warps: int = 4
    num_stages: int = 4


class _State:
    """Per-process caches: tuned configs keyed by (device, M bucket, N, K_pad, w_bits), semaphore
    buffers per device (zero between calls: the last split of each tile resets its counter)."""

    def __init__(self) -> None:
        self.tuned: dict[tuple, GemmConfig] = {}
        self.sems: dict[torch.device, torch.Tensor] = {}
        self.num_sms: dict[torch.device, int] = {}


_STATE = _State()
MAX_SEMAPHORES = 1 << 16


def _m_bucket(m: int) -> int:
    return min(max(16, triton.next_power_of_2(m)), 4096)


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: any small number exercises the split-K path
    if device not in _STATE.num_sms:
        _STATE.num_sms[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _STATE.num_sms[device]


def _split_for(tiles: int, nb: int, sms: int, waves: float) -> int:
    """K splits so that tiles * splits ~ waves * SMs (a weight stream needs every SM pulling)."""
    return max(1, min(nb, round(waves * sms / tiles)))


def candidates(m: int, n: int, nb: int, device: torch.device) -> list[GemmConfig]:
    """The small tuning space, first entry = the untuned default."""
    sms = _sm_count(device)
    bm = max(16, triton.next_power_of_2(m))
    out: list[GemmConfig] = []
    if bm <= 64:  # weight stream: the token tile is tiny, split K to fill the machine
        for bn, warps, stages in ((128, 4, 4), (64, 4, 5), (128, 8, 3)):
            if n % bn == 0:
                tiles = n // bn
                for waves in (1.0, 2.0):
                    out.append(GemmConfig(bn, bm, _split_for(tiles, nb, sms, waves), 8, warps, stages))
    elif bm <= 256:  # middle: tensor work grows; split only if the tiles leave SMs idle
        for bm_t in (64, 128):
            tiles = (n // 128) * triton.cdiv(m, bm_t)
            split = _split_for(tiles, nb, sms, 1.0) if tiles < sms else 1
            out.append(GemmConfig(128, bm_t, split, 8, 4 if bm_t == 64 else 8, 4))
            if split > 1:
                out.append(GemmConfig(128, bm_t, 1, 8, 4 if bm_t == 64 else 8, 4))
    else:  # prefill: tensor-core bound, big tiles, 2 warpgroups, deep pipeline
        for bm_t, stages in ((128, 4), (256, 3), (128, 3)):
            out.append(GemmConfig(128, bm_t, 1, 8, 8, stages))
    if n % 128 and not out:
        out.append(GemmConfig(64, min(bm, 64), 1, 8, 4, 4))
    return [c for c in out if n % c.block_n == 0] or [GemmConfig(64, min(bm, 128), 1, 8, 4, 4)]


def _semaphores(device: torch.device, count: int) -> torch.Tensor:
    buf = _STATE.sems.get(device)
    if buf is None or buf.numel() < count:
        buf = torch.zeros(max(count, 1024), dtype=torch.int32, device=device)
        _STATE.sems[device] = buf
    return buf


def _launch(cfg: GemmConfig, a_codes, a_scales, qweight, w_scales, bias, y, magic_cvt=True, use_asm=None):
    """Launch one config; returns the compiled kernel (registers, spills, PTX for diagnostics).
    magic_cvt / use_asm: the register tricks, switchable for the ablation in the benchmark."""
    m, k_pad = a_codes.shape
    n = y.shape[1]
    nb = k_pad // BLOCK_SIZE
    w_bits = 4 if qweight.dtype == torch.uint8 else 8
    tiles = (n // cfg.block_n) * triton.cdiv(m, cfg.block_m)
    split = max(1, min(cfg.split_k, nb))
    if split * m * n >= 2**31:
        split = 1  # partials would overflow int32 offsets; such M is not a weight stream anyway
    part = torch.empty((split, m, n), dtype=torch.float32, device=y.device) if split > 1 else y
    sems = _semaphores(y.device, tiles) if split > 1 else y
    return _w4ax_kernel[(tiles, split)](
        a_codes, a_scales, qweight, w_scales, bias if bias is not None else y, y, part, sems,
        m, n, nb, split,
        a_codes.stride(0), a_scales.stride(0), qweight.stride(0),
        w_scales.stride(0) if w_scales.shape[0] > 1 else 0, y.stride(0),
        W_BITS=w_bits, HAS_BIAS=bias is not None, USE_SPLIT=split > 1,
        BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m, GROUP_N=cfg.group_n,
        USE_ASM=y.is_cuda if use_asm is None else use_asm, MAGIC_CVT=magic_cvt,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def tune(a_codes, a_scales, qweight, w_scales, bias, y) -> GemmConfig:
    """Time each candidate on these operands (CUDA only), keep the fastest for the shape bucket."""
    m, k_pad = a_codes.shape
    n = y.shape[1]
    key = (y.device, _m_bucket(m), n, k_pad, qweight.dtype)
    cands = candidates(m, n, k_pad // BLOCK_SIZE, y.device)
    if len(cands) > 1:
        times = []
        for c in cands:
            times.append(triton.testing.do_bench(
                lambda c=c: _launch(c, a_codes, a_scales, qweight, w_scales, bias, y),
                warmup=5, rep=20, return_mode="median"))
        cands = [cands[times.index(min(times))]]
    _STATE.tuned[key] = cands[0]
    return cands[0]


def _config_for(a_codes, a_scales, qweight, w_scales, bias, y) -> GemmConfig:
    m, k_pad = a_codes.shape
    key = (y.device, _m_bucket(m), y.shape[1], k_pad, qweight.dtype)
    cfg = _STATE.tuned.get(key)
    if cfg is not None:
        return cfg
    if y.is_cuda and not torch.cuda.is_current_stream_capturing():
        return tune(a_codes, a_scales, qweight, w_scales, bias, y)
    return candidates(m, y.shape[1], k_pad // BLOCK_SIZE, y.device)[0]


def _check(a_codes, a_scales, qweight, w_scales, bias, out_dtype) -> None:
    m, k_pad = a_codes.shape
    nb = k_pad // BLOCK_SIZE
    assert a_codes.dtype == torch.int8, f"a_codes must be int8 [M, K_pad], got {a_codes.dtype}"
    assert k_pad % BLOCK_SIZE == 0, f"K_pad={k_pad} must be a multiple of {BLOCK_SIZE}"
    assert a_codes.stride(1) == 1, "a_codes [M, K_pad] must be contiguous along K"
    assert a_scales.dtype == torch.float32 and a_scales.shape == (m, nb), (
        f"a_scales must be float32 {(m, nb)}, got {a_scales.dtype} {tuple(a_scales.shape)}")
    assert a_scales.stride(1) == 1, "a_scales [M, nb] must be contiguous along blocks"
    assert qweight.dtype in (torch.uint8, torch.int8), f"qweight dtype {qweight.dtype}"
    kq = k_pad // 2 if qweight.dtype == torch.uint8 else k_pad
    assert qweight.shape[1] == kq and qweight.stride(1) == 1, (
        f"qweight must be [N, {kq}] contiguous along K, got {tuple(qweight.shape)}")
    n = qweight.shape[0]
    assert w_scales.dtype == torch.float16 and w_scales.shape[1] == n and w_scales.shape[0] in (1, nb), (
        f"w_scales must be prepared float16 [nb or 1, N={n}], got {w_scales.dtype} "
        f"{tuple(w_scales.shape)}: pass the weights through prepare_weights() first")
    assert w_scales.is_contiguous(), "prepared w_scales must be contiguous"
    assert bias is None or (bias.shape == (n,) and bias.is_contiguous()), "bias must be contiguous [N]"
    assert out_dtype in (torch.float16, torch.bfloat16, torch.float32), f"out_dtype {out_dtype}"
    devs = {t.device for t in (a_codes, a_scales, qweight, w_scales) + ((bias,) if bias is not None else ())}
    assert len(devs) == 1, f"all operands must be on one device, got {devs}"


# ---------------------------------------------------------------------------------------------
# public API


def can_implement(n: int, k: int, w_bits: int, device: torch.device) -> tuple[bool, str]:
    """Whether this kernel runs Y[M, n] = X[M, k] W^T; `k` is K_pad (a multiple of 128)."""
    device = torch.device(device)
    if device.type != "cuda":
        return False, f"W4Ax Triton kernel needs a CUDA device, got {device.type}"
    if w_bits not in (4, 8):
        return False, f"weights must be INT4 or INT8, got {w_bits} bits"
    if k % BLOCK_SIZE:
        return False, f"K_pad={k} is not a multiple of the {BLOCK_SIZE}-channel activation block"
    if n % 64:
        return False, f"N={n} is not a multiple of 64 (the kernel's weight tile)"
    if n * k >= 2**31:
        return False, f"N*K={n * k} overflows the kernel's int32 offsets"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return False, "W4Ax Triton kernel needs INT8 tensor cores of sm_80 or newer"
    return True, ""


def prepare_weights(qweight: torch.Tensor, w_scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Checkpoint layout -> kernel layout, once at load.

    INT4 uint8 [N, K_pad/2] (byte i = codes 2i low, 2i+1 high) -> uint8 [N, K_pad/2] where byte j of
    block b holds channel b*128+j (low nibble) and b*128+64+j (high nibble). INT8 is kept as is.
    w_scales float16 [N, G] -> float16 [G, N] contiguous: the kernel loads one block's BN scales as a
    contiguous vector instead of BN strided 2-byte reads.
    """
    assert w_scales.dim() == 2 and w_scales.shape[0] == qweight.shape[0], f"w_scales {tuple(w_scales.shape)}"
    if qweight.dtype == torch.uint8:
        n, half_k = qweight.shape
        p = qweight.to(torch.int16)
        codes = torch.stack((p & 0xF, (p >> 4) & 0xF), dim=-1).reshape(n, half_k * 2)  # nibbles
        codes = codes.view(n, -1, 2, HALF)  # [N, nb, half, 64]
        packed = codes[:, :, 0, :] | (codes[:, :, 1, :] << 4)
        qweight = packed.reshape(n, half_k).to(torch.uint8).contiguous()
    else:
        assert qweight.dtype == torch.int8, f"qweight must be uint8 (INT4) or int8, got {qweight.dtype}"
        qweight = qweight.contiguous()
    return qweight, w_scales.to(torch.float16).t().contiguous()


def w4ax_gemm(
    a_codes: torch.Tensor,
    a_scales: torch.Tensor,
    qweight: torch.Tensor,
    w_scales: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Y [M, N] out_dtype from a_codes int8 [M, K_pad], a_scales float32 [M, nb], and prepared
    weights (qweight uint8 [N, K_pad/2] or int8 [N, K_pad], w_scales float16 [nb or 1, N])."""
    _check(a_codes, a_scales, qweight, w_scales, bias, out_dtype)
    m = a_codes.shape[0]
    assert m * max(qweight.shape[0], a_codes.shape[1]) < 2**31, f"M={m}: offsets overflow int32"
    y = torch.empty((m, qweight.shape[0]), dtype=out_dtype, device=a_codes.device)
    if m == 0:
        return y
    cfg = _config_for(a_codes, a_scales, qweight, w_scales, bias, y)
    _launch(cfg, a_codes, a_scales, qweight, w_scales, bias, y)
    return y
