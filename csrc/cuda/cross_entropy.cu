// CUDA kernels of the cross-entropy family (schemas in csrc/memcore.cpp) and their launchers:
// ce_forward, ce_forward_reduce, ce_backward, ce_forward_grad_, scale_unless_one_, ce_input_sqnorm.
// A warp (C <= 2048) or a block owns a row and streams it once per pass with 16-byte loads; the
// per-row logic is cross_entropy_row.h. Few wide rows (N < SMs) take the split launch: each row
// over S blocks, their parts merged by a finish kernel. Memory: O(N) outputs, the N x C gradient of
// ce_backward (none for ce_forward_grad_, which writes over the logits), and on the split path a
// workspace of N x S x 4 opmath values; no host sync. Launch shapes, passes and orders:
// docs/kernels.md.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "../checks.h"
#include "../common.h"
#include "../ops.h"
#include "cross_entropy_launch.h"
#include "cross_entropy_row.h"
#include "cuda_helpers.h"

namespace memcore {
namespace cuda {
namespace {

using cerow::OpMath;
using cerow::Part;

// ---- ce_forward_reduce's fixed-order reduction (cerow::reduce_thread / reduce_add)

// The tree's last five steps over one warp: lane i adds lane i + off (off = 16..1), as the host
// replay's s[i] += s[i + stride]; lane 0 ends with the warp's total. Lanes >= off get their own
// value back from shfl_down past the warp and end with values nobody reads.
__device__ __forceinline__ cerow::Total warp_total(cerow::Total r) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    cerow::Total o;
    o.sum = __shfl_down_sync(0xffffffffu, r.sum, off);
    o.count = __shfl_down_sync(0xffffffffu, r.count, off);
    r = cerow::reduce_add(r, o);
  }
  return r;
}

// ce_reduce_kernel (one block of cerow::kReduceThreads, launched after the forward kernel): out =
// the mean (sum) of the N losses and count = the rows whose target is not ignore_index, both
// written on the device. loss null: the count only (ce_forward_grad_'s, needed before its
// kernel for 1/count); out or count null: not written.
template <typename acc_t>
__global__ void __launch_bounds__(cerow::kReduceThreads) ce_reduce_kernel(
    const acc_t* __restrict__ loss, const int64_t* __restrict__ targets, int64_t N, int64_t ignore_index,
    acc_t* __restrict__ out, int64_t* __restrict__ count, bool mean) {
  constexpr int T = cerow::kReduceThreads;
  __shared__ double ssum[T];
  __shared__ int64_t scnt[T];
  const int tid = threadIdx.x;
  cerow::Total r = cerow::reduce_thread(loss, targets, N, ignore_index, tid, T);
#pragma unroll
  for (int stride = T / 2; stride >= 32; stride >>= 1) {  // the tree's steps above a warp
    if (tid < 2 * stride) {
      ssum[tid] = r.sum;
      scnt[tid] = r.count;
    }
    __syncthreads();
    if (tid < stride) r = cerow::reduce_add(r, cerow::Total{ssum[tid + stride], scnt[tid + stride]});
    __syncthreads();
  }
  if (tid >= 32) return;
  r = warp_total(r);
  if (tid != 0) return;
  if (out) *out = static_cast<acc_t>(cerow::reduce_value(r, mean));
  if (count) *count = r.count;
}

// The split finish kernel's fold of the same reduction. ticket: 64-bit, zero-filled with the status
// word (one memset); null: no reduction (ce_forward). out / count as ce_reduce_kernel's.
template <typename acc_t>
struct Fold {
  unsigned long long* ticket;
  acc_t* out;
  int64_t* count;
  bool mean;
};

// Called by the whole warp of a row after its lane 0 wrote loss[row]: lane 0 publishes the row
// (__threadfence, then a ticket); the warp drawing ticket N - 1 finishes last, when every loss is
// in L2, and reduces them (cerow::reduce_thread over 32 threads: volatile loads of the rows, then
// warp_total). N < SMs rows here (cerow::split_slices): a few loads per lane.
template <typename acc_t>
__device__ __forceinline__ void fold_last_row(const Fold<acc_t>& f, const acc_t* loss, const int64_t* targets,
                                              int64_t N, int64_t ignore_index, int lane) {
  if (f.ticket == nullptr) return;  // uniform over the grid
  unsigned long long ticket = 0;
  if (lane == 0) {
    __threadfence();  // this row's loss (this thread's store) visible device-wide before its ticket
    ticket = atomicAdd(f.ticket, 1ull);
  }
  ticket = __shfl_sync(0xffffffffu, ticket, 0);
  // __shfl_sync moves the ticket but orders no memory; __syncwarp does: lane 0's store of loss[row],
  // its fence and its atomic come before every lane's loads below (the PTX memory model's barrier
  // among the warp's threads), not only in the compiled instruction order
  __syncwarp();
  if (ticket + 1 != static_cast<unsigned long long>(N)) return;  // uniform over the warp
  __threadfence();  // every other row fenced its loss before its ticket: read them after ours
  cerow::Total r =
      cerow::reduce_thread(static_cast<const volatile acc_t*>(loss), targets, N, ignore_index, lane, 32);
  r = warp_total(r);
  if (lane != 0) return;
  *f.out = static_cast<acc_t>(cerow::reduce_value(r, f.mean));
  if (f.count) *f.count = r.count;
}

// ce_forward: the row's statistics (cerow::walk_row per thread, merged); every output row is
// written (zeros for ignored rows and bad targets), so the outputs need no zero fill.
// GRAD (ce_forward_grad_): then a second pass over the row writes the gradient of the reduced
// loss over the logits: (softmax - onehot) / count for mean (count read on the device), or
// (softmax - onehot) for sum. It re-reads the row from L2 as long as the rows in flight fit there;
// very wide rows (256k fp32 = 1 MB each) may come from HBM again.
template <typename scalar_t, int TPR, int VEC, bool GRAD>
__global__ void __launch_bounds__(RowMap<TPR>::kThreads, kMinBlocks<scalar_t>) ce_forward_kernel(
    const scalar_t* logits, const int64_t* __restrict__ targets,
    const int64_t* __restrict__ index, typename OpMath<scalar_t>::type* __restrict__ loss,
    typename OpMath<scalar_t>::type* __restrict__ lse_out,
    typename OpMath<scalar_t>::type* __restrict__ row_stats, int* __restrict__ status, int64_t N,
    int64_t C, int64_t num_samples, int64_t ignore_index, scalar_t* grad, const int64_t* count,
    bool mean) {
  using acc_t = typename OpMath<scalar_t>::type;
  using Map = RowMap<TPR>;
  const int64_t row = Map::row();
  const int lane = Map::lane();
  if (row >= N) return;  // uniform over the row's threads
  const int64_t t = targets[row];
  acc_t* rs = row_stats + row * kNumRowStats;
  if (t == ignore_index || t < 0 || t >= C) {
    if (lane == 0) {
      if (t != ignore_index) atomicOr(status, int(kBadTarget));
      loss[row] = acc_t(0);
      lse_out[row] = acc_t(0);
      rs[kRowProb] = rs[kRowMargin] = rs[kRowCorrect] = acc_t(0);
    }
    if constexpr (GRAD) zero_row<scalar_t, TPR>(grad + row * C, C, lane);
    return;
  }
  const scalar_t* z = logits + row * C;
  // every lane reads the target logit; in GRAD its owning lane overwrites it later, after the
  // barrier before the gradient pass (each other element is read and written by one thread)
  const acc_t zt = static_cast<acc_t>(z[t]);
  Part<acc_t> p = cerow::walk_row<scalar_t, TPR, VEC>(z, C, t, lane);
  p = row_merge<acc_t, TPR, cerow::kExactDiff<scalar_t>>(p, lane);
  const cerow::RowOut<acc_t> o = cerow::finish(p, zt);
  if constexpr (GRAD) {
    // one warp per row: only shuffles lie between the reads of the row above and the overwrite
    // below, and shuffles do not order memory; __syncwarp does (wider rows passed a
    // __syncthreads). Rows return early whole, so the full mask is safe.
    if constexpr (TPR <= 32) __syncwarp();
    const acc_t w = mean ? acc_t(1) / static_cast<acc_t>(*count) : acc_t(1);
    const cerow::Layout L = cerow::layout<VEC>(reinterpret_cast<uintptr_t>(z), sizeof(scalar_t), C, t);
    scalar_t* g = grad + row * C;
    const acc_t mine = cerow::grad_row<scalar_t, TPR, VEC>(z, g, C, t, L, o.lse, w, lane);
    const acc_t others = cerow::kTargetBySum<scalar_t> ? row_sum<acc_t, TPR>(mine, lane) : acc_t(0);
    // the onehot: by the thread that wrote column t in the pass, after it (program order)
    if (lane == cerow::owner<TPR, VEC>(L, t))
      g[t] = static_cast<scalar_t>(cerow::target_grad<scalar_t>(zt, o.lse, others, w, g + t));
  }
  if (lane != 0) return;
  int flags = 0;
  const int64_t ix = index[row];
  if (ix < 0 || ix >= num_samples) flags |= kBadIndex;
  if (!isfinite(o.loss)) flags |= kNonFinite;
  if (flags) atomicOr(status, flags);
  loss[row] = o.loss;
  lse_out[row] = o.lse;
  rs[kRowProb] = o.prob;
  rs[kRowMargin] = o.margin;
  rs[kRowCorrect] = o.correct;
}

template <typename scalar_t, int TPR, int VEC>
__global__ void __launch_bounds__(RowMap<TPR>::kThreads, kMinBlocks<scalar_t>) ce_backward_kernel(
    const typename OpMath<scalar_t>::type* __restrict__ grad_loss,
    const scalar_t* __restrict__ logits, const int64_t* __restrict__ targets,
    const typename OpMath<scalar_t>::type* __restrict__ lse, scalar_t* __restrict__ grad, int64_t N,
    int64_t C, int64_t ignore_index) {
  using acc_t = typename OpMath<scalar_t>::type;
  using Map = RowMap<TPR>;
  const int64_t row = Map::row();
  const int lane = Map::lane();
  if (row >= N) return;
  const int64_t t = targets[row];
  scalar_t* g = grad + row * C;
  if (t == ignore_index || t < 0 || t >= C) {  // ignored rows: zero gradient, logits never read
    zero_row<scalar_t, TPR>(g, C, lane);
    return;
  }
  const scalar_t* z = logits + row * C;
  const acc_t l = lse[row], gl = grad_loss[row];
  const cerow::Layout L = cerow::layout<VEC>(reinterpret_cast<uintptr_t>(z), sizeof(scalar_t), C, t);
  const acc_t mine = cerow::grad_row<scalar_t, TPR, VEC>(z, g, C, t, L, l, gl, lane);
  const acc_t others = cerow::kTargetBySum<scalar_t> ? row_sum<acc_t, TPR>(mine, lane) : acc_t(0);
  if (lane == cerow::owner<TPR, VEC>(L, t))
    g[t] = static_cast<scalar_t>(cerow::target_grad<scalar_t>(static_cast<acc_t>(z[t]), l, others, gl, g + t));
}

// ---- the split launch: few rows of many classes, each row over S blocks (cerow::split_slices)
//
// ce_split_forward_kernel: block b walks slice b % S of row b / S (cerow::walk_slice: packs of the
//   slice, plus the scalar head in slice 0 and the tail in slice S - 1), merges it over the block
//   and stores the part (m, s, before, after) in the workspace [N, S, 4] of acc_t. Skipped rows
//   store nothing: the finish kernel does not read their parts.
// ce_split_finish_kernel: a warp per row, lane k loading part k; the warp butterfly merges them and
//   lane 0 writes what ce_forward_kernel writes (loss, lse, row stats, status bits; zeros for
//   skipped rows). zt_saved (the overwrite mode) gets the target logit before the gradient kernel
//   overwrites it. ce_forward_reduce / ce_forward_grad_: then fold_last_row, the warp of the last
//   row to finish writing out (and count) in cerow::reduce_thread's order.
// ce_split_grad_kernel: block b writes slice b % S of row b / S's gradient (cerow::grad_slice),
//   the slice's owner of the target column the onehot after it; zeros for skipped rows.
//   ce_backward: g = grad_loss[row], the target logit read from the logits (out != logits);
//   ce_forward_grad_: g = 1 / count (mean, read on the device) or 1, out == logits, the target
//   logit from zt_saved. fp32 logits (cerow::kTargetBySum): each block stores its slice's sum of
//   the other columns' softmax instead, and ce_split_target_kernel writes the target's gradient.
template <typename scalar_t, int TPR>
__global__ void __launch_bounds__(TPR) ce_split_forward_kernel(
    const scalar_t* __restrict__ logits, const int64_t* __restrict__ targets,
    typename OpMath<scalar_t>::type* __restrict__ parts, int64_t C, int S, int64_t ignore_index) {
  using acc_t = typename OpMath<scalar_t>::type;
  constexpr int V = cerow::kVec<scalar_t>;
  const int64_t row = blockIdx.x / S;
  const int k = blockIdx.x % S;
  const int lane = threadIdx.x;
  const int64_t t = targets[row];
  if (cerow::row_skipped(t, C, ignore_index)) return;  // uniform over the block
  const scalar_t* z = logits + row * C;
  const cerow::Layout L = cerow::layout<V>(reinterpret_cast<uintptr_t>(z), sizeof(scalar_t), C, t);
  Part<acc_t> p = cerow::walk_slice<scalar_t, TPR>(z, C, t, L, cerow::slice_of(L, S, k), lane);
  p = row_merge<acc_t, TPR, cerow::kExactDiff<scalar_t>>(p, lane);
  if (lane == 0) cerow::store_part(parts + (row * S + k) * cerow::kPartWords, p);
}

template <typename scalar_t>
__global__ void __launch_bounds__(256) ce_split_finish_kernel(
    const scalar_t* __restrict__ logits, const int64_t* __restrict__ targets,
    const int64_t* __restrict__ index, const typename OpMath<scalar_t>::type* __restrict__ parts,
    typename OpMath<scalar_t>::type* __restrict__ zt_saved, typename OpMath<scalar_t>::type* __restrict__ loss,
    typename OpMath<scalar_t>::type* __restrict__ lse_out,
    typename OpMath<scalar_t>::type* __restrict__ row_stats, int* __restrict__ status, int64_t N, int64_t C,
    int S, int64_t num_samples, int64_t ignore_index, Fold<typename OpMath<scalar_t>::type> fold) {
  using acc_t = typename OpMath<scalar_t>::type;
  const int64_t row = int64_t(blockIdx.x) * 8 + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= N) return;  // uniform over the warp
  const int64_t t = targets[row];
  acc_t* rs = row_stats + row * kNumRowStats;
  if (cerow::row_skipped(t, C, ignore_index)) {
    if (lane == 0) {
      if (const int flags = cerow::skipped_flags(t, ignore_index)) atomicOr(status, flags);
      loss[row] = acc_t(0);
      lse_out[row] = acc_t(0);
      rs[kRowProb] = rs[kRowMargin] = rs[kRowCorrect] = acc_t(0);
    }
  } else {
    const Part<acc_t> p =
        warp_merge<acc_t, cerow::kExactDiff<scalar_t>>(cerow::load_part(parts + row * S * cerow::kPartWords, S, lane));
    if (lane == 0) {
      const acc_t zt = static_cast<acc_t>(logits[row * C + t]);
      if (zt_saved) zt_saved[row] = zt;
      const cerow::RowOut<acc_t> o = cerow::finish(p, zt);
      if (const int flags = cerow::row_flags(index[row], num_samples, o.loss)) atomicOr(status, flags);
      loss[row] = o.loss;
      lse_out[row] = o.lse;
      rs[kRowProb] = o.prob;
      rs[kRowMargin] = o.margin;
      rs[kRowCorrect] = o.correct;
    }
  }
  // the whole warp (rows return above only whole), after lane 0 wrote loss[row]
  fold_last_row(fold, loss, targets, N, ignore_index, lane);
}

