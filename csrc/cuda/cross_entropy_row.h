// The per-row logic of the CUDA cross-entropy kernels (csrc/cuda/cross_entropy.cu) as __host__
// __device__ functions, so the host replays (csrc/cross_entropy_replay.cpp) run the same code. A row
// of C logits is owned by TPR threads, each walking a scalar head, 16-byte packs (kUnroll in flight)
// and a scalar tail while keeping an online (max, sum exp) pair and the largest logit before and
// after the target; partial states merge in a fixed butterfly order. Registers only: no memory but
// the row's reads, its gradient's writes and, on the split path, a 4-word part per slice (and for
// fp32 gradients a 1-word sum per slice). Few wide
// rows are split over blocks by column slices (split_slices, walk_slice, grad_slice). The
// arithmetic, NaN handling and merge order: docs/kernels.md.
#pragma once
#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "../common.h"

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define MEMCORE_HD __host__ __device__ __forceinline__
#define MEMCORE_UNROLL _Pragma("unroll")
#else
#define MEMCORE_HD inline
#define MEMCORE_UNROLL
#endif

namespace memcore {
namespace cerow {

// accumulation type: ATen's (float for half / bfloat16 / float, double for double)
template <typename T>
struct OpMath { using type = at::opmath_type<T>; };

// Elements per 16-byte pack, and packs loaded per trip of the main loops (in flight at once).
template <typename scalar_t>
constexpr int kVec = 16 / static_cast<int>(sizeof(scalar_t));
template <typename scalar_t>
constexpr int kUnroll = sizeof(scalar_t) == 8 ? 2 : 4;

template <typename T>
MEMCORE_HD T neg_inf() { return -std::numeric_limits<T>::infinity(); }

MEMCORE_HD float fmax_(float a, float b) { return fmaxf(a, b); }
MEMCORE_HD double fmax_(double a, double b) { return fmax(a, b); }

#ifndef __CUDA_ARCH__
// The host replays' ex2.approx.ftz.f32: 2^x within the instruction's documented 2 ulp, subnormal
// results flushed to zero (csrc/cross_entropy_replay.cpp, which says how and why).
float host_ex2(float x);
// and rcp.approx.ftz.f32: 1 / x within the instruction's documented 1 ulp
float host_rcp(float x);
#endif

// exp in the kernels' units: expo(x * kScale) == exp(x). float: base 2, double: base e.
MEMCORE_HD float expo(float x) {
#ifdef __CUDA_ARCH__
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return host_ex2(x);
#endif
}
MEMCORE_HD double expo(double x) { return exp(x); }
template <typename acc_t>
constexpr acc_t kScale = acc_t(1.4426950408889634);  // log2(e)
template <>
constexpr double kScale<double> = 1.0;

MEMCORE_HD float log_(float x) { return logf(x); }
MEMCORE_HD double log_(double x) { return log(x); }

MEMCORE_HD float fma_(float a, float b, float c) { return fmaf(a, b, c); }
MEMCORE_HD double fma_(double a, double b, double c) { return fma(a, b, c); }

// How a term exp(x - r) is formed (docs/kernels.md, "Accuracy"). 16-bit logits: one FFMA,
// ex2(x * log2e + shift) with shift = -r * log2e rounded to fp32, which adds up to |r| * 2^-24 to
// every exponent, below the logits' own rounding (2^-9 relative for bf16, 2^-12 for fp16). fp32
// and fp64 (kExactDiff): the exact difference first, ex2((x - r) * log2e) (fp64: exp(x - r)), whose
// rounding is relative to |x - r|, as on the CPU.
template <typename scalar_t>
constexpr bool kExactDiff = sizeof(scalar_t) != 2;

// The reference point of the terms for a finite r (a running max, or lse): r itself for the exact
// difference, the shift -r * log2e for the FFMA.
template <typename acc_t, bool E>
MEMCORE_HD acc_t ref_of(acc_t r) {
  if constexpr (E) return r;
  else return -r * kScale<acc_t>;
}

// exp(x - r) from ref = ref_of(r)
template <typename acc_t, bool E>
MEMCORE_HD acc_t term(acc_t x, acc_t ref) {
  if constexpr (E) return expo((x - ref) * kScale<acc_t>);
  else return expo(fma_(x, kScale<acc_t>, ref));
}

// fp32 logits: where the other columns' p_j sum below 1/2 (p_t > 1/2), the target's gradient
// p_t - 1 is taken as minus that sum, not from exp(z_t - lse) - 1. lse is stored in fp32, rounded
// by up to ulp(lse) / 2, which shifts every p_j by that much relative: harmless where p_j is the
// gradient, but p_t - 1 of a confident row (p_t near 1) would keep it as an absolute error, up to
// 1.9e-6 for |lse| in [32, 64); the others' sum carries it relative to p_t - 1 instead. Where p_t
// is small the sum (near 1) would carry it absolutely and exp(z_t - lse) - 1 does not: that form
// stays there, as on the CPU. fp64 (error 2^-53 |lse|) and 16-bit logits (gradient rounded to 2^-9
// or 2^-12) always take exp(z_t - lse) - 1.
template <typename scalar_t>
constexpr bool kTargetBySum = std::is_same_v<scalar_t, float>;

// a product the compiler may not fuse into a following add (merge() must stay commutative)
MEMCORE_HD float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
MEMCORE_HD double mul_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

// ---- 16-byte packs as four 32-bit words, widened to / narrowed from the accumulation type

struct alignas(16) Words {
  uint32_t w[4];
};

MEMCORE_HD Words load16(const void* p) {
#ifdef __CUDA_ARCH__
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  return Words{{u.x, u.y, u.z, u.w}};
#else
  Words r;
  std::memcpy(&r, p, 16);
  return r;
#endif
}

MEMCORE_HD void store16(void* p, const Words& r) {
#ifdef __CUDA_ARCH__
  *reinterpret_cast<uint4*>(p) = make_uint4(r.w[0], r.w[1], r.w[2], r.w[3]);
#else
  std::memcpy(p, &r, 16);
#endif
}

MEMCORE_HD float as_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

MEMCORE_HD uint32_t as_uint(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

MEMCORE_HD float half_bits_to_float(uint32_t h) {
#ifdef __CUDA_ARCH__
  return __half2float(__ushort_as_half(static_cast<unsigned short>(h)));
#else
  return c10::detail::fp16_ieee_to_fp32_value(static_cast<uint16_t>(h));
#endif
}

// x[k] = element k of the pack, as acc_t (bf16: a shift or a mask per element)
template <typename scalar_t>
MEMCORE_HD void widen(const Words& r, typename OpMath<scalar_t>::type* x) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
MEMCORE_UNROLL
    for (int i = 0; i < 4; ++i) {
      x[2 * i] = as_float(r.w[i] << 16);
      x[2 * i + 1] = as_float(r.w[i] & 0xFFFF0000u);
    }
  } else if constexpr (std::is_same_v<scalar_t, c10::Half>) {
MEMCORE_UNROLL
    for (int i = 0; i < 4; ++i) {
      x[2 * i] = half_bits_to_float(r.w[i] & 0xFFFFu);
      x[2 * i + 1] = half_bits_to_float(r.w[i] >> 16);
    }
  } else if constexpr (std::is_same_v<scalar_t, float>) {
MEMCORE_UNROLL
    for (int i = 0; i < 4; ++i) x[i] = as_float(r.w[i]);
  } else {
    static_assert(std::is_same_v<scalar_t, double>, "unsupported logits dtype");
MEMCORE_UNROLL
    for (int i = 0; i < 2; ++i) {
      uint64_t u = (static_cast<uint64_t>(r.w[2 * i + 1]) << 32) | r.w[2 * i];
      double d;
      std::memcpy(&d, &u, 8);
      x[i] = d;
    }
  }
}

// the pack of y[0..kVec) rounded to scalar_t (round to nearest even, as the CPU's narrowing)
template <typename scalar_t>
MEMCORE_HD Words narrow(const typename OpMath<scalar_t>::type* y) {
  Words r;
  if constexpr (std::is_same_v<scalar_t, float>) {
MEMCORE_UNROLL
    for (int i = 0; i < 4; ++i) r.w[i] = as_uint(y[i]);
  } else if constexpr (std::is_same_v<scalar_t, double>) {
    std::memcpy(&r, y, 16);
  } else {
MEMCORE_UNROLL
    for (int i = 0; i < 4; ++i) {
#ifdef __CUDA_ARCH__
      if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
        const __nv_bfloat162 h = __floats2bfloat162_rn(y[2 * i], y[2 * i + 1]);
        std::memcpy(&r.w[i], &h, 4);
      } else {
        const __half2 h = __floats2half2_rn(y[2 * i], y[2 * i + 1]);
        std::memcpy(&r.w[i], &h, 4);
      }
#else
      const scalar_t lo(y[2 * i]), hi(y[2 * i + 1]);
      r.w[i] = static_cast<uint32_t>(lo.x) | (static_cast<uint32_t>(hi.x) << 16);
#endif
    }
  }
  return r;
}

