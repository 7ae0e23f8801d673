// Host replays of the CUDA cross-entropy kernels' logic, from the same per-row code
// (csrc/cuda/cross_entropy_row.h), compiled into every build so tests/test_cross_entropy_replay.py
// checks it against the CPU kernels, and tests/test_cross_entropy_accuracy.py against float64,
// without a GPU: a row's forward and gradient pass thread by thread as the launch splits it, the
// split launch of few wide rows, and ce_forward_reduce's fixed-order reduction; ex2.approx.ftz.f32
// as host_ex2 models it. Lanes run one after another, which the kernels' own ordering (barriers;
// each element read and written by one thread) makes equivalent. More: docs/kernels.md.
#include "cross_entropy_replay.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "common.h"

#include "cuda/cross_entropy_row.h"

namespace memcore {
namespace cerow {
namespace {

// Which float within ex2.approx.ftz.f32's documented error (2 ulp) host_ex2 returns (and within
// rcp.approx.ftz.f32's 1 ulp, host_rcp). The instructions' algorithms are not documented, so no
// emulation of them can be trusted; their error bounds are, and the kernels' accuracy must hold
// anywhere inside them. kHashed (the default) picks one of the
// floats within 2 ulp of 2^x by a hash of x's bits: deterministic, a function of x as the
// hardware's result is, and reaching both ends of the bound; kLow / kHigh take the lowest / highest
// of them for every x (the error as one systematic bias); kNearest rounds 2^x correctly.
enum class Ex2Model { kNearest, kLow, kHigh, kHashed };
thread_local Ex2Model ex2_model = Ex2Model::kHashed;

const char* ex2_name(Ex2Model m) {
  switch (m) {
    case Ex2Model::kNearest: return "nearest";
    case Ex2Model::kLow: return "low";
    case Ex2Model::kHigh: return "high";
    default: return "hashed";
  }
}

uint32_t mix32(uint32_t h) {  // murmur3's finalizer
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  return h ^ (h >> 16);
}

// A float within ulps ulp of y (a finite double in float's normal range), as the thread's model
// picks it: the nearest, the lowest, the highest, or one chosen by a hash of key (an input's bits).
float within_ulps(double y, int ulps, uint32_t key) {
  const float nearest = static_cast<float>(y);
  if (std::isinf(nearest) || ex2_model == Ex2Model::kNearest) return nearest;
  int e = 0;
  std::frexp(y, &e);  // |y| in [2^(e-1), 2^e): floats there are 2^(e-24) apart
  const double ulp = std::ldexp(1.0, e - 24);
  const float inf = std::numeric_limits<float>::infinity();
  float lo = nearest, hi = nearest;
  for (float n = std::nextafter(lo, -inf); static_cast<double>(n) >= y - ulps * ulp; n = std::nextafter(n, -inf)) lo = n;
  for (float n = std::nextafter(hi, inf); static_cast<double>(n) <= y + ulps * ulp; n = std::nextafter(n, inf)) hi = n;
  if (ex2_model == Ex2Model::kLow) return lo;
  if (ex2_model == Ex2Model::kHigh) return hi;
  int count = 0;
  for (float f = lo; f < hi; f = std::nextafter(f, inf)) ++count;
  float r = lo;
  for (uint32_t k = mix32(key) % static_cast<uint32_t>(count + 1); k > 0; --k) r = std::nextafter(r, inf);
  return r;
}

uint32_t bits_of(float x) {
  uint32_t b;
  std::memcpy(&b, &x, 4);
  return b;
}

}  // namespace

float host_ex2(float x) {
  // .ftz: a subnormal input reads as 0 (2^0 = 1, what exp2 of it rounds to anyway); a result below
  // the smallest normal float flushes to +0
  const double y = std::exp2(static_cast<double>(x));
  if (std::isnan(y)) return std::numeric_limits<float>::quiet_NaN();
  if (y < static_cast<double>(std::numeric_limits<float>::min())) return 0.0f;
  return within_ulps(y, 2, bits_of(x));
}

float host_rcp(float x) {
  // rcp.approx.ftz.f32: within 1 ulp of 1 / x (PTX ISA); .ftz: a subnormal input reads as a signed
  // 0 (1 / 0 = inf), a result below the smallest normal float flushes to a signed 0
  if (std::isnan(x)) return x;
  if (std::fpclassify(x) == FP_SUBNORMAL || x == 0.0f) return std::copysign(std::numeric_limits<float>::infinity(), x);
  if (std::isinf(x)) return std::copysign(0.0f, x);
  const double y = 1.0 / static_cast<double>(x);
  if (std::fabs(y) < static_cast<double>(std::numeric_limits<float>::min())) return std::copysign(0.0f, x);
  return within_ulps(y, 1, bits_of(x) ^ 0x9E3779B9u);
}

}  // namespace cerow

namespace replay {
namespace {

using cerow::OpMath;
using cerow::Part;

// the kernel's warp_merge over each warp of p (size TPR): merge(self, lane ^ off), off = 16..1
template <typename acc_t, bool E>
void butterfly(std::vector<Part<acc_t>>& p) {
  for (int off = 16; off > 0; off >>= 1) {
    const std::vector<Part<acc_t>> q = p;
    for (size_t lane = 0; lane < p.size(); ++lane) {
      Part<acc_t> o = q[lane ^ off];
      o.ref = 0;
      p[lane] = cerow::merge<acc_t, E>(q[lane], o);
    }
  }
}

// the kernels' row_merge over the TPR states of one row (a block, or a warp for TPR = 32): the
// butterfly, then for TPR > 32 lane 0 of each warp to shared memory, every warp merging them
template <typename acc_t, int TPR, bool E>
void row_merge(std::vector<Part<acc_t>>& p) {
  butterfly<acc_t, E>(p);
  if (TPR > 32) {
    constexpr int kWarps = TPR / 32;
    std::vector<Part<acc_t>> sm(kWarps);
    for (int w = 0; w < kWarps; ++w) sm[w] = p[w * 32];
    for (int lane = 0; lane < TPR; ++lane) {
      const int wl = lane % 32;
      p[lane] = cerow::part_init<acc_t>();
      if (wl < kWarps) {
        p[lane].m = sm[wl].m; p[lane].s = sm[wl].s; p[lane].before = sm[wl].before; p[lane].after = sm[wl].after;
      }
    }
    butterfly<acc_t, E>(p);
  }
}

// the kernels' warp_sum over each warp of v: v[lane] + v[lane ^ off], off = 16..1
template <typename acc_t>
void warp_sums(std::vector<acc_t>& v) {
  for (int off = 16; off > 0; off >>= 1) {
    const std::vector<acc_t> q = v;
    for (size_t lane = 0; lane < v.size(); ++lane) v[lane] = q[lane] + q[lane ^ off];
  }
}

// the kernels' row_sum over the TPR values of one row: the warp sums, then for TPR > 32 lane 0 of
// each warp to shared memory, every warp summing them; the total every lane ends with (all agree)
template <typename acc_t, int TPR>
acc_t row_sum(std::vector<acc_t> v, const char* op) {
  warp_sums(v);
  if (TPR > 32) {
    constexpr int kWarps = TPR / 32;
    std::vector<acc_t> sw(kWarps);
    for (int w = 0; w < kWarps; ++w) sw[w] = v[w * 32];
    for (int lane = 0; lane < TPR; ++lane) v[lane] = lane % 32 < kWarps ? sw[lane % 32] : acc_t(0);
    warp_sums(v);
  }
  for (int lane = 1; lane < TPR; ++lane)
    TORCH_CHECK(std::memcmp(&v[lane], &v[0], sizeof(acc_t)) == 0, op, ": lane ", lane,
                " ends with another row sum than lane 0");
  return v[0];
}

// every thread must end with the same state bit for bit (the gradient pass takes lse from each)
template <typename acc_t>
void check_agree(const std::vector<Part<acc_t>>& p, const char* op) {
  for (size_t lane = 1; lane < p.size(); ++lane) {
    const bool same = (p[lane].m == p[0].m || (p[lane].m != p[lane].m && p[0].m != p[0].m)) &&
                      (p[lane].s == p[0].s || (p[lane].s != p[lane].s && p[0].s != p[0].s)) &&
                      p[lane].before == p[0].before && p[lane].after == p[0].after;
    TORCH_CHECK(same, op, ": lane ", lane, " ends with another row state than lane 0");
  }
}

template <typename scalar_t, int TPR, int VEC>
std::vector<double> forward_row(const scalar_t* z, int64_t C, int64_t t) {
  using acc_t = typename OpMath<scalar_t>::type;
  std::vector<Part<acc_t>> p(TPR);
  for (int lane = 0; lane < TPR; ++lane) p[lane] = cerow::walk_row<scalar_t, TPR, VEC>(z, C, t, lane);
  row_merge<acc_t, TPR, cerow::kExactDiff<scalar_t>>(p);
  check_agree(p, "_ce_row_replay");
  const cerow::RowOut<acc_t> o = cerow::finish(p[0], static_cast<acc_t>(z[t]));
  return {double(o.lse), double(o.loss), double(o.prob), double(o.margin), double(o.correct)};
}

template <typename scalar_t, int TPR, int VEC>
void grad_row(const scalar_t* z, scalar_t* out, int64_t C, int64_t t, double lse, double g) {
  using acc_t = typename OpMath<scalar_t>::type;
  const acc_t zt = static_cast<acc_t>(z[t]);  // read before the pass (out may be z)
  const cerow::Layout L = cerow::layout<VEC>(reinterpret_cast<uintptr_t>(z), sizeof(scalar_t), C, t);
  const int own = cerow::owner<TPR, VEC>(L, t);
  // lanes run one after another here, so a wrong owner could still leave the right value last;
  // out[t] starts as a marker the pass cannot write, and must first change in the owner's pass
  // (the kernel relies on the owner's program order, not on the order of lanes)
  const bool mark = out != z;
  unsigned char marker[sizeof(scalar_t)];
  std::memset(marker, 0xA5, sizeof(marker));
  if (mark) std::memcpy(&out[t], marker, sizeof(scalar_t));
  std::vector<acc_t> sums(TPR);
  for (int lane = 0; lane < TPR; ++lane) {
    sums[lane] = cerow::grad_row<scalar_t, TPR, VEC>(z, out, C, t, L, acc_t(lse), acc_t(g), lane);
    if (mark) {
      const bool written = std::memcmp(&out[t], marker, sizeof(scalar_t)) != 0;
      TORCH_CHECK(written == (lane >= own), "_ce_grad_replay: column ", t, " is written by lane ",
                  written ? lane : -1, ", the fix-up is done by lane ", own);
    }
  }
  // the owner's fix-up, after the row's sum (kTargetBySum) that every lane takes part in
  const acc_t others = cerow::kTargetBySum<scalar_t> ? row_sum<acc_t, TPR>(sums, "_ce_grad_replay") : acc_t(0);
  out[t] = static_cast<scalar_t>(cerow::target_grad<scalar_t>(zt, acc_t(lse), others, acc_t(g), out + t));
}

// ---- the split path (ce_split_forward_kernel, ce_split_finish_kernel, ce_split_grad_kernel)

// Launch arguments of the split forward, as the CUDA launcher passes them.
struct SplitArgs {
  int64_t N, C, S, num_samples, ignore_index;
};

// ce_split_forward_kernel then ce_split_finish_kernel over logits [N, C] (rows at any alignment):
// outputs as ce_forward's; zt (when not null) gets each read row's target logit, as the finish
// kernel saves it for the gradient kernel.
template <typename scalar_t, int TPR>
void split_forward(const scalar_t* logits, const int64_t* targets, const int64_t* index, const SplitArgs& a,
                   typename OpMath<scalar_t>::type* loss, typename OpMath<scalar_t>::type* lse,
                   typename OpMath<scalar_t>::type* rs, int* status, typename OpMath<scalar_t>::type* zt_saved) {
  using acc_t = typename OpMath<scalar_t>::type;
  constexpr int V = cerow::kVec<scalar_t>;
  const int S = static_cast<int>(a.S);
  std::vector<acc_t> ws(a.N * S * cerow::kPartWords, acc_t(-12345));  // unread unless written
  // the forward kernel: block (row, k) walks slice k of its row, merges it, lane 0 stores the part
  for (int64_t row = 0; row < a.N; ++row) {
    const int64_t t = targets[row];
    if (cerow::row_skipped(t, a.C, a.ignore_index)) continue;
    const scalar_t* z = logits + row * a.C;
    const cerow::Layout L = cerow::layout<V>(reinterpret_cast<uintptr_t>(z), sizeof(scalar_t), a.C, t);
    for (int k = 0; k < S; ++k) {
      const cerow::Slice sl = cerow::slice_of(L, S, k);
      std::vector<Part<acc_t>> p(TPR);
      for (int lane = 0; lane < TPR; ++lane) p[lane] = cerow::walk_slice<scalar_t, TPR>(z, a.C, t, L, sl, lane);
      row_merge<acc_t, TPR, cerow::kExactDiff<scalar_t>>(p);
      check_agree(p, "_ce_split_forward_replay");
      cerow::store_part(ws.data() + (row * S + k) * cerow::kPartWords, p[0]);
    }
  }
  // the finish kernel: a warp per row, lane k loads part k, butterfly, lane 0 writes
  for (int64_t row = 0; row < a.N; ++row) {
    const int64_t t = targets[row];
    acc_t* r = rs + row * kNumRowStats;
    if (cerow::row_skipped(t, a.C, a.ignore_index)) {
      *status |= cerow::skipped_flags(t, a.ignore_index);
      loss[row] = lse[row] = acc_t(0);
      r[kRowProb] = r[kRowMargin] = r[kRowCorrect] = acc_t(0);
      continue;
    }
    std::vector<Part<acc_t>> q(32);
    for (int lane = 0; lane < 32; ++lane) q[lane] = cerow::load_part(ws.data() + row * S * cerow::kPartWords, S, lane);
    butterfly<acc_t, cerow::kExactDiff<scalar_t>>(q);
    check_agree(q, "_ce_split_forward_replay");
    const acc_t zt = static_cast<acc_t>(logits[row * a.C + t]);
    if (zt_saved) zt_saved[row] = zt;
    const cerow::RowOut<acc_t> o = cerow::finish(q[0], zt);
    *status |= cerow::row_flags(index[row], a.num_samples, o.loss);
    loss[row] = o.loss;
    lse[row] = o.lse;
    r[kRowProb] = o.prob;
    r[kRowMargin] = o.margin;
    r[kRowCorrect] = o.correct;
  }
}

// ce_split_grad_kernel: block (row, k) writes slice k of the row's gradient into out (may be
// logits: the overwrite mode, whose target logits come from zt_saved); g: the row's weight.
template <typename scalar_t, int TPR>
void split_grad(const scalar_t* logits, scalar_t* out, const int64_t* targets, const typename OpMath<scalar_t>::type* lse,
                const typename OpMath<scalar_t>::type* g, const typename OpMath<scalar_t>::type* zt_saved,
                const SplitArgs& a) {
  using acc_t = typename OpMath<scalar_t>::type;
  constexpr int V = cerow::kVec<scalar_t>;
  const int S = static_cast<int>(a.S);
  for (int64_t row = 0; row < a.N; ++row) {
    const int64_t t = targets[row];
    const scalar_t* z = logits + row * a.C;
    scalar_t* o = out + row * a.C;
    const cerow::Layout L = cerow::layout<V>(reinterpret_cast<uintptr_t>(z), sizeof(scalar_t), a.C, t);
    int owners = 0;
    std::vector<acc_t> parts(32, acc_t(0));  // the slices' sums (kTargetBySum): lane k of the target kernel
    for (int k = 0; k < S; ++k) {
      const cerow::Slice sl = cerow::slice_of(L, S, k);
      if (cerow::row_skipped(t, a.C, a.ignore_index)) {  // zeros, the logits never read
        for (int lane = 0; lane < TPR; ++lane)
          for (int64_t j = cerow::slice_begin<V>(L, sl) + lane; j < cerow::slice_end<V>(L, sl, a.C); j += TPR)
            o[j] = scalar_t(0);
        continue;
      }
      const int own = cerow::slice_owner<TPR, V>(L, sl, t);
      owners += own >= 0;
      // read before the block's pass, by the owner (out may be z)
      const acc_t zt = own < 0 ? acc_t(0) : zt_saved ? zt_saved[row] : static_cast<acc_t>(z[t]);
      // as _ce_grad_replay: out[t] starts as a marker and must first change in the owner's pass
      const bool mark = own >= 0 && o != z;
      unsigned char marker[sizeof(scalar_t)];
      std::memset(marker, 0xA5, sizeof(marker));
      if (mark) std::memcpy(&o[t], marker, sizeof(scalar_t));
      std::vector<acc_t> sums(TPR);
      for (int lane = 0; lane < TPR; ++lane) {
        sums[lane] = cerow::grad_slice<scalar_t, TPR>(z, o, a.C, t, L, sl, lse[row], g[row], lane);
        if (mark) {
          const bool written = std::memcmp(&o[t], marker, sizeof(scalar_t)) != 0;
          TORCH_CHECK(written == (lane >= own), "_ce_split_grad_replay: column ", t, " of slice ", k,
                      " is written by lane ", written ? lane : -1, ", the fix-up is done by lane ", own);
        }
      }
      if (cerow::kTargetBySum<scalar_t>)
        parts[k] = row_sum<acc_t, TPR>(sums, "_ce_split_grad_replay");  // lane 0 stores the slice's
      else if (own >= 0)
        o[t] = static_cast<scalar_t>(cerow::target_grad<scalar_t>(zt, lse[row], acc_t(0), g[row], o + t));
    }
    if (cerow::row_skipped(t, a.C, a.ignore_index)) continue;
    TORCH_CHECK(owners == 1, "_ce_split_grad_replay: column ", t, " is owned by ", owners, " slices");
    if (cerow::kTargetBySum<scalar_t>) {  // ce_split_target_kernel: the warp's sum, lane 0 writes
      warp_sums(parts);
      o[t] = static_cast<scalar_t>(cerow::target_grad<scalar_t>(acc_t(0), acc_t(0), parts[0], g[row], o + t));
    }
  }
}

// f(Int<TPR>) for the thread counts of a block
template <typename F>
void by_tpr(int64_t tpr, F&& f) {
  if (tpr == 32) f(std::integral_constant<int, 32>{});
  else if (tpr == 256) f(std::integral_constant<int, 256>{});
  else if (tpr == 512) f(std::integral_constant<int, 512>{});
  else TORCH_CHECK(false, "threads per row must be 32, 256 or 512, got ", tpr);
}

void check_split(const at::Tensor& logits, const at::Tensor& targets, int64_t slices, const char* op) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous() && logits.device().is_cpu(), op,
              ": logits must be a contiguous 2-D CPU tensor");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(logits.data_ptr()) % logits.element_size() == 0, op,
              ": packs need element-aligned logits");
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == logits.size(0) && targets.scalar_type() == at::kLong &&
                  targets.device().is_cpu(),
              op, ": targets must be int64 [N] on the CPU");
  TORCH_CHECK(slices >= 1 && slices <= cerow::kSplitMaxSlices, op, ": slices must lie in [1, ",
              cerow::kSplitMaxSlices, "], got ", slices);
}