// The weight of a row's gradient on the split path: grad_loss[row] (ce_backward), else 1 / count
// (mean, count read on the device) or 1 (ce_forward_grad_).
template <typename acc_t>
__device__ __forceinline__ acc_t split_weight(const acc_t* grad_loss, const int64_t* count, bool mean, int64_t row) {
  return grad_loss ? grad_loss[row] : mean ? acc_t(1) / static_cast<acc_t>(*count) : acc_t(1);
}

// logits and grad alias in the overwrite mode: no __restrict__ on them. Each element is read and
// then written by one thread; the target column, written twice, by one thread (its owner).
// others (cerow::kTargetBySum logits): [N, S], the slices' sums of the gradient pass, for
// ce_split_target_kernel; the owner then leaves the target column to that kernel.
template <typename scalar_t, int TPR>
__global__ void __launch_bounds__(TPR, kMinBlocks<scalar_t>) ce_split_grad_kernel(
    const scalar_t* logits, scalar_t* grad, const int64_t* __restrict__ targets,
    const typename OpMath<scalar_t>::type* __restrict__ lse, const typename OpMath<scalar_t>::type* __restrict__ grad_loss,
    const int64_t* __restrict__ count, bool mean, const typename OpMath<scalar_t>::type* __restrict__ zt_saved,
    typename OpMath<scalar_t>::type* __restrict__ others, int64_t C, int S, int64_t ignore_index) {
  using acc_t = typename OpMath<scalar_t>::type;
  constexpr int V = cerow::kVec<scalar_t>;
  const int64_t row = blockIdx.x / S;
  const int k = blockIdx.x % S;
  const int lane = threadIdx.x;
  const int64_t t = targets[row];
  const scalar_t* z = logits + row * C;
  scalar_t* g = grad + row * C;
  const cerow::Layout L = cerow::layout<V>(reinterpret_cast<uintptr_t>(z), sizeof(scalar_t), C, t);
  const cerow::Slice sl = cerow::slice_of(L, S, k);
  if (cerow::row_skipped(t, C, ignore_index)) {  // zeros, the logits never read (uniform over the block)
    const int64_t end = cerow::slice_end<V>(L, sl, C);
    for (int64_t j = cerow::slice_begin<V>(L, sl) + lane; j < end; j += TPR) g[j] = scalar_t(0);
    return;
  }
  const acc_t l = lse[row];
  const acc_t w = split_weight(grad_loss, count, mean, row);
  const int own = cerow::slice_owner<TPR, V>(L, sl, t);
  // the owner reads the target logit before its pass writes column t
  const acc_t zt = lane != own ? acc_t(0) : zt_saved ? zt_saved[row] : static_cast<acc_t>(z[t]);
  const acc_t mine = cerow::grad_slice<scalar_t, TPR>(z, g, C, t, L, sl, l, w, lane);
  if constexpr (cerow::kTargetBySum<scalar_t>) {
    const acc_t slice = row_sum<acc_t, TPR>(mine, lane);
    if (lane == 0) others[row * S + k] = slice;
  } else if (lane == own) {
    g[t] = static_cast<scalar_t>(cerow::target_grad<scalar_t>(zt, l, acc_t(0), w, g + t));
  }
}