// ---- per-thread state of one row

template <typename acc_t>
struct Part {
  acc_t m;       // running max over the thread's columns (never NaN: maxima skip NaN)
  acc_t ref;     // ref_of(m), or 0 while m = -inf (then every term is exp(-inf) = 0)
  acc_t s;       // sum of exp(z - m); NaN once a NaN logit was seen
  acc_t before;  // max over the thread's columns left of the target
  acc_t after;   // max over the thread's columns right of the target
};

template <typename acc_t>
MEMCORE_HD Part<acc_t> part_init() {
  return Part<acc_t>{neg_inf<acc_t>(), acc_t(0), acc_t(0), neg_inf<acc_t>(), neg_inf<acc_t>()};
}

// Raises the running max to bmax (the max of the values about to be added) when it is larger.
// The factor exp(m - bmax) is 0 when m = -inf, so s (0, or NaN) keeps its NaN.
// E: kExactDiff of the logits (term()).
template <typename acc_t, bool E>
MEMCORE_HD void raise_max(Part<acc_t>& p, acc_t bmax) {
  if (bmax > p.m) {
    p.s *= expo((p.m - bmax) * kScale<acc_t>);
    p.m = bmax;
    p.ref = ref_of<acc_t, E>(bmax);
  }
}

// One value of known column col (head, tail, target pack).
template <typename acc_t, bool E>
MEMCORE_HD void add_one(Part<acc_t>& p, acc_t x, int64_t col, int64_t t) {
  raise_max<acc_t, E>(p, x);
  p.s += term<acc_t, E>(x, p.ref);
  if (col < t) p.before = fmax_(p.before, x);
  if (col > t) p.after = fmax_(p.after, x);
}

// n packs' values x, all left (side = before) or right (after) of the target: one max test.
template <typename acc_t, int N, bool E>
MEMCORE_HD void add_group(Part<acc_t>& p, const acc_t (&x)[N], acc_t& side) {
  acc_t bmax = x[0];
MEMCORE_UNROLL
  for (int k = 1; k < N; ++k) bmax = fmax_(bmax, x[k]);
  raise_max<acc_t, E>(p, bmax);
  side = fmax_(side, bmax);
  acc_t sum = acc_t(0);
MEMCORE_UNROLL
  for (int k = 0; k < N; ++k) sum += term<acc_t, E>(x[k], p.ref);
  p.s += sum;
}