// f(Int<TPR>, Int<VEC>) for the launch shapes the CUDA launcher can pick
template <typename scalar_t, typename F>
void by_shape(int64_t tpr, bool vec, F&& f) {
  constexpr int V = cerow::kVec<scalar_t>;
  auto with_vec = [&](auto t) {
    if (vec) f(t, std::integral_constant<int, V>{});
    else f(t, std::integral_constant<int, 1>{});
  };
  if (tpr == 32) with_vec(std::integral_constant<int, 32>{});
  else if (tpr == 256) with_vec(std::integral_constant<int, 256>{});
  else if (tpr == 512) with_vec(std::integral_constant<int, 512>{});
  else TORCH_CHECK(false, "threads per row must be 32, 256 or 512, got ", tpr);
}

void check_row(const at::Tensor& row, int64_t target, bool vec, const char* op) {
  TORCH_CHECK(row.dim() == 1 && row.is_contiguous() && row.device().is_cpu(), op, ": row must be a contiguous 1-D CPU tensor");
  TORCH_CHECK(target >= 0 && target < row.size(0), op, ": target must lie in [0, C)");
  TORCH_CHECK(!vec || reinterpret_cast<uintptr_t>(row.data_ptr()) % row.element_size() == 0, op,
              ": packs need an element-aligned row");
}

