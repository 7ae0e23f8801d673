// CPU kernels of the curvature family (schemas in csrc/memcore.cpp, Philox in csrc/philox.h):
// rademacher, rademacher_perturb, probe_reduce; and philox4x32_words, the raw generator words for
// the known-answer tests. A row is one (probe, sample) pair; rows are split across threads and
// walked in 128-element blocks, one Philox4x32-10 call giving a block's signs, so probes are
// regenerated where needed and never stored. probe_reduce sums 16-lane fp32 partials (fp64 for
// fp64) within a block and blocks in fp64: a row's result depends only on D, not on P, B, the
// chunking or the thread count. Memory: the [P, B, ...] outputs of the perturb ops, float64 [P, B]
// for probe_reduce. More: docs/kernels.md.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../curvature.h"
#include "../ops.h"
#include "../philox.h"

namespace memcore {
namespace cpu {
namespace {

constexpr int kLanes = 16;

template <typename scalar_t>
using opmath_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

int64_t grain_rows(int64_t D) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(D, 1)); }

// Single-bit masks: testing `word & kBit[k]` (rather than `(word >> k) & 1`) lets the compiler
// vectorise the sign expansion without per-lane variable shifts, which baseline x86-64 lacks.
alignas(64) constexpr uint32_t kBit[32] = {
    1u << 0,  1u << 1,  1u << 2,  1u << 3,  1u << 4,  1u << 5,  1u << 6,  1u << 7,
    1u << 8,  1u << 9,  1u << 10, 1u << 11, 1u << 12, 1u << 13, 1u << 14, 1u << 15,
    1u << 16, 1u << 17, 1u << 18, 1u << 19, 1u << 20, 1u << 21, 1u << 22, 1u << 23,
    1u << 24, 1u << 25, 1u << 26, 1u << 27, 1u << 28, 1u << 29, 1u << 30, 1u << 31};

// signs[j] = +a or -a for the 128 bits of one Philox block
template <typename T>
inline void block_signs(const Philox4x32& bits, T a, T* __restrict__ signs) {
  for (int w = 0; w < 4; ++w) {
    const uint32_t word = bits.v[w];
    for (int k = 0; k < 32; ++k) signs[w * 32 + k] = (word & kBit[k]) ? a : -a;
  }
}

// out[p, b, :] = x[b, :] + h * v(p, b)   (or v itself when x is null, with h = 1)
template <typename scalar_t>
void perturb_rows(const scalar_t* x, scalar_t* out, const int64_t* index, int64_t P, int64_t B,
                  int64_t D, uint64_t seed, int64_t probe_start, double h) {
  using acc_t = opmath_t<scalar_t>;
  const acc_t hh = static_cast<acc_t>(h);
  at::parallel_for(0, P * B, grain_rows(D), [&](int64_t begin, int64_t end) {
    alignas(64) acc_t hs[kPhiloxBits];
    for (int64_t r = begin; r < end; ++r) {
      const int64_t p = r / B, b = r % B;
      const uint32_t probe = static_cast<uint32_t>(probe_start + p);
      scalar_t* __restrict__ o = out + r * D;
      const scalar_t* __restrict__ xr = x ? x + b * D : nullptr;
      for (int64_t off = 0, blk = 0; off < D; off += kPhiloxBits, ++blk) {
        const int64_t len = std::min<int64_t>(kPhiloxBits, D - off);
        block_signs(rademacher_bits(seed, index[b], probe, static_cast<uint32_t>(blk)), hh, hs);
        if (xr) {
          for (int64_t j = 0; j < len; ++j) o[off + j] = static_cast<scalar_t>(static_cast<acc_t>(xr[off + j]) + hs[j]);
        } else {
          for (int64_t j = 0; j < len; ++j) o[off + j] = static_cast<scalar_t>(hs[j]);
        }
      }
    }
  });
}

at::Tensor rademacher_perturb_cpu(const at::Tensor& x, const at::Tensor& index, int64_t seed,
                                  int64_t probe_start, int64_t n_probes, double h) {
  const ProbeOutput p = perturb_output(x, index, probe_start, n_probes);
  if (p.out.numel() == 0) return p.out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rademacher_perturb_cpu", [&] {
    perturb_rows<scalar_t>(x.data_ptr<scalar_t>(), p.out.data_ptr<scalar_t>(), index.data_ptr<int64_t>(),
                           n_probes, p.B, p.D, static_cast<uint64_t>(seed), probe_start, h);
  });
  return p.out;
}

