// W4Ax GEMV for decode batches of at most 4 tokens: the weight stream on the CUDA cores (dp4a), no
// tensor cores, no split-K fix-up. Compiled at run time with NVRTC by gemv_w4ax.py (design and
// measurements there); mma_int4.cuh (typedefs, 16-bit conversions, store_out, griddepcontrol) is
// put in front of this file.
//
// Y[m, n] = sum_b int32(A_b . W_b^T)[m, n] * a_scale[m, b] * w_scale[b, n] / 16 (+ bias[n]), per
// block fma(float(block sum), w_scale * a_scale, acc) as the Triton kernel computes it; the blocks
// are summed in another order (each warp over its own blocks, then the warps in order): within the
// reference's tolerance, and deterministic.
//
// CTA = GV_WARPS warps over 32 weight rows (half of a prepared 64-row tile) and all K. Warp w takes
// blocks w, w + GV_WARPS, ...: the slab's 2 KB of block b are four fully coalesced 512-byte warp
// loads, lane l holding bytes 16 l .. of each, i.e. a 16-byte quarter (l % 4) of rows 8 q + l / 4,
// q = 0..3. Byte j of a row holds channel j (low nibble) and 64 + j (high nibble): masked into the
// high nibble of an int8 (code * 16, as the Triton kernel's mask widening) they meet the activation
// codes of channels 16 (l % 4) .. and 64 + 16 (l % 4) .. in dp4a. The four lanes of a row add their
// int32 sums with two shuffles (exact) before the fold. The next block's weights are in flight while
// one block is computed; the first block's are requested before the wait for the previous kernel
// (weights are never written by one). Activation codes and scales are staged in shared memory once.

constexpr int GV_WARPS = 16, GV_ROWS = 32, GV_THREADS = 32 * GV_WARPS, GV_TILE_BYTES = 64 * 64;

DEV int dp4a(u32 a, u32 b, int c) {
  int d;
  asm("dp4a.s32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

struct GvBlock {
  uint4 w[4];  // quarter l % 4 of rows 8 q + l / 4
  float ws;    // w_scale of row `lane` of the slab
};

DEV void gv_load(GvBlock& t, const u8* w, const u16* w_scales, int slab, int NB, int b, int stride_wsb, int lane) {
  const int n0 = slab * GV_ROWS;  // the 32-row slab is half (n0 % 64) of a prepared 64-row tile
  const uint4* p =
      reinterpret_cast<const uint4*>(w + ((long long)(n0 / 64) * NB + b) * GV_TILE_BYTES + (n0 % 64) * 64) + lane;
#pragma unroll
  for (int q = 0; q < 4; ++q) t.w[q] = __ldg(p + 32 * q);
  t.ws = half_to_float<false>(__ldg(w_scales + n0 + lane + (long long)b * stride_wsb), 0);
}

template <int MT>
DEV void gv_block(float (&acc)[MT][4], const GvBlock& t, const u8* act, const float* sa, int b, int kpad,
                  int nb, int lane) {
  const int part = lane % 4;
  uint4 alo[MT], ahi[MT];  // channels 16 part .. + 15 and 64 + 16 part .. of block b
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    alo[m] = *reinterpret_cast<const uint4*>(act + m * kpad + b * 128 + 16 * part);
    ahi[m] = *reinterpret_cast<const uint4*>(act + m * kpad + b * 128 + 64 + 16 * part);
  }
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const u32 w[4] = {t.w[q].x, t.w[q].y, t.w[q].z, t.w[q].w};
    int s[MT];
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      const u32 lo_a[4] = {alo[m].x, alo[m].y, alo[m].z, alo[m].w}, hi_a[4] = {ahi[m].x, ahi[m].y, ahi[m].z, ahi[m].w};
      s[m] = 0;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        s[m] = dp4a((w[i] << 4) & 0xF0F0F0F0u, lo_a[i], s[m]);
        s[m] = dp4a(w[i] & 0xF0F0F0F0u, hi_a[i], s[m]);
      }
      s[m] += __shfl_xor_sync(0xffffffffu, s[m], 1);  // the row's four quarters: exact int32 sum
      s[m] += __shfl_xor_sync(0xffffffffu, s[m], 2);
    }
    const float ws = __shfl_sync(0xffffffffu, t.ws, 8 * q + lane / 4);
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[m][q] = __fmaf_rn((float)s[m], __fmul_rn(ws, sa[m * nb + b]), acc[m][q]);
  }
}

