// Paged decode attention over the INT4 KV cache (layout: ref.PagedKVCache), compiled at run time
// with NVRTC by kernels/decode_cuda.py, which explains the design and the measurements behind it.
//
// One warp owns a tile of TT = min(G, 64) tokens of one KV head from load to softmax update, with
// mma.sync m16n8k16 and every operand fragment built in registers from the tile's raw bytes:
// either straight from global memory, or from the warp's private cp.async ring in shared memory
// (the next tile streams in while this one is computed). No CTA barrier in the main loop. A CTA
// of NW warps covers a split of the sequence (warp w takes tiles w, w + NW, ...) and merges its
// warps through shared memory once.
//
// Fragments (PTX ISA, mma.m16n8k16; lane = 4 * gq + l): A rows gq, gq + 8 and k 2l, 2l+1, 2l+8,
// 2l+9; B k 2l, 2l+1, 2l+8, 2l+9 and column gq; C rows gq, gq + 8, columns 2l, 2l+1.
//   S = Q K^T: A = query heads (rows; REP <= 8 uses row gq only), B = K^T: column n of n-tile j is
//     token 8j + n, whose 16-byte code chunk l the lane loads (coalesced 512 B per warp load).
//     The channel (k) order is free, since a dot product sums over it: q is permuted to match
//     the order the codes widen into.
//   O = P V: A = P straight from the C fragment of S (the FlashAttention-2 register trick), B = V:
//     lane (gq, l) needs tokens 2l, 2l+1, 2l+8, 2l+9 of a 16-token step at its channels, bytes
//     gq * D/16 .. of those rows; one prmt pairs the same byte of two token rows.
// Dequantization never touches an element: scores = (q * k_scale) . codes + q . k_zero and
// P V = k-sums of p * codes, times v_scale, plus sum(p) * v_zero (sum(p) from an MMA against ones,
// so it sums exactly the float16 p the MMA used).
// Widening: codes land in float16 mantissas by mask-and-or with an exponent (1024 + c for bits
// 0-3, 64 + c for bits 4-7); the 1024 is subtracted (exact), the 64s are folded into the score
// bias and the V zero point.

// Register-level helpers (widening masks, MMA, loads, cp.async): mma_int4.cuh, which
// decode_cuda.py puts in front of this file.

// Per-lane softmax/output state of one warp (rows gq and gq + 8 of the head group).
template <int D, int NR>
struct State {
  float m[NR], l[NR];
  float acc[NR][2][D / 8];  // channel r * D/2 + l * D/8 + i at acc[.][r][i]
};

// Online-softmax update from the tile's scores S (C fragments of NT n-tiles): returns the P
// A-fragments (16-bit) and the rescale factors; updates m.
template <int NT, int NR, bool BF16>
DEV void softmax_tile(float (&S)[NT][4], float (&m)[NR], float (&alpha)[NR], u32 (&pa)[NT / 2][4]) {
#pragma unroll
  for (int rh = 0; rh < NR; ++rh) {
    float mx = NEG_INF;
#pragma unroll
    for (int j = 0; j < NT; ++j) mx = fmaxf(mx, fmaxf(S[j][2 * rh], S[j][2 * rh + 1]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    float m_new = fmaxf(m[rh], mx);
    alpha[rh] = ex2(m[rh] - m_new);
    m[rh] = m_new;
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      S[j][2 * rh] = ex2(S[j][2 * rh] - m_new);
      S[j][2 * rh + 1] = ex2(S[j][2 * rh + 1] - m_new);
    }
  }
#pragma unroll
  for (int ks = 0; ks < NT / 2; ++ks) {
    pa[ks][0] = pack2<BF16>(S[2 * ks][0], S[2 * ks][1]);
    pa[ks][2] = pack2<BF16>(S[2 * ks + 1][0], S[2 * ks + 1][1]);
    pa[ks][1] = NR > 1 ? pack2<BF16>(S[2 * ks][2], S[2 * ks][3]) : 0u;
    pa[ks][3] = NR > 1 ? pack2<BF16>(S[2 * ks + 1][2], S[2 * ks + 1][3]) : 0u;
  }
}

// sum(p) per row over the tile, exactly as the MMA sees p: C = P . ones.
template <int KS, bool BF16>
DEV void row_sums(const u32 (&pa)[KS][4], float (&cs)[4]) {
  const u32 one = BF16 ? 0x3F803F80u : 0x3C003C00u;
  cs[0] = cs[1] = cs[2] = cs[3] = 0.f;
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) mma<BF16>(cs, pa[ks][0], pa[ks][1], pa[ks][2], pa[ks][3], one, one);
}

