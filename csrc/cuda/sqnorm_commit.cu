// CUDA kernel of memcore::sqnorm_commit, the one op registered here (schema in csrc/memcore.cpp,
// C++ type in csrc/ops.h): per-sample squared L2 norms of input gradients, for the paper's learning
// time (CSL paper, Eq. 7).
//
// One block per row of grad [N, D]: 16-byte vector loads when rows are aligned, a float (double
// for float64 grads) sum of squares per thread, one block reduction, then thread 0 adds
// (scale^2 * sum, 1) into stats[index[row]] with two float64 atomicAdds. Reads grad once; nothing
// of size N*D is allocated (except under torch.use_deterministic_algorithms, which takes the ATen
// form in csrc/commit_deterministic.cpp: one grad-sized temporary).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "../checks.h"
#include "../commit_deterministic.h"
#include "../common.h"
#include "../ops.h"
#include "cuda_helpers.h"

namespace memcore {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads) sqnorm_commit_kernel(
    double* __restrict__ stats, const scalar_t* __restrict__ grad, const double* __restrict__ scale,
    const int64_t* __restrict__ index, int64_t D, int64_t num_samples) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t row = blockIdx.x;
  const double sc = scale[row];
  const int64_t ix = index[row];
  if (sc == 0.0 || ix < 0 || ix >= num_samples) return;  // uniform over the block
  const scalar_t* g = grad + row * D;
  acc_t s = 0;
  if (VEC > 1) {
    const Pack<scalar_t, VEC>* gv = reinterpret_cast<const Pack<scalar_t, VEC>*>(g);
    for (int64_t v = threadIdx.x; v < D / VEC; v += kThreads) {
      const Pack<scalar_t, VEC> p = gv[v];
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const acc_t x = static_cast<acc_t>(p.v[k]);
        s += x * x;
      }
    }
  } else {
    for (int64_t j = threadIdx.x; j < D; j += kThreads) {
      const acc_t x = static_cast<acc_t>(g[j]);
      s += x * x;
    }
  }
  s = warp_sum(s);
  __shared__ acc_t partial[kThreads / 32];
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = s;
  __syncthreads();
  if (threadIdx.x != 0) return;
  double total = 0.0;
#pragma unroll
  for (int w = 0; w < kThreads / 32; ++w) total += partial[w];
  atomicAdd(stats + ix * kNumGradStats + kGradSqSum, sc * sc * total);
  atomicAdd(stats + ix * kNumGradStats + kGradRows, 1.0);
}

void sqnorm_commit_cuda(at::Tensor& stats, const at::Tensor& grad, const at::Tensor& scale,
                        const at::Tensor& index) {
  check_sqnorm(stats, grad, scale, index);
  const c10::cuda::CUDAGuard guard(stats.device());
  const int64_t N = grad.size(0);
  if (N == 0) return;  // D == 0 still counts the rows (sum 0), as on the CPU
  TORCH_CHECK(N <= std::numeric_limits<int32_t>::max(), "memcore::sqnorm_commit: ", N,
              " rows is too many for one launch; split the batch");
  if (at::globalContext().deterministicAlgorithms()) {  // the atomics' order varies run to run
    sqnorm_commit_deterministic(stats, grad, scale, index);
    return;
  }
  const int64_t D = grad.numel() / N;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "sqnorm_commit_cuda", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool vec = reinterpret_cast<uintptr_t>(grad.data_ptr()) % 16 == 0 && D % kVec == 0;
    auto launch = [&](auto kernel) {
      kernel<<<N, kThreads, 0, stream>>>(stats.data_ptr<double>(), grad.data_ptr<scalar_t>(),
                                         scale.data_ptr<double>(), index.data_ptr<int64_t>(), D,
                                         stats.size(0));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (vec) launch(sqnorm_commit_kernel<scalar_t, kVec>);
    else launch(sqnorm_commit_kernel<scalar_t, 1>);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(memcore, CUDA, m) { MEMCORE_IMPL(m, sqnorm_commit, sqnorm_commit_cuda); }

}  // namespace cuda
}  // namespace memcore