at::Tensor rademacher_cpu(const at::Tensor& index, int64_t seed, int64_t probe_start, int64_t n_probes,
                          at::IntArrayRef sample_shape, at::ScalarType dtype) {
  const ProbeOutput p = rademacher_output(index, probe_start, n_probes, sample_shape, dtype);
  if (p.out.numel() == 0) return p.out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "rademacher_cpu", [&] {
    perturb_rows<scalar_t>(nullptr, p.out.data_ptr<scalar_t>(), index.data_ptr<int64_t>(), n_probes, p.B,
                           p.D, static_cast<uint64_t>(seed), probe_start, 1.0);
  });
  return p.out;
}

std::tuple<at::Tensor, at::Tensor> probe_reduce_cpu(const at::Tensor& gp, const at::Tensor& gc,
                                                    const at::Tensor& index, int64_t seed,
                                                    int64_t probe_start) {
  check_probe_reduce(gp, gc, index, probe_start);
  const int64_t P = gp.size(0), B = gc.size(0);
  const int64_t D = sample_numel(gc.sizes().slice(1), "memcore::probe_reduce");
  const auto f64 = gc.options().dtype(at::kDouble);
  at::Tensor sq = at::zeros({P, B}, f64), vd = at::zeros({P, B}, f64);
  if (P * B == 0 || D == 0) return {sq, vd};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gc.scalar_type(), "probe_reduce_cpu", [&] {
    using acc_t = opmath_t<scalar_t>;
    const scalar_t* a = gp.data_ptr<scalar_t>();
    const scalar_t* c = gc.data_ptr<scalar_t>();
    const int64_t* ix = index.data_ptr<int64_t>();
    double* sq_p = sq.data_ptr<double>();
    double* vd_p = vd.data_ptr<double>();
    at::parallel_for(0, P * B, grain_rows(D), [&](int64_t begin, int64_t end) {
      alignas(64) acc_t sg[kPhiloxBits];
      alignas(64) acc_t d[kPhiloxBits];
      for (int64_t r = begin; r < end; ++r) {
        const int64_t p = r / B, b = r % B;
        const uint32_t probe = static_cast<uint32_t>(probe_start + p);
        const scalar_t* __restrict__ ar = a + r * D;
        const scalar_t* __restrict__ cr = c + b * D;
        double row_sq = 0.0, row_vd = 0.0;
        for (int64_t off = 0, blk = 0; off < D; off += kPhiloxBits, ++blk) {
          const int64_t len = std::min<int64_t>(kPhiloxBits, D - off);
          block_signs(rademacher_bits(static_cast<uint64_t>(seed), ix[b], probe, static_cast<uint32_t>(blk)),
                      acc_t(1), sg);
          for (int64_t j = 0; j < len; ++j) d[j] = static_cast<acc_t>(ar[off + j]) - static_cast<acc_t>(cr[off + j]);
          for (int64_t j = len; j < kPhiloxBits; ++j) d[j] = acc_t(0);  // tail block: pad with zeros
          acc_t lsq[kLanes] = {}, lvd[kLanes] = {};
          for (int64_t j = 0; j < kPhiloxBits; j += kLanes)
            for (int k = 0; k < kLanes; ++k) {
              lsq[k] += d[j + k] * d[j + k];
              lvd[k] += sg[j + k] * d[j + k];
            }
          acc_t bsq = 0, bvd = 0;
          for (int k = 0; k < kLanes; ++k) {
            bsq += lsq[k];
            bvd += lvd[k];
          }
          row_sq += static_cast<double>(bsq);
          row_vd += static_cast<double>(bvd);
        }
        sq_p[r] = row_sq;
        vd_p[r] = row_vd;
      }
    });
  });
  return {sq, vd};
}

}  // namespace

TORCH_LIBRARY_IMPL(memcore, CPU, m) {
  MEMCORE_IMPL(m, rademacher, rademacher_cpu);
  MEMCORE_IMPL(m, rademacher_perturb, rademacher_perturb_cpu);
  MEMCORE_IMPL(m, probe_reduce, probe_reduce_cpu);
}

at::Tensor philox4x32_words(const at::Tensor& counter, int64_t seed) {
  check_philox(counter);
  at::Tensor out = at::empty_like(counter);
  const int64_t n = counter.size(0);
  const int64_t* c = counter.data_ptr<int64_t>();
  int64_t* o = out.data_ptr<int64_t>();
  const uint64_t key = static_cast<uint64_t>(seed);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t* ci = c + 4 * i;
    const Philox4x32 r = philox4x32_10(static_cast<uint32_t>(ci[0]), static_cast<uint32_t>(ci[1]),
                                       static_cast<uint32_t>(ci[2]), static_cast<uint32_t>(ci[3]),
                                       static_cast<uint32_t>(key), static_cast<uint32_t>(key >> 32));
    for (int k = 0; k < 4; ++k) o[4 * i + k] = static_cast<int64_t>(r.v[k]);
  }
  return out;
}

}  // namespace cpu
}  // namespace memcore