// The target's gradient of cerow::kTargetBySum logits on the split path, after ce_split_grad_kernel:
// a warp per row adds the S slices' sums (lane k holds slice k's; warp_sum's butterfly, the order
// the host replays) and lane 0 writes column t, which the gradient kernel wrote only in its pass
// (p_t * w: what target_grad reads back where the others' total is 1/2 or more).
template <typename scalar_t>
__global__ void __launch_bounds__(256) ce_split_target_kernel(
    scalar_t* __restrict__ grad, const int64_t* __restrict__ targets,
    const typename OpMath<scalar_t>::type* __restrict__ others,
    const typename OpMath<scalar_t>::type* __restrict__ grad_loss, const int64_t* __restrict__ count, bool mean,
    int64_t N, int64_t C, int S, int64_t ignore_index) {
  using acc_t = typename OpMath<scalar_t>::type;
  const int64_t row = int64_t(blockIdx.x) * 8 + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= N) return;  // uniform over the warp
  const int64_t t = targets[row];
  if (cerow::row_skipped(t, C, ignore_index)) return;
  const acc_t total = warp_sum(lane < S ? others[row * S + lane] : acc_t(0));
  if (lane != 0) return;
  const acc_t w = split_weight(grad_loss, count, mean, row);
  grad[row * C + t] = static_cast<scalar_t>(cerow::target_grad<scalar_t>(acc_t(0), acc_t(0), total, w, grad + row * C + t));
}

