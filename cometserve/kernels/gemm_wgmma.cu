// W4Ax GEMM for many tokens on sm_90a: warp-specialized, persistent, wgmma with the widened INT4
// weights as the register operand (gemm_wgmma.py has the design notes and the launcher). Needs
// mma_int4.cuh (typedefs, float_to_half, store_out, grid_dep_wait) in the same NVRTC unit.
//
// Y[m, n] = sum_b int32(A_b . W_b^T)[m, n] * a_scale[m, b] * w_scale[b, n] / 16 (+ bias[n]): the
// reference's numerics (kernels/ref.py) in the Triton kernel's order: one fp32 FMA per output and
// 128-channel block, fma(float(block sum), w_scale * a_scale, acc), blocks in ascending order.
//
// CTA = 3 warpgroups. WG0 (the producer, 88 registers) streams block b of the tile into a ring of
// STAGES shared-memory stages with cp.async: the activation tile [BT tokens, 128 B] in the 128-byte
// swizzle wgmma reads, the weight tile [128 rows, 64 B] chunk-swizzled for ldmatrix, and both scale
// vectors; each producer thread's copies arrive on the stage's `full` mbarrier when they land. WG1
// and WG2 (the consumers, 208 registers) own 64 weight rows each: ldmatrix, mask widening to int8
// code * 16, four wgmma m64nBTk32 into an int32 block sum (the first with scale-d 0: no zeroing),
// wait, fold into the fp32 accumulator, release the stage. The consumers take turns to issue their
// MMAs (named barriers 3 and 4, ping-pong), so that one folds while the other's MMAs run; without
// the turns both woke on the same stage, issued together and folded together (measured 5-17%
// slower). What the fold still costs is in NOTES-gemm.md (session 10): the kernel runs at ~650-690
// TOP/s, ~1050-1250 without the fold.

constexpr int WT_ROWS = 128;          // weight rows per CTA tile (2 consumer warpgroups x 64)
constexpr int WT_STAGE = WT_ROWS * 64;  // bytes of packed INT4 weights per stage (one 128-channel block)

DEV u32 smem_addr(const void* p) {
  u32 a;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
  return a;
}
DEV void mbar_init(u32 bar, u32 count) {
  asm volatile("mbarrier.init.shared.b64 [%0], %1;" :: "r"(bar), "r"(count) : "memory");
}
DEV void mbar_arrive(u32 bar) {
  asm volatile("{ .reg .b64 st; mbarrier.arrive.shared.b64 st, [%0]; }" :: "r"(bar) : "memory");
}
DEV void mbar_wait(u32 bar, u32 parity) {  // until the phase of this parity has completed
  u32 done = 0;
  while (!done)
    asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                 : "=r"(done) : "r"(bar), "r"(parity) : "memory");
}
DEV void cp_async_arrive(u32 bar) {  // arrive on `bar` once this thread's earlier cp.async have landed
  asm volatile("cp.async.mbarrier.arrive.noinc.shared.b64 [%0];" :: "r"(bar) : "memory");
}
DEV void cp16(u32 dst, const void* src, bool ok) {  // 16 bytes, zeros where !ok
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(dst), "l"(src), "r"(ok ? 16 : 0) : "memory");
}
DEV void cp4(u32 dst, const void* src, bool ok) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" :: "r"(dst), "l"(src), "r"(ok ? 4 : 0) : "memory");
}
DEV void ldmatrix_x4(u32 (&r)[4], u32 addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
DEV void wg_barrier(int id) { asm volatile("bar.sync %0, 128;" :: "r"(id) : "memory"); }
DEV void pair_sync(int id) { asm volatile("bar.sync %0, 256;" :: "r"(id) : "memory"); }  // both consumers
DEV void pair_arrive(int id) { asm volatile("bar.arrive %0, 256;" :: "r"(id) : "memory"); }

// wgmma descriptor of a K-major tile with the 128-byte swizzle: rows of 128 bytes, 8-row atoms
// 1024 bytes apart (stride byte offset), start 1024-aligned; k step s starts 32 * s bytes in.
DEV u64 sw128_desc(u32 addr) {
  return (u64)((addr & 0x3FFFF) >> 4) | ((u64)1 << 16) | ((u64)(1024 >> 4) << 32) | ((u64)1 << 62);
}

#define R8(i) "+r"(d[i]), "+r"(d[i + 1]), "+r"(d[i + 2]), "+r"(d[i + 3]), "+r"(d[i + 4]), "+r"(d[i + 5]), \
              "+r"(d[i + 6]), "+r"(d[i + 7])
template <int BT>
DEV void wgmma_s8(int (&d)[BT / 2], const u32 (&a)[4], u64 desc, int accumulate);
template <>
DEV void wgmma_s8<64>(int (&d)[32], const u32 (&a)[4], u64 desc, int accumulate) {
  asm volatile(
      "{ .reg .pred p; setp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k32.s32.s8.s8 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, "
      "%12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "{%32, %33, %34, %35}, %36, p; }"
      : R8(0), R8(8), R8(16), R8(24)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(accumulate));
}
template <>
DEV void wgmma_s8<128>(int (&d)[64], const u32 (&a)[4], u64 desc, int accumulate) {
  asm volatile(
      "{ .reg .pred p; setp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, "
      "%12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, "
      "%52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p; }"
      : R8(0), R8(8), R8(16), R8(24), R8(32), R8(40), R8(48), R8(56)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(accumulate));
}
#undef R8