// Merge of two partial states: merge(self, other) in the kernels' butterfly. A factor of exactly 1
// for the side holding the max (also both -inf), so 0 * NaN never drops a NaN.
template <typename acc_t, bool E>
MEMCORE_HD Part<acc_t> merge(const Part<acc_t>& a, const Part<acc_t>& b) {
  const acc_t M = a.m > b.m ? a.m : b.m;
  const acc_t fa = a.m == M ? acc_t(1) : expo((a.m - M) * kScale<acc_t>);
  const acc_t fb = b.m == M ? acc_t(1) : expo((b.m - M) * kScale<acc_t>);
  Part<acc_t> r;
  r.m = M;
  r.ref = M == neg_inf<acc_t>() ? acc_t(0) : ref_of<acc_t, E>(M);
  r.s = mul_rn(a.s, fa) + mul_rn(b.s, fb);  // merge(a, b) == merge(b, a) bit for bit
  r.before = fmax_(a.before, b.before);
  r.after = fmax_(a.after, b.after);
  return r;
}

// ---- the row's layout: scalar head, packs, scalar tail; where the target lies

struct Layout {
  int64_t head;  // scalar elements before the first 16-byte boundary (<= C)
  int64_t nv;    // whole packs after the head
  int64_t tail0; // first column of the scalar tail: head + nv * VEC
  int64_t tp;    // pack holding the target, or -1 (target in the head) / nv (in the tail)
};

template <int VEC>
MEMCORE_HD Layout layout(uintptr_t addr, int elem_size, int64_t C, int64_t t) {
  Layout L;
  if (VEC == 1) {
    L.head = 0;
    L.nv = 0;
  } else {
    const int64_t mis = static_cast<int64_t>((addr / elem_size) % VEC);
    const int64_t head = mis == 0 ? 0 : VEC - mis;
    L.head = head < C ? head : C;
    L.nv = (C - L.head) / VEC;
  }
  L.tail0 = L.head + L.nv * VEC;
  L.tp = t < L.head ? -1 : (t >= L.tail0 ? L.nv : (t - L.head) / VEC);
  return L;
}

// The lane of TPR that owns column col in the walk (head, packs and tail alike).
template <int TPR, int VEC>
MEMCORE_HD int owner(const Layout& L, int64_t col) {
  if (col < L.head) return static_cast<int>(col);
  if (col < L.tail0) return static_cast<int>(((col - L.head) / VEC) % TPR);
  return static_cast<int>((col - L.tail0) % TPR);
}

// Packs v = first, first + TPR, ... below end, kUnroll at a time, into p (side: before / after).
// Returns the lane's first pack index >= end.
template <typename scalar_t, int TPR>
MEMCORE_HD int64_t walk_packs(Part<typename OpMath<scalar_t>::type>& p, const scalar_t* body, int64_t first,
                              int64_t end, typename OpMath<scalar_t>::type& side) {
  using acc_t = typename OpMath<scalar_t>::type;
  constexpr int V = kVec<scalar_t>, U = kUnroll<scalar_t>;
  int64_t v = first;
  for (; v + (U - 1) * TPR < end; v += U * TPR) {
    Words r[U];
MEMCORE_UNROLL
    for (int u = 0; u < U; ++u) r[u] = load16(body + (v + u * TPR) * V);
    acc_t x[U * V];
MEMCORE_UNROLL
    for (int u = 0; u < U; ++u) widen<scalar_t>(r[u], x + u * V);
    add_group<acc_t, U * V, kExactDiff<scalar_t>>(p, x, side);
  }
  for (; v < end; v += TPR) {
    acc_t x[V];
    widen<scalar_t>(load16(body + v * V), x);
    add_group<acc_t, V, kExactDiff<scalar_t>>(p, x, side);
  }
  return v;
}

// One thread's partial state of the row z[0, C) with target t (0 <= t < C).
template <typename scalar_t, int TPR, int VEC>
MEMCORE_HD Part<typename OpMath<scalar_t>::type> walk_row(const scalar_t* z, int64_t C, int64_t t, int lane) {
  using acc_t = typename OpMath<scalar_t>::type;
  constexpr bool E = kExactDiff<scalar_t>;
  Part<acc_t> p = part_init<acc_t>();
  const Layout L = layout<VEC>(reinterpret_cast<uintptr_t>(z), sizeof(scalar_t), C, t);
  if constexpr (VEC > 1) {
    static_assert(VEC == kVec<scalar_t>, "packs are 16 bytes");
    if (lane < L.head) add_one<acc_t, E>(p, static_cast<acc_t>(z[lane]), lane, t);
    const scalar_t* body = z + L.head;
    int64_t v = walk_packs<scalar_t, TPR>(p, body, lane, L.tp < 0 ? 0 : L.tp, p.before);
    if (v == L.tp && L.tp < L.nv) {  // the target's pack: element by element
      acc_t x[VEC];
      widen<scalar_t>(load16(body + v * VEC), x);
MEMCORE_UNROLL
      for (int k = 0; k < VEC; ++k) add_one<acc_t, E>(p, x[k], L.head + v * VEC + k, t);
      v += TPR;
    }
    walk_packs<scalar_t, TPR>(p, body, v, L.nv, p.after);
  }
  for (int64_t j = L.tail0 + lane; j < C; j += TPR) add_one<acc_t, E>(p, static_cast<acc_t>(z[j]), j, t);
  return p;
}

// Per-row results from the merged state and the target logit.
template <typename acc_t>
struct RowOut {
  acc_t lse, loss, prob, margin, correct;
};

template <typename acc_t>
MEMCORE_HD RowOut<acc_t> finish(const Part<acc_t>& p, acc_t zt) {
  RowOut<acc_t> o;
  if (p.m == neg_inf<acc_t>()) {  // no finite max (all -inf): NaN, as on the CPU
    o.lse = o.loss = std::numeric_limits<acc_t>::quiet_NaN();
  } else {  // NaN logits made s NaN already
    const acc_t ls = log_(p.s);
    o.lse = p.m + ls;
    // not lse - zt: lse is rounded at its own magnitude, which a small loss of a large logit
    // (|lse| >= 32, loss < 0.1) would keep as its error; m - zt is exact near the max
    o.loss = (p.m - zt) + ls;
  }
  o.prob = expo(-o.loss * kScale<acc_t>);
  o.margin = zt - fmax_(p.before, p.after);
  // argmax is the first maximal index: the target wins ties only against later columns
  o.correct = (zt > p.before && zt >= p.after) ? acc_t(1) : acc_t(0);
  return o;
}