// ---- the options route (ce_forward_options_kernel, ce_backward_options_kernel), one row at a time

template <typename acc_t>
struct OptArgs {
  acc_t cap, kc;    // softcap and cerow::cap_k_of(softcap) (CAP)
  bool smooth;      // forward: the smoothing sum wanted
  const acc_t* u;   // class weights, or null (1)
  acc_t big_u;      // sum of u (C without weights)
};

// ce_forward_options_kernel on row z (kept: 0 <= t < C): [lse, loss, prob, margin, correct, smooth]
template <typename scalar_t, int TPR, int VEC, bool CAP>
std::vector<double> opt_forward_row(const scalar_t* z, int64_t C, int64_t t, const OptArgs<at::opmath_type<scalar_t>>& o) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<Part<acc_t>> p(TPR);
  std::vector<acc_t> zs(TPR);
  for (int lane = 0; lane < TPR; ++lane) {
    const cerow::OptPart<acc_t> r = cerow::opt_walk_row<scalar_t, TPR, VEC, CAP>(z, C, t, lane, o.cap, o.kc, o.smooth, o.u);
    p[lane] = r.p;
    zs[lane] = r.zs;
  }
  row_merge<acc_t, TPR, cerow::kExactDiff<scalar_t>>(p);
  check_agree(p, "_ce_forward_options_replay");
  const acc_t total = o.smooth ? row_sum<acc_t, TPR>(zs, "_ce_forward_options_replay") : acc_t(0);
  acc_t sm = acc_t(0);
  const cerow::RowOut<acc_t> r =
      cerow::opt_finish<acc_t, CAP>(p[0], static_cast<acc_t>(z[t]), o.cap, o.kc, o.smooth, total, o.big_u, &sm);
  return {double(r.lse), double(r.loss), double(r.prob), double(r.margin), double(r.correct), double(sm)};
}

