// Register-level helpers of the INT4-KV attention kernels (paged_decode.cu): 16-bit pair packing,
// mask-and-or widening, mma.sync m16n8k16, vector loads and cp.async; the 16-bit conversions and
// output stores are shared with the GEMM kernels (gemm_wgmma.cu, gemv_w4ax.cu). Self-contained (NVRTC
// compiles it without CUDA headers).

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;
typedef unsigned long long u64;
#define NEG_INF (__uint_as_float(0xff800000u))

#define DEV __device__ __forceinline__

DEV u32 lop3_and_or(u32 a, u32 m, u32 o) {  // (a & m) | o
  u32 d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(m), "r"(o));
  return d;
}
DEV u32 hsub2(u32 a, u32 b) {
  u32 d;
  asm("sub.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
  return d;
}
DEV u32 hmul2(u32 a, u32 b) {
  u32 d;
  asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
  return d;
}
template <bool BF16>
DEV u32 pack2(float lo, float hi) {  // two floats -> 16-bit pair, lo in bits 0-15
  u32 d;
  if constexpr (BF16)
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
  else
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
  return d;
}
template <bool BF16>
DEV float half_to_float(u32 pair, int which) {  // element `which` (0: bits 0-15) of a 16-bit pair
  u32 bits = which ? (pair >> 16) : (pair & 0xFFFFu);
  if constexpr (BF16) {
    return __uint_as_float(bits << 16);
  } else {
    float f;
    u16 h = (u16)bits;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
  }
}
template <bool BF16>
DEV u16 float_to_half(float x) {
  u16 h;
  if constexpr (BF16)
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(x));
  else
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
  return h;
}
// GEMM outputs (gemm_wgmma.cu, gemv_w4ax.cu), OUT: 0 bfloat16, 1 float16, 2 float32 (Y and bias)
template <int OUT>
DEV void store_out(u8* p, float v) {
  if constexpr (OUT == 2) *reinterpret_cast<float*>(p) = v;
  else *reinterpret_cast<u16*>(p) = float_to_half<OUT == 0>(v);
}
template <int OUT>
DEV float load_bias(const void* bias, int n) {
  if constexpr (OUT == 2) return reinterpret_cast<const float*>(bias)[n];
  else return half_to_float<OUT == 0>(reinterpret_cast<const u16*>(bias)[n], 0);
}

DEV float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

template <bool BF16>
DEV void mma(float (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
  if constexpr (BF16)
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// N 32-bit words from p (aligned to min(16, 4N) bytes; GLOBAL: read-only global memory, else any
// address, shared memory here); zeros where !ok.
template <bool GLOBAL, typename V>
DEV V ld_vec(const void* p) {
  if constexpr (GLOBAL) return __ldg(reinterpret_cast<const V*>(p));
  else return *reinterpret_cast<const V*>(p);
}
template <bool GLOBAL, int N>
DEV void ld_words(u32 (&d)[N], const void* p, bool ok = true) {
  if constexpr (N % 4 == 0) {
#pragma unroll
    for (int i = 0; i < N / 4; ++i) {
      uint4 v = ok ? ld_vec<GLOBAL, uint4>(reinterpret_cast<const uint4*>(p) + i) : uint4{0u, 0u, 0u, 0u};
      d[4 * i] = v.x, d[4 * i + 1] = v.y, d[4 * i + 2] = v.z, d[4 * i + 3] = v.w;
    }
  } else if constexpr (N == 2) {
    uint2 v = ok ? ld_vec<GLOBAL, uint2>(p) : uint2{0u, 0u};
    d[0] = v.x, d[1] = v.y;
  } else {
    static_assert(N == 1, "1, 2 or a multiple of 4 words");
    d[0] = ok ? ld_vec<GLOBAL, u32>(p) : 0u;
  }
}

// Asynchronous 16-byte global -> shared copies (sm_80+), L2 only: the tile is read once.
DEV void cp_async16(void* dst, const void* src) {
  asm volatile("{.reg .u64 a; .reg .u32 s;\n cvta.to.shared.u64 a, %0;\n cvt.u32.u64 s, a;\n"
               " cp.async.cg.shared.global [s], [%1], 16;}" :: "l"(dst), "l"(src) : "memory");
}
DEV void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
DEV void cp_async_wait() { asm volatile("cp.async.wait_group %0;" :: "n"(N) : "memory"); }

// float16 constants (pairs) of the widening: exponent patterns and nibble masks
constexpr u32 F16_1024 = 0x64006400u, F16_64 = 0x54005400u, F16_NEG64 = 0xD400D400u;
constexpr u32 LO_NIB = 0x000F000Fu, HI_NIB = 0x00F000F0u;

// Programmatic dependent launch (decode_cuda.py launches with the attribute on sm_90+; without it,
// or on older GPUs, these are no-ops): wait until the previous grid has completed and its writes
// are visible; let the next grid launch.
DEV void grid_dep_wait() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
DEV void grid_dep_launch() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