// ---- the gradient pass: out[j] = (exp(z[j] - lse) - onehot(j == t)) * g
//
// grad_row (grad_slice) writes exp(z[j] - lse) * g over the lane's share of the row, column t
// included, and returns the sum of exp(z[j] - lse) over the share's other columns (kTargetBySum;
// 0 otherwise). The owner of column t (owner(), slice_owner()) then rewrites out[t] with
// target_grad(), after its own store (program order): from the row's total of those sums, or from
// the target logit read before the pass (out may be z).

// Packs v = first, first + TPR, ... below end (kUnroll loads in flight); their terms added to sum
// when SUM. Returns the lane's first pack index >= end.
template <typename scalar_t, int TPR, bool SUM>
MEMCORE_HD int64_t grad_packs(const scalar_t* zb, scalar_t* ob, int64_t first, int64_t end,
                              typename OpMath<scalar_t>::type ref, typename OpMath<scalar_t>::type g,
                              typename OpMath<scalar_t>::type& sum) {
  using acc_t = typename OpMath<scalar_t>::type;
  constexpr int V = kVec<scalar_t>, U = kUnroll<scalar_t>;
  auto pack = [&](const Words& r, int64_t v) {
    acc_t x[V];
    widen<scalar_t>(r, x);
MEMCORE_UNROLL
    for (int k = 0; k < V; ++k) {
      const acc_t e = term<acc_t, kExactDiff<scalar_t>>(x[k], ref);
      if constexpr (SUM) sum += e;
      x[k] = e * g;
    }
    store16(ob + v * V, narrow<scalar_t>(x));
  };
  int64_t v = first;
  for (; v + (U - 1) * TPR < end; v += U * TPR) {
    Words r[U];
MEMCORE_UNROLL
    for (int u = 0; u < U; ++u) r[u] = load16(zb + (v + u * TPR) * V);
MEMCORE_UNROLL
    for (int u = 0; u < U; ++u) pack(r[u], v + u * TPR);
  }
  for (; v < end; v += TPR) pack(load16(zb + v * V), v);
  return v;
}

// One thread's share of the gradient pass over the row z[0, C) into out (target t, L = its
// layout): the walk of walk_row, the packs split at the target's where its term is left out of the
// returned sum. z and out rows share their offset from a 16-byte boundary.
template <typename scalar_t, int TPR, int VEC>
MEMCORE_HD typename OpMath<scalar_t>::type grad_row(const scalar_t* z, scalar_t* out, int64_t C, int64_t t,
                                                    const Layout& L, typename OpMath<scalar_t>::type lse,
                                                    typename OpMath<scalar_t>::type g, int lane) {
  using acc_t = typename OpMath<scalar_t>::type;
  constexpr bool E = kExactDiff<scalar_t>, SUM = kTargetBySum<scalar_t>;
  const acc_t ref = ref_of<acc_t, E>(lse);
  acc_t sum = acc_t(0);
  auto one = [&](int64_t j) {
    const acc_t e = term<acc_t, E>(static_cast<acc_t>(z[j]), ref);
    if (SUM && j != t) sum += e;
    out[j] = static_cast<scalar_t>(e * g);
  };
  if constexpr (VEC > 1) {
    if (lane < L.head) one(lane);
    const scalar_t* zb = z + L.head;
    scalar_t* ob = out + L.head;
    int64_t v = lane;
    if constexpr (SUM) {
      v = grad_packs<scalar_t, TPR, SUM>(zb, ob, v, L.tp < 0 ? 0 : L.tp, ref, g, sum);
      if (v == L.tp && L.tp < L.nv) {  // the target's pack
        acc_t x[VEC];
        widen<scalar_t>(load16(zb + v * VEC), x);
MEMCORE_UNROLL
        for (int k = 0; k < VEC; ++k) {
          const acc_t e = term<acc_t, E>(x[k], ref);
          if (L.head + v * VEC + k != t) sum += e;
          x[k] = e * g;
        }
        store16(ob + v * VEC, narrow<scalar_t>(x));
        v += TPR;
      }
    }
    grad_packs<scalar_t, TPR, SUM>(zb, ob, v, L.nv, ref, g, sum);
  }
  for (int64_t j = L.tail0 + lane; j < C; j += TPR) one(j);
  return sum;
}

// out[t] = (p_t - 1) * g. kTargetBySum: minus others (the row's total of the pass's sums) times g
// where others < 1/2, else written - g, written = out[t] as the pass left it (p_t * g, the column's
// own term: read back, so no value stays live through the pass); otherwise from zt, the target
// logit, and lse.
template <typename scalar_t>
MEMCORE_HD typename OpMath<scalar_t>::type target_grad(typename OpMath<scalar_t>::type zt,
                                                       typename OpMath<scalar_t>::type lse,
                                                       typename OpMath<scalar_t>::type others,
                                                       typename OpMath<scalar_t>::type g, const scalar_t* written) {
  using acc_t = typename OpMath<scalar_t>::type;
  constexpr bool E = kExactDiff<scalar_t>;
  if constexpr (kTargetBySum<scalar_t>) return others < acc_t(0.5) ? -others * g : static_cast<acc_t>(*written) - g;
  else return (term<acc_t, E>(zt, ref_of<acc_t, E>(lse)) - acc_t(1)) * g;
}

// ---- the split path: few rows of many classes, one row over S blocks
//
// One block per row leaves SMs idle when rows are fewer than SMs (16-64 rows of 128k-256k classes
// use at most 64 of an H100's 132). The split launch cuts each row of the aligned (VEC > 1) launch
// into S slices of whole 16-byte packs: slice k holds the packs [split_pack(nv, S, k),
// split_pack(nv, S, k + 1)) of the row's aligned body, slice 0 also the scalar head and slice S - 1
// the scalar tail, so every pack stays 16-byte aligned. A block of kSplitThreads walks a slice
// (walk_slice), merges it (row_merge) and stores the Part in the workspace (store_part); the finish
// kernel's warp loads part k into lane k (load_part, part_init beyond S) and merges them with its
// butterfly, so the cross-slice merge order is the warp butterfly's, replayed by the host. The
// gradient goes slice by slice as well (grad_slice, slice_owner for the onehot).