// ce_backward_options_kernel on row z (kept) into out: a new row at z's offset from 16 bytes, or z
// itself (in place, ce_forward_grad_options_: the lanes run one after another over the row they
// overwrite, the owner having read the target logit before)
template <typename scalar_t, int TPR, int VEC, bool CAP>
void opt_grad_row(const scalar_t* z, scalar_t* out, int64_t C, int64_t t, at::opmath_type<scalar_t> lse,
                  at::opmath_type<scalar_t> a, at::opmath_type<scalar_t> b, at::opmath_type<scalar_t> c,
                  const OptArgs<at::opmath_type<scalar_t>>& o) {
  using acc_t = at::opmath_type<scalar_t>;
  const bool inplace = static_cast<const void*>(z) == static_cast<const void*>(out);
  const cerow::Layout L = cerow::layout<VEC>(reinterpret_cast<uintptr_t>(z), sizeof(scalar_t), C, t);
  const int own = cerow::owner<TPR, VEC>(L, t);
  const acc_t zt = static_cast<acc_t>(z[t]);  // the owner's read before its pass
  unsigned char marker[sizeof(scalar_t)];  // as _ce_grad_replay: column t first written by its owner
  std::memset(marker, 0xA5, sizeof(marker));
  if (!inplace) std::memcpy(&out[t], marker, sizeof(scalar_t));
  std::vector<acc_t> sums(TPR);
  for (int lane = 0; lane < TPR; ++lane) {
    sums[lane] = cerow::opt_grad_row<scalar_t, TPR, VEC, CAP>(z, out, C, t, L, lse, a, c, o.cap, o.kc, o.u, lane);
    const bool written = std::memcmp(&out[t], marker, sizeof(scalar_t)) != 0;
    TORCH_CHECK(inplace || written == (lane >= own), "_ce_backward_options_replay: column ", t, " is written by lane ",
                written ? lane : -1, ", the fix-up is done by lane ", own);
  }
  const acc_t others = cerow::kTargetBySum<scalar_t> ? row_sum<acc_t, TPR>(sums, "_ce_backward_options_replay") : acc_t(0);
  const acc_t ut = c != acc_t(0) && o.u ? o.u[t] : acc_t(1);
  out[t] = static_cast<scalar_t>(cerow::opt_target_grad<scalar_t, CAP>(zt, lse, others, a, b, c, ut, o.cap, o.kc));
}