// The weight stream of one CTA once its activation codes and scales are in shared memory: slabs
// slab, slab + step, ... < slabs, the first block of the first already in `cur`; the main loop keeps
// the next block in flight, across slab ends too (the next slab's first block); per slab the warps'
// sums are joined in warp order and Y stored.
template <int MT, int OUT, bool BIAS>
DEV void gv_stream(const u8* act, const float* sa, GvBlock& cur, const u8* w, const u16* w_scales,
                   const void* bias, u8* y, int M, int NB, int stride_wsb, int stride_ym, int slab, int slabs,
                   int step) {
  __shared__ float red[GV_WARPS][MT][GV_ROWS];
  constexpr int OSZ = OUT == 2 ? 4 : 2;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, kpad = NB * 128;
  for (; slab < slabs; slab += step) {
    GvBlock nxt;
    float acc[MT][4];
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[m][q] = 0.0f;
    for (int b = warp; b < NB; b += GV_WARPS) {
      if (b + GV_WARPS < NB) gv_load(nxt, w, w_scales, slab, NB, b + GV_WARPS, stride_wsb, lane);
      else if (slab + step < slabs) gv_load(nxt, w, w_scales, slab + step, NB, warp, stride_wsb, lane);
      gv_block<MT>(acc, cur, act, sa, b, kpad, NB, lane);
      cur = nxt;
    }
    grid_dep_launch();  // after the main loop, as the Triton kernel (earlier measured no better)
    if (lane % 4 == 0)
#pragma unroll
      for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int q = 0; q < 4; ++q) red[warp][m][8 * q + lane / 4] = acc[m][q];
    __syncthreads();
    if (tid < MT * GV_ROWS) {
      const int m = tid / GV_ROWS, r = tid % GV_ROWS, n = slab * GV_ROWS + r;
      float v = red[0][m][r];
#pragma unroll
      for (int i = 1; i < GV_WARPS; ++i) v = __fadd_rn(v, red[i][m][r]);
      v = __fmul_rn(v, 0.0625f);  // undo the x16 of the mask widening (exact)
      if (BIAS) v = __fadd_rn(v, load_bias<OUT>(bias, n));
      if (m < M) store_out<OUT>(y + ((long long)m * stride_ym + n) * OSZ, v);
    }
    __syncthreads();  // red is the next slab's
  }
}

// grid (N / 32); rows m >= M of the MT-row instance are zero codes and never stored
template <int MT, int OUT, bool BIAS>
__global__ void __launch_bounds__(GV_THREADS) w4ax_gemv(
    const u8* __restrict__ a_codes, const float* __restrict__ a_scales, const u8* __restrict__ w,
    const u16* __restrict__ w_scales, const void* __restrict__ bias, u8* __restrict__ y, int M, int NB,
    int stride_am, int stride_asm, int stride_wsb, int stride_ym) {
  extern __shared__ __align__(16) u8 act[];  // activation codes [MT][K_pad], then scales fp32 [MT][NB]
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, kpad = NB * 128;
  GvBlock cur;
  if (warp < NB) gv_load(cur, w, w_scales, blockIdx.x, NB, warp, stride_wsb, lane);
  grid_dep_wait();  // the activations and Y are shared with earlier kernels
  float* sa = reinterpret_cast<float*>(act + MT * kpad);
  for (int i = 16 * tid; i < MT * kpad; i += 16 * GV_THREADS) {
    const int m = i / kpad, k = i % kpad;
    *reinterpret_cast<uint4*>(act + i) =
        m < M ? *reinterpret_cast<const uint4*>(a_codes + (long long)m * stride_am + k) : uint4{0u, 0u, 0u, 0u};
  }
  for (int i = tid; i < MT * NB; i += GV_THREADS) sa[i] = i / NB < M ? a_scales[(long long)(i / NB) * stride_asm + i % NB] : 0.0f;
  __syncthreads();
  gv_stream<MT, OUT, BIAS>(act, sa, cur, w, w_scales, bias, y, M, NB, stride_wsb, stride_ym, blockIdx.x,
                           blockIdx.x + 1, 1);
}

