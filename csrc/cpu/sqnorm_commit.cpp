// CPU kernel of memcore::sqnorm_commit, the one op registered here (schema in csrc/memcore.cpp, C++
// type in csrc/ops.h): per-sample squared L2 norms of input gradients, for the paper's learning
// time (CSL paper, Eq. 7).
//
// Rows of grad [N, D] are reduced across threads, each streamed once (half/bf16 widened to float
// in an L1-sized chunk); the O(N) scatter into the float64 [S, 2] buffer is serial, so repeated
// indices need no atomics. Nothing of size N*D is allocated.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "../checks.h"
#include "../common.h"
#include "../ops.h"
#include "vec_math.h"
#include "widen.h"

namespace memcore {
namespace cpu {
namespace {

constexpr int64_t kChunk = 1024;

template <typename scalar_t>
double row_sumsq(const scalar_t* g, int64_t d, float* buf) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    double s = 0.0;
    for (int64_t j = 0; j < d; ++j) s += g[j] * g[j];
    return s;
  } else {
    double s = 0.0;  // float within a chunk, double across chunks
    for (int64_t off = 0; off < d; off += kChunk) {
      const int64_t len = std::min(kChunk, d - off);
      if constexpr (std::is_same_v<scalar_t, float>) {
        s += sumsq_f32(g + off, len);
      } else {
        widen(g + off, buf, len);
        s += sumsq_f32(buf, len);
      }
    }
    return s;
  }
}

void sqnorm_commit_cpu(at::Tensor& stats, const at::Tensor& grad, const at::Tensor& scale,
                       const at::Tensor& index) {
  check_sqnorm(stats, grad, scale, index);
  const int64_t N = grad.size(0), S = stats.size(0);
  const int64_t D = N == 0 ? 0 : grad.numel() / N;
  const double* sc = scale.data_ptr<double>();
  const int64_t* ix = index.data_ptr<int64_t>();
  for (int64_t i = 0; i < N; ++i)  // checked before any write: a rejected call changes nothing
    TORCH_CHECK(sc[i] == 0.0 || (ix[i] >= 0 && ix[i] < S), "memcore::sqnorm_commit: index[", i,
                "]=", ix[i], " outside [0, ", S, ")");
  std::vector<double> sq(N, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "sqnorm_commit_cpu", [&] {
    const scalar_t* g = grad.data_ptr<scalar_t>();
    at::parallel_for(0, N, std::max<int64_t>(1, 32768 / std::max<int64_t>(D, 1)), [&](int64_t b, int64_t e) {
      std::vector<float> buf(kChunk);
      for (int64_t i = b; i < e; ++i)
        if (sc[i] != 0.0) sq[i] = row_sumsq(g + i * D, D, buf.data());
    });
  });
  double* st = stats.data_ptr<double>();
  for (int64_t i = 0; i < N; ++i) {
    if (sc[i] == 0.0) continue;
    st[ix[i] * kNumGradStats + kGradSqSum] += sc[i] * sc[i] * sq[i];
    st[ix[i] * kNumGradStats + kGradRows] += 1.0;
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(memcore, CPU, m) { MEMCORE_IMPL(m, sqnorm_commit, sqnorm_commit_cpu); }

}  // namespace cpu
}  // namespace memcore