// Slices of a row: at most one per lane of the finish kernel's warp.
constexpr int kSplitMaxSlices = 32;
// Threads of a split block: the 256-thread launch of the middle classes, one whole unrolled trip of
// which (256 x 4 packs x 16 B) is the smallest slice below.
constexpr int kSplitThreads = 256;
// Smallest slice: 16 KiB (8192 bf16, 4096 fp32 logits), four 16-byte loads in flight per thread,
// so the extra blocks still stream; narrower slices would be mostly merge and launch.
constexpr int64_t kSplitMinSliceBytes = 16384;
// Blocks aimed at per SM: all resident in one wave (four 256-thread blocks fit an SM).
constexpr int kSplitBlocksPerSm = 2;
// acc_t words of one part in the workspace: m, s, before, after (ref follows from m)
constexpr int kPartWords = 4;

// Slices per row for N rows of C logits of elem_size bytes on a device of sms SMs; 1: keep the
// block-per-row launch. Split only while the N row-blocks leave SMs idle (N < sms), into about
// kSplitBlocksPerSm * sms blocks in all, no slice under kSplitMinSliceBytes, at most
// kSplitMaxSlices. Examples for 132 SMs: 16 x 256000 bf16 -> 17 slices of 30 KB (272 blocks),
// 4 x 131072 fp32 -> 32 slices of 16 KiB, 64 x 131072 bf16 -> 5, 132 rows -> 1.
MEMCORE_HD int split_slices(int64_t N, int64_t C, int64_t elem_size, int64_t sms) {
  if (N <= 0 || N >= sms) return 1;
  int64_t s = (kSplitBlocksPerSm * sms + N - 1) / N;
  const int64_t by_size = C * elem_size / kSplitMinSliceBytes;
  if (s > by_size) s = by_size;
  if (s > kSplitMaxSlices) s = kSplitMaxSlices;
  return s < 2 ? 1 : static_cast<int>(s);
}

// First pack of slice k of a body of nv packs in S slices (k = S: nv). Balanced: sizes differ by
// at most one pack.
MEMCORE_HD int64_t split_pack(int64_t nv, int S, int k) { return nv * k / S; }

struct Slice {
  int64_t p0, p1;  // packs [p0, p1) of the row's aligned body
  bool first;      // slice 0: also the scalar head
  bool last;       // slice S - 1: also the scalar tail
};

MEMCORE_HD Slice slice_of(const Layout& L, int S, int k) {
  return Slice{split_pack(L.nv, S, k), split_pack(L.nv, S, k + 1), k == 0, k == S - 1};
}

// Columns [begin, end) of the slice in the row.
template <int VEC>
MEMCORE_HD int64_t slice_begin(const Layout& L, const Slice& sl) { return sl.first ? 0 : L.head + sl.p0 * VEC; }
template <int VEC>
MEMCORE_HD int64_t slice_end(const Layout& L, const Slice& sl, int64_t C) {
  return sl.last ? C : L.head + sl.p1 * VEC;
}

// One thread's partial state of slice sl of the row z[0, C) with target t (0 <= t < C); L: the
// row's layout<kVec>. The packs go through walk_row as a row of their own, starting 16-byte aligned
// (no head, no tail), with the target column taken relative to it: a target left of the slice
// (t - c0 < 0) gives layout's tp = -1, every pack feeding `after`; right of it (>= the slice's
// width) tp = nv, every pack feeding `before`.
template <typename scalar_t, int TPR>
MEMCORE_HD Part<typename OpMath<scalar_t>::type> walk_slice(const scalar_t* z, int64_t C, int64_t t,
                                                           const Layout& L, const Slice& sl, int lane) {
  using acc_t = typename OpMath<scalar_t>::type;
  constexpr int V = kVec<scalar_t>;
  Part<acc_t> p = part_init<acc_t>();
  if (sl.first && lane < L.head) add_one<acc_t, kExactDiff<scalar_t>>(p, static_cast<acc_t>(z[lane]), lane, t);
  if (sl.last)
    for (int64_t j = L.tail0 + lane; j < C; j += TPR)
      add_one<acc_t, kExactDiff<scalar_t>>(p, static_cast<acc_t>(z[j]), j, t);
  const int64_t c0 = L.head + sl.p0 * V;
  // merge with p exact when p is empty (factor 1 on the packs' side, 0 * 0 on p's)
  return merge<acc_t, kExactDiff<scalar_t>>(p, walk_row<scalar_t, TPR, V>(z + c0, (sl.p1 - sl.p0) * V, t - c0, lane));
}

// The gradient pass over slice sl only (grad_row's values and returned sum, t the row's target).
template <typename scalar_t, int TPR>
MEMCORE_HD typename OpMath<scalar_t>::type grad_slice(const scalar_t* z, scalar_t* out, int64_t C, int64_t t,
                                                      const Layout& L, const Slice& sl,
                                                      typename OpMath<scalar_t>::type lse,
                                                      typename OpMath<scalar_t>::type g, int lane) {
  using acc_t = typename OpMath<scalar_t>::type;
  constexpr int V = kVec<scalar_t>;
  constexpr bool E = kExactDiff<scalar_t>, SUM = kTargetBySum<scalar_t>;
  const acc_t ref = ref_of<acc_t, E>(lse);
  acc_t sum = acc_t(0);
  auto one = [&](int64_t j) {
    const acc_t e = term<acc_t, E>(static_cast<acc_t>(z[j]), ref);
    if (SUM && j != t) sum += e;
    out[j] = static_cast<scalar_t>(e * g);
  };
  if (sl.first && lane < L.head) one(lane);
  if (sl.last)
    for (int64_t j = L.tail0 + lane; j < C; j += TPR) one(j);
  // the slice's packs as a row of their own: 16-byte aligned (no head, no tail), the target column
  // relative to it (left of the slice: tp = -1, right of it: tp = nv; neither splits the packs)
  const int64_t c0 = L.head + sl.p0 * V, nv = sl.p1 - sl.p0;
  const Layout Ls = layout<V>(reinterpret_cast<uintptr_t>(z + c0), sizeof(scalar_t), nv * V, t - c0);
  const acc_t packs = grad_row<scalar_t, TPR, V>(z + c0, out + c0, nv * V, t - c0, Ls, lse, g, lane);
  return sum + packs;
}

