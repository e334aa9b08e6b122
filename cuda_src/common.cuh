// common.cuh: NVRTC-safe basics. No system or toolkit headers are needed: fp16/bf16 are
// handled as raw 16-bit words and converted with PTX, so the sources compile under NVRTC
// alone (12.x and 13.x) on a machine without a CUDA toolkit.
#pragma once

typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef int int32_t;
typedef long long int64_t;
typedef unsigned long long uint64_t;

#define DM_DEVICE __device__ __forceinline__

namespace dm {

constexpr float kLog2e = 1.4426950408889634f;

// Programmatic dependent launch (sm_90+; no-ops on older targets). A kernel launched with
// programmatic stream serialization (runtime.LaunchConfig) may start before the kernel ahead of
// it in the stream ends: grid_dependency_wait() returns once that kernel has completed and its
// writes are visible (at once for a plain launch). grid_dependents_launch() lets the next such
// launch start before this grid ends (it still waits for this grid's writes).
DM_DEVICE void grid_dependency_wait() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
DM_DEVICE void grid_dependents_launch() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
#define DM_INF (__int_as_float(0x7f800000))  // +inf

// Bit 7 of each byte of m set where that byte is nonzero (a mask byte keeps): its low 7 bits
// plus 0x7f carry into bit 7, or bit 7 was set; no carry crosses a byte.
__host__ __device__ constexpr uint32_t kept_bits(uint32_t m) {
  return (((m & 0x7f7f7f7fu) + 0x7f7f7f7fu) | m) & 0x80808080u;
}
// kept_bits of m's 4 bytes as bits 0-3: one multiply by 1 + 2^7 + 2^14 + 2^21 moves bit
// 7 + 8i to 28 + i; the other partial products land on distinct bits below 28 or past 31.
__host__ __device__ constexpr uint32_t kept_nibble(uint32_t m) {
  return kept_bits(m) * 0x00204081u >> 28;
}

// One 16-bit storage type per element kind; both are converted through float.
struct Half { uint16_t bits; };
struct BFloat16 { uint16_t bits; };

DM_DEVICE float to_float(Half x) {
  float f;
  asm("{ .reg .b16 h; mov.b16 h, %1; cvt.f32.f16 %0, h; }" : "=f"(f) : "h"(x.bits));
  return f;
}
DM_DEVICE float to_float(BFloat16 x) { return __uint_as_float(uint32_t(x.bits) << 16); }
DM_DEVICE float to_float(float x) { return x; }

template <typename T> DM_DEVICE T from_float(float f);
template <> DM_DEVICE Half from_float<Half>(float f) {
  Half h;
  asm("{ .reg .b16 t; cvt.rn.f16.f32 t, %1; mov.b16 %0, t; }" : "=h"(h.bits) : "f"(f));
  return h;
}
template <> DM_DEVICE BFloat16 from_float<BFloat16>(float f) {
  BFloat16 h;
  asm("{ .reg .b16 t; cvt.rn.bf16.f32 t, %1; mov.b16 %0, t; }" : "=h"(h.bits) : "f"(f));
  return h;
}

// Two floats packed into one 32-bit register of two 16-bit values (lo = a, hi = b).
template <typename T> DM_DEVICE uint32_t pack2(float a, float b);
template <> DM_DEVICE uint32_t pack2<Half>(float a, float b) {
  uint32_t r;
  asm("cvt.rn.f16x2.f32 %0, %2, %1;" : "=r"(r) : "f"(a), "f"(b));
  return r;
}
template <> DM_DEVICE uint32_t pack2<BFloat16>(float a, float b) {
  uint32_t r;
  asm("cvt.rn.bf16x2.f32 %0, %2, %1;" : "=r"(r) : "f"(a), "f"(b));
  return r;
}

DM_DEVICE float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// max that returns NaN when either input is NaN (fmaxf drops a NaN).
DM_DEVICE float fmax_nan(float a, float b) {
  float y;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(y) : "f"(a), "f"(b));
  return y;
}

DM_DEVICE float fast_tanh(float x) {
  float y;
  asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Bytes of dynamic shared memory this launch has (kernels __trap() when their layout needs
// more: the launcher and the kernel disagree).
DM_DEVICE uint32_t dynamic_smem_size() {
  uint32_t r;
  asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(r));
  return r;
}

template <typename A, typename B> struct IsSame { static constexpr bool value = false; };
template <typename A> struct IsSame<A, A> { static constexpr bool value = true; };

template <typename T> DM_DEVICE T dm_min(T a, T b) { return a < b ? a : b; }
template <typename T> DM_DEVICE T dm_max(T a, T b) { return a > b ? a : b; }

}  // namespace dm
