// CUDA kernels of the cross_entropy family's options route (schemas in csrc/memcore.cpp):
// ce_forward_options and ce_backward_options, and on them ce_forward_reduce_options (the options'
// loss) and ce_forward_grad_options_ (both kernels in turn, the backward in place over the logits). A warp (C <= 2048) or a block owns a row, as on the
// default route (csrc/cuda/cross_entropy.cu), and streams it once per pass with 16-byte loads; the
// per-row logic is cross_entropy_row.h's options section (opt_walk_row, opt_grad_row,
// opt_target_grad), replayed on the host by csrc/cross_entropy_replay.cpp. Soft-capping is a
// compile-time variant (CAP), label smoothing and class weights runtime choices uniform over the
// launch. Memory: O(N) outputs and the N x C gradient (none in place); no workspace, no host sync. Few very wide
// rows take the block-per-row launch here (the default route's split launch is not used).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "../checks.h"
#include "../common.h"
#include "../cross_entropy_options.h"
#include "../ops.h"
#include "cross_entropy_launch.h"
#include "cross_entropy_row.h"
#include "cuda_helpers.h"

namespace memcore {
namespace cuda {
namespace {

// The second __launch_bounds__ argument of both kernels, every dtype and arch: without it ptxas
// (CUDA 13) caps some instances at 40 registers and spills 12-24 B around the row loop (bf16 / fp16
// backward at 512 threads on sm_90; fp32 / fp64 with soft-capping on sm_80), as kMinBlocks says
// of the default route's fp64 kernels; with it none spills (tools/sass_report.py).
constexpr int kOptionsMinBlocks = 1;

// The capping constants of a launch: cap and cerow::cap_k_of(cap) in opmath (unused without CAP).
template <typename acc_t>
struct CapArgs {
  acc_t cap, kc;
};

// ce_forward_options: ce_forward_kernel's outputs of the capped logits, and smooth[row] (when
// smooth) = U loss - sum_j u_j (z'_j - z'_t), U = *big_u. Every output row is written (zeros for skipped rows).
template <typename scalar_t, int TPR, int VEC, bool CAP>
__global__ void __launch_bounds__(RowMap<TPR>::kThreads, kOptionsMinBlocks) ce_forward_options_kernel(
    const scalar_t* __restrict__ logits, const int64_t* __restrict__ targets, const int64_t* __restrict__ index,
    typename OpMath<scalar_t>::type* __restrict__ loss, typename OpMath<scalar_t>::type* __restrict__ lse_out,
    typename OpMath<scalar_t>::type* __restrict__ row_stats, int* __restrict__ status,
    typename OpMath<scalar_t>::type* __restrict__ smooth_out, const typename OpMath<scalar_t>::type* __restrict__ u,
    const typename OpMath<scalar_t>::type* __restrict__ big_u, int64_t N, int64_t C, int64_t num_samples,
    int64_t ignore_index, CapArgs<typename OpMath<scalar_t>::type> ca) {
  using acc_t = typename OpMath<scalar_t>::type;
  using Map = RowMap<TPR>;
  const int64_t row = Map::row();
  const int lane = Map::lane();
  if (row >= N) return;  // uniform over the row's threads
  const int64_t t = targets[row];
  acc_t* rs = row_stats + row * kNumRowStats;
  const bool smooth = smooth_out != nullptr;
  if (cerow::row_skipped(t, C, ignore_index)) {
    if (lane == 0) {
      if (const int flags = cerow::skipped_flags(t, ignore_index)) atomicOr(status, flags);
      loss[row] = lse_out[row] = acc_t(0);
      rs[kRowProb] = rs[kRowMargin] = rs[kRowCorrect] = acc_t(0);
      if (smooth) smooth_out[row] = acc_t(0);
    }
    return;
  }
  const scalar_t* z = logits + row * C;
  cerow::OptPart<acc_t> r = cerow::opt_walk_row<scalar_t, TPR, VEC, CAP>(z, C, t, lane, ca.cap, ca.kc, smooth, u);
  const Part<acc_t> p = row_merge<acc_t, TPR, cerow::kExactDiff<scalar_t>>(r.p, lane);
  const acc_t zs = smooth ? row_sum<acc_t, TPR>(r.zs, lane) : acc_t(0);
  if (lane != 0) return;
  const acc_t bu = smooth ? (u ? *big_u : static_cast<acc_t>(C)) : acc_t(0);
  const cerow::RowOut<acc_t> o = cerow::opt_finish<acc_t, CAP>(p, static_cast<acc_t>(z[t]), ca.cap, ca.kc, smooth,
                                                               zs, bu, smooth_out + row);
  if (const int flags = cerow::row_flags(index[row], num_samples, o.loss)) atomicOr(status, flags);
  loss[row] = o.loss;
  lse_out[row] = o.lse;
  rs[kRowProb] = o.prob;
  rs[kRowMargin] = o.margin;
  rs[kRowCorrect] = o.correct;
}

// ce_backward_options: grad row = (a p - b onehot - c u) (* (1 - th^2) with CAP); c null: no c term.
// grad may be the logits (ce_forward_grad_options_): no __restrict__ on them; each element is read
// and then written by one thread, and the owner of column t reads the target logit before its pass.
template <typename scalar_t, int TPR, int VEC, bool CAP>
__global__ void __launch_bounds__(RowMap<TPR>::kThreads, kOptionsMinBlocks) ce_backward_options_kernel(
    const typename OpMath<scalar_t>::type* __restrict__ a, const typename OpMath<scalar_t>::type* __restrict__ b,
    const typename OpMath<scalar_t>::type* __restrict__ c, const scalar_t* logits,
    const int64_t* __restrict__ targets, const typename OpMath<scalar_t>::type* __restrict__ lse,
    const typename OpMath<scalar_t>::type* __restrict__ u, scalar_t* grad, int64_t N, int64_t C,
    int64_t ignore_index, CapArgs<typename OpMath<scalar_t>::type> ca) {
  using acc_t = typename OpMath<scalar_t>::type;
  using Map = RowMap<TPR>;
  const int64_t row = Map::row();
  const int lane = Map::lane();
  if (row >= N) return;
  const int64_t t = targets[row];
  scalar_t* g = grad + row * C;
  if (cerow::row_skipped(t, C, ignore_index)) {  // zero gradient, logits never read
    zero_row<scalar_t, TPR>(g, C, lane);
    return;
  }
  const scalar_t* z = logits + row * C;
  const acc_t l = lse[row], ar = a[row], cr = c ? c[row] : acc_t(0);
  const cerow::Layout L = cerow::layout<VEC>(reinterpret_cast<uintptr_t>(z), sizeof(scalar_t), C, t);
  const bool own = lane == cerow::owner<TPR, VEC>(L, t);
  const acc_t zt = own ? static_cast<acc_t>(z[t]) : acc_t(0);  // before the pass may overwrite it
  const acc_t mine = cerow::opt_grad_row<scalar_t, TPR, VEC, CAP>(z, g, C, t, L, l, ar, cr, ca.cap, ca.kc, u, lane);
  const acc_t others = cerow::kTargetBySum<scalar_t> ? row_sum<acc_t, TPR>(mine, lane) : acc_t(0);
  // the owner of column t rewrites it after its own store (program order)
  if (own) {
    const acc_t ut = cr != acc_t(0) && u ? u[t] : acc_t(1);
    g[t] = static_cast<scalar_t>(cerow::opt_target_grad<scalar_t, CAP>(zt, l, others, ar, b[row], cr, ut, ca.cap, ca.kc));
  }
}

// f(std::bool_constant<CAP>) for the launch's softcap
template <typename F>
void by_cap(double softcap, F&& f) {
  if (softcap > 0.0) f(std::true_type{});
  else f(std::false_type{});
}

Tensor5 ce_forward_options_cuda(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& index,
                                int64_t num_samples, int64_t ignore_index, double softcap, double label_smoothing,
                                const std::optional<at::Tensor>& weight) {
  const char* op = "memcore::ce_forward_options";
  check_forward_options(logits, targets, index, softcap, label_smoothing, weight);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t N = logits.size(0), C = logits.size(1);
  const auto acc = logits.options().dtype(opmath_dtype(logits));
  at::Tensor loss = at::empty({N}, acc), lse = at::empty({N}, acc), row_stats = at::empty({N, kNumRowStats}, acc);
  at::Tensor status = at::zeros({1}, logits.options().dtype(at::kInt));
  const bool smooth = label_smoothing > 0.0;
  at::Tensor smooth_out = at::empty({smooth ? N : 0}, acc);
  if (N == 0) return {loss, lse, row_stats, status, smooth_out};
  // U = sum of the weights, on the device (no sync); unused without weights
  const at::Tensor big_u = smooth && weight.has_value() ? weight->sum() : at::Tensor();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool aligned = reinterpret_cast<uintptr_t>(logits.data_ptr()) % logits.element_size() == 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "ce_forward_options_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const CapArgs<acc_t> ca{static_cast<acc_t>(softcap), softcap > 0.0 ? cerow::cap_k_of<acc_t>(softcap) : acc_t(0)};
    const acc_t* u = smooth && weight.has_value() ? weight->data_ptr<acc_t>() : nullptr;
    const acc_t* bu = big_u.defined() ? big_u.data_ptr<acc_t>() : nullptr;
    by_cap(softcap, [&](auto cap) {
      dispatch_shape<scalar_t>(C, aligned, [&](auto tpr, auto vec) {
        constexpr int TPR = decltype(tpr)::value, VEC = decltype(vec)::value;
        using Map = RowMap<TPR>;
        const int64_t blocks = grid_size((N + Map::kRowsPerBlock - 1) / Map::kRowsPerBlock, op);
        ce_forward_options_kernel<scalar_t, TPR, VEC, decltype(cap)::value><<<blocks, Map::kThreads, 0, stream>>>(
            logits.data_ptr<scalar_t>(), targets.data_ptr<int64_t>(), index.data_ptr<int64_t>(),
            loss.data_ptr<acc_t>(), lse.data_ptr<acc_t>(), row_stats.data_ptr<acc_t>(), status.data_ptr<int>(),
            smooth ? smooth_out.data_ptr<acc_t>() : nullptr, u, bu, N, C, num_samples, ignore_index, ca);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return {loss, lse, row_stats, status, smooth_out};
}

// ce_backward_options_kernel over every row into out: a new tensor at the logits' 16-byte offset
// (grad_like), or the logits themselves
void backward_options_into(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, const at::Tensor& logits,
                           at::Tensor& out, const at::Tensor& targets, const at::Tensor& lse, int64_t ignore_index,
                           double softcap, const std::optional<at::Tensor>& weight) {
  const char* op = "memcore::ce_backward_options";
  const int64_t N = logits.size(0), C = logits.size(1);
  if (N == 0 || C == 0) return;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "ce_backward_options_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const bool vec = packs_fit(logits, out);
    const CapArgs<acc_t> ca{static_cast<acc_t>(softcap), softcap > 0.0 ? cerow::cap_k_of<acc_t>(softcap) : acc_t(0)};
    const acc_t* cp = c.numel() != 0 ? c.data_ptr<acc_t>() : nullptr;
    const acc_t* u = weight.has_value() ? weight->data_ptr<acc_t>() : nullptr;
    by_cap(softcap, [&](auto cap) {
      dispatch_shape<scalar_t>(C, vec, [&](auto tpr, auto v) {
        constexpr int TPR = decltype(tpr)::value, VEC = decltype(v)::value;
        using Map = RowMap<TPR>;
        const int64_t blocks = grid_size((N + Map::kRowsPerBlock - 1) / Map::kRowsPerBlock, op);
        ce_backward_options_kernel<scalar_t, TPR, VEC, decltype(cap)::value><<<blocks, Map::kThreads, 0, stream>>>(
            a.data_ptr<acc_t>(), b.data_ptr<acc_t>(), cp, logits.data_ptr<scalar_t>(), targets.data_ptr<int64_t>(),
            lse.data_ptr<acc_t>(), u, out.data_ptr<scalar_t>(), N, C, ignore_index, ca);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
}

at::Tensor ce_backward_options_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c,
                                    const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                                    int64_t ignore_index, double softcap, const std::optional<at::Tensor>& weight) {
  check_backward_options(a, b, c, logits, targets, lse, softcap, weight);
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor grad = grad_like(logits);  // at the logits' 16-byte offset, as ce_backward's
  backward_options_into(a, b, c, logits, grad, targets, lse, ignore_index, softcap, weight);
  return grad;
}

// The options' overwrite route (cross_entropy_options.h): the forward kernel, the reduced loss on
// the device (no host sync), and the backward kernel in place over the logits
Tensor6 ce_forward_grad_options_cuda(at::Tensor& logits, const at::Tensor& targets, const at::Tensor& index,
                                     int64_t num_samples, int64_t ignore_index, int64_t reduction,
                                     const std::optional<at::Tensor>& weight, double label_smoothing, double softcap,
                                     double z_loss) {
  const c10::cuda::CUDAGuard guard(logits.device());
  return forward_grad_options(logits, targets, index, num_samples, ignore_index, reduction, weight,
                              label_smoothing, softcap, z_loss, ce_forward_options_cuda, backward_options_into);
}

}  // namespace

TORCH_LIBRARY_IMPL(memcore, CUDA, m) {
  MEMCORE_IMPL(m, ce_forward_options, ce_forward_options_cuda);
  MEMCORE_IMPL(m, ce_backward_options, ce_backward_options_cuda);
  MEMCORE_IMPL(m, ce_forward_reduce_options, forward_reduce_options);  // cross_entropy_options.h
  MEMCORE_IMPL(m, ce_forward_grad_options_, ce_forward_grad_options_cuda);
}

}  // namespace cuda
}  // namespace memcore
