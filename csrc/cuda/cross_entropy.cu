// CUDA kernels of the fused cross-entropy + per-sample statistics ops (schemas in csrc/memcore.cpp,
// C++ types in csrc/ops.h). Registers six ops: ce_forward, ce_forward_reduce, ce_backward,
// ce_commit, ce_forward_grad_, scale_unless_one_.
//
// ce_forward: a group of TPR threads owns one row (a warp for C <= 2048, a whole block above) and
//   streams it once with 16-byte vector loads (a scalar head up to the row's first 16-byte
//   boundary and a scalar tail, so odd C such as 50257 and sliced logits vectorise too), keeping
//   per thread an online (max, sum exp) pair, the largest logit before and after the target column
//   and a NaN flag; one warp-shuffle (+ shared memory across warps) reduction per row. Ignored
//   rows are never read. Writes O(N) outputs: loss, lse, row stats [N, 3], and error bits into a 1-int status word.
// ce_forward_reduce: ce_forward, then the mean or sum of the O(N) losses with ATen reductions on
//   the device (no host sync); count and out are 0-d tensors.
// ce_forward_grad_: ce_forward's kernel with a second pass over each row right after the first
//   (from L2 while the rows in flight fit there) writing the gradient of the reduced loss over the
//   logits; 1/count is read on the device. No N x C allocation, no backward pass over the logits.
// ce_backward: same row mapping; writes (exp(z - lse) - onehot) * g with vector stores. Memory
//   traffic of forward + backward: two reads and one write of the logits, nothing else O(N*C).
// scale_unless_one_: grad *= scale, grid-stride, every thread returning at once when scale == 1
//   (decided on the device: no host sync, no pass over grad for a plain loss.backward()).
// ce_commit: one thread per row, six float64 atomicAdds into stats[index[row]] (repeated indices
//   are correct), skipped by every thread when status != 0 so a rejected batch changes nothing;
//   under torch.use_deterministic_algorithms the ATen form in csrc/commit_deterministic.cpp.
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
#include "cuda_helpers.h"

namespace memcore {
namespace cuda {
namespace {

// __expf: the fast exp (a few ulp; arguments here are <= 0), like the CPU kernels' exp_approx and
// well inside the fp32 tolerance of the parity tests. Double keeps exp / log.
__device__ __forceinline__ float dev_exp(float x) { return __expf(x); }
__device__ __forceinline__ double dev_exp(double x) { return exp(x); }
__device__ __forceinline__ float dev_log(float x) { return logf(x); }
__device__ __forceinline__ double dev_log(double x) { return log(x); }

template <typename T>
__device__ __forceinline__ T neg_inf() { return -std::numeric_limits<T>::infinity(); }

// Elements before the first 16-byte boundary of a row starting at z (at most C). The body after
// them is read in Packs; the row's remainder after the last whole Pack is a scalar tail.
template <typename scalar_t, int VEC>
__device__ __forceinline__ int64_t head_of(const scalar_t* z, int64_t C) {
  const int64_t mis = static_cast<int64_t>((reinterpret_cast<uintptr_t>(z) / sizeof(scalar_t)) % VEC);
  const int64_t head = mis == 0 ? 0 : VEC - mis;
  return head < C ? head : C;
}

template <typename acc_t>
struct RowState {
  acc_t m;       // running max over the row
  acc_t s;       // sum of exp(z - m)
  acc_t before;  // max over columns < target
  acc_t after;   // max over columns > target
  int nan;       // a NaN was seen

