// W4Ax GEMV for decode batches of at most 4 tokens: the weight stream on the CUDA cores (dp4a), no
// tensor cores, no split-K fix-up; below it the tensor-core instances for up to 32 tokens. Compiled at run time with NVRTC by gemv_w4ax.py (design and
// measurements there); mma_int4.cuh (typedefs, 16-bit conversions, store_out, griddepcontrol) is
// put in front of this file.
//
// Y[m, n] = sum_b int32(A_b . W_b^T)[m, n] * a_scale[m, b] * w_scale[b, n] / 16 (+ bias[n]), per
// block fma(float(block sum), w_scale * a_scale, acc) as the Triton kernel computes it; the blocks
// are summed in another order (each warp over its own blocks, then the warps in order): within the
// reference's tolerance, and deterministic.
//
// CTA = W warps (8 or 16: a tuner choice) over 32 weight rows (half of a prepared 64-row tile) and all
// K. Warp w takes blocks w, w + W, ...: the slab's 2 KB of block b are four fully coalesced 512-byte warp
// loads, lane l holding bytes 16 l .. of each, i.e. a 16-byte quarter (l % 4) of rows 8 q + l / 4,
// q = 0..3. Byte j of a row holds channel j (low nibble) and 64 + j (high nibble): masked into the
// high nibble of an int8 (code * 16, as the Triton kernel's mask widening) they meet the activation
// codes of channels 16 (l % 4) .. and 64 + 16 (l % 4) .. in dp4a. The four lanes of a row add their
// int32 sums with two shuffles (exact) before the fold. The next block's weights are in flight while
// one block is computed; the first block's are requested before the wait for the previous kernel
// (weights are never written by one). Activation codes and scales are staged in shared memory once.

constexpr int GV_ROWS = 32, GV_TILE_BYTES = 64 * 64;