// One tile of TT quantized tokens: codes [TT, D/2] (row stride D/2) and the group's four float16
// [D] vectors, in global memory (GLOBAL) or in the warp's shared-memory ring.
template <int D, int REP, int TT, bool GLOBAL>
DEV void int4_tile(State<D, (REP > 8 ? 2 : 1)>& st, const u32 (&qp)[REP > 8 ? 2 : 1][D / 16][2],
                   const u8* kcp, const u8* vcp, const u16* ksp, const u16* kzp, const u16* vsp, const u16* vzp,
                   int gq, int l) {
  constexpr int NR = REP > 8 ? 2 : 1, HALF = D / 2, CH = D / 8, NWD = CH / 4, KST = D / 16;
  constexpr int VB = D / 16, VW = (VB + 3) / 4, NT = TT / 8, KS = TT / 16;
  // Global memory: every load of the tile issued at once (one latency). Shared memory (the ring):
  // each fragment loaded where it is used, so fewer registers are live and more warps fit.
  u32 kc[NT][NWD], vc[KS][4][VW];
  u32 ksw[2][CH / 2], kzw[2][CH / 2], vsw[2][CH / 2], vzw[2][CH / 2];
  auto load_k = [&](int j) { ld_words<GLOBAL>(kc[j], kcp + (8 * j + gq) * HALF + l * CH); };
  auto load_v = [&]() {
#pragma unroll
    for (int ks = 0; ks < KS; ++ks)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        ld_words<GLOBAL>(vc[ks][e], vcp + (16 * ks + 2 * l + (e & 1) + 8 * (e >> 1)) * HALF + gq * VB);
  };
  auto load_vmeta = [&]() {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      ld_words<GLOBAL>(vsw[r], vsp + r * HALF + l * CH);
      ld_words<GLOBAL>(vzw[r], vzp + r * HALF + l * CH);
    }
  };
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    ld_words<GLOBAL>(ksw[r], ksp + r * HALF + l * CH);
    ld_words<GLOBAL>(kzw[r], kzp + r * HALF + l * CH);
  }
  if constexpr (GLOBAL) {
#pragma unroll
    for (int j = 0; j < NT; ++j) load_k(j);
    load_v();
    load_vmeta();
  }
  // ---- q * k_scale (float16) and the score bias q . k_zero - 64 * sum_hi(q * k_scale) ----
  // k-step s = 2w + r, slot e holds channels r*HALF + l*CH + 4w + e and ... + 2 (widening order)
  u32 qs[NR][KST][2];
  float cb[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int s = 0; s < KST; ++s) {
    const int r = s & 1, w = s >> 1;
    u32 kz2[2];
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const u32 sel = e ? 0x7632u : 0x5410u;
      u32 ks2 = __byte_perm(ksw[r][2 * w], ksw[r][2 * w + 1], sel);
      kz2[e] = __byte_perm(kzw[r][2 * w], kzw[r][2 * w + 1], sel);
#pragma unroll
      for (int rh = 0; rh < NR; ++rh) qs[rh][s][e] = hmul2(qp[rh][s][e], ks2);
    }
    mma<false>(cb, qp[0][s][0], NR > 1 ? qp[NR - 1][s][0] : 0u, qp[0][s][1], NR > 1 ? qp[NR - 1][s][1] : 0u,
               kz2[0], kz2[1]);
    if (r == 1)
      mma<false>(cb, qs[0][s][0], NR > 1 ? qs[NR - 1][s][0] : 0u, qs[0][s][1], NR > 1 ? qs[NR - 1][s][1] : 0u,
                 F16_NEG64, F16_NEG64);
  }
  // ---- S = Q K^T + bias ----
  float S[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    S[j][0] = cb[0], S[j][1] = cb[1], S[j][2] = cb[2], S[j][3] = cb[3];
    if constexpr (!GLOBAL) load_k(j);
#pragma unroll
    for (int w = 0; w < NWD; ++w) {
      const u32 x = kc[j][w], y = x >> 8;
      const u32 lo02 = hsub2(lop3_and_or(x, LO_NIB, F16_1024), F16_1024);  // bytes 0, 2: channels 4w, 4w+2
      const u32 lo13 = hsub2(lop3_and_or(y, LO_NIB, F16_1024), F16_1024);  // bytes 1, 3
      const u32 hi02 = lop3_and_or(x, HI_NIB, F16_64);                     // 64 + code
      const u32 hi13 = lop3_and_or(y, HI_NIB, F16_64);
      const int s0 = 2 * w, s1 = 2 * w + 1;
      mma<false>(S[j], qs[0][s0][0], NR > 1 ? qs[NR - 1][s0][0] : 0u, qs[0][s0][1],
                 NR > 1 ? qs[NR - 1][s0][1] : 0u, lo02, lo13);
      mma<false>(S[j], qs[0][s1][0], NR > 1 ? qs[NR - 1][s1][0] : 0u, qs[0][s1][1],
                 NR > 1 ? qs[NR - 1][s1][1] : 0u, hi02, hi13);
    }
  }
  float alpha[NR];
  u32 pa[KS][4];
  softmax_tile<NT, NR, false>(S, st.m, alpha, pa);
  float cs[4];
  row_sums<KS, false>(pa, cs);