  __device__ __forceinline__ void init() {
    m = s = before = after = acc_t(0);
    m = before = after = neg_inf<acc_t>();
    nan = 0;
  }
  __device__ __forceinline__ void merge(acc_t om, acc_t os, acc_t ob, acc_t oa, int on) {
    const acc_t M = om > m ? om : m;
    const acc_t a = (m == neg_inf<acc_t>()) ? acc_t(0) : s * dev_exp(m - M);
    const acc_t b = (om == neg_inf<acc_t>()) ? acc_t(0) : os * dev_exp(om - M);
    m = M;
    s = a + b;
    before = ob > before ? ob : before;
    after = oa > after ? oa : after;
    nan |= on;
  }
};

template <typename acc_t>
__device__ __forceinline__ void warp_merge(RowState<acc_t>& st) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const acc_t om = __shfl_xor_sync(0xffffffffu, st.m, off);
    const acc_t os = __shfl_xor_sync(0xffffffffu, st.s, off);
    const acc_t ob = __shfl_xor_sync(0xffffffffu, st.before, off);
    const acc_t oa = __shfl_xor_sync(0xffffffffu, st.after, off);
    const int on = __shfl_xor_sync(0xffffffffu, st.nan, off);
    st.merge(om, os, ob, oa, on);
  }
}

// Folds VEC consecutive values starting at column j into the thread's state: one rescale per pack.
template <typename acc_t, int VEC>
__device__ __forceinline__ void fold(RowState<acc_t>& st, const acc_t (&x)[VEC], int64_t j, int64_t t) {
  acc_t vmax = x[0];
#pragma unroll
  for (int k = 1; k < VEC; ++k) vmax = x[k] > vmax ? x[k] : vmax;
  if (vmax > st.m) {
    st.s = (st.m == neg_inf<acc_t>()) ? acc_t(0) : st.s * dev_exp(st.m - vmax);
    st.m = vmax;
  }
  const bool live = st.m != neg_inf<acc_t>();
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    st.nan |= (x[k] != x[k]);
    if (live) st.s += dev_exp(x[k] - st.m);
    const int64_t col = j + k;
    if (col < t) st.before = x[k] > st.before ? x[k] : st.before;
    if (col > t) st.after = x[k] > st.after ? x[k] : st.after;
  }
}

// Threads of a row: TPR. Block: max(TPR, 256) threads, so warp-sized rows pack 8 per block.
template <int TPR>
struct RowMap {
  static constexpr int kThreads = TPR < 256 ? 256 : TPR;
  static constexpr int kRowsPerBlock = kThreads / TPR;
  __device__ static int64_t row() { return int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / TPR; }
  __device__ static int lane() { return threadIdx.x % TPR; }
};

// out[j] = (exp(z[j] - shift) - onehot(j == t)) * g over the row's columns, in the forward's
// column split. out may be z (ce_forward_grad_): each element is read, then written, by one thread.
template <typename scalar_t, typename acc_t, int TPR, int VEC>
__device__ __forceinline__ void row_grad(const scalar_t* z, scalar_t* out, int64_t C, int64_t t,
                                         acc_t shift, acc_t g, int lane) {
  auto one = [&](int64_t j) {
    const acc_t onehot = (j == t) ? acc_t(1) : acc_t(0);
    out[j] = static_cast<scalar_t>((dev_exp(static_cast<acc_t>(z[j]) - shift) - onehot) * g);
  };
  if constexpr (VEC > 1) {  // z and out rows share their offset from a 16-byte boundary
    const int64_t head = head_of<scalar_t, VEC>(z, C);
    if (lane < head) one(lane);
    const Pack<scalar_t, VEC>* zv = reinterpret_cast<const Pack<scalar_t, VEC>*>(z + head);
    Pack<scalar_t, VEC>* ov = reinterpret_cast<Pack<scalar_t, VEC>*>(out + head);
    const int64_t nv = (C - head) / VEC;
    for (int64_t v = lane; v < nv; v += TPR) {
      const Pack<scalar_t, VEC> p = zv[v];
      Pack<scalar_t, VEC> o;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const acc_t onehot = (head + v * VEC + k == t) ? acc_t(1) : acc_t(0);
        o.v[k] = static_cast<scalar_t>((dev_exp(static_cast<acc_t>(p.v[k]) - shift) - onehot) * g);
      }
      ov[v] = o;
    }
    for (int64_t j = head + nv * VEC + lane; j < C; j += TPR) one(j);
  } else {
    for (int64_t j = lane; j < C; j += TPR) one(j);
  }
}