// f(std::bool_constant<CAP>)
template <typename F>
void by_cap(double softcap, F&& f) {
  if (softcap > 0.0) f(std::true_type{});
  else f(std::false_type{});
}

}  // namespace

at::Tensor ce_row_replay(const at::Tensor& row, int64_t target, int64_t tpr, bool vec) {
  check_row(row, target, vec, "_ce_row_replay");
  std::vector<double> r;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, row.scalar_type(), "_ce_row_replay", [&] {
    by_shape<scalar_t>(tpr, vec, [&](auto T, auto V) {
      r = forward_row<scalar_t, decltype(T)::value, decltype(V)::value>(row.data_ptr<scalar_t>(), row.size(0), target);
    });
  });
  return at::tensor(r, at::kDouble);
}

void ce_grad_replay(const at::Tensor& row, at::Tensor& out, int64_t target, double lse, double g, int64_t tpr,
                    bool vec) {
  check_row(row, target, vec, "_ce_grad_replay");
  TORCH_CHECK(out.sizes() == row.sizes() && out.scalar_type() == row.scalar_type() && out.is_contiguous(),
              "_ce_grad_replay: out must be like row");
  TORCH_CHECK(!vec || (reinterpret_cast<uintptr_t>(row.data_ptr()) - reinterpret_cast<uintptr_t>(out.data_ptr())) % 16 == 0,
              "_ce_grad_replay: packs need row and out at the same offset from a 16-byte boundary");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, row.scalar_type(), "_ce_grad_replay", [&] {
    by_shape<scalar_t>(tpr, vec, [&](auto T, auto V) {
      grad_row<scalar_t, decltype(T)::value, decltype(V)::value>(row.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                                                 row.size(0), target, lse, g);
    });
  });
}

