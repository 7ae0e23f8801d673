// CUDA launchers of the fused cross-entropy + per-sample statistics ops (schemas in
// csrc/memcore.cpp, C++ types in csrc/ops.h); the kernels are in ce_kernels.cuh, their per-row
// logic in ce_row.h (host-tested by tests/test_kernel_logic.py). Registers six ops: ce_forward,
// ce_forward_reduce, ce_backward, ce_commit, ce_forward_grad_, scale_unless_one_.
//
// ce_forward: a group of TPR threads owns one row (a warp for C <= 2048, a whole block above) and
//   streams it once with 16-byte vector loads, four in flight per thread (a scalar head up to the
//   row's first 16-byte boundary and a scalar tail, so odd C such as 50257 and sliced logits
//   vectorise too), keeping per thread an online (max, sum exp) pair in log2 units and the
//   largest logit before and after the target column, taken per group of packs (the one pack
//   holding the target goes element by element); one warp-shuffle (+ shared memory across warps)
//   reduction per row. Ignored rows are never read. Writes O(N) outputs: loss, lse, row stats
//   [N, 3] (every row, zeros for ignored ones: no fill), and error bits into a 1-int status word.
// ce_forward_reduce: ce_forward, then out (the mean or sum of the O(N) losses) and count (rows not
//   ignored), 0-d tensors written on the device (no host sync) in one fixed order (cerow::
//   reduce_thread: the same bits every run, deterministic algorithms or not). Launches: a memset
//   of 16 bytes (the status word, then on the split path the 64-bit ticket of the fold), the
//   forward kernel, ce_reduce_kernel (one block of 1024 threads reading loss and targets once);
//   on the split path the split forward and the finish kernel, whose last row to finish (its
//   ticket N - 1, after every row's __threadfence) writes out and count: no third kernel. Was: a
//   memset, the forward kernel(s), then ne + sum for count and sum(double) + div + cast for out.
// ce_forward_grad_: ce_forward's kernel with a second pass over each row right after the first
//   (from L2 while the rows in flight fit there) writing the gradient of the reduced loss over the
//   logits; 1/count is read on the device. No N x C allocation, no backward pass over the logits.
//   Launches: ce_reduce_kernel for count alone (needed before the gradient), the memset, the GRAD
//   forward kernel and ce_reduce_kernel for out (split: split forward, finish with the fold writing
//   out, split gradient).
// ce_backward: same row mapping; writes (exp(z - lse) - onehot) * g with vector stores. Memory
//   traffic of forward + backward: two reads and one write of the logits, nothing else O(N*C).
// scale_unless_one_: grad *= scale, grid-stride, every thread returning at once when scale == 1
//   (decided on the device: no host sync, no pass over grad for a plain loss.backward()).
// Few wide rows (cerow::split_slices: N < SMs, rows of 32 KiB or more, element-aligned logits):
//   ce_forward / ce_forward_grad_ / ce_backward split each row into S column slices of whole
//   16-byte packs (N * S ~ 2 x SMs, slices >= 16 KiB, S <= 32), one 256-thread block each:
//   ce_split_forward_kernel stores each slice's (max, sum, before, after) in a workspace of
//   N * S * 4 opmath values (+ N saved target logits for ce_forward_grad_: 4.4 KB for
//   16 x 256000), ce_split_finish_kernel (a warp per row) merges them and writes what
//   ce_forward_kernel writes; the gradient (ce_backward, or ce_forward_grad_ over the logits after
//   the finish) is ce_split_grad_kernel over the same N * S blocks. Other shapes: unchanged.
// ce_commit: one thread per row; rows of a warp that share a sample index are summed first
//   (segmented warp reduction), then six float64 atomicAdds per run into stats[index]; skipped by
//   every thread when status != 0 so a rejected batch changes nothing; under
//   torch.use_deterministic_algorithms the ATen form in csrc/commit_deterministic.cpp.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "../checks.h"
#include "../commit_deterministic.h"
#include "../common.h"
#include "../ops.h"
#include "ce_kernels.cuh"
#include "cuda_helpers.h"

