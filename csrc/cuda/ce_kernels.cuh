// Device kernels of the fused cross-entropy ops; launched by csrc/cuda/cross_entropy.cu. Apart
// from header-only c10 / ATen types (BFloat16, Half, opmath_type) they need nothing of torch, so
// they also compile alone (benchmarks/sass_report.py reads the real build; a standalone compile
// is quicker to iterate).
// The per-row logic lives in ce_row.h (host-testable); these wrap it in the launch geometry: a
// group of TPR threads per row (ce_forward_kernel, ce_backward_kernel), or for few wide rows a
// block per column slice of a row (ce_split_*_kernel, below).
#pragma once
#include <cstdint>

#include "../common.h"
#include "ce_row.h"

namespace memcore {
namespace cuda {
namespace {

using cerow::OpMath;
using cerow::Part;

// Butterfly over the warp: every lane ends with the merge of all 32, merged as merge(self, other)
// in the order the host replay (csrc/kernel_logic.cpp) follows.
template <typename acc_t>
__device__ __forceinline__ Part<acc_t> warp_merge(Part<acc_t> p) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    Part<acc_t> o;
    o.m = __shfl_xor_sync(0xffffffffu, p.m, off);
    o.s = __shfl_xor_sync(0xffffffffu, p.s, off);
    o.before = __shfl_xor_sync(0xffffffffu, p.before, off);
    o.after = __shfl_xor_sync(0xffffffffu, p.after, off);
    o.shift = 0;  // merge() recomputes it from the merged max
    p = cerow::merge(p, o);
  }
  return p;
}

// The row's merged state in every one of its TPR threads (warp butterfly; across warps through
// shared memory, each warp merging the per-warp states in the same order).
template <typename acc_t, int TPR>
__device__ __forceinline__ Part<acc_t> row_merge(Part<acc_t> p, int lane) {
  p = warp_merge(p);
  if constexpr (TPR > 32) {
    constexpr int kWarps = TPR / 32;
    __shared__ acc_t sm[kWarps], ss[kWarps], sb[kWarps], sa[kWarps];
    const int warp = lane / 32;
    if (lane % 32 == 0) {
      sm[warp] = p.m; ss[warp] = p.s; sb[warp] = p.before; sa[warp] = p.after;
    }
    __syncthreads();
    const int wl = lane % 32;
    p = cerow::part_init<acc_t>();
    if (wl < kWarps) {
      p.m = sm[wl]; p.s = ss[wl]; p.before = sb[wl]; p.after = sa[wl];
    }
    p = warp_merge(p);
  }
  return p;
}

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
  if (ticket + 1 != static_cast<unsigned long long>(N)) return;  // uniform over the warp
  __threadfence();  // every other row fenced its loss before its ticket: read them after ours
  cerow::Total r =
      cerow::reduce_thread(static_cast<const volatile acc_t*>(loss), targets, N, ignore_index, lane, 32);
  r = warp_total(r);
  if (lane != 0) return;
  *f.out = static_cast<acc_t>(cerow::reduce_value(r, f.mean));
  if (f.count) *f.count = r.count;
}

// Threads of a row: TPR. Block: max(TPR, 256) threads, so warp-sized rows pack 8 per block.
template <int TPR>
struct RowMap {
  static constexpr int kThreads = TPR < 256 ? 256 : TPR;
  static constexpr int kRowsPerBlock = kThreads / TPR;
  __device__ static int64_t row() { return int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / TPR; }
  __device__ static int lane() { return threadIdx.x % TPR; }
};

// The second __launch_bounds__ argument (minimum resident blocks per SM); 0 is as if absent.
// Double on sm_90+: 1. Without it ptxas (CUDA 13) caps the fp64 kernels' registers at an occupancy
// step of its own (40-64) and spills the double exp's polynomial constants, which it hoists out of
// the loops, to the stack (up to 92 B stored and 148 B loaded per thread, in the hot loop); with it
// they take 42-90 registers and spill nothing (benchmarks/sass_report.py), with fewer blocks of 256
// threads resident per SM (forward 4 -> 2, backward 5 -> 3). sm_80's ptxas does not spill them, and
// there the hint would only cost registers (48 -> 63, 64 -> 78): not given.
template <typename scalar_t>
constexpr int kMinBlocks =
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    sizeof(scalar_t) == 8 ? 1 : 0;
#else
    0;
#endif

