// Branch-free float kernels for the CPU cross-entropy path, written so GCC auto-vectorises them
// and compiled for several ISAs with target_clones: the process picks AVX-512, AVX2+FMA or the
// baseline at load time, so one build runs on any x86-64 machine at its best width. They take raw
// float pointers and call nothing from ATen, so no inline ATen code is compiled for a wider ISA
// than the machine running it.
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

constexpr int kLanes = 16;  // independent accumulators: lets the compiler vectorise the sums
static_assert(kLanes == 16, "hmax16 / hsum16 reduce 16 lanes");

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

// Horizontal max / sum of kLanes floats. Written on GCC vector types so the lanes stay in
// registers: the array-loop form spilled the accumulator and reloaded its halves narrower than
// it was stored, a store-forwarding stall per step that cost more than a short row's whole sweep.
#if defined(__GNUC__)
typedef float v16f __attribute__((vector_size(64), aligned(4)));
typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));

MEMCORE_INLINE float hmax16(const float* a) {  // NaN lanes are skipped, as in max_f32
  v16f v;
  std::memcpy(&v, a, sizeof(v));
  const v8f lo = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
  const v8f hi = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const v8f m8 = hi > lo ? hi : lo;
  const v4f l4 = __builtin_shufflevector(m8, m8, 0, 1, 2, 3), h4 = __builtin_shufflevector(m8, m8, 4, 5, 6, 7);
  const v4f m4 = h4 > l4 ? h4 : l4;
  const float a0 = m4[2] > m4[0] ? m4[2] : m4[0], a1 = m4[3] > m4[1] ? m4[3] : m4[1];
  return a1 > a0 ? a1 : a0;
}

MEMCORE_INLINE float hsum16(const float* a) {
  v16f v;
  std::memcpy(&v, a, sizeof(v));
  const v8f s8 = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                 __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const v4f s4 = __builtin_shufflevector(s8, s8, 0, 1, 2, 3) + __builtin_shufflevector(s8, s8, 4, 5, 6, 7);
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}
#else
MEMCORE_INLINE float hmax16(const float* a) {
  float m = a[0];
  for (int k = 1; k < 16; ++k) m = a[k] > m ? a[k] : m;
  return m;
}

MEMCORE_INLINE float hsum16(const float* a) {
  float s = 0.f;
  for (int k = 0; k < 16; ++k) s += a[k];
  return s;
}
#endif

// log(x) to ~1 ulp for normal finite x > 0 (Cephes logf polynomial; here x is a sum of exps, so
// >= 1); NaN and +inf give NaN. Branch-free, so loops over rows vectorise (glibc's logf does not).
MEMCORE_INLINE float log_approx(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  const int32_t e = ((bits >> 23) & 0xff) - 126;  // x = m * 2^e with m in [0.5, 1)
  bits = (bits & 0x007fffff) | 0x3f000000;
  float m;
  std::memcpy(&m, &bits, sizeof(m));
  const bool low = m < 0.707106781186547524f;  // then use 2m - 1 and e - 1: |m - 1| < 0.29
  const float fe = static_cast<float>(e) - (low ? 1.f : 0.f);
  m = (low ? m + m : m) - 1.f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y += -2.12194440e-4f * fe;
  y += -0.5f * z;
  const float r = (m + y) + 0.693359375f * fe;
  return r + (x - x);  // 0 for finite x; NaN for NaN or inf
}

// max over x[0, n); -inf for n == 0. NaN entries are skipped (the exp sum catches them).
MEMCORE_CLONES inline float max_f32(const float* x, int64_t n) {
  float acc[kLanes];
  for (int k = 0; k < kLanes; ++k) acc[k] = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int k = 0; k < kLanes; ++k) acc[k] = x[i + k] > acc[k] ? x[i + k] : acc[k];
  if (i < n) {  // tail as one padded block, so short rows (C = 10) are vectorised too
    for (int k = 0; k < kLanes; ++k) {
      const float v = i + k < n ? x[i + k] : -std::numeric_limits<float>::infinity();
      acc[k] = v > acc[k] ? v : acc[k];
    }
  }
  return hmax16(acc);
}

// sum over x[0, n) of exp(x - shift)
MEMCORE_CLONES inline float sum_exp_f32(const float* x, int64_t n, float shift) {
  float acc[kLanes] = {0.f};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int k = 0; k < kLanes; ++k) acc[k] += exp_approx(x[i + k] - shift);
  if (i < n) {
    for (int k = 0; k < kLanes; ++k) {
      const float e = exp_approx((i + k < n ? x[i + k] : shift) - shift);
      acc[k] += i + k < n ? e : 0.f;
    }
  }
  return hsum16(acc);
}

// out[j] = exp(x[j] - lse) * g  (softmax times the row's upstream gradient)
MEMCORE_CLONES inline void softmax_scale_f32(const float* x, int64_t n, float lse, float g, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = exp_approx(x[i] - lse) * g;
}

// sum over x[0, n) of x^2
MEMCORE_CLONES inline float sumsq_f32(const float* x, int64_t n) {
  float acc[kLanes] = {0.f};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int k = 0; k < kLanes; ++k) acc[k] += x[i + k] * x[i + k];
  float s = 0.f;
  for (; i < n; ++i) s += x[i] * x[i];
  for (int k = 0; k < kLanes; ++k) s += acc[k];
  return s;
}

}  // namespace cpu
}  // namespace memcore