namespace memcore {
namespace cuda {
namespace {

template <int V>
using Int = std::integral_constant<int, V>;

// Calls f(Int<TPR>, Int<VEC>) for the launch shape that fits C; vec: 16-byte packs may be used
// (each row then has a scalar head and tail around its aligned body).
template <typename scalar_t, typename F>
void dispatch_shape(int64_t C, bool vec, F&& f) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  auto by_tpr = [&](auto tpr) {
    if (vec) f(tpr, Int<kVec>{});
    else f(tpr, Int<1>{});
  };
  if (C <= 2048) by_tpr(Int<32>{});
  else if (C <= 16384) by_tpr(Int<256>{});
  else by_tpr(Int<512>{});
}

template <typename scalar_t>
bool element_aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % sizeof(scalar_t) == 0; }

// Grid size for <<<>>>, which takes an unsigned int: a clear error instead of a silent wrap.
int64_t grid_size(int64_t blocks, const char* op) {
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), op, ": batch too large for one launch (",
              blocks, " blocks); split it");
  return blocks;
}

// Slices per row of the split launch on the current device (1: a block or warp per row).
int split_slices(int64_t N, int64_t C, int64_t elem_size) {
  return cerow::split_slices(N, C, elem_size, at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
}

// ce_forward's launch; with grad (GRAD kernels) also the gradient over grad (== logits' data).
// With out (ce_forward_reduce, ce_forward_grad_): also the reduction, out = the mean (mean) or sum
// of the losses and, unless count_out is null, count_out = the rows not ignored, both 0-d tensors
// written on the device: by ce_reduce_kernel after the forward kernel, or on the split path by the
// finish kernel's last row (fold_last_row; its ticket follows the status word in the one zero fill).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_launch(
    const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& index, int64_t num_samples,
    int64_t ignore_index, const char* op, at::Tensor* grad = nullptr, const at::Tensor* count = nullptr,
    bool mean = false, at::Tensor* out = nullptr, at::Tensor* count_out = nullptr) {
  check_rows(logits, targets, op);
  check_vector(index, logits, at::kLong, "index", op);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t N = logits.size(0), C = logits.size(1);
  const auto acc = logits.options().dtype(opmath_dtype(logits));
  // the kernel writes every row (zeros for ignored rows): no fill but the status word's
  at::Tensor loss = at::empty({N}, acc), lse = at::empty({N}, acc);
  at::Tensor row_stats = at::empty({N, kNumRowStats}, acc);
  // int32 words: [status] for ce_forward; [status, pad, ticket (uint64, 8-byte aligned)] with out
  at::Tensor words = at::zeros({out ? 4 : 1}, logits.options().dtype(at::kInt));
  at::Tensor status = words.narrow(0, 0, 1);
  if (out) *out = at::empty({}, acc);
  // C == 0 still launches: every non-ignored row is a bad target, as on the CPU
  if (N == 0) {
    if (out) {  // the sum of no rows is 0, their mean 0 / 0 = NaN (the CPU op's values)
      out->fill_(mean ? std::numeric_limits<double>::quiet_NaN() : 0.0);
      if (count_out) count_out->zero_();
    }
    return {loss, lse, row_stats, status};
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool aligned = reinterpret_cast<uintptr_t>(logits.data_ptr()) % logits.element_size() == 0;
  const int S = aligned ? split_slices(N, C, logits.element_size()) : 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "ce_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (S > 1) {  // few wide rows: each over S blocks
      constexpr int TPR = cerow::kSplitThreads;
      // the parts [N, S, 4], then (overwrite mode) the target logits [N], saved before the overwrite
      at::Tensor ws = at::empty({N * S * cerow::kPartWords + (grad ? N : 0)}, acc);
      acc_t* parts = ws.data_ptr<acc_t>();
      acc_t* zt = grad ? parts + N * S * cerow::kPartWords : nullptr;
      ce_split_forward_kernel<scalar_t, TPR><<<N * S, TPR, 0, stream>>>(
          logits.data_ptr<scalar_t>(), targets.data_ptr<int64_t>(), parts, C, S, ignore_index);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      Fold<acc_t> fold = {nullptr, nullptr, nullptr, mean};
      if (out) {
        fold.ticket = reinterpret_cast<unsigned long long*>(words.data_ptr<int>() + 2);
        fold.out = out->data_ptr<acc_t>();
        fold.count = count_out ? count_out->data_ptr<int64_t>() : nullptr;
      }
      ce_split_finish_kernel<scalar_t><<<(N + 7) / 8, 256, 0, stream>>>(
          logits.data_ptr<scalar_t>(), targets.data_ptr<int64_t>(), index.data_ptr<int64_t>(), parts, zt,
          loss.data_ptr<acc_t>(), lse.data_ptr<acc_t>(), row_stats.data_ptr<acc_t>(), status.data_ptr<int>(), N, C,
          S, num_samples, ignore_index, fold);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (grad) {
        ce_split_grad_kernel<scalar_t, TPR><<<N * S, TPR, 0, stream>>>(
            logits.data_ptr<scalar_t>(), grad->data_ptr<scalar_t>(), targets.data_ptr<int64_t>(),
            lse.data_ptr<acc_t>(), nullptr, count->data_ptr<int64_t>(), mean, zt, C, S, ignore_index);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      return;
    }
    dispatch_shape<scalar_t>(C, aligned, [&](auto tpr, auto vec) {
      constexpr int TPR = decltype(tpr)::value, VEC = decltype(vec)::value;
      using Map = RowMap<TPR>;
      const int64_t blocks = grid_size((N + Map::kRowsPerBlock - 1) / Map::kRowsPerBlock, op);
      auto launch = [&](auto kernel, scalar_t* g, const int64_t* cnt) {
        kernel<<<blocks, Map::kThreads, 0, stream>>>(
            logits.data_ptr<scalar_t>(), targets.data_ptr<int64_t>(), index.data_ptr<int64_t>(),
            loss.data_ptr<acc_t>(), lse.data_ptr<acc_t>(), row_stats.data_ptr<acc_t>(),
            status.data_ptr<int>(), N, C, num_samples, ignore_index, g, cnt, mean);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (grad) launch(ce_forward_kernel<scalar_t, TPR, VEC, true>, grad->data_ptr<scalar_t>(), count->data_ptr<int64_t>());
      else launch(ce_forward_kernel<scalar_t, TPR, VEC, false>, nullptr, nullptr);
    });
    if (out) {
      ce_reduce_kernel<acc_t><<<1, cerow::kReduceThreads, 0, stream>>>(
          loss.data_ptr<acc_t>(), targets.data_ptr<int64_t>(), N, ignore_index, out->data_ptr<acc_t>(),
          count_out ? count_out->data_ptr<int64_t>() : nullptr, mean);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {loss, lse, row_stats, status};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ce_forward_cuda(
    const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& index,
    int64_t num_samples, int64_t ignore_index) {
  return forward_launch(logits, targets, index, num_samples, ignore_index, "memcore::ce_forward");
}

// Launches: the status memset, the forward kernel, ce_reduce_kernel (out and count, fixed order:
// the same bits every run); on the split path the finish kernel writes them (no third kernel).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ce_forward_reduce_cuda(
    const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& index, int64_t num_samples,
    int64_t ignore_index, int64_t reduction) {
  const char* op = "memcore::ce_forward_reduce";
  check_reduction(reduction, /*allow_none=*/false, op);
  at::Tensor out, count = at::empty({}, targets.options());
  auto [loss, lse, row_stats, status] = forward_launch(logits, targets, index, num_samples, ignore_index, op,
                                                       nullptr, nullptr, reduction == kMean, &out, &count);
  return {out, count, loss, lse, row_stats, status};
}

// ce_forward_reduce whose forward kernel also writes d(out)/d(logits) over the logits (no N x C
// buffer, no backward pass over them). count is computed first, on the device, for the mean's
// 1/count: one ce_reduce_kernel launch (count only), then the status memset, the GRAD forward
// kernel and ce_reduce_kernel for out (split path: the split forward, the finish kernel writing
// out, the split gradient kernel).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ce_forward_grad_cuda(
    at::Tensor& logits, const at::Tensor& targets, const at::Tensor& index, int64_t num_samples,
    int64_t ignore_index, int64_t reduction) {
  const char* op = "memcore::ce_forward_grad_";
  check_forward_grad(logits, reduction);
  check_rows(logits, targets, op);  // before the count kernel reads targets
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor count = at::empty({}, targets.options());
  ce_reduce_kernel<float><<<1, cerow::kReduceThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      nullptr, targets.data_ptr<int64_t>(), targets.size(0), ignore_index, nullptr, count.data_ptr<int64_t>(), false);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor out;
  auto [loss, lse, row_stats, status] = forward_launch(logits, targets, index, num_samples, ignore_index, op,
                                                       &logits, &count, reduction == kMean, &out, nullptr);
  return {out, count, loss, lse, row_stats, status};
}

void scale_unless_one_cuda(at::Tensor& grad, const at::Tensor& scale) {
  check_scale_unless_one(grad, scale);
  const c10::cuda::CUDAGuard guard(grad.device());
  const int64_t n = grad.numel();
  if (n == 0) return;
  const at::Tensor s = scale.to(opmath_dtype(grad)).contiguous();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  constexpr int kThreads = 256;
  const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, 65535);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "scale_unless_one_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scale_unless_one_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(grad.data_ptr<scalar_t>(), s.data_ptr<acc_t>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor ce_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& logits,
                            const at::Tensor& targets, const at::Tensor& lse, int64_t ignore_index) {
  check_rows(logits, targets, "memcore::ce_backward");
  check_vector(lse, logits, opmath_dtype(logits), "lse", "memcore::ce_backward");
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor g = grad_loss.to(opmath_dtype(logits)).contiguous();
  check_vector(g, logits, opmath_dtype(logits), "grad_loss", "memcore::ce_backward");
  const int64_t N = logits.size(0), C = logits.size(1);
  // the gradient at the logits' offset from a 16-byte boundary, so both rows take 16-byte packs
  // even for logits that start mid-pack (a view at an odd offset); a fresh tensor is aligned
  const int64_t esize = logits.element_size();
  const auto lp = reinterpret_cast<uintptr_t>(logits.data_ptr());
  const int64_t shift = lp % esize == 0 ? static_cast<int64_t>(lp % 16) / esize : 0;
  at::Tensor grad = shift == 0 ? at::empty_like(logits)
                               : at::empty({N * C + 16 / esize}, logits.options()).narrow(0, shift, N * C).view({N, C});
  if (N == 0 || C == 0) return grad;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "ce_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // packs need logits and grad rows at the same offset from a 16-byte boundary (see above)
    const auto gp = reinterpret_cast<uintptr_t>(grad.data_ptr());
    const bool vec = element_aligned<scalar_t>(logits.data_ptr()) && element_aligned<scalar_t>(grad.data_ptr()) &&
                     (lp - gp) % 16 == 0;
    if (const int S = vec ? split_slices(N, C, esize) : 1; S > 1) {  // few wide rows: each over S blocks
      constexpr int TPR = cerow::kSplitThreads;
      ce_split_grad_kernel<scalar_t, TPR><<<N * S, TPR, 0, stream>>>(
          logits.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(), targets.data_ptr<int64_t>(), lse.data_ptr<acc_t>(),
          g.data_ptr<acc_t>(), nullptr, false, nullptr, C, S, ignore_index);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    dispatch_shape<scalar_t>(C, vec, [&](auto tpr, auto vec) {
      constexpr int TPR = decltype(tpr)::value, VEC = decltype(vec)::value;
      using Map = RowMap<TPR>;
      const int64_t blocks = grid_size((N + Map::kRowsPerBlock - 1) / Map::kRowsPerBlock, "memcore::ce_backward");
      ce_backward_kernel<scalar_t, TPR, VEC><<<blocks, Map::kThreads, 0, stream>>>(
          g.data_ptr<acc_t>(), logits.data_ptr<scalar_t>(), targets.data_ptr<int64_t>(),
          lse.data_ptr<acc_t>(), grad.data_ptr<scalar_t>(), N, C, ignore_index);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return grad;
}

void ce_commit_cuda(at::Tensor& stats, const at::Tensor& index, const at::Tensor& targets,
                    const at::Tensor& loss, const at::Tensor& row_stats, const at::Tensor& status,
                    int64_t ignore_index) {
  check_commit(stats, index, targets, loss, row_stats, status);
  const c10::cuda::CUDAGuard guard(stats.device());
  const int64_t N = loss.size(0);
  if (N == 0) return;
  if (at::globalContext().deterministicAlgorithms()) {  // the atomics' order varies run to run
    ce_commit_deterministic(stats, index, targets, loss, row_stats, status, ignore_index);
    return;
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  constexpr int kThreads = 256;
  const int64_t blocks = grid_size((N + kThreads - 1) / kThreads, "memcore::ce_commit");
  AT_DISPATCH_FLOATING_TYPES(loss.scalar_type(), "ce_commit_cuda", [&] {
    ce_commit_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        stats.data_ptr<double>(), index.data_ptr<int64_t>(), targets.data_ptr<int64_t>(),
        loss.data_ptr<scalar_t>(), row_stats.data_ptr<scalar_t>(), status.data_ptr<int>(), N,
        stats.size(0), ignore_index);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(memcore, CUDA, m) {
  MEMCORE_IMPL(m, ce_forward, ce_forward_cuda);
  MEMCORE_IMPL(m, ce_forward_reduce, ce_forward_reduce_cuda);
  MEMCORE_IMPL(m, ce_backward, ce_backward_cuda);
  MEMCORE_IMPL(m, ce_commit, ce_commit_cuda);
  MEMCORE_IMPL(m, ce_forward_grad_, ce_forward_grad_cuda);
  MEMCORE_IMPL(m, scale_unless_one_, scale_unless_one_cuda);
}

}  // namespace cuda
}  // namespace memcore