#pragma unroll
  for (int rh = 0; rh < NR; ++rh) st.l[rh] = st.l[rh] * alpha[rh] + cs[2 * rh];
  // ---- O = alpha O + v_scale (P codes) + sum(p) (v_zero - offset v_scale) ----
  if constexpr (!GLOBAL) load_v(), load_vmeta();  // after S: the K registers are free again
#pragma unroll
  for (int k = 0; k < VB; ++k) {
    const int u = k >> 2, bb = k & 3;
    const u32 sel = bb | (bb << 4) | ((bb + 4) << 8) | ((bb + 4) << 12);
    float clo[4] = {0.f, 0.f, 0.f, 0.f}, chi[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      const u32 x01 = __byte_perm(vc[ks][0][u], vc[ks][1][u], sel);
      const u32 x89 = __byte_perm(vc[ks][2][u], vc[ks][3][u], sel);
      mma<false>(clo, pa[ks][0], pa[ks][1], pa[ks][2], pa[ks][3], lop3_and_or(x01, LO_NIB, F16_1024),
                 lop3_and_or(x89, LO_NIB, F16_1024));
      mma<false>(chi, pa[ks][0], pa[ks][1], pa[ks][2], pa[ks][3], lop3_and_or(x01, HI_NIB, F16_64),
                 lop3_and_or(x89, HI_NIB, F16_64));
    }
    // C column 2l (+1) is channel l*CH + k (+ VB) of the low / high half
#pragma unroll
    for (int cc = 0; cc < 2; ++cc) {
      const int i = cc * VB + k;
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float vs = half_to_float<false>(vsw[r][i >> 1], i & 1);
        const float vz = half_to_float<false>(vzw[r][i >> 1], i & 1);
        const float zeff = vz - (r ? 64.f : 1024.f) * vs;
#pragma unroll
        for (int rh = 0; rh < NR; ++rh) {
          const float c = r ? chi[2 * rh + cc] : clo[2 * rh + cc];
          st.acc[rh][r][i] = fmaf(st.acc[rh][r][i], alpha[rh], fmaf(vs, c, cs[2 * rh] * zeff));
        }
      }
    }
  }
}