// ---------------------------------------------------------------------------------------------------
// One token with its activation quantization fused in front (w4ax_gemv_quant): at M = 1 the separate
// act-quant kernel costs more in its launch and round trip than in work, so every CTA quantizes the
// token itself (redundantly: the row is 8-28 KB, read from L2) into shared memory, then streams its
// weights as w4ax_gemv. The contract of kernels/quant_act.py (x [+ residual] -> [RMSNorm] -> gather
// by the permutation -> [Hadamard-rotate INT4 blocks] -> per-block scale and codes): every float
// operation is the Triton kernel's in the same order and rounding (rn intrinsics, no contraction),
// so the codes are bit-identical to it, except that the RMSNorm's sum of squares is reduced in
// another order (a rare code may then differ by one, as between that kernel and the reference).
// CTA 0 stores x + residual. Quantization layout: a warp takes groups of 4 consecutive blocks, 8
// lanes per block, lane l holding slots 16 (l % 8) .. + 15; the rotation's butterflies are the
// reference's stages, H <= 8 inside a lane, H >= 16 across lanes (shfl.xor).

constexpr int QB_LANES = 8, QB_VALS = 16;  // lanes per 128-channel block, slots per lane
constexpr float HADAMARD_NORM = 0.08838834764831845f;

template <bool BF16>
DEV void unpack8(float* v, uint4 w) {
  v[0] = half_to_float<BF16>(w.x, 0), v[1] = half_to_float<BF16>(w.x, 1);
  v[2] = half_to_float<BF16>(w.y, 0), v[3] = half_to_float<BF16>(w.y, 1);
  v[4] = half_to_float<BF16>(w.z, 0), v[5] = half_to_float<BF16>(w.z, 1);
  v[6] = half_to_float<BF16>(w.w, 0), v[7] = half_to_float<BF16>(w.w, 1);
}

// pairs H apart become (a + b, a - b), H = 1 .. 64 in order; across lanes the lane whose bit is clear
// keeps a + b and its partner computes fma(-1, b, a) = a - b (one rounding, as the subtraction). Only
// the block's 8 lanes take part (a warp's 4 blocks may mix INT4 and INT8: a full-warp shuffle here
// would wait for lanes that never come).
DEV void fwht_block(float (&v)[QB_VALS], int lane) {
  const u32 group = 0xFFu << (lane & ~(QB_LANES - 1));
#pragma unroll
  for (int h = 1; h < QB_VALS; h <<= 1)
#pragma unroll
    for (int i = 0; i < QB_VALS; ++i)
      if (!(i & h)) {
        const float a = v[i], b = v[i + h];
        v[i] = __fadd_rn(a, b), v[i + h] = __fsub_rn(a, b);
      }
#pragma unroll
  for (int mask = 1; mask < QB_LANES; mask <<= 1) {
    const float sgn = lane & mask ? -1.0f : 1.0f;
#pragma unroll
    for (int i = 0; i < QB_VALS; ++i) v[i] = __fmaf_rn(sgn, v[i], __shfl_xor_sync(group, v[i], mask));
  }
#pragma unroll
  for (int i = 0; i < QB_VALS; ++i) v[i] = __fmul_rn(v[i], HADAMARD_NORM);
}

// codes (16 bytes at codes + 16 (lane % 8)) and the scale of the block this lane's group holds;
// all lanes take part in the shuffles, only `store` ones write
template <bool ROTATE>
DEV void quantize_block(float (&v)[QB_VALS], int nbits, int lane, bool store, u8* codes, float* scale) {
  if (ROTATE && nbits == 4) fwht_block(v, lane);
  float amax = fabsf(v[0]);
#pragma unroll
  for (int i = 1; i < QB_VALS; ++i) amax = fmaxf(amax, fabsf(v[i]));
#pragma unroll
  for (int mask = 1; mask < QB_LANES; mask <<= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, mask));
  const float qmax = nbits == 8 ? 127.0f : 7.0f;
  const float inv = amax > 0.0f ? __fdiv_rn(qmax, amax) : 0.0f;
  u32 word[4] = {0u, 0u, 0u, 0u};