template <int N>
DEV void fence_regs(int (&d)[N]) {  // keep the compiler from moving accumulator reads across the wait
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(d[i]) :: "memory");
}

template <int BT>
struct Tile {  // CTA tile coordinates: GROUP_N weight tiles sweep all token tiles (L2 reuse)
  int n0, m0;
  DEV Tile(int tile, int M, int N, int group_n) {
    int num_m = (M + BT - 1) / BT, num_n = N / WT_ROWS;
    int width = group_n * num_m, first_n = (tile / width) * group_n;
    int group = min(num_n - first_n, group_n);
    n0 = (first_n + (tile % width) % group) * WT_ROWS;
    m0 = ((tile % width) / group) * BT;
  }
};

// SPLIT: K split over work units, a separate instance (the fix-up switched off at run time left
// the unsplit kernel ~10% slower in a recorded run; as an instance it times as before, NOTES item 23)
template <int BT, int OUT, bool BIAS, int STAGES, bool SPLIT>
__global__ void __launch_bounds__(384, 1)
w4ax_wgmma(const u8* __restrict__ a, const float* __restrict__ a_scales, const u8* __restrict__ w,
           const u16* __restrict__ w_scales, const void* __restrict__ bias, u8* __restrict__ y,
           float* __restrict__ part, int* __restrict__ sems,
           int M, int N, int NB, int stride_am, int stride_asm, int stride_wsb, int stride_ym, int group_n,
           int splits) {
  constexpr int A_STAGE = BT * 128, OSZ = OUT == 2 ? 4 : 2;
  constexpr int EPI_ROW = 64 * OSZ + 16;  // a token's 64 outputs of one consumer, padded (banks)
  extern __shared__ __align__(1024) u8 smem_raw[];
  u8* smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);  // stays a shared-memory pointer
  u8* act_s = smem;                                   // [STAGES][BT][128] swizzled
  u8* wt_s = act_s + STAGES * A_STAGE;                // [STAGES][128][64] chunk-swizzled
  float* sa_s = reinterpret_cast<float*>(wt_s + STAGES * WT_STAGE);  // [STAGES][BT]
  u16* sw_s = reinterpret_cast<u16*>(sa_s + STAGES * BT);            // [STAGES][128]
  u64* bars = reinterpret_cast<u64*>(sw_s + STAGES * WT_ROWS);       // full[STAGES], empty[STAGES]
  u8* epi_s = reinterpret_cast<u8*>(bars + 2 * STAGES);              // [2][BT][EPI_ROW]

  const int wg = threadIdx.x / 128, tid = threadIdx.x % 128;
  // work unit u = (tile u % tiles, K split u / tiles): split s owns blocks [s * per, (s + 1) * per)
  if (!SPLIT) splits = 1;
  const int tiles = ((M + BT - 1) / BT) * (N / WT_ROWS), units = tiles * splits, per = (NB + splits - 1) / splits;
  if (threadIdx.x == 0) {
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(smem_addr(bars + s), 128);         // every producer thread's copies
      mbar_init(smem_addr(bars + STAGES + s), 8);  // every consumer warp
    }
  }
  __syncthreads();
  grid_dep_wait();  // A, its scales and Y are shared with earlier kernels (PDL)

  if (wg == 0) {  // producer
    asm volatile("setmaxnreg.dec.sync.aligned.u32 88;");
    int it = 0;
    for (int u = blockIdx.x; u < units; u += gridDim.x) {
      const int sp = SPLIT ? u / tiles : 0;
      Tile<BT> t(SPLIT ? u % tiles : u, M, N, group_n);
      const int b_hi = min(NB, (sp + 1) * per);
      for (int b = sp * per; b < b_hi; ++b, ++it) {
        const int s = it % STAGES;
        if (it >= STAGES) mbar_wait(smem_addr(bars + STAGES + s), ((it / STAGES) - 1) & 1);
        const u32 as = smem_addr(act_s + s * A_STAGE), wsm = smem_addr(wt_s + s * WT_STAGE);
#pragma unroll
        for (int i = tid; i < BT * 8; i += 128) {  // activation rows: 8 chunks of 16 B each
          const int r = i >> 3, c = i & 7, m = t.m0 + r;
          const bool ok = m < M;
          cp16(as + r * 128 + ((c ^ (r & 7)) << 4), a + (size_t)(ok ? m : 0) * stride_am + b * 128 + c * 16, ok);
        }
#pragma unroll
        for (int i = tid; i < WT_ROWS * 4; i += 128) {  // weights: two contiguous 4 KB tile blocks
          const int r = i >> 2, c = i & 3;
          const u8* src = w + ((size_t)((t.n0 >> 6) + (r >> 6)) * NB + b) * 4096 + (r & 63) * 64 + c * 16;
          cp16(wsm + r * 64 + ((c ^ ((r >> 1) & 3)) << 4), src, true);
        }
        for (int i = tid; i < BT; i += 128) {
          const int m = t.m0 + i;
          cp4(smem_addr(sa_s + s * BT + i), a_scales + (size_t)(m < M ? m : 0) * stride_asm + b, m < M);
        }
        if (tid < WT_ROWS * 2 / 16)
          cp16(smem_addr(sw_s + s * WT_ROWS) + tid * 16, w_scales + (size_t)b * stride_wsb + t.n0 + tid * 8, true);
        cp_async_arrive(smem_addr(bars + s));
      }
    }
    return;
  }

  // consumers
  asm volatile("setmaxnreg.inc.sync.aligned.u32 208;");
  const int c = wg - 1, warp = tid / 32, lane = tid % 32, g = lane / 4, tq = lane % 4;
  const int row0 = 64 * c + 16 * warp;  // this warp's 16 weight rows in the tile
  // ldmatrix sources: lanes 8q..8q+7 give the rows of matrix q = (rows 0-7 | 8-15) x (chunk lo | hi)
  const int lr = row0 + ((lane >> 3) & 1) * 8 + (lane & 7), lc = lane >> 4;
  const u32 ld0 = smem_addr(wt_s) + lr * 64 + (((lc) ^ ((lr >> 1) & 3)) << 4);
  const u32 ld1 = smem_addr(wt_s) + lr * 64 + (((lc + 2) ^ ((lr >> 1) & 3)) << 4);
  u8* epi = epi_s + c * BT * EPI_ROW;
  int d[BT / 2];  // the int32 block sum