// One chunk of up to TT tokens of the 16-bit window (rows w0 .. of the sequence's window slot).
template <int D, int REP, int TT, bool BF16>
DEV void window_tile(State<D, (REP > 8 ? 2 : 1)>& st, const u16* __restrict__ q_row0, int stride_qh,
                     const u16* __restrict__ k_win, const u16* __restrict__ v_win, int w0, int n_win,
                     float sm_scale, int gq, int l) {
  constexpr int NR = REP > 8 ? 2 : 1, HALF = D / 2, CH = D / 8, NWD = CH / 4, KST = D / 16;
  constexpr int VB = D / 16, NT = TT / 8, KS = TT / 16;
  // q in its own dtype, pairs of adjacent channels: k-step s = 2w + r, slot e = channels
  // r*HALF + l*CH + 4w + 2e, +1 (the K rows below load the same pairs)
  u32 qa[NR][KST][2];
#pragma unroll
  for (int rh = 0; rh < NR; ++rh) {
    const int row = gq + 8 * rh;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      u32 qw[CH / 2];
      ld_words<true>(qw, q_row0 + (u64)row * stride_qh + r * HALF + l * CH, row < REP);
#pragma unroll
      for (int w = 0; w < NWD; ++w) qa[rh][2 * w + r][0] = qw[2 * w], qa[rh][2 * w + r][1] = qw[2 * w + 1];
    }
  }
  float S[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    S[j][0] = S[j][1] = S[j][2] = S[j][3] = 0.f;
    if constexpr (NT > 2) __syncwarp();  // keeps the compiler from hoisting every row's loads (registers)
    const int t = w0 + 8 * j + gq;
    u32 kw[2][CH / 2];
#pragma unroll
    for (int r = 0; r < 2; ++r) ld_words<true>(kw[r], k_win + (u64)t * D + r * HALF + l * CH, t < n_win);
#pragma unroll
    for (int s = 0; s < KST; ++s)
      mma<BF16>(S[j], qa[0][s][0], NR > 1 ? qa[NR - 1][s][0] : 0u, qa[0][s][1], NR > 1 ? qa[NR - 1][s][1] : 0u,
                kw[s & 1][2 * (s >> 1)], kw[s & 1][2 * (s >> 1) + 1]);
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const bool ok = w0 + 8 * j + 2 * l + (c & 1) < n_win;
      S[j][c] = ok ? S[j][c] * sm_scale : NEG_INF;
    }
  }
  float alpha[NR];
  u32 pa[KS][4];
  softmax_tile<NT, NR, BF16>(S, st.m, alpha, pa);
  float cs[4];
  row_sums<KS, BF16>(pa, cs);
#pragma unroll
  for (int rh = 0; rh < NR; ++rh) {
    st.l[rh] = st.l[rh] * alpha[rh] + cs[2 * rh];
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int i = 0; i < CH; ++i) st.acc[rh][r][i] *= alpha[rh];
  }
  // lane (gq, l) holds output channels r*HALF + l*CH + i; as the B operand it serves column gq:
  // channels r*HALF + gq*VB + k of n-tile (r, k), rows 2l, 2l+1, 2l+8, 2l+9
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) {
    if constexpr (KS > 1) __syncwarp();
    u32 vw[4][2][VB / 2];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int t = w0 + 16 * ks + 2 * l + (e & 1) + 8 * (e >> 1);
#pragma unroll
      for (int r = 0; r < 2; ++r) ld_words<true>(vw[e][r], v_win + (u64)t * D + r * HALF + gq * VB, t < n_win);
    }
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int k = 0; k < VB; ++k) {
        const u32 sel = (k & 1) ? 0x7632u : 0x5410u;
        float c[4] = {0.f, 0.f, 0.f, 0.f};
        mma<BF16>(c, pa[ks][0], pa[ks][1], pa[ks][2], pa[ks][3], __byte_perm(vw[0][r][k >> 1], vw[1][r][k >> 1], sel),
                  __byte_perm(vw[2][r][k >> 1], vw[3][r][k >> 1], sel));
#pragma unroll
        for (int rh = 0; rh < NR; ++rh)
#pragma unroll
          for (int cc = 0; cc < 2; ++cc) st.acc[rh][r][cc * VB + k] += c[2 * rh + cc];
      }
  }
}