int64_t ce_split_slices(int64_t n, int64_t c, int64_t elem_size, int64_t sms) {
  return cerow::split_slices(n, c, elem_size, sms);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ce_split_forward_replay(
    at::Tensor& logits, const at::Tensor& targets, const at::Tensor& index, int64_t num_samples,
    int64_t ignore_index, int64_t slices, int64_t tpr, bool grad, bool mean) {
  const char* op = "_ce_split_forward_replay";
  check_split(logits, targets, slices, op);
  TORCH_CHECK(index.sizes() == targets.sizes() && index.scalar_type() == at::kLong && index.device().is_cpu(), op,
              ": index must be int64 [N] on the CPU");
  const at::Tensor tg = targets.contiguous(), ix = index.contiguous();
  const int64_t N = logits.size(0), C = logits.size(1);
  const SplitArgs a{N, C, slices, num_samples, ignore_index};
  const auto acc = logits.options().dtype(at::toOpMathType(logits.scalar_type()));
  at::Tensor loss = at::empty({N}, acc), lse = at::empty({N}, acc), rs = at::empty({N, kNumRowStats}, acc);
  at::Tensor status = at::zeros({1}, at::kInt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "_ce_split_replay", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    by_tpr(tpr, [&](auto T) {
      constexpr int TPR = decltype(T)::value;
      std::vector<acc_t> zt(N, acc_t(0));
      split_forward<scalar_t, TPR>(logits.data_ptr<scalar_t>(), tg.data_ptr<int64_t>(), ix.data_ptr<int64_t>(), a,
                                   loss.data_ptr<acc_t>(), lse.data_ptr<acc_t>(), rs.data_ptr<acc_t>(),
                                   status.data_ptr<int>(), grad ? zt.data() : nullptr);
      if (!grad) return;
      // ce_forward_grad_: the weight 1 / count (mean) or 1 of every row, the gradient over logits
      int64_t count = 0;
      for (int64_t r = 0; r < N; ++r) count += tg.data_ptr<int64_t>()[r] != ignore_index;
      const std::vector<acc_t> w(N, mean ? acc_t(1) / static_cast<acc_t>(count) : acc_t(1));
      split_grad<scalar_t, TPR>(logits.data_ptr<scalar_t>(), logits.data_ptr<scalar_t>(), tg.data_ptr<int64_t>(),
                                lse.data_ptr<acc_t>(), w.data(), zt.data(), a);
    });
  });
  return {loss, lse, rs, status};
}