template <typename scalar_t, int TPR>
__device__ __forceinline__ void zero_row(scalar_t* out, int64_t C, int lane) {
  for (int64_t j = lane; j < C; j += TPR) out[j] = scalar_t(0);
}

// GRAD (ce_forward_grad_): after the row's statistics, a second pass over the row writes the
// gradient of the reduced loss over the logits: (softmax - onehot) / count for mean (count read
// on the device), or (softmax - onehot) for sum. It re-reads the row from L2 as long as the rows
// in flight fit there; very wide rows (256k fp32 = 1 MB each) may come from HBM again.
template <typename scalar_t, int TPR, int VEC, bool GRAD>
__global__ void __launch_bounds__(RowMap<TPR>::kThreads) ce_forward_kernel(
    const scalar_t* logits, const int64_t* __restrict__ targets,
    const int64_t* __restrict__ index, at::opmath_type<scalar_t>* __restrict__ loss,
    at::opmath_type<scalar_t>* __restrict__ lse_out,
    at::opmath_type<scalar_t>* __restrict__ row_stats, int* __restrict__ status, int64_t N,
    int64_t C, int64_t num_samples, int64_t ignore_index, scalar_t* grad, const int64_t* count,
    bool mean) {
  using acc_t = at::opmath_type<scalar_t>;
  using Map = RowMap<TPR>;
  const int64_t row = Map::row();
  const int lane = Map::lane();
  if (row >= N) return;  // uniform over the row's threads
  const int64_t t = targets[row];
  if (t == ignore_index || t < 0 || t >= C) {  // outputs were zero-initialised
    if (t != ignore_index && lane == 0) atomicOr(status, int(kBadTarget));
    if constexpr (GRAD) zero_row<scalar_t, TPR>(grad + row * C, C, lane);
    return;
  }
  const scalar_t* z = logits + row * C;
  // every lane reads the target logit; in GRAD its owning lane overwrites it later, after the
  // barrier before the gradient pass (each other element is read and written by one thread)
  const acc_t zt = static_cast<acc_t>(z[t]);
  RowState<acc_t> st;
  st.init();
  if constexpr (VEC > 1) {
    const int64_t head = head_of<scalar_t, VEC>(z, C);
    if (lane < head) {
      const acc_t x[1] = {static_cast<acc_t>(z[lane])};
      fold<acc_t, 1>(st, x, lane, t);
    }
    const Pack<scalar_t, VEC>* zv = reinterpret_cast<const Pack<scalar_t, VEC>*>(z + head);
    const int64_t nv = (C - head) / VEC;
    for (int64_t v = lane; v < nv; v += TPR) {
      const Pack<scalar_t, VEC> p = zv[v];
      acc_t x[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) x[k] = static_cast<acc_t>(p.v[k]);
      fold<acc_t, VEC>(st, x, head + v * VEC, t);
    }
    for (int64_t j = head + nv * VEC + lane; j < C; j += TPR) {
      const acc_t x[1] = {static_cast<acc_t>(z[j])};
      fold<acc_t, 1>(st, x, j, t);
    }
  } else {
    for (int64_t j = lane; j < C; j += TPR) {
      const acc_t x[1] = {static_cast<acc_t>(z[j])};
      fold<acc_t, 1>(st, x, j, t);
    }
  }
  warp_merge(st);
  if constexpr (TPR > 32) {
    constexpr int kWarps = TPR / 32;
    __shared__ acc_t sm[kWarps], ss[kWarps], sb[kWarps], sa[kWarps];
    __shared__ int sn[kWarps];
    const int warp = lane / 32;
    if (lane % 32 == 0) {
      sm[warp] = st.m; ss[warp] = st.s; sb[warp] = st.before; sa[warp] = st.after; sn[warp] = st.nan;
    }
    __syncthreads();
    // every warp merges the per-warp states in the same order, so every thread of the row ends
    // with the same final state (the GRAD pass needs lse in all of them)
    const int wl = lane % 32;
    st.init();
    if (wl < kWarps) {
      st.m = sm[wl]; st.s = ss[wl]; st.before = sb[wl]; st.after = sa[wl]; st.nan = sn[wl];
    }
    warp_merge(st);
  }
  acc_t lse = st.m + dev_log(st.s);
  // NaN logits, or a row with no finite max (all -inf): loss and lse both NaN, as on the CPU, so a
  // backward through a rejected batch (strict=False) gives NaN gradients like F.cross_entropy
  if (st.nan || st.m == neg_inf<acc_t>()) lse = std::numeric_limits<acc_t>::quiet_NaN();
  if constexpr (GRAD) {
    // one warp per row: only shuffles lie between lane 0's read of z[t] above and the owning
    // lane's overwrite below, and shuffles do not order memory; __syncwarp does (wider rows
    // passed a __syncthreads). Rows return early whole, so the full mask is safe.
    if constexpr (TPR <= 32) __syncwarp();
    const acc_t w = mean ? acc_t(1) / static_cast<acc_t>(*count) : acc_t(1);
    row_grad<scalar_t, acc_t, TPR, VEC>(z, grad + row * C, C, t, lse, w, lane);
  }
  if (lane != 0) return;
  int flags = 0;
  const int64_t ix = index[row];
  if (ix < 0 || ix >= num_samples) flags |= kBadIndex;
  const acc_t l = lse - zt;
  if (!isfinite(l)) flags |= kNonFinite;
  if (flags) atomicOr(status, flags);
  loss[row] = l;
  lse_out[row] = lse;
  const acc_t other = st.after > st.before ? st.after : st.before;
  acc_t* rs = row_stats + row * kNumRowStats;
  rs[kRowProb] = dev_exp(-l);
  rs[kRowMargin] = zt - other;
  rs[kRowCorrect] = (zt > st.before && zt >= st.after) ? acc_t(1) : acc_t(0);
}