constexpr int WINDOW_TILE = 16;  // tokens per window chunk

// Copies quantized tile `t` (codes, then k_scale, k_zero, v_scale, v_zero) into a ring stage.
template <int D, int G, int P, int TT>
DEV void issue_tile(u8* stage, int page, int t, int h, int H, const u8* __restrict__ k_codes,
                    const u8* __restrict__ v_codes, const u16* __restrict__ k_scales,
                    const u16* __restrict__ k_zeros, const u16* __restrict__ v_scales,
                    const u16* __restrict__ v_zeros, int lane) {
  constexpr int CB = TT * D / 32, MB = D / 8;  // 16-byte chunks per code tile, per meta vector
  static_assert(CB % 32 == 0 && (4 * MB) % 32 == 0, "whole chunks per lane");
  const int row = (t * TT) % P;
  const u8* kc = k_codes + ((u64)(page * H + h) * P + row) * (D / 2);
  const u8* vc = v_codes + ((u64)(page * H + h) * P + row) * (D / 2);
  const u64 mo = ((u64)(page * H + h) * (P / G) + row / G) * D;
#pragma unroll
  for (int k = 0; k < CB / 32; ++k) {
    const int i = lane + 32 * k;
    cp_async16(stage + 16 * i, kc + 16 * i);
    cp_async16(stage + TT * D / 2 + 16 * i, vc + 16 * i);
  }
#pragma unroll
  for (int k = 0; k < 4 * MB / 32; ++k) {
    const int i = lane + 32 * k, vec = i / MB, off = (i % MB) * 8;  // off in halves
    const u16* src = vec == 0 ? k_scales : vec == 1 ? k_zeros : vec == 2 ? v_scales : v_zeros;
    cp_async16(stage + TT * D + vec * 2 * D + 2 * off, src + mo + off);
  }
}