at::Tensor ce_split_backward_replay(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& targets,
                                    const at::Tensor& lse, int64_t ignore_index, int64_t slices, int64_t tpr) {
  const char* op = "_ce_split_backward_replay";
  check_split(logits, targets, slices, op);
  const int64_t N = logits.size(0), C = logits.size(1);
  const auto acc = at::toOpMathType(logits.scalar_type());
  TORCH_CHECK(grad_loss.sizes() == targets.sizes() && grad_loss.scalar_type() == acc && lse.sizes() == targets.sizes() &&
                  lse.scalar_type() == acc,
              op, ": grad_loss and lse must be [N] in the logits' opmath dtype");
  const at::Tensor tg = targets.contiguous(), gl = grad_loss.contiguous(), l = lse.contiguous();
  // the gradient at the logits' offset from a 16-byte boundary, as ce_backward_cuda allocates it
  const int64_t esize = logits.element_size();
  const int64_t shift = static_cast<int64_t>(reinterpret_cast<uintptr_t>(logits.data_ptr()) % 16) / esize;
  at::Tensor buf = at::empty({N * C + 32 / esize}, logits.options());
  const int64_t base = static_cast<int64_t>((16 - reinterpret_cast<uintptr_t>(buf.data_ptr()) % 16) % 16) / esize;
  at::Tensor out = buf.narrow(0, base + shift, N * C).view({N, C});
  const SplitArgs a{N, C, slices, 0, ignore_index};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "_ce_split_replay", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    by_tpr(tpr, [&](auto T) {
      split_grad<scalar_t, decltype(T)::value>(logits.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                               tg.data_ptr<int64_t>(), l.data_ptr<acc_t>(), gl.data_ptr<acc_t>(),
                                               nullptr, a);
    });
  });
  return out;
}

namespace {
void check_options_replay(const at::Tensor& logits, const at::Tensor& targets, const std::optional<at::Tensor>& weight,
                          const char* op) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous() && logits.device().is_cpu(), op,
              ": logits must be a contiguous 2-D CPU tensor");
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == logits.size(0) && targets.scalar_type() == at::kLong &&
                  targets.device().is_cpu() && targets.is_contiguous(),
              op, ": targets must be contiguous int64 [N] on the CPU");
  TORCH_CHECK(!weight.has_value() || (weight->dim() == 1 && weight->size(0) == logits.size(1) &&
                                      weight->scalar_type() == at::toOpMathType(logits.scalar_type()) &&
                                      weight->is_contiguous() && weight->device().is_cpu()),
              op, ": weight must be a contiguous opmath [C] CPU tensor");
}
}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ce_forward_options_replay(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& index,
                                  int64_t num_samples, int64_t ignore_index, double softcap, double label_smoothing,
                                  const std::optional<at::Tensor>& weight, int64_t tpr, bool vec) {
  const char* op = "_ce_forward_options_replay";
  check_options_replay(logits, targets, weight, op);
  const int64_t N = logits.size(0), C = logits.size(1);
  const auto acc = logits.options().dtype(at::toOpMathType(logits.scalar_type()));
  at::Tensor loss = at::empty({N}, acc), lse = at::empty({N}, acc), rs = at::empty({N, kNumRowStats}, acc);
  at::Tensor status = at::zeros({1}, at::kInt);
  const bool smooth = label_smoothing > 0.0;
  at::Tensor sm = at::empty({smooth ? N : 0}, acc);
  const at::Tensor ix = index.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "_ce_options_replay", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const OptArgs<acc_t> o{static_cast<acc_t>(softcap), softcap > 0.0 ? cerow::cap_k_of<acc_t>(softcap) : acc_t(0),
                           smooth, weight.has_value() ? weight->data_ptr<acc_t>() : nullptr,
                           weight.has_value() ? weight->sum().item<acc_t>() : static_cast<acc_t>(C)};
    by_cap(softcap, [&](auto cap) {
      by_shape<scalar_t>(tpr, vec, [&](auto T, auto V) {
        for (int64_t row = 0; row < N; ++row) {
          const int64_t t = targets.data_ptr<int64_t>()[row];
          acc_t* r = rs.data_ptr<acc_t>() + row * kNumRowStats;
          acc_t* out[] = {lse.data_ptr<acc_t>() + row, loss.data_ptr<acc_t>() + row, r + kRowProb, r + kRowMargin,
                          r + kRowCorrect};
          if (cerow::row_skipped(t, C, ignore_index)) {
            status.data_ptr<int>()[0] |= cerow::skipped_flags(t, ignore_index);
            for (acc_t* p : out) *p = acc_t(0);
            if (smooth) sm.data_ptr<acc_t>()[row] = acc_t(0);
            continue;
          }
          const std::vector<double> v = opt_forward_row<scalar_t, decltype(T)::value, decltype(V)::value,
                                                        decltype(cap)::value>(logits.data_ptr<scalar_t>() + row * C, C, t, o);
          for (int k = 0; k < 5; ++k) *out[k] = static_cast<acc_t>(v[k]);
          if (smooth) sm.data_ptr<acc_t>()[row] = static_cast<acc_t>(v[5]);
          status.data_ptr<int>()[0] |= cerow::row_flags(ix.data_ptr<int64_t>()[row], num_samples, static_cast<acc_t>(v[1]));
        }
      });
    });
  });
  return {loss, lse, rs, status, sm};
}