template <typename scalar_t, int TPR, int VEC>
__global__ void __launch_bounds__(RowMap<TPR>::kThreads) ce_backward_kernel(
    const at::opmath_type<scalar_t>* __restrict__ grad_loss,
    const scalar_t* __restrict__ logits, const int64_t* __restrict__ targets,
    const at::opmath_type<scalar_t>* __restrict__ lse, scalar_t* __restrict__ grad, int64_t N,
    int64_t C, int64_t ignore_index) {
  using acc_t = at::opmath_type<scalar_t>;
  using Map = RowMap<TPR>;
  const int64_t row = Map::row();
  const int lane = Map::lane();
  if (row >= N) return;
  const int64_t t = targets[row];
  if (t == ignore_index || t < 0 || t >= C) {  // ignored rows: zero gradient, logits never read
    zero_row<scalar_t, TPR>(grad + row * C, C, lane);
    return;
  }
  row_grad<scalar_t, acc_t, TPR, VEC>(logits + row * C, grad + row * C, C, t, lse[row], grad_loss[row], lane);
}

// x *= s unless s == 1, the test made on the device (no host sync): the backward of
// ce_forward_grad_, whose gradient already holds the factor 1; loss scaling and accumulation
// divisors cost one pass, the plain loss.backward() none.
template <typename scalar_t>
__global__ void scale_unless_one_kernel(scalar_t* __restrict__ x,
                                        const at::opmath_type<scalar_t>* __restrict__ s, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t f = *s;
  if (f == acc_t(1)) return;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    x[i] = static_cast<scalar_t>(static_cast<acc_t>(x[i]) * f);
}

template <typename acc_t>
__global__ void ce_commit_kernel(double* __restrict__ stats, const int64_t* __restrict__ index,
                                 const int64_t* __restrict__ targets, const acc_t* __restrict__ loss,
                                 const acc_t* __restrict__ row_stats, const int* __restrict__ status,
                                 int64_t N, int64_t num_samples, int64_t ignore_index) {
  const int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= N || *status != 0) return;
  if (targets[row] == ignore_index) return;
  const int64_t ix = index[row];
  if (ix < 0 || ix >= num_samples) return;  // unreachable after a clean forward; never write OOB
  double* s = stats + ix * kNumStats;
  const acc_t* rs = row_stats + row * kNumRowStats;
  const double p = rs[kRowProb];
  atomicAdd(s + kLossSum, double(loss[row]));
  atomicAdd(s + kRows, 1.0);
  atomicAdd(s + kCorrect, double(rs[kRowCorrect]));
  atomicAdd(s + kProbSum, p);
  atomicAdd(s + kProbSqSum, p * p);
  atomicAdd(s + kMarginSum, double(rs[kRowMargin]));
}

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

