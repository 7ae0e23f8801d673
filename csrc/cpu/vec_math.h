// Scalar and branch-free float helpers of the CPU cross-entropy path: exp_approx, the scalar form
// of the block kernels' exp (vec.inc), and the bfloat16 <-> float row conversions, written so GCC
// auto-vectorises them and compiled for several ISAs with target_clones (the process picks AVX-512,
// AVX2+FMA or the baseline at load time). They take raw pointers and call nothing from ATen, so no
// inline ATen code is compiled for a wider ISA than the machine running it.
#pragma once
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define MEMCORE_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MEMCORE_CLONES
#endif
// helpers called from cloned functions: inlined, so each clone compiles them at its own width
#if defined(__GNUC__)
#define MEMCORE_INLINE static inline __attribute__((always_inline))
#else
#define MEMCORE_INLINE static inline
#endif

namespace memcore {
namespace cpu {

// exp(x) to ~2 ulp for x in [-87, 88] (Cephes expf polynomial); inputs below -87 give
// exp(-87) ~ 1.6e-38 instead of 0, negligible in every sum and gradient here. NaN propagates.
MEMCORE_INLINE float exp_approx(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float kRound = 12582912.0f;  // 1.5 * 2^23: adding and subtracting rounds to an integer
  float k = (x * 1.44269504088896341f + kRound) - kRound;
  float r = x - k * 0.693359375f;
  r = r - k * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// bfloat16 bits <-> float, bit for bit c10::BFloat16's conversions (widening is a shift; narrowing
// rounds to nearest even, NaN -> 0x7FC0), branch-free so each clone vectorises them: the scalar
// c10 conversions dominated the bf16 rows' time.
MEMCORE_CLONES inline void bf16_to_f32(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = static_cast<uint32_t>(src[i]) << 16;
    std::memcpy(dst + i, &u, sizeof(u));
  }
}

MEMCORE_CLONES inline void f32_to_bf16(const float* src, uint16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, src + i, sizeof(u));
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    dst[i] = (u & 0x7FFFFFFFu) > 0x7F800000u ? uint16_t(0x7FC0) : static_cast<uint16_t>(rounded);
  }
}

}  // namespace cpu
}  // namespace memcore