// x *= s unless s == 1, the test made on the device (no host sync): the backward of
// ce_forward_grad_, whose gradient already holds the factor 1; loss scaling and accumulation
// divisors cost one pass, the plain loss.backward() none.
template <typename scalar_t>
__global__ void scale_unless_one_kernel(scalar_t* __restrict__ x,
                                        const typename OpMath<scalar_t>::type* __restrict__ s, int64_t n) {
  using acc_t = typename OpMath<scalar_t>::type;
  const acc_t f = *s;
  if (f == acc_t(1)) return;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    x[i] = static_cast<scalar_t>(static_cast<acc_t>(x[i]) * f);
}

// ce_input_sqnorm: a block per row of grad [N, D], 16-byte loads when the rows are aligned, a
// sum of squares per thread in opmath, one block reduction in double; out[row] = scale^2 * sum,
// 0 without reading the row where scale == 0.
constexpr int kSqnormThreads = 256;

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kSqnormThreads) ce_input_sqnorm_kernel(
    const scalar_t* __restrict__ grad, const double* __restrict__ scale, double* __restrict__ out, int64_t D) {
  using acc_t = typename OpMath<scalar_t>::type;
  const int64_t row = blockIdx.x;
  const double sc = scale[row];
  if (sc == 0.0) {  // uniform over the block
    if (threadIdx.x == 0) out[row] = 0.0;
    return;
  }
  const scalar_t* g = grad + row * D;
  acc_t s = 0;
  if constexpr (VEC > 1) {
    const Pack<scalar_t, VEC>* gv = reinterpret_cast<const Pack<scalar_t, VEC>*>(g);
    for (int64_t v = threadIdx.x; v < D / VEC; v += kSqnormThreads) {
      const Pack<scalar_t, VEC> p = gv[v];
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const acc_t x = static_cast<acc_t>(p.v[k]);
        s += x * x;
      }
    }
  } else {
    for (int64_t j = threadIdx.x; j < D; j += kSqnormThreads) {
      const acc_t x = static_cast<acc_t>(g[j]);
      s += x * x;
    }
  }
  s = warp_sum(s);
  __shared__ acc_t partial[kSqnormThreads / 32];
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = s;
  __syncthreads();
  if (threadIdx.x != 0) return;
  double total = 0.0;