// ce_forward's launch; with grad (GRAD kernels) also the gradient over grad (== logits' data).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_launch(
    const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& index, int64_t num_samples,
    int64_t ignore_index, const char* op, at::Tensor* grad = nullptr, const at::Tensor* count = nullptr,
    bool mean = false) {
  check_rows(logits, targets, op);
  check_vector(index, logits, at::kLong, "index", op);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t N = logits.size(0), C = logits.size(1);
  const auto acc = logits.options().dtype(opmath_dtype(logits));
  at::Tensor loss = at::zeros({N}, acc), lse = at::zeros({N}, acc);
  at::Tensor row_stats = at::zeros({N, kNumRowStats}, acc);
  at::Tensor status = at::zeros({1}, logits.options().dtype(at::kInt));
  // C == 0 still launches: every non-ignored row is a bad target, as on the CPU
  if (N == 0) return {loss, lse, row_stats, status};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "ce_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_shape<scalar_t>(C, element_aligned<scalar_t>(logits.data_ptr()), [&](auto tpr, auto vec) {
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
  });
  return {loss, lse, row_stats, status};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ce_forward_cuda(
    const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& index,
    int64_t num_samples, int64_t ignore_index) {
  return forward_launch(logits, targets, index, num_samples, ignore_index, "memcore::ce_forward");
}

// The reduction with ATen ops on the device (ignored and rejected rows hold 0).
at::Tensor reduce_loss(const at::Tensor& loss, const at::Tensor& count, int64_t reduction) {
  const at::Tensor total = loss.sum(at::kDouble);
  return (reduction == kSum ? total : total / count).to(loss.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ce_forward_reduce_cuda(
    const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& index, int64_t num_samples,
    int64_t ignore_index, int64_t reduction) {
  check_reduction(reduction, /*allow_none=*/false, "memcore::ce_forward_reduce");
  auto [loss, lse, row_stats, status] = ce_forward_cuda(logits, targets, index, num_samples, ignore_index);
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor count = targets.ne(ignore_index).sum();
  return {reduce_loss(loss, count, reduction), count, loss, lse, row_stats, status};
}

// ce_forward_reduce whose forward kernel also writes d(out)/d(logits) over the logits (no N x C
// buffer, no backward pass over them). count is computed first, on the device, for the mean's
// 1/count.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ce_forward_grad_cuda(
    at::Tensor& logits, const at::Tensor& targets, const at::Tensor& index, int64_t num_samples,
    int64_t ignore_index, int64_t reduction) {
  const char* op = "memcore::ce_forward_grad_";
  check_forward_grad(logits, reduction);
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor count = targets.ne(ignore_index).sum();  // forward_launch checks targets
  auto [loss, lse, row_stats, status] =
      forward_launch(logits, targets, index, num_samples, ignore_index, op, &logits, &count, reduction == kMean);
  return {reduce_loss(loss, count, reduction), count, loss, lse, row_stats, status};
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
  at::Tensor grad = at::empty_like(logits);
  const int64_t N = logits.size(0), C = logits.size(1);
  if (N == 0 || C == 0) return grad;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "ce_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // packs need logits and grad rows at the same offset from a 16-byte boundary (empty_like
    // gives that unless the logits are a slice at an odd offset)
    const auto lp = reinterpret_cast<uintptr_t>(logits.data_ptr()), gp = reinterpret_cast<uintptr_t>(grad.data_ptr());
    const bool vec = element_aligned<scalar_t>(logits.data_ptr()) && element_aligned<scalar_t>(grad.data_ptr()) &&
                     (lp - gp) % 16 == 0;
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