// The lane of slice sl's block that writes column t in grad_slice, or -1 when t is not in sl.
template <int TPR, int VEC>
MEMCORE_HD int slice_owner(const Layout& L, const Slice& sl, int64_t t) {
  if (t < L.head) return sl.first ? static_cast<int>(t) : -1;
  if (t >= L.tail0) return sl.last ? static_cast<int>((t - L.tail0) % TPR) : -1;
  const int64_t v = (t - L.head) / VEC;
  if (v < sl.p0 || v >= sl.p1) return -1;
  return static_cast<int>((v - sl.p0) % TPR);
}

// A row's parts in the workspace: S x kPartWords acc_t.
template <typename acc_t>
MEMCORE_HD void store_part(acc_t* w, const Part<acc_t>& p) {
  w[0] = p.m;
  w[1] = p.s;
  w[2] = p.before;
  w[3] = p.after;
}

// The finish kernel's lane `lane`: part `lane` of the row's S, or the empty part beyond S.
template <typename acc_t>
MEMCORE_HD Part<acc_t> load_part(const acc_t* row_parts, int S, int lane) {
  Part<acc_t> p = part_init<acc_t>();
  if (lane < S) {
    const acc_t* w = row_parts + lane * kPartWords;
    p.m = w[0];
    p.s = w[1];
    p.before = w[2];
    p.after = w[3];
  }
  return p;  // ref unused: merge() recomputes it
}

// ---- a row's outputs and status bits (ce_forward's contract)

// Rows that are not read: ignored, or a target outside [0, C).
MEMCORE_HD bool row_skipped(int64_t t, int64_t C, int64_t ignore_index) {
  return t == ignore_index || t < 0 || t >= C;
}

// Status bits of a skipped row: a bad target unless the row is ignored.
MEMCORE_HD int skipped_flags(int64_t t, int64_t ignore_index) { return t != ignore_index ? kBadTarget : 0; }

// Status bits of a read row: its sample index and its loss.
template <typename acc_t>
MEMCORE_HD int row_flags(int64_t ix, int64_t num_samples, acc_t loss) {
  int flags = 0;
  if (ix < 0 || ix >= num_samples) flags |= kBadIndex;
#ifdef __CUDA_ARCH__
  if (!isfinite(loss)) flags |= kNonFinite;
#else
  if (!std::isfinite(loss)) flags |= kNonFinite;
#endif
  return flags;
}

// ---- ce_forward_reduce's reduction: the total of the N per-row losses and the count of rows
// whose target is not ignore_index, in one fixed order (bit-identical run to run; no atomics on
// the values). `threads` threads (ce_reduce_kernel's block, or the split finish kernel's last warp)
// each take the rows tid, tid + threads, ... in increasing order (consecutive threads read
// consecutive rows: coalesced), summing the float losses in double (reduce_thread); then a fixed
// tree, s[i] = reduce_add(s[i], s[i + stride]) for i < stride, stride = threads / 2, ..., 1
// (shared memory, then shfl_down over the last warp: the same pairs), leaves the total in thread 0.
// The order differs from ATen's loss.sum(kDouble) (the value may differ in the last bits of the
// double), not from run to run. Replayed by csrc/cross_entropy_replay.cpp's _ce_reduce_replay.

// Threads of ce_reduce_kernel (one block): N = 8192 rows is 8 coalesced loads per thread.
constexpr int kReduceThreads = 1024;

struct Total {
  double sum;
  int64_t count;
};

// Rows loaded per trip of reduce_thread before they are added (in row order): loads in flight.
constexpr int kReduceBatch = 8;

// Thread tid's share: rows tid, tid + threads, ... of loss (null: the count only) and targets, the
// losses added in row order. LossPtr: const acc_t*, or const volatile acc_t* where other blocks of
// the same grid wrote them (the split finish kernel's fold: L1 is not coherent across SMs, and a
// volatile load also stays after the __threadfence in program order).
template <typename LossPtr>
MEMCORE_HD Total reduce_thread(LossPtr loss, const int64_t* targets, int64_t n, int64_t ignore_index, int tid,
                               int threads) {
  Total r = {0.0, 0};
  for (int64_t i0 = tid; i0 < n; i0 += int64_t(threads) * kReduceBatch) {
    double v[kReduceBatch];
    MEMCORE_UNROLL
    for (int k = 0; k < kReduceBatch; ++k) {  // the loads first, all in flight
      const int64_t i = i0 + int64_t(k) * threads;
      v[k] = 0.0;
      if (i < n) {
        if (loss) v[k] = static_cast<double>(loss[i]);
        r.count += targets[i] != ignore_index;
      }
    }
    MEMCORE_UNROLL
    for (int k = 0; k < kReduceBatch; ++k)
      if (i0 + int64_t(k) * threads < n) r.sum += v[k];
  }
  return r;
}

MEMCORE_HD Total reduce_add(Total a, const Total& b) {
  a.sum += b.sum;
  a.count += b.count;
  return a;
}

// out of ce_forward_reduce before the cast to the loss dtype: mean of no rows is 0 / 0 = NaN, as
// the CPU op and F.cross_entropy give
MEMCORE_HD double reduce_value(const Total& t, bool mean) {
  return mean ? t.sum / static_cast<double>(t.count) : t.sum;
}