#pragma unroll
  for (int i = 0; i < BT / 2; ++i) d[i] = 0;
  int issued = 0;  // blocks issued by this consumer: its ring position and ping-pong turn
  // Issue the next block of the ring into d: four wgmma, k steps of 32 channels.
  auto issue = [&]() {
    const int s = issued % STAGES;
    mbar_wait(smem_addr(bars + s), (issued / STAGES) & 1);
    // weights: chunk q of row r holds channels 16q..16q+15 (low nibbles) and 64+16q.. (high), so
    // the masks give the k steps 0-1 (low) and 2-3 (high) in the A fragment layout directly
    u32 c01[4], c23[4];  // chunks 0-1 and 2-3 of the warp's 16 rows
    ldmatrix_x4(c01, ld0 + s * WT_STAGE);
    ldmatrix_x4(c23, ld1 + s * WT_STAGE);
    u32 op[4][4];  // k step k: chunks 0-1 (k even) or 2-3, low nibbles (k < 2) or high
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      op[0][i] = (c01[i] << 4) & 0xF0F0F0F0u, op[1][i] = (c23[i] << 4) & 0xF0F0F0F0u;
      op[2][i] = c01[i] & 0xF0F0F0F0u, op[3][i] = c23[i] & 0xF0F0F0F0u;
    }
    const u64 desc = sw128_desc(smem_addr(act_s + s * A_STAGE));
    if (c == 1 || issued > 0) pair_sync(3 + c);  // my turn to issue (ping-pong, see below)
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#pragma unroll
    for (int k = 0; k < 4; ++k) wgmma_s8<BT>(d, op[k], desc + 2 * k, k);  // +32 B per k step (16 B units)
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
    pair_arrive(4 - c);  // the other consumer's turn
    ++issued;
  };
  // Fold the block sum into acc once its MMAs are done, release the stage.
  auto fold = [&](float (&acc)[BT / 2]) {
    const int s = (issued - 1) % STAGES;
    const float sw0 = half_to_float<false>(sw_s[s * WT_ROWS + row0 + g], 0);
    const float sw1 = half_to_float<false>(sw_s[s * WT_ROWS + row0 + g + 8], 0);
    float2 sa[BT / 8];
#pragma unroll
    for (int j = 0; j < BT / 8; ++j) sa[j] = *reinterpret_cast<const float2*>(sa_s + s * BT + 8 * j + 2 * tq);
    asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
    fence_regs(d);
#pragma unroll
    for (int j = 0; j < BT / 8; ++j) {  // d[4j + e]: row g (e < 2) or g + 8, token 8j + 2tq + (e & 1)
      acc[4 * j] = fmaf((float)d[4 * j], sw0 * sa[j].x, acc[4 * j]);
      acc[4 * j + 1] = fmaf((float)d[4 * j + 1], sw0 * sa[j].y, acc[4 * j + 1]);
      acc[4 * j + 2] = fmaf((float)d[4 * j + 2], sw1 * sa[j].x, acc[4 * j + 2]);
      acc[4 * j + 3] = fmaf((float)d[4 * j + 3], sw1 * sa[j].y, acc[4 * j + 3]);
    }
    __syncwarp();
    if (lane == 0) mbar_arrive(smem_addr(bars + STAGES + s));
  };
  const int r0 = 16 * warp + g;
  for (int u = blockIdx.x; u < units; u += gridDim.x) {
    const int tile = SPLIT ? u % tiles : u, sp = SPLIT ? u / tiles : 0;
    Tile<BT> t(tile, M, N, group_n);
    float acc[BT / 2];
#pragma unroll
    for (int i = 0; i < BT / 2; ++i) acc[i] = 0.f;
    for (int b = sp * per; b < min(NB, (sp + 1) * per); ++b) {
      issue();
      fold(acc);
    }
    if constexpr (SPLIT) {
      __shared__ int last_s;  // whether this unit was the tile's last split to arrive
      // split-K fix-up, as the Triton kernel's: partials [splits, M, N] fp32; the last split of a
      // tile to arrive (counted on its semaphore, then reset) sums them in split order
      const size_t n_base = t.n0 + 64 * c + r0;
#pragma unroll
      for (int j = 0; j < BT / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int m = t.m0 + 8 * j + 2 * tq + (e & 1);
          if (m < M) part[((size_t)sp * M + m) * N + n_base + (e >> 1) * 8] = acc[4 * j + e];
        }
      __threadfence();
      pair_sync(5);
      if (threadIdx.x == 128) {
        last_s = atomicAdd(sems + tile, 1) == splits - 1;
        if (last_s) sems[tile] = 0;  // every split has arrived: ready for the next launch
      }
      pair_sync(5);
      if (!last_s) continue;  // the same for both consumers
      __threadfence();
#pragma unroll
      for (int i = 0; i < BT / 2; ++i) acc[i] = 0.f;
      for (int q = 0; q < splits; ++q)  // all of a split's loads in flight at once: one L2 trip per split
#pragma unroll
        for (int j = 0; j < BT / 8; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int m = t.m0 + 8 * j + 2 * tq + (e & 1);
            if (m < M) acc[4 * j + e] += __ldcg(part + ((size_t)q * M + m) * N + n_base + (e >> 1) * 8);
          }
    }
    // epilogue: /16 (mask widening), bias, convert; staged through shared memory so that each
    // token's 64 outputs of this consumer leave as 16-byte stores
    const float b0 = BIAS ? load_bias<OUT>(bias, t.n0 + 64 * c + r0) : 0.f;
    const float b1 = BIAS ? load_bias<OUT>(bias, t.n0 + 64 * c + r0 + 8) : 0.f;
#pragma unroll
    for (int j = 0; j < BT / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int tok = 8 * j + 2 * tq + (e & 1), r = r0 + (e >> 1) * 8;
        store_out<OUT>(epi + tok * EPI_ROW + r * OSZ, acc[4 * j + e] * 0.0625f + ((e >> 1) ? b1 : b0));
      }
    wg_barrier(1 + c);
    constexpr int CHUNKS = 64 * OSZ / 16;  // 16-byte pieces per token row
    for (int i = tid; i < BT * CHUNKS; i += 128) {
      const int tok = i / CHUNKS, q = i % CHUNKS, m = t.m0 + tok;
      if (m < M)
        *reinterpret_cast<uint4*>(y + ((size_t)m * stride_ym + t.n0 + 64 * c) * OSZ + q * 16) =
            *reinterpret_cast<const uint4*>(epi + tok * EPI_ROW + q * 16);
    }
    wg_barrier(1 + c);  // the next tile's epilogue overwrites epi
  }
  if (c == 0 && issued > 0) pair_sync(3);  // the second consumer's last arrival
}