#pragma unroll
  for (int w = 0; w < kSqnormThreads / 32; ++w) total += partial[w];
  out[row] = sc * sc * total;
}

// ---- launchers

// Slices per row of the split launch on the current device (1: a block or warp per row).
int split_slices(int64_t N, int64_t C, int64_t elem_size) {
  return cerow::split_slices(N, C, elem_size, at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
}

// The split gradient of rows [N = targets.size(0), C] over S slices: ce_split_grad_kernel, and for
// cerow::kTargetBySum logits ce_split_target_kernel after it, with an [N, S] workspace for the
// slices' sums. grad_loss (ce_backward) or count / mean (ce_forward_grad_) give each row's weight
// (split_weight); zt: the target logits the finish kernel saved (overwrite mode), else null.
template <typename scalar_t>
void split_grad_launch(const scalar_t* logits, scalar_t* grad, const at::Tensor& targets, const at::Tensor& lse,
                       const at::opmath_type<scalar_t>* grad_loss, const int64_t* count, bool mean,
                       const at::opmath_type<scalar_t>* zt, int64_t C, int S, int64_t ignore_index,
                       cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int TPR = cerow::kSplitThreads;
  const int64_t N = targets.size(0);
  at::Tensor others;
  if constexpr (cerow::kTargetBySum<scalar_t>) others = at::empty({N * S}, lse.options());
  acc_t* op = others.defined() ? others.data_ptr<acc_t>() : nullptr;
  ce_split_grad_kernel<scalar_t, TPR><<<N * S, TPR, 0, stream>>>(logits, grad, targets.data_ptr<int64_t>(),
                                                                 lse.data_ptr<acc_t>(), grad_loss, count, mean, zt,
                                                                 op, C, S, ignore_index);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if constexpr (cerow::kTargetBySum<scalar_t>) {
    ce_split_target_kernel<scalar_t><<<(N + 7) / 8, 256, 0, stream>>>(
        grad, targets.data_ptr<int64_t>(), op, grad_loss, count, mean, N, C, S, ignore_index);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
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
      if (grad)
        split_grad_launch<scalar_t>(logits.data_ptr<scalar_t>(), grad->data_ptr<scalar_t>(), targets, lse, nullptr,
                                    count->data_ptr<int64_t>(), mean, zt, C, S, ignore_index, stream);
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
  const int64_t N = logits.size(0), C = logits.size(1), esize = logits.element_size();
  at::Tensor grad = grad_like(logits);
  if (N == 0 || C == 0) return grad;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "ce_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const bool vec = packs_fit(logits, grad);
    if (const int S = vec ? split_slices(N, C, esize) : 1; S > 1) {  // few wide rows: each over S blocks
      split_grad_launch<scalar_t>(logits.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(), targets, lse,
                                  g.data_ptr<acc_t>(), nullptr, false, nullptr, C, S, ignore_index, stream);
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

at::Tensor ce_input_sqnorm_cuda(const at::Tensor& grad, const at::Tensor& scale) {
  check_input_sqnorm(grad, scale);
  const c10::cuda::CUDAGuard guard(grad.device());
  const int64_t N = grad.size(0);
  at::Tensor out = at::empty({N}, scale.options());
  if (N == 0) return out;
  const int64_t blocks = grid_size(N, "memcore::ce_input_sqnorm");
  const int64_t D = grad.numel() / N;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "ce_input_sqnorm_cuda", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool vec = reinterpret_cast<uintptr_t>(grad.data_ptr()) % 16 == 0 && D % kVec == 0;
    auto launch = [&](auto kernel) {
      kernel<<<blocks, kSqnormThreads, 0, stream>>>(grad.data_ptr<scalar_t>(), scale.data_ptr<double>(),
                                                    out.data_ptr<double>(), D);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (vec) launch(ce_input_sqnorm_kernel<scalar_t, kVec>);
    else launch(ce_input_sqnorm_kernel<scalar_t, 1>);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(memcore, CUDA, m) {
  MEMCORE_IMPL(m, ce_forward, ce_forward_cuda);
  MEMCORE_IMPL(m, ce_forward_reduce, ce_forward_reduce_cuda);
  MEMCORE_IMPL(m, ce_backward, ce_backward_cuda);
  MEMCORE_IMPL(m, ce_forward_grad_, ce_forward_grad_cuda);
  MEMCORE_IMPL(m, scale_unless_one_, scale_unless_one_cuda);
  MEMCORE_IMPL(m, ce_input_sqnorm, ce_input_sqnorm_cuda);
}

}  // namespace cuda
}  // namespace memcore