// ---- the options route (ce_forward_options / ce_backward_options): soft-capping, label smoothing
//
// Separate kernels on the same per-row pieces (Part, merge, term, layout), so the default route's
// code stays as it is. CAP (compile time): each value is capped as it is widened,
// z' = cap * tanh(z / cap); the smoothing sum sum_j u_j z'_j (u = weight, or 1 where weight is
// null) and the gradient's c u_j term are runtime choices (a null pointer, c == 0), uniform over a
// row. Kept per thread beside the Part: one more register (the sum), merged by row_sum.

// 1 / x by rcp.approx.ftz.f32 (an IEEE division would add a slow-path call, and with it a stack
// frame, to every kernel using it); fp64 divides
MEMCORE_HD float rcp_(float x) {
#ifdef __CUDA_ARCH__
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return host_rcp(x);
#endif
}
MEMCORE_HD double rcp_(double x) { return 1.0 / x; }

// The capping constant of a launch: kc = 2 log2(e) / cap in the kernels' exp units (2 / cap for
// fp64), so that expo(x kc) = exp(2 x / cap).
template <typename acc_t>
acc_t cap_k_of(double cap) {
  return static_cast<acc_t>(2.0 * static_cast<double>(kScale<acc_t>) / cap);
}

// The capped value z' = cap tanh(x / cap) of x, and r = 1 / (1 + exp(2 x / cap)): tanh = 1 - 2 r, so
// z' = cap - 2 cap r (one FFMA) and the gradient's factor 1 - tanh^2 = 4 r (1 - r), which keeps
// its relative accuracy where tanh^2 is near 1. fp32: exp within 2 ulp (ex2.approx), 1 / (1 + e)
// within 1 ulp (rcp.approx), so |z' - exact| < cap 2^-21. Large |x|: exp overflows to inf (r = 0,
// z' = cap) or flushes to 0 (r = 1, z' = -cap); inf logits are capped as ATen's tanh caps them.
template <typename acc_t>
struct Capped {
  acc_t x, r;
};

template <typename acc_t, bool CAP>
MEMCORE_HD Capped<acc_t> cap_of(acc_t x, acc_t cap, acc_t kc) {
  if constexpr (CAP) {
    const acc_t r = rcp_(acc_t(1) + expo(x * kc));
    return Capped<acc_t>{fma_(r, acc_t(-2) * cap, cap), r};
  } else {
    return Capped<acc_t>{x, acc_t(0)};
  }
}

// dz'/dx = 1 - tanh^2 = 4 r (1 - r)
template <typename acc_t>
MEMCORE_HD acc_t cap_slope(const Capped<acc_t>& c) {
  return acc_t(4) * c.r * (acc_t(1) - c.r);
}

// One thread's partial state of the row z[0, C) with target t under the options: walk_row's Part
// of the capped values, and in zs the thread's share of sum_j u_j (z'_j - z'_t) (when smooth; u
// null: 1).
template <typename acc_t>
struct OptPart {
  Part<acc_t> p;
  acc_t zs;
};

// the smoothing sum's term of column col, taken from zref (the capped target logit: the row's
// terms are differences of nearby logits, whatever the logits' offset; u null: weight 1)
template <typename acc_t>
MEMCORE_HD void opt_weigh(OptPart<acc_t>& r, acc_t x, int64_t col, bool smooth, const acc_t* u, acc_t zref) {
  if (smooth) r.zs += u ? u[col] * (x - zref) : x - zref;
}

// One value v of known column col (head, tail, the target's pack), capped
template <typename acc_t, bool E, bool CAP>
MEMCORE_HD void opt_add_one(OptPart<acc_t>& r, acc_t v, int64_t col, int64_t t, acc_t cap, acc_t kc, bool smooth,
                            const acc_t* u, acc_t zref) {
  const acc_t x = cap_of<acc_t, CAP>(v, cap, kc).x;
  add_one<acc_t, E>(r.p, x, col, t);
  opt_weigh(r, x, col, smooth, u, zref);
}

template <typename scalar_t, int TPR, int VEC, bool CAP>
MEMCORE_HD OptPart<typename OpMath<scalar_t>::type> opt_walk_row(const scalar_t* z, int64_t C, int64_t t,
                                                                 int lane, typename OpMath<scalar_t>::type cap,
                                                                 typename OpMath<scalar_t>::type kc, bool smooth,
                                                                 const typename OpMath<scalar_t>::type* u) {
  using acc_t = typename OpMath<scalar_t>::type;
  constexpr bool E = kExactDiff<scalar_t>;
  OptPart<acc_t> r{part_init<acc_t>(), acc_t(0)};
  const acc_t zref = smooth ? cap_of<acc_t, CAP>(static_cast<acc_t>(z[t]), cap, kc).x : acc_t(0);
  const Layout L = layout<VEC>(reinterpret_cast<uintptr_t>(z), sizeof(scalar_t), C, t);
  if constexpr (VEC > 1) {
    static_assert(VEC == kVec<scalar_t>, "packs are 16 bytes");
    if (lane < L.head) opt_add_one<acc_t, E, CAP>(r, static_cast<acc_t>(z[lane]), lane, t, cap, kc, smooth, u, zref);
    const scalar_t* body = z + L.head;
    for (int64_t v = lane; v < L.nv; v += TPR) {
      acc_t x[VEC];
      widen<scalar_t>(load16(body + v * VEC), x);
      const int64_t c0 = L.head + v * VEC;
      if (v == L.tp) {  // the target's pack: element by element
MEMCORE_UNROLL
        for (int k = 0; k < VEC; ++k) opt_add_one<acc_t, E, CAP>(r, x[k], c0 + k, t, cap, kc, smooth, u, zref);
      } else {
MEMCORE_UNROLL
        for (int k = 0; k < VEC; ++k) {
          x[k] = cap_of<acc_t, CAP>(x[k], cap, kc).x;
          opt_weigh(r, x[k], c0 + k, smooth, u, zref);
        }
        add_group<acc_t, VEC, E>(r.p, x, v < L.tp ? r.p.before : r.p.after);
      }
    }
  }
  for (int64_t j = L.tail0 + lane; j < C; j += TPR)
    opt_add_one<acc_t, E, CAP>(r, static_cast<acc_t>(z[j]), j, t, cap, kc, smooth, u, zref);
  return r;
}