at::Tensor ce_backward_options_replay(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c,
                                      const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                                      int64_t ignore_index, double softcap, const std::optional<at::Tensor>& weight,
                                      int64_t tpr, bool vec, bool inplace) {
  const char* op = "_ce_backward_options_replay";
  check_options_replay(logits, targets, weight, op);
  const int64_t N = logits.size(0), C = logits.size(1);
  const auto acc = at::toOpMathType(logits.scalar_type());
  for (const at::Tensor* v : {&a, &b, &lse})
    TORCH_CHECK(v->dim() == 1 && v->size(0) == N && v->scalar_type() == acc && v->is_contiguous(), op,
                ": a, b and lse must be contiguous opmath [N]");
  TORCH_CHECK(c.numel() == 0 || (c.dim() == 1 && c.size(0) == N && c.scalar_type() == acc && c.is_contiguous()), op,
              ": c must be contiguous opmath [N] or empty");
  // the gradient at the logits' offset from a 16-byte boundary, as ce_backward_options_cuda allocates it
  const int64_t esize = logits.element_size();
  const int64_t shift = static_cast<int64_t>(reinterpret_cast<uintptr_t>(logits.data_ptr()) % 16) / esize;
  at::Tensor buf = at::empty({N * C + 32 / esize}, logits.options());
  const int64_t base = static_cast<int64_t>((16 - reinterpret_cast<uintptr_t>(buf.data_ptr()) % 16) % 16) / esize;
  at::Tensor out = buf.narrow(0, base + shift, N * C).view({N, C});
  if (inplace) out.copy_(logits);  // the rows the kernel overwrites, at the logits' offset
  const at::Tensor& z_rows = inplace ? out : logits;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "_ce_options_replay", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const OptArgs<acc_t> o{static_cast<acc_t>(softcap), softcap > 0.0 ? cerow::cap_k_of<acc_t>(softcap) : acc_t(0),
                           false, weight.has_value() ? weight->data_ptr<acc_t>() : nullptr, acc_t(0)};
    by_cap(softcap, [&](auto cap) {
      by_shape<scalar_t>(tpr, vec, [&](auto T, auto V) {
        for (int64_t row = 0; row < N; ++row) {
          const int64_t t = targets.data_ptr<int64_t>()[row];
          scalar_t* g = out.data_ptr<scalar_t>() + row * C;
          if (cerow::row_skipped(t, C, ignore_index)) {
            std::fill(g, g + C, scalar_t(0));
            continue;
          }
          const acc_t cr = c.numel() ? c.data_ptr<acc_t>()[row] : acc_t(0);
          opt_grad_row<scalar_t, decltype(T)::value, decltype(V)::value, decltype(cap)::value>(
              z_rows.data_ptr<scalar_t>() + row * C, g, C, t, lse.data_ptr<acc_t>()[row], a.data_ptr<acc_t>()[row],
              b.data_ptr<acc_t>()[row], cr, o);
        }
      });
    });
  });
  return out;
}

std::string ce_ex2_model(const std::string& model) {
  using cerow::Ex2Model;
  const std::string before = cerow::ex2_name(cerow::ex2_model);
  if (model == "nearest") cerow::ex2_model = Ex2Model::kNearest;
  else if (model == "low") cerow::ex2_model = Ex2Model::kLow;
  else if (model == "high") cerow::ex2_model = Ex2Model::kHigh;
  else if (model == "hashed") cerow::ex2_model = Ex2Model::kHashed;
  else TORCH_CHECK(false, "_ce_ex2_model: model must be nearest, low, high or hashed, got '", model, "'");
  return before;
}

double ce_host_ex2(double x) { return cerow::host_ex2(static_cast<float>(x)); }

std::tuple<at::Tensor, at::Tensor> ce_reduce_replay(const at::Tensor& loss, const at::Tensor& targets,
                                                    int64_t ignore_index, bool mean, int64_t threads) {
  TORCH_CHECK(threads >= 32 && threads <= cerow::kReduceThreads && (threads & (threads - 1)) == 0,
              "_ce_reduce_replay: threads must be a power of two in [32, ", cerow::kReduceThreads, "]");
  TORCH_CHECK(loss.dim() == 1 && targets.dim() == 1 && loss.size(0) == targets.size(0) &&
                  targets.scalar_type() == at::kLong && loss.device().is_cpu() && targets.device().is_cpu(),
              "_ce_reduce_replay: loss and targets must be 1-D CPU tensors of one length, targets int64");
  const at::Tensor l = loss.contiguous(), tg = targets.contiguous();
  const int64_t n = l.size(0);
  double value = 0.0;
  int64_t count = 0;
  AT_DISPATCH_FLOATING_TYPES(l.scalar_type(), "_ce_reduce_replay", [&] {
    // each thread's share (cerow::reduce_thread), then the tree: shared memory, then shfl_down
    std::vector<cerow::Total> s(threads);
    for (int tid = 0; tid < threads; ++tid)
      s[tid] = cerow::reduce_thread(l.data_ptr<scalar_t>(), tg.data_ptr<int64_t>(), n, ignore_index, tid,
                                    static_cast<int>(threads));
    for (int64_t stride = threads / 2; stride > 0; stride >>= 1)
      for (int64_t i = 0; i < stride; ++i) s[i] = cerow::reduce_add(s[i], s[i + stride]);
    value = static_cast<double>(static_cast<scalar_t>(cerow::reduce_value(s[0], mean)));
    count = s[0].count;
  });
  return {at::scalar_tensor(value, l.options()), at::scalar_tensor(count, tg.options())};
}

}  // namespace replay
}  // namespace memcore