#pragma unroll
  for (int i = 0; i < QB_VALS; ++i) {  // round half away from zero, as the reference
    const float q = __fmul_rn(v[i], inv), a = fabsf(q), fl = floorf(a);
    const float mag = fminf(__fadd_rn(fl, __fsub_rn(a, fl) >= 0.5f ? 1.0f : 0.0f), qmax);
    word[i / 4] |= (u32)((int)(q < 0.0f ? -mag : mag) & 0xFF) << (8 * (i % 4));
  }
  if (!store) return;
  *reinterpret_cast<uint4*>(codes + QB_VALS * (lane % QB_LANES)) = uint4{word[0], word[1], word[2], word[3]};
  if (lane % QB_LANES == 0) *scale = __fdiv_rn(amax, qmax);
}

// Persistent: grid min(N / 32, resident CTAs), CTA c takes slabs c, c + grid, ... (the prologue once
// per CTA, not per slab). x, residual, total: one contiguous row of K (K % 8 == 0, K <= 8 CH GV_THREADS).
// Shared memory: codes [K_pad], scales fp32 [NB rounded up to 4], the row fp32 [K].
template <int OUT, bool BIAS, bool BF16, bool HAS_PERM, bool HAS_NORM, bool ROTATE, bool RESIDUAL, int CH, int MIN_CTAS>
__global__ void __launch_bounds__(GV_THREADS, MIN_CTAS) w4ax_gemv_quant(
    const u16* __restrict__ x, const u16* __restrict__ res, u16* __restrict__ total, const int* __restrict__ perm,
    const u8* __restrict__ bits, const u16* __restrict__ nw, const u8* __restrict__ w,
    const u16* __restrict__ w_scales, const void* __restrict__ bias, u8* __restrict__ y, int K, int NB,
    int slabs, int stride_wsb, int eps_bits) {
  extern __shared__ __align__(16) u8 act[];
  __shared__ float ssq[GV_WARPS];
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, kpad = NB * 128;
  float* sa = reinterpret_cast<float*>(act + kpad);
  float* row = sa + ((NB + 3) & ~3);
  // before the wait, what no earlier kernel writes: the first weight block, the norm weight, the
  // first group's gather sources
  GvBlock cur;
  if (warp < NB) gv_load(cur, w, w_scales, blockIdx.x, NB, warp, stride_wsb, lane);
  uint4 nwv[CH];
  if constexpr (HAS_NORM)
#pragma unroll
    for (int j = 0; j < CH; ++j) {
      const int c = 8 * (tid + j * GV_THREADS);
      nwv[j] = c < K ? __ldg(reinterpret_cast<const uint4*>(nw + c)) : uint4{0u, 0u, 0u, 0u};
    }
  const int sub = lane / QB_LANES, slot = QB_VALS * (lane % QB_LANES), g0 = 4 * warp;
  int4 src[QB_VALS / 4];
  {
    const int kk = (g0 + sub) * 128 + slot;
#pragma unroll
    for (int i = 0; i < QB_VALS / 4; ++i) {
      const int k = kk + 4 * i;
      src[i] = HAS_PERM && k < K ? __ldg(reinterpret_cast<const int4*>(perm + k)) : int4{k, k + 1, k + 2, k + 3};
    }
  }
  grid_dep_wait();  // x and the residual come from the kernels before; Y and total are shared with them
  uint4 xw[CH], rw[CH];
#pragma unroll
  for (int j = 0; j < CH; ++j) {  // every load of the row in flight at once
    const int c = 8 * (tid + j * GV_THREADS);
    xw[j] = c < K ? *reinterpret_cast<const uint4*>(x + c) : uint4{0u, 0u, 0u, 0u};
    if constexpr (RESIDUAL) rw[j] = c < K ? *reinterpret_cast<const uint4*>(res + c) : uint4{0u, 0u, 0u, 0u};
  }
  float v[CH][8];
  float ss = 0.0f;
#pragma unroll
  for (int j = 0; j < CH; ++j) {
    const int c = 8 * (tid + j * GV_THREADS);
    unpack8<BF16>(v[j], xw[j]);
    if constexpr (RESIDUAL) {  // x + residual rounded to x's dtype (torch's add); CTA 0 stores it
      float r[8];
      unpack8<BF16>(r, rw[j]);
#pragma unroll
      for (int i = 0; i < 8; ++i) v[j][i] = half_to_float<BF16>(float_to_half<BF16>(__fadd_rn(v[j][i], r[i])), 0);
      if (blockIdx.x == 0 && c < K)
        *reinterpret_cast<uint4*>(total + c) = uint4{pack2<BF16>(v[j][0], v[j][1]), pack2<BF16>(v[j][2], v[j][3]),
                                                     pack2<BF16>(v[j][4], v[j][5]), pack2<BF16>(v[j][6], v[j][7])};
    }
    if constexpr (HAS_NORM)
#pragma unroll
      for (int i = 0; i < 8; ++i) ss = __fadd_rn(ss, __fmul_rn(v[j][i], v[j][i]));  // not torch's order
  }
  if constexpr (HAS_NORM) {
#pragma unroll
    for (int mask = 16; mask; mask >>= 1) ss = __fadd_rn(ss, __shfl_xor_sync(0xffffffffu, ss, mask));
    if (lane == 0) ssq[warp] = ss;
    __syncthreads();
    float sum = ssq[0];
#pragma unroll
    for (int i = 1; i < GV_WARPS; ++i) sum = __fadd_rn(sum, ssq[i]);
    const float rstd = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fdiv_rn(sum, (float)K), __int_as_float(eps_bits))));