// A kept row's outputs from the merged Part and the row's total zs: finish() of the capped target
// logit, and smooth = -sum_j u_j log p_j = U (lse - z'_t) - sum_j u_j (z'_j - z'_t) = U loss - zs
// (U = sum_j u_j) when smoothing: from the row's loss, not its lse, so a large common offset of the
// logits cancels in each term instead of between two large sums.
template <typename acc_t, bool CAP>
MEMCORE_HD RowOut<acc_t> opt_finish(const Part<acc_t>& p, acc_t zt, acc_t cap, acc_t kc, bool smooth, acc_t zs,
                                    acc_t big_u, acc_t* smooth_out) {
  const RowOut<acc_t> o = finish(p, cap_of<acc_t, CAP>(zt, cap, kc).x);
  if (smooth) *smooth_out = big_u * o.loss - zs;
  return o;
}

// One entry (a p_j - c u_j) (1 - tanh_j^2) of column col from its logit v; adds p_j into others unless
// col is the target
template <typename acc_t, bool E, bool CAP>
MEMCORE_HD acc_t opt_grad_value(acc_t v, int64_t col, int64_t t, acc_t ref, acc_t a, acc_t c, acc_t cap, acc_t kc,
                                const acc_t* u, acc_t& others) {
  const Capped<acc_t> x = cap_of<acc_t, CAP>(v, cap, kc);
  const acc_t e = term<acc_t, E>(x.x, ref);
  if (col != t) others += e;
  acc_t d = a * e;
  if (c != acc_t(0)) d -= u ? c * u[col] : c;
  if constexpr (CAP) d *= cap_slope(x);
  return d;
}

// The gradient pass of the options over one thread's share of the row: out[j] =
// (a p_j - c u_j) * (1 - tanh_j^2) (CAP; else without the factor), p_j = exp(z'_j - lse), column t
// included (opt_target_grad rewrites it); returns the share's sum of p_j over the other columns.
// c == 0: no smoothing term. z and out rows share their offset from a 16-byte boundary.
template <typename scalar_t, int TPR, int VEC, bool CAP>
MEMCORE_HD typename OpMath<scalar_t>::type opt_grad_row(const scalar_t* z, scalar_t* out, int64_t C, int64_t t,
                                                        const Layout& L, typename OpMath<scalar_t>::type lse,
                                                        typename OpMath<scalar_t>::type a,
                                                        typename OpMath<scalar_t>::type c,
                                                        typename OpMath<scalar_t>::type cap,
                                                        typename OpMath<scalar_t>::type kc,
                                                        const typename OpMath<scalar_t>::type* u, int lane) {
  using acc_t = typename OpMath<scalar_t>::type;
  constexpr bool E = kExactDiff<scalar_t>;
  const acc_t ref = ref_of<acc_t, E>(lse);
  acc_t others = acc_t(0);
  if constexpr (VEC > 1) {
    if (lane < L.head)
      out[lane] = static_cast<scalar_t>(
          opt_grad_value<acc_t, E, CAP>(static_cast<acc_t>(z[lane]), lane, t, ref, a, c, cap, kc, u, others));
    const scalar_t* zb = z + L.head;
    scalar_t* ob = out + L.head;
    for (int64_t v = lane; v < L.nv; v += TPR) {
      acc_t x[VEC];
      widen<scalar_t>(load16(zb + v * VEC), x);
MEMCORE_UNROLL
      for (int k = 0; k < VEC; ++k)
        x[k] = opt_grad_value<acc_t, E, CAP>(x[k], L.head + v * VEC + k, t, ref, a, c, cap, kc, u, others);
      store16(ob + v * VEC, narrow<scalar_t>(x));
    }
  }
  for (int64_t j = L.tail0 + lane; j < C; j += TPR)
    out[j] = static_cast<scalar_t>(
        opt_grad_value<acc_t, E, CAP>(static_cast<acc_t>(z[j]), j, t, ref, a, c, cap, kc, u, others));
  return others;
}

// The target's entry of the options' gradient: a (p_t - 1) + (a - b) - c u_t, times 1 - tanh_t^2
// (CAP), p_t - 1 as target_grad takes it (minus the others' sum where it is below 1/2 for fp32
// logits, else exp(z'_t - lse) - 1); zt the raw target logit, others the row's total of the pass.
template <typename scalar_t, bool CAP>
MEMCORE_HD typename OpMath<scalar_t>::type opt_target_grad(
    typename OpMath<scalar_t>::type zt, typename OpMath<scalar_t>::type lse, typename OpMath<scalar_t>::type others,
    typename OpMath<scalar_t>::type a, typename OpMath<scalar_t>::type b, typename OpMath<scalar_t>::type c,
    typename OpMath<scalar_t>::type u_t, typename OpMath<scalar_t>::type cap,
    typename OpMath<scalar_t>::type kc) {
  using acc_t = typename OpMath<scalar_t>::type;
  constexpr bool E = kExactDiff<scalar_t>;
  const Capped<acc_t> x = cap_of<acc_t, CAP>(zt, cap, kc);
  const acc_t pm1 = kTargetBySum<scalar_t> && others < acc_t(0.5) ? -others
                                                                 : term<acc_t, E>(x.x, ref_of<acc_t, E>(lse)) - acc_t(1);
  acc_t d = a * pm1 + (a - b) - c * u_t;
  if constexpr (CAP) d *= cap_slope(x);
  return d;
}

}  // namespace cerow
}  // namespace memcore