template <typename scalar_t, int TPR>
__device__ __forceinline__ void zero_row(scalar_t* out, int64_t C, int lane) {
  for (int64_t j = lane; j < C; j += TPR) out[j] = scalar_t(0);
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
  p = row_merge<acc_t, TPR>(p, lane);
  const cerow::RowOut<acc_t> o = cerow::finish(p, zt);
  if constexpr (GRAD) {
    // one warp per row: only shuffles lie between the reads of the row above and the overwrite
    // below, and shuffles do not order memory; __syncwarp does (wider rows passed a
    // __syncthreads). Rows return early whole, so the full mask is safe.
    if constexpr (TPR <= 32) __syncwarp();
    const acc_t w = mean ? acc_t(1) / static_cast<acc_t>(*count) : acc_t(1);
    const cerow::Layout L = cerow::layout<VEC>(reinterpret_cast<uintptr_t>(z), sizeof(scalar_t), C, t);
    scalar_t* g = grad + row * C;
    cerow::grad_row<scalar_t, TPR, VEC>(z, g, C, L, o.lse, w, lane);
    // the onehot: by the thread that wrote column t in the pass, after it (program order)
    if (lane == cerow::owner<TPR, VEC>(L, t)) g[t] = static_cast<scalar_t>(cerow::target_grad(zt, o.lse, w));
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
  cerow::grad_row<scalar_t, TPR, VEC>(z, g, C, L, l, gl, lane);
  if (lane == cerow::owner<TPR, VEC>(L, t))
    g[t] = static_cast<scalar_t>(cerow::target_grad(static_cast<acc_t>(z[t]), l, gl));
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
//   logit from zt_saved.
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
  p = row_merge<acc_t, TPR>(p, lane);
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
    const Part<acc_t> p = warp_merge(cerow::load_part(parts + row * S * cerow::kPartWords, S, lane));
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

// logits and grad alias in the overwrite mode: no __restrict__ on them. Each element is read and
// then written by one thread; the target column, written twice, by one thread (its owner).
template <typename scalar_t, int TPR>
__global__ void __launch_bounds__(TPR) ce_split_grad_kernel(
    const scalar_t* logits, scalar_t* grad, const int64_t* __restrict__ targets,
    const typename OpMath<scalar_t>::type* __restrict__ lse, const typename OpMath<scalar_t>::type* __restrict__ grad_loss,
    const int64_t* __restrict__ count, bool mean, const typename OpMath<scalar_t>::type* __restrict__ zt_saved,
    int64_t C, int S, int64_t ignore_index) {
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
  if (cerow::row_skipped(t, C, ignore_index)) {  // zeros, the logits never read
    const int64_t end = cerow::slice_end<V>(L, sl, C);
    for (int64_t j = cerow::slice_begin<V>(L, sl) + lane; j < end; j += TPR) g[j] = scalar_t(0);
    return;
  }
  const acc_t l = lse[row];
  const acc_t w = grad_loss ? grad_loss[row] : mean ? acc_t(1) / static_cast<acc_t>(*count) : acc_t(1);
  const int own = cerow::slice_owner<TPR, V>(L, sl, t);
  // the owner reads the target logit before its pass writes column t
  const acc_t zt = lane != own ? acc_t(0) : zt_saved ? zt_saved[row] : static_cast<acc_t>(z[t]);
  cerow::grad_slice<scalar_t, TPR>(z, g, C, L, sl, l, w, lane);
  if (lane == own) g[t] = static_cast<scalar_t>(cerow::target_grad(zt, l, w));
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

// One thread per row. Consecutive rows sharing a sample index (a sequence's tokens) are summed in
// the warp first (cerow::seg_step over runs of equal indices), so a run of T rows costs six
// float64 atomics instead of 6T on the same 48 bytes. Skipped when status != 0, so a rejected
// batch changes nothing.
template <typename acc_t>
__global__ void ce_commit_kernel(double* __restrict__ stats, const int64_t* __restrict__ index,
                                 const int64_t* __restrict__ targets, const acc_t* __restrict__ loss,
                                 const acc_t* __restrict__ row_stats, const int* __restrict__ status,
                                 int64_t N, int64_t num_samples, int64_t ignore_index) {
  if (*status != 0) return;  // uniform over the grid
  const int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int lane = threadIdx.x % 32;
  int64_t ix = -1;  // -1: nothing to add (past N, ignored, or an index out of range)
  cerow::Commit c = {{0, 0, 0, 0, 0, 0}};
  if (row < N && targets[row] != ignore_index) {
    ix = index[row];
    if (ix < 0 || ix >= num_samples) {
      ix = -1;  // unreachable after a clean forward; never write OOB
    } else {
      const acc_t* rs = row_stats + row * kNumRowStats;
      const double p = rs[kRowProb];
      c.v[kLossSum] = loss[row];
      c.v[kRows] = 1.0;
      c.v[kCorrect] = rs[kRowCorrect];
      c.v[kProbSum] = p;
      c.v[kProbSqSum] = p * p;
      c.v[kMarginSum] = rs[kRowMargin];
    }
  }
  // whole warps reach here (blocks are multiples of 32 threads; rows past N carry ix = -1)
  const int64_t prev = __shfl_up_sync(0xffffffffu, ix, 1);
  const bool head = lane == 0 || prev != ix;
  const uint32_t heads = __ballot_sync(0xffffffffu, head);
  if (heads != 0xffffffffu) {  // some run longer than one row
    const int end = cerow::seg_end(heads, lane);
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      cerow::Commit o;
#pragma unroll
      for (int k = 0; k < 6; ++k) o.v[k] = __shfl_down_sync(0xffffffffu, c.v[k], off);
      cerow::seg_step(c, o, lane, off, end);
    }
  }
  if (!head || ix < 0) return;
  double* s = stats + ix * kNumStats;
#pragma unroll
  for (int k = 0; k < 6; ++k) atomicAdd(s + k, c.v[k]);
}

}  // namespace
}  // namespace cuda
}  // namespace memcore