// Grid (splits, Hkv, B), NW warps. Each sequence spreads its own tiles over the splits, whole rounds
// of the warps per split (a CUDA graph sizes the grid for the longest context the model takes: a
// short sequence is spread over the splits too, not crowded into the first ones). Tiles:
// ctx // G full groups as G / TT quantized tiles each, then the 16-bit window in chunks of WT tokens
// (a small chunk loads its rows at once and spreads the window over warps: the window's loads had
// been one round trip per 8 rows, 3.5 us of a 9.4 us batch-1 call at context 552).
// STAGES > 0: each warp streams its quantized tiles through a STAGES-deep cp.async ring in shared
// memory (loads of the next tiles overlap this tile's math); 0: straight from global memory.
// num_splits == 1: writes out, else unnormalized partials for merge_splits.
template <int D, int G, int P, int REP, int NW, bool BF16, int STAGES>
__global__ void __launch_bounds__(NW * 32) paged_decode_int4(
    const u16* __restrict__ q, const u8* __restrict__ k_codes, const u8* __restrict__ v_codes,
    const u16* __restrict__ k_scales, const u16* __restrict__ k_zeros, const u16* __restrict__ v_scales,
    const u16* __restrict__ v_zeros, const u16* __restrict__ k_window, const u16* __restrict__ v_window,
    const int* __restrict__ block_tables, const int* __restrict__ context_lens, const int* __restrict__ seq_slots,
    u16* __restrict__ out, float* __restrict__ part_o, float* __restrict__ part_ml, int stride_qb, int stride_qh, int stride_ob, int stride_oh, int stride_bt, int num_kv_heads,
    int num_splits, int scale_bits) {
  constexpr int NR = REP > 8 ? 2 : 1, HALF = D / 2, CH = D / 8, NWD = CH / 4, KST = D / 16;
  constexpr int TT = G < 64 ? G : 64, TPG = G / TT, STAGE = TT * D + 8 * D, WT = WINDOW_TILE;
  constexpr int RING = NW * STAGES * STAGE, MERGE = NW * REP * (D + 2) * 4;
  static_assert(REP <= 16 && TT % 16 == 0 && P % G == 0, "unsupported shape");
  __shared__ __align__(16) u8 smem[RING > MERGE ? RING : MERGE];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gq = lane >> 2, l = lane & 3;
  const int split = blockIdx.x, h = blockIdx.y, b = blockIdx.z, H = num_kv_heads;
  const float sm_scale = __int_as_float(scale_bits);  // softmax scale * log2(e)
  grid_dep_wait();  // q and the newest K/V come from the kernel before (launched with PDL)
  grid_dep_launch();
  const int ctx = context_lens[b];
  const int n_groups = ctx / G, n_win = ctx - n_groups * G, n_qt = n_groups * TPG;
  const int n_tiles = n_qt + (n_win + WT - 1) / WT;
  const int tps = (n_tiles + num_splits * NW - 1) / (num_splits * NW) * NW;  // tiles per split
  const int t_begin = split * tps, t_end = min(t_begin + tps, n_tiles);
  const u16* q_row0 = q + (u64)b * stride_qb + (u64)h * REP * stride_qh;

  State<D, NR> st;
  // q * scale * log2(e) as float16 pairs in the widening order (see int4_tile)
  u32 qp[NR][KST][2];
#pragma unroll
  for (int rh = 0; rh < NR; ++rh) {
    st.m[rh] = NEG_INF, st.l[rh] = 0.f;
    const int row = gq + 8 * rh;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
#pragma unroll
      for (int i = 0; i < CH; ++i) st.acc[rh][r][i] = 0.f;
      u32 qw[CH / 2];
      ld_words<true>(qw, q_row0 + (u64)row * stride_qh + r * HALF + l * CH, row < REP);
#pragma unroll
      for (int w = 0; w < NWD; ++w)
#pragma unroll
        for (int e = 0; e < 2; ++e)
          qp[rh][2 * w + r][e] = pack2<false>(half_to_float<BF16>(qw[2 * w], e) * sm_scale,
                                              half_to_float<BF16>(qw[2 * w + 1], e) * sm_scale);
    }
  }
  const int* bt = block_tables + (u64)b * stride_bt;
  const int first = t_begin + warp, q_end = min(t_end, n_qt);
  const int n_mine = first < q_end ? (q_end - first + NW - 1) / NW : 0;  // this warp's quantized tiles
  if constexpr (STAGES > 0) {
    u8* ring = smem + warp * STAGES * STAGE;
    int next_page = n_mine > 0 ? bt[first * TT / P] : 0;  // one tile ahead of the copies
    auto issue = [&](int i) {
      if (i < n_mine) {
        const int t = first + i * NW, page = next_page;
        next_page = i + 1 < n_mine ? bt[(t + NW) * TT / P] : 0;
        issue_tile<D, G, P, TT>(ring + (i % STAGES) * STAGE, page, t, h, H, k_codes, v_codes, k_scales, k_zeros,
                                v_scales, v_zeros, lane);
      }
      cp_async_commit();  // empty groups keep the wait count uniform
    };
#pragma unroll
    for (int i = 0; i < STAGES - 1; ++i) issue(i);
    for (int i = 0; i < n_mine; ++i) {
      issue(i + STAGES - 1);
      cp_async_wait<STAGES - 1>();
      __syncwarp();
      const u8* stg = ring + (i % STAGES) * STAGE;
      const u16* meta = reinterpret_cast<const u16*>(stg + TT * D);
      int4_tile<D, REP, TT, false>(st, qp, stg, stg + TT * HALF, meta, meta + D, meta + 2 * D, meta + 3 * D, gq, l);
      __syncwarp();  // the stage is refilled by the next iteration's issue
    }
  } else {
    for (int i = 0; i < n_mine; ++i) {
      const int t = first + i * NW, tok = t * TT, page = bt[tok / P], row = tok % P;
      const u64 cb = ((u64)(page * H + h) * P + row) * HALF, mb = ((u64)(page * H + h) * (P / G) + row / G) * D;
      int4_tile<D, REP, TT, true>(st, qp, k_codes + cb, v_codes + cb, k_scales + mb, k_zeros + mb, v_scales + mb,
                                  v_zeros + mb, gq, l);
    }
  }
  for (int t = first + n_mine * NW; t < t_end; t += NW) {  // window chunks (t >= n_qt)
    const u64 wbase = (u64)(seq_slots[b] * H + h) * G * D;
    window_tile<D, REP, WT, BF16>(st, q_row0, stride_qh, k_window + wbase, v_window + wbase, (t - n_qt) * WT,
                                  n_win, sm_scale, gq, l);
  }
  // ---- merge the warps (shared memory, once), then store ----
  float (*sm_o)[REP][D] = reinterpret_cast<float (*)[REP][D]>(smem);
  float (*sm_ml)[REP][2] = reinterpret_cast<float (*)[REP][2]>(smem + NW * REP * D * 4);
  if constexpr (STAGES > 0) __syncthreads();  // the merge buffer aliases the rings
