"""W4Ax GEMM for Hopper: Y[M, N] = sum_b int32(A_b . W_b^T) * a_scale[m, b] * w_scale[n, b] (+ bias).

Hopper has no INT4 tensor cores (HARDWARE.md: `mma.sync` s4 is emulated, 26x slower than s8), so
weights stay 4-bit in memory and are widened in registers right before INT8 `tl.dot`s:

- Mask widening (COMET section 4.3): a packed byte keeps each 4-bit code in the HIGH nibble of an
  int8 (`x & 0xF0`, `(x << 4) & 0xF0`), i.e. code * 16, done as one 32-bit op per 4 bytes with
  `inline_asm_elementwise(pack=4)`. The int32 block sums are then exactly 16x the true ones (still
  integers, |16 * 128 * 8 * 127| < 2^22), and the final fp32 sum is multiplied by 1/16 (a power of
  two: exact).
- `prepare_weights` (weight_layout.py) splits each 128-channel block in halves: byte j of a block holds channel j in
  its low nibble and channel j + 64 in its high nibble, so the two masks give two [BN, 64] operands
  for two K=64 dots against the two activation half-tiles: no interleaving shuffle in registers.
- Swap AB: the widened weights are the A operand (the one wgmma reads from registers) and the
  kernel computes the transposed tile Y^T[BN, BM]; the activation tile is B, through shared memory.
  With weights as B, Triton would round-trip them through shared memory (measured 0.9-1.16x vs
  1.41-1.66x cuBLAS bf16 at large M).
- Per-block scales cost 3 CUDA-core ops per output and 128-deep block (int32 -> fp32 is one I2FP
  on sm_90; the magic-number conversion measured no faster, NOTES-gemm.md), and the fp32
  accumulator plus the int32 block sum double the registers per output, which caps the tile size.
  A weight tile is therefore split into N_SUB sub-tiles that share one activation tile.
- Above STREAM_M rows the tuner also times a warp-specialized CUDA kernel (gemm_wgmma.py) that
  overlaps one warpgroup's MMAs with another's per-block scaling, which Triton will not do.
- At 1-32 tokens the tuner also times a CUDA GEMV (gemv_w4ax.py: no split-K partials; dp4a on the
  CUDA cores at 1-4 tokens, the batch-1 decode's choice on every benchmark shape, and mma.sync on
  8-token tiles at 1-32).
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

from cometserve.kernels import gemm_wgmma, gemv_w4ax, pdl, timing
from cometserve.kernels.weight_layout import HALF, W_TILE, prepare_weights  # noqa: F401 (ops interface)
from cometserve.scheme import BLOCK_SIZE

# constants visible inside @triton.jit functions must be tl.constexpr globals
_BLK = tl.constexpr(BLOCK_SIZE)
_HALF = tl.constexpr(HALF)
_WT = tl.constexpr(W_TILE)


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
def _load_act(a_ptr, offs_m, offs_h, b, mask_m, stride_am):
    """The two K=64 halves of activation block b, as [64, BM] int8 (the wgmma B operand)."""
    a_base = a_ptr + offs_m[None, :] * stride_am + b * _BLK + offs_h[:, None]
    a_lo = tl.load(a_base, mask=mask_m[None, :], other=0)
    a_hi = tl.load(a_base + _HALF, mask=mask_m[None, :], other=0)
    return a_lo, a_hi


@triton.jit
def _weight_dot(w_ptr, w_rows, offs_h, b, stride_wt, a_lo, a_hi, W_BITS: tl.constexpr,
                USE_ASM: tl.constexpr):
    """int32 [SUB_N, BM] = W_b . A_b^T over block b (x16 for INT4 weights)."""
    w_base = w_ptr + w_rows[:, None] + b * stride_wt + offs_h[None, :]
    if W_BITS == 4:
        w_lo, w_hi = _widen_int4(tl.load(w_base), USE_ASM)
    else:
        w_lo = tl.load(w_base)
        w_hi = tl.load(w_base + _HALF)
    d = tl.dot(w_lo, a_lo, out_dtype=tl.int32)
    return tl.dot(w_hi, a_hi, d, out_dtype=tl.int32)


@triton.jit
def _weight_rows(offs_n, NB, stride_wt):
    """Byte offset of each weight row's block 0 in the tiled layout [N/64, NB, 64, row bytes]."""
    rows = (offs_n // _WT) * (NB * stride_wt) + (offs_n % _WT) * (stride_wt // _WT)
    return tl.multiple_of(rows, 64)  # 64-byte aligned: keeps 16-byte vector loads


@triton.jit
def _load_scales(as_ptr, ws_ptr, offs_m, offs_n0, mask_m, b, stride_asm, stride_wsb,
                 N_SUB: tl.constexpr, SUB_N: tl.constexpr):
    """a_scale[BM] and the w_scale[SUB_N] vectors of block b, fp32."""
    a_s = tl.load(as_ptr + offs_m * stride_asm + b, mask=mask_m, other=0.0)
    w_s0 = tl.load(ws_ptr + b * stride_wsb + offs_n0).to(tl.float32)
    w_s1 = w_s0
    if N_SUB == 2:
        w_s1 = tl.load(ws_ptr + b * stride_wsb + SUB_N + offs_n0).to(tl.float32)
    return a_s, w_s0, w_s1


@triton.jit
def _scale_acc(acc, d, w_s, a_s):
    # 3 ops per output and block (I2FP, FMUL, FFMA): the CUDA-core cost that rides along with
    # each 128-deep integer MMA, the price of per-block activation scales.
    return tl.fma(d.to(tl.float32), w_s[:, None] * a_s[None, :], acc)


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
def _reduce_partials(part_ptr, offs_m, offs_n, mask_m, M, N, SPLIT_K, SUB_N: tl.constexpr,
                     BLOCK_M: tl.constexpr):
    """Sum the SPLIT_K fp32 partials of a sub-tile in split order (deterministic)."""
    ptrs = part_ptr + offs_m[None, :] * N + offs_n[:, None]
    acc = tl.zeros([SUB_N, BLOCK_M], dtype=tl.float32)
    for s in range(SPLIT_K):
        acc += tl.load(ptrs + s * M * N, mask=mask_m[None, :], other=0.0, cache_modifier=".cg")
    return acc


@triton.jit
def _w4ax_kernel(
    a_ptr, as_ptr, w_ptr, ws_ptr, bias_ptr, y_ptr, part_ptr, sem_ptr,  # pointers
    M, N, NB, SPLIT_K,  # dims (SPLIT_K: K splits, runtime so one binary serves every split)
    stride_am, stride_asm, stride_wt, stride_wsb, stride_ym,  # strides (stride_wt: one weight tile)
    W_BITS: tl.constexpr, HAS_BIAS: tl.constexpr, USE_SPLIT: tl.constexpr,  # meta
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, N_SUB: tl.constexpr, GROUP_N: tl.constexpr,
    USE_ASM: tl.constexpr, PREFETCH: tl.constexpr, PDL: tl.constexpr,
):
    # grouped tile order: GROUP_N weight tiles sweep all activation tiles together, so a weight
    # tile is read from DRAM once per group and the activation tiles stay in L2.
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    width = GROUP_N * num_pid_m
    first_n = (pid // width) * GROUP_N
    group = tl.minimum(N // BLOCK_N - first_n, GROUP_N)
    pid_n = first_n + (pid % width) % group
    pid_m = (pid % width) // group

    # A BLOCK_N tile is N_SUB sub-tiles with their own accumulators: the activation tile is
    # loaded once for all (half the L2 traffic of two CTAs), while the int32 block product of
    # only one sub-tile is live at a time (registers: fp32 acc + int32 block sum per output).
    SUB_N: tl.constexpr = BLOCK_N // N_SUB
    offs_n0 = pid_n * BLOCK_N + tl.arange(0, SUB_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_h = tl.arange(0, _HALF)
    mask_m = offs_m < M
    rows0 = _weight_rows(offs_n0, NB, stride_wt)
    rows1 = _weight_rows(offs_n0 + SUB_N, NB, stride_wt)
    per_split = tl.cdiv(NB, SPLIT_K)
    b_lo = pid_k * per_split
    b_hi = tl.minimum(b_lo + per_split, NB)
    pdl.wait(PDL)  # the activations, partials, semaphores and Y are shared with earlier kernels

    acc0 = tl.zeros([SUB_N, BLOCK_M], dtype=tl.float32)
    acc1 = tl.zeros([SUB_N, BLOCK_M], dtype=tl.float32)
    # a trailing split can own no block (b_lo >= NB when SPLIT_K does not divide NB evenly): clamp
    # so its scale loads stay inside the tensors; its loop is empty and its partial is zero
    a_s, w_s0, w_s1 = _load_scales(as_ptr, ws_ptr, offs_m, offs_n0, mask_m, tl.minimum(b_lo, NB - 1),
                                   stride_asm, stride_wsb, N_SUB, SUB_N)
    for b in range(b_lo, b_hi):
        if PREFETCH:  # block b+1's scales now: Triton's pipeliner leaves these small loads
            # synchronous, and each would expose a full memory latency per block
            nxt = _load_scales(as_ptr, ws_ptr, offs_m, offs_n0, mask_m, tl.minimum(b + 1, b_hi - 1),
                               stride_asm, stride_wsb, N_SUB, SUB_N)
        else:
            a_s, w_s0, w_s1 = _load_scales(as_ptr, ws_ptr, offs_m, offs_n0, mask_m, b, stride_asm,
                                           stride_wsb, N_SUB, SUB_N)
        a_lo, a_hi = _load_act(a_ptr, offs_m, offs_h, b, mask_m, stride_am)
        d = _weight_dot(w_ptr, rows0, offs_h, b, stride_wt, a_lo, a_hi, W_BITS, USE_ASM)
        acc0 = _scale_acc(acc0, d, w_s0, a_s)
        if N_SUB == 2:
            d = _weight_dot(w_ptr, rows1, offs_h, b, stride_wt, a_lo, a_hi, W_BITS, USE_ASM)
            acc1 = _scale_acc(acc1, d, w_s1, a_s)
        if PREFETCH:
            a_s, w_s0, w_s1 = nxt

    # the next kernel may launch now: its programs become resident while this grid's last
    # programs drain and the split-K fix-up runs (earlier, at the start, measured slower)
    pdl.launch_dependents(PDL)
    if USE_SPLIT:
        # partials [SPLIT_K, M, N] fp32; the last split to arrive reduces them and stores Y
        tl.store(part_ptr + pid_k * M * N + offs_m[None, :] * N + offs_n0[:, None], acc0,
                 mask=mask_m[None, :])
        if N_SUB == 2:
            tl.store(part_ptr + pid_k * M * N + offs_m[None, :] * N + SUB_N + offs_n0[:, None], acc1,
                     mask=mask_m[None, :])
        tl.debug_barrier()  # every thread's partial stored before the release below
        tile = pid_n * num_pid_m + pid_m
        arrived = tl.atomic_add(sem_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            acc0 = _reduce_partials(part_ptr, offs_m, offs_n0, mask_m, M, N, SPLIT_K, SUB_N, BLOCK_M)
            if N_SUB == 2:
                acc1 = _reduce_partials(part_ptr, offs_m, offs_n0 + SUB_N, mask_m, M, N, SPLIT_K,
                                        SUB_N, BLOCK_M)
            tl.atomic_xchg(sem_ptr + tile, 0, sem="relaxed", scope="gpu")  # ready for the next call
            _epilogue(acc0, y_ptr, bias_ptr, offs_m, offs_n0, mask_m, stride_ym, W_BITS, HAS_BIAS)
            if N_SUB == 2:
                _epilogue(acc1, y_ptr, bias_ptr, offs_m, offs_n0 + SUB_N, mask_m, stride_ym, W_BITS,
                          HAS_BIAS)
    else:
        _epilogue(acc0, y_ptr, bias_ptr, offs_m, offs_n0, mask_m, stride_ym, W_BITS, HAS_BIAS)
        if N_SUB == 2:
            _epilogue(acc1, y_ptr, bias_ptr, offs_m, offs_n0 + SUB_N, mask_m, stride_ym, W_BITS,
                      HAS_BIAS)


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
    prefetch: bool = True  # load block b+1's scales during block b (costs registers)
    n_sub: int = 1  # sub-tiles of block_n sharing one activation tile (1 or 2)
    backend: str = "triton"  # or "wgmma": the CUDA kernel of gemm_wgmma.py (block_n 128); "gemv" / "gemv_mma":
    # gemv_w4ax.py's dp4a / tensor-core instances


class _State:
    """Per-process caches: tuned configs keyed by (device, M bucket, N, K_pad, w_bits), semaphore
    buffers per device (zero between calls: the last split of each tile resets its counter)."""

    def __init__(self) -> None:
        self.tuned: dict[tuple, GemmConfig] = {}
        self.sems: dict[torch.device, torch.Tensor] = {}
        self.retired_sems: list[torch.Tensor] = []  # grown out of, still read by captured graphs
        self.num_sms: dict[torch.device, int] = {}


_STATE = _State()
# The tuner times decode-sized shapes (M <= GRAPH_TUNE_M) as a decode step runs them: back to back
# from a CUDA graph over weight copies spanning TUNE_ROTATE_BYTES (kernels/timing.py); 0, or larger
# M: do_bench (an L2 flush by a write before each call, whose write-back the timed kernel pays).
TUNE_ROTATE_BYTES = 128e6
GRAPH_TUNE_M = 256
STREAM_M = 64  # above this many rows the wgmma kernel joins the candidates
USE_GEMV = True  # the CUDA GEMV among the candidates at 1-32 rows (benchmarks switch it off for A/B)


def _m_bucket(m: int) -> int:
    """Tuned-table bucket: 1, 2, 4 (where the GEMV joins the candidates), then 16, 32, ... 4096."""
    p = triton.next_power_of_2(m)
    return p if p <= gemv_w4ax.MAX_M else min(max(16, p), 4096)


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: any small number exercises the split-K path
    if device not in _STATE.num_sms:
        _STATE.num_sms[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _STATE.num_sms[device]


def _split_for(tiles: int, nb: int, sms: int, waves: float) -> int:
    """K splits so that tiles * splits ~ waves * SMs (a weight stream needs every SM pulling);
    1 when the tiles alone fill the machine."""
    return max(1, min(nb, round(waves * sms / tiles))) if tiles < waves * sms else 1


def _candidate_list(m: int, n: int, nb: int, device: torch.device) -> list[GemmConfig]:
    """The small tuning space (from the sweeps in NOTES-gemm.md); first entry = untuned default.

    One warpgroup per CTA throughout: two CTAs per SM overlap one's MMAs with the other's per-block
    FP32 scaling, which Triton will not overlap inside one CTA (measured 2-2.5x slower with 8 warps).
    """
    sms = _sm_count(device)
    bm = max(16, triton.next_power_of_2(m))
    C = GemmConfig
    if bm <= 16:  # weight stream: tiny token tile, split K so that every SM keeps loads in flight
        t64 = n // 64
        # 3 stages, 2-6 waves of split CTAs: within 0.5% of the best of a sweep over 1-24 splits x 3-6
        # stages x 64/128-row tiles, on all 11 benchmark shapes at M 1 and 16 (NOTES-gemm.md item 19)
        out = [C(64, 16, _split_for(t64, nb, sms, w), 8, 4, 3) for w in (6.0, 2.0, 4.0, 3.0, 5.0)]
        if n % 128 == 0:
            out.append(C(128, 16, _split_for(n // 128, nb, sms, 2.0), 8, 8, 3))
        return out
    def split(bm_t: int, waves: float, bn: int = 64) -> int:
        return _split_for(n // bn * triton.cdiv(m, bm_t), nb, sms, waves)

    # middle: 32-token tiles split for 3-4 waves (2 warps: mma.sync), 128x64 double tiles for the
    # wide matrices; within 0.5% (geomean) of a sweep over 16-128-token tiles x 2/4 warps x 3/4
    # stages x 1-8 waves at M 32 and 64 on the 11 benchmark shapes (NOTES-gemm.md item 22)
    mid = [C(64, 32, split(32, 4.0), 8, 2, 3), C(64, 32, split(32, 3.0), 8, 4, 3),
           C(64, 32, split(32, 3.0), 8, 2, 3)]
    if bm <= 64:
        if bm == 64 and n % 128 == 0:
            mid += [C(128, 64, split(64, w, 128), 8, 4, 4, True, 2) for w in (1.0, 2.0)]
        return mid
    if bm <= 256:  # above STREAM_M the wgmma kernel's candidates join these (candidates())
        return [C(64, 128, split(128, 1.0), 8, 4, 3), C(64, 128, split(128, 2.0), 8, 4, 3), mid[2]]
    out = [C(64, 128, 1, 8, 4, 3), C(64, 128, 1, 8, 4, 4)]  # prefill
    if n % 128 == 0:
        out.append(C(128, 64, 1, 8, 4, 4, True, 2))
    return out


# (tokens per tile, stages) of the wgmma kernel's candidates (gemm_wgmma.py), tried above STREAM_M rows:
# ~10% faster than the Triton kernel at M 256-4096 on the 8B shapes (NOTES-gemm.md, session 10); up to
# GRAPH_TUNE_M rows also split over K for one wave (NOTES-gemm.md item 23)
WGMMA_SHAPES = ((128, 4), (64, 6))


def candidates(m: int, n: int, nb: int, device: torch.device, w_bits: int = 4,
               out_dtype: torch.dtype = torch.bfloat16) -> list[GemmConfig]:
    out = _candidate_list(m, n, nb, device)
    for mma in (False, True) if USE_GEMV else ():
        if gemv_w4ax.can_implement(m, n, nb * BLOCK_SIZE, w_bits, out_dtype, device, mma)[0]:
            out += [GemmConfig(rows, triton.next_power_of_2(m), 1, 1, w, 1, backend="gemv_mma" if mma else "gemv")
                    for w in gemv_w4ax.warps_for(m, mma) for rows in gemv_w4ax.rows_for(mma)]
    if m > STREAM_M and gemm_wgmma.can_implement(n, w_bits, out_dtype, device)[0]:
        out += [GemmConfig(128, bm, 1, 8, 12, st, backend="wgmma") for bm, st in WGMMA_SHAPES]
        if m <= GRAPH_TUNE_M:  # K splits where the tiles leave SMs idle (wins at M = 128 on down_proj)
            sms = _sm_count(device)
            out += [GemmConfig(128, bm, _split_for(n // 128 * triton.cdiv(m, bm), nb, sms, 1.0), 8, 12, st,
                               backend="wgmma") for bm, st in WGMMA_SHAPES]
    return list(dict.fromkeys(out))  # unique, order kept


def _semaphores(device: torch.device, count: int) -> torch.Tensor:
    """The device's counters (zero between calls), at least `count`. A grown buffer replaces the old
    one for new launches, but the old one is kept: CUDA graphs captured earlier still point at it."""
    buf = _STATE.sems.get(device)
    if buf is None or buf.numel() < count:
        if buf is not None:
            _STATE.retired_sems.append(buf)
        buf = _STATE.sems[device] = torch.zeros(max(count, 1024), dtype=torch.int32, device=device)
    return buf


def _launch(cfg: GemmConfig, a_codes, a_scales, qweight, w_scales, bias, y, use_asm=None):
    """Launch one config; returns the compiled kernel (registers, spills, PTX for diagnostics).
    use_asm: the 32-bit mask trick, switchable for the ablation in the benchmark."""
    m, k_pad = a_codes.shape
    n = y.shape[1]
    nb = k_pad // BLOCK_SIZE
    gemv = cfg.backend in ("gemv", "gemv_mma")
    if (cfg.backend == "wgmma" and not gemm_wgmma.operands_ok(a_codes, bias, y)) or (
            gemv and not gemv_w4ax.operands_ok(a_codes, bias, y, cfg.backend == "gemv_mma")):
        cfg, gemv = _candidate_list(m, n, nb, y.device)[0], False
    if gemv:
        return gemv_w4ax.launch(a_codes, a_scales, qweight, w_scales, bias, y, cfg.num_warps,
                                cfg.backend == "gemv_mma", cfg.block_n)
    tiles = (n // cfg.block_n) * triton.cdiv(m, cfg.block_m)
    split = max(1, min(cfg.split_k, nb))
    if split * m * n >= 2**31:
        split = 1  # partials would overflow int32 offsets; such M is not a weight stream anyway
    part = torch.empty((split, m, n), dtype=torch.float32, device=y.device) if split > 1 else y
    sems = _semaphores(y.device, tiles) if split > 1 else y
    if cfg.backend == "wgmma":
        return gemm_wgmma.launch(cfg.block_m, cfg.num_stages, cfg.group_n, split, a_codes, a_scales, qweight,
                                 w_scales, bias, y, part, sems)
    w_bits = 4 if qweight.dtype == torch.uint8 else 8
    return _w4ax_kernel[(tiles, split)](
        a_codes, a_scales, qweight, w_scales, bias if bias is not None else y, y, part, sems,
        m, n, nb, split,
        a_codes.stride(0), a_scales.stride(0), W_TILE * qweight.shape[1] // nb,
        w_scales.stride(0) if w_scales.shape[0] > 1 else 0, y.stride(0),
        W_BITS=w_bits, HAS_BIAS=bias is not None, USE_SPLIT=split > 1,
        BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m, N_SUB=cfg.n_sub, GROUP_N=cfg.group_n,
        USE_ASM=y.is_cuda if use_asm is None else use_asm, PREFETCH=cfg.prefetch,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl.launch_kwargs(y),
    )


def tune(a_codes, a_scales, qweight, w_scales, bias, y) -> GemmConfig:
    """Time each candidate on these operands (CUDA only), keep the fastest for the shape bucket."""
    m, k_pad = a_codes.shape
    n = y.shape[1]
    key = (y.device, _m_bucket(m), n, k_pad, qweight.dtype)
    cands = candidates(m, n, k_pad // BLOCK_SIZE, y.device, 4 if qweight.dtype == torch.uint8 else 8, y.dtype)
    if len(cands) > 1:
        times = _time_candidates(cands, a_codes, a_scales, qweight, w_scales, bias, y)
        cands = [cands[times.index(min(times))]]
    _STATE.tuned[key] = cands[0]
    return cands[0]


def _time_candidates(cands, a_codes, a_scales, qweight, w_scales, bias, y) -> list[float]:
    if a_codes.shape[0] <= GRAPH_TUNE_M and TUNE_ROTATE_BYTES:
        copies = timing.copies_for(qweight.numel() * qweight.element_size() + w_scales.numel() * 2,
                                   TUNE_ROTATE_BYTES)
        try:
            ws = [(qweight, w_scales)] + [(qweight.clone(), w_scales.clone()) for _ in range(copies - 1)]
        except torch.OutOfMemoryError:
            ws = [(qweight, w_scales)]  # no room for copies: this shape's weights may sit in L2
        return [timing.graph_us([lambda c=c, w=w: _launch(c, a_codes, a_scales, *w, bias, y) for w in ws],
                                replays=7, target_us=1000) for c in cands]
    return [triton.testing.do_bench(lambda c=c: _launch(c, a_codes, a_scales, qweight, w_scales, bias, y),
                                    warmup=5, rep=20, return_mode="median") for c in cands]


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