DEV int dp4a(u32 a, u32 b, int c) {
  int d;
  asm("dp4a.s32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

struct GvBlock {
  uint4 w[4];  // quarter l % 4 of rows 8 q + l / 4
  float ws;    // w_scale of row `lane` of the slab
};

DEV void gv_load(GvBlock& t, const u8* slab, const u16* ws_col, int b, int stride_wsb, int lane) {
  const uint4* p = reinterpret_cast<const uint4*>(slab + (long long)b * GV_TILE_BYTES) + lane;
#pragma unroll
  for (int q = 0; q < 4; ++q) t.w[q] = __ldg(p + 32 * q);
  t.ws = half_to_float<false>(__ldg(ws_col + (long long)b * stride_wsb), 0);
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

// One output of either kernel's epilogue: the P warps' partial sums (stride apart) added in warp
// order, the x16 of the mask widening undone (exact), the bias added, stored.
template <int OUT, bool BIAS, int P>
DEV void gv_store(const float* part, int stride, const void* bias, int col, u8* out) {
  float v = part[0];
#pragma unroll
  for (int i = 1; i < P; ++i) v = __fadd_rn(v, part[i * stride]);
  v = __fmul_rn(v, 0.0625f);
  if (BIAS) v = __fadd_rn(v, load_bias<OUT>(bias, col));
  store_out<OUT>(out, v);
}

// grid (N / 32); rows m >= M of the MT-row instance are zero codes and never stored
template <int MT, int OUT, bool BIAS, int W>
__global__ void __launch_bounds__(32 * W) w4ax_gemv(
    const u8* __restrict__ a_codes, const float* __restrict__ a_scales, const u8* __restrict__ w,
    const u16* __restrict__ w_scales, const void* __restrict__ bias, u8* __restrict__ y, int M, int NB,
    int stride_am, int stride_asm, int stride_wsb, int stride_ym) {
  extern __shared__ __align__(16) u8 act[];  // activation codes [MT][K_pad], then scales fp32 [MT][NB]
  __shared__ float red[W][MT][GV_ROWS];
  constexpr int OSZ = OUT == 2 ? 4 : 2;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, kpad = NB * 128;
  const int n0 = blockIdx.x * GV_ROWS;
  const u8* slab = w + (long long)(n0 / 64) * NB * GV_TILE_BYTES + (n0 % 64) * 64;
  const u16* ws_col = w_scales + n0 + lane;
  GvBlock cur, nxt;
  if (warp < NB) gv_load(cur, slab, ws_col, warp, stride_wsb, lane);
  grid_dep_wait();  // the activations and Y are shared with earlier kernels
  float* sa = reinterpret_cast<float*>(act + MT * kpad);
  for (int i = 16 * tid; i < MT * kpad; i += 16 * 32 * W) {
    const int m = i / kpad, k = i % kpad;
    *reinterpret_cast<uint4*>(act + i) =
        m < M ? *reinterpret_cast<const uint4*>(a_codes + (long long)m * stride_am + k) : uint4{0u, 0u, 0u, 0u};
  }
  for (int i = tid; i < MT * NB; i += 32 * W) sa[i] = i / NB < M ? a_scales[(long long)(i / NB) * stride_asm + i % NB] : 0.0f;
  __syncthreads();
  float acc[MT][4];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int q = 0; q < 4; ++q) acc[m][q] = 0.0f;
  for (int b = warp; b < NB; b += W) {
    if (b + W < NB) gv_load(nxt, slab, ws_col, b + W, stride_wsb, lane);
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
    const int m = tid / GV_ROWS, r = tid % GV_ROWS;
    if (m < M) gv_store<OUT, BIAS, W>(&red[0][m][r], MT * GV_ROWS, bias, n0 + r, y + ((long long)m * stride_ym + n0 + r) * OSZ);
  }
}

// Tensor-core instances for up to 32 tokens (NT tiles of 8): the same CTA, slab and warp-to-block
// assignment, but each block is mma.sync m16n8k32 s8 with the widened weights as A (rows 8 q + l / 4:
// q = 0, 1 one 16-row tile, q = 2, 3 the other) and the activation codes as B, so the cost per block
// stays ~flat in the tokens where dp4a's grows with them. A dot product may take its channels in any
// order: k-step j pairs word j of the lane's weight quarter (channels 16 (l % 4) + 4 j .. in its low
// nibbles, 64 + 16 (l % 4) + 4 j .. in its high ones) with the same channels of token 8 t + l / 4,
// i.e. the A columns and B rows of lane l name the same 8 channels (both sit at 4 (l % 4) and
// 16 + 4 (l % 4) in the fragment). The int32 block sum comes out of the MMA complete (no shuffles);
// the fold is the dp4a instances' fp32 FMA, the warps summed in the same order.

DEV void mma_s8(int (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
  asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

template <int NT>
struct GtAct {
  uint4 lo[NT], hi[NT];  // channels 16 (l % 4) .. and 64 + 16 (l % 4) .. of token 8 t + l / 4
  float s[NT][2];        // a_scale of tokens 8 t + 2 (l % 4) + {0, 1} (the accumulator's columns)
};

template <int NT>
DEV void gt_load_act(GtAct<NT>& x, const u8* a_codes, const float* a_scales, int b, int M, int stride_am,
                     int stride_asm, int lane) {
  const int g = lane / 4, part = lane % 4;
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    const int tok = 8 * t + g;
    const uint4* p = reinterpret_cast<const uint4*>(a_codes + (long long)tok * stride_am + b * 128 + 16 * part);
    x.lo[t] = tok < M ? __ldg(p) : uint4{0u, 0u, 0u, 0u};
    x.hi[t] = tok < M ? __ldg(p + 4) : uint4{0u, 0u, 0u, 0u};
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int ts = 8 * t + 2 * part + e;
      x.s[t][e] = ts < M ? __ldg(a_scales + (long long)ts * stride_asm + b) : 0.0f;
    }
  }
}

template <int NT>
DEV void gt_block(float (&acc)[2][NT][4], const GvBlock& t, const GtAct<NT>& x, int lane) {
  float ws[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) ws[q] = __shfl_sync(0xffffffffu, t.ws, 8 * q + lane / 4);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const uint4 r0 = t.w[2 * h], r1 = t.w[2 * h + 1];
    const u32 w0[4] = {r0.x, r0.y, r0.z, r0.w}, w1[4] = {r1.x, r1.y, r1.z, r1.w};
    u32 lo0[4], lo1[4], hi0[4], hi1[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      lo0[j] = (w0[j] << 4) & 0xF0F0F0F0u, hi0[j] = w0[j] & 0xF0F0F0F0u;
      lo1[j] = (w1[j] << 4) & 0xF0F0F0F0u, hi1[j] = w1[j] & 0xF0F0F0F0u;
    }
#pragma unroll
    for (int tt = 0; tt < NT; ++tt) {
      const u32 blo[4] = {x.lo[tt].x, x.lo[tt].y, x.lo[tt].z, x.lo[tt].w};
      const u32 bhi[4] = {x.hi[tt].x, x.hi[tt].y, x.hi[tt].z, x.hi[tt].w};
      int c[4] = {0, 0, 0, 0};
#pragma unroll
      for (int j = 0; j < 4; ++j) mma_s8(c, lo0[j], lo1[j], hi0[j], hi1[j], blo[j], bhi[j]);
#pragma unroll
      for (int i = 0; i < 4; ++i)
        acc[h][tt][i] = __fmaf_rn((float)c[i], __fmul_rn(ws[2 * h + i / 2], x.s[tt][i % 2]), acc[h][tt][i]);
    }
  }
}

// grid (N / (32 RG)), dynamic shared memory (W / RG) * 8 NT * (32 RG + 1) fp32 (the warps' partial
// sums). RG row groups of 32 rows per CTA: warp w takes rows 32 (w % RG) .. and blocks w / RG,
// w / RG + W / RG, ..., so RG warps read each activation block at about the same time (L1 hits
// instead of L2 reads, for the larger token counts).
template <int NT, int OUT, bool BIAS, int W, int RG>
__global__ void __launch_bounds__(32 * W) w4ax_gemv_mma(
    const u8* __restrict__ a_codes, const float* __restrict__ a_scales, const u8* __restrict__ w,
    const u16* __restrict__ w_scales, const void* __restrict__ bias, u8* __restrict__ y, int M, int NB,
    int stride_am, int stride_asm, int stride_wsb, int stride_ym) {
  constexpr int MT = 8 * NT, KW = W / RG, CR = GV_ROWS * RG, RS = CR + 1, OSZ = OUT == 2 ? 4 : 2;
  extern __shared__ float red[];  // [KW][MT][RS]
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, rg = warp % RG, kw = warp / RG;
  const int c0 = blockIdx.x * CR, n0 = c0 + GV_ROWS * rg;
  const u8* slab = w + (long long)(n0 / 64) * NB * GV_TILE_BYTES + (n0 % 64) * 64;
  const u16* ws_col = w_scales + n0 + lane;
  GvBlock cur, nxt;
  GtAct<NT> xc, xn;
  if (kw < NB) gv_load(cur, slab, ws_col, kw, stride_wsb, lane);
  grid_dep_wait();  // the activations and Y are shared with earlier kernels
  if (kw < NB) gt_load_act<NT>(xc, a_codes, a_scales, kw, M, stride_am, stride_asm, lane);
  float acc[2][NT][4];
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[h][t][i] = 0.0f;
  for (int b = kw; b < NB; b += KW) {
    if (b + KW < NB) {
      gv_load(nxt, slab, ws_col, b + KW, stride_wsb, lane);
      gt_load_act<NT>(xn, a_codes, a_scales, b + KW, M, stride_am, stride_asm, lane);
    }
    gt_block<NT>(acc, cur, xc, lane);
    cur = nxt, xc = xn;
  }
  grid_dep_launch();
  const int g = lane / 4, part = lane % 4;
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
      for (int i = 0; i < 4; ++i)
        red[(kw * MT + 8 * t + 2 * part + i % 2) * RS + GV_ROWS * rg + 16 * h + 8 * (i / 2) + g] = acc[h][t][i];
  __syncthreads();
  for (int o = tid; o < MT * CR; o += 32 * W) {
    const int m = o / CR, r = o % CR;
    if (m >= M) break;  // o grows with m
    gv_store<OUT, BIAS, KW>(&red[m * RS + r], MT * RS, bias, c0 + r, y + ((long long)m * stride_ym + c0 + r) * OSZ);
  }
}