#pragma unroll
    for (int j = 0; j < CH; ++j) {
      float wf[8];
      unpack8<BF16>(wf, nwv[j]);
#pragma unroll
      for (int i = 0; i < 8; ++i) v[j][i] = __fmul_rn(__fmul_rn(v[j][i], rstd), wf[i]);
    }
  }
#pragma unroll
  for (int j = 0; j < CH; ++j) {
    const int c = 8 * (tid + j * GV_THREADS);
    if (c < K) {
      *reinterpret_cast<float4*>(row + c) = float4{v[j][0], v[j][1], v[j][2], v[j][3]};
      *reinterpret_cast<float4*>(row + c + 4) = float4{v[j][4], v[j][5], v[j][6], v[j][7]};
    }
  }
  __syncthreads();
  for (int g = g0; g < NB; g += 4 * GV_WARPS) {
    const int b = g + sub, kk = b * 128 + slot;
    if (g != g0) {
#pragma unroll
      for (int i = 0; i < QB_VALS / 4; ++i) {
        const int k = kk + 4 * i;
        src[i] = HAS_PERM && k < K ? __ldg(reinterpret_cast<const int4*>(perm + k)) : int4{k, k + 1, k + 2, k + 3};
      }
    }
    float q[QB_VALS];
#pragma unroll
    for (int i = 0; i < QB_VALS / 4; ++i) {  // K % 8 == 0: four slots are all in or all out
      const bool in = kk + 4 * i < K;
      q[4 * i] = in ? row[src[i].x] : 0.0f, q[4 * i + 1] = in ? row[src[i].y] : 0.0f;
      q[4 * i + 2] = in ? row[src[i].z] : 0.0f, q[4 * i + 3] = in ? row[src[i].w] : 0.0f;
    }
    quantize_block<ROTATE>(q, b < NB ? bits[b] : 4, lane, b < NB, act + b * 128, sa + b);
  }
  __syncthreads();
  gv_stream<1, OUT, BIAS>(act, sa, cur, w, w_scales, bias, y, 1, NB, stride_wsb, 0, blockIdx.x, slabs, gridDim.x);
}