#pragma unroll
  for (int rh = 0; rh < NR; ++rh) {
    const int row = gq + 8 * rh;
    if (row < REP) {
#pragma unroll
      for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int i = 0; i < CH; ++i) sm_o[warp][row][r * HALF + l * CH + i] = st.acc[rh][r][i];
      if (l == 0) sm_ml[warp][row][0] = st.m[rh], sm_ml[warp][row][1] = st.l[rh];
    }
  }
  __syncthreads();
  const int hq0 = h * REP;
  for (int idx = threadIdx.x; idx < REP * D; idx += NW * 32) {
    const int row = idx / D, d = idx % D;
    float mx = NEG_INF;
#pragma unroll
    for (int w = 0; w < NW; ++w) mx = fmaxf(mx, sm_ml[w][row][0]);
    float num = 0.f, den = 0.f;
    if (mx != NEG_INF) {
#pragma unroll
      for (int w = 0; w < NW; ++w) {
        const float e = ex2(sm_ml[w][row][0] - mx);
        num = fmaf(e, sm_o[w][row][d], num);
        den = fmaf(e, sm_ml[w][row][1], den);
      }
    }
    if (num_splits == 1) {
      out[(u64)b * stride_ob + (u64)(hq0 + row) * stride_oh + d] = float_to_half<BF16>(den > 0.f ? num / den : 0.f);
    } else {
      const u64 pidx = ((u64)b * H * REP + hq0 + row) * num_splits + split;
      part_o[pidx * D + d] = num;
      if (d == 0) part_ml[pidx * 2] = mx, part_ml[pidx * 2 + 1] = den;
    }
  }
}

// Grid (B * Hq), D threads: out = sum_s 2^(m_s - m) o_s / sum_s 2^(m_s - m) l_s.
template <int D, bool BF16>
__global__ void __launch_bounds__(D) merge_splits(const float* __restrict__ part_o, const float* __restrict__ part_ml,
                                                  u16* __restrict__ out, int num_q_heads, int stride_ob,
                                                  int stride_oh, int num_splits) {
  const int pid = blockIdx.x, b = pid / num_q_heads, hq = pid % num_q_heads, d = threadIdx.x;
  grid_dep_wait();
  grid_dep_launch();
  const float* ml = part_ml + (u64)pid * num_splits * 2;
  float mx = NEG_INF;
  for (int s = 0; s < num_splits; ++s) mx = fmaxf(mx, ml[2 * s]);
  float num = 0.f, den = 0.f;
  if (mx != NEG_INF) {
    for (int s = 0; s < num_splits; ++s) {
      const float e = ex2(ml[2 * s] - mx);
      num = fmaf(e, part_o[((u64)pid * num_splits + s) * D + d], num);
      den = fmaf(e, ml[2 * s + 1], den);
    }
  }
  out[(u64)b * stride_ob + (u64)hq * stride_oh + d] = float_to_half<BF16>(den > 0.f ? num / den : 0.f);
}
