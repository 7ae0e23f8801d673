// Device-side pieces shared by the CUDA cross-entropy kernels (csrc/cuda/cross_entropy.cu, the
// default route; csrc/cuda/cross_entropy_options.cu, the options route): the row merges over a
// warp or block in the order the host replays follow, the row-to-thread map, the launch shapes.
// Included by .cu files only.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <limits>
#include <type_traits>

#include "cross_entropy_row.h"
#include "cuda_helpers.h"

namespace memcore {
namespace cuda {

using cerow::OpMath;
using cerow::Part;

// Butterfly over the warp: every lane ends with the merge of all 32, merged as merge(self, other)
// in the order the host replay (csrc/cross_entropy_replay.cpp) follows. E: cerow::kExactDiff.
template <typename acc_t, bool E>
__device__ __forceinline__ Part<acc_t> warp_merge(Part<acc_t> p) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    Part<acc_t> o;
    o.m = __shfl_xor_sync(0xffffffffu, p.m, off);
    o.s = __shfl_xor_sync(0xffffffffu, p.s, off);
    o.before = __shfl_xor_sync(0xffffffffu, p.before, off);
    o.after = __shfl_xor_sync(0xffffffffu, p.after, off);
    o.ref = 0;  // merge() recomputes it from the merged max
    p = cerow::merge<acc_t, E>(p, o);
  }
  return p;
}

// The row's merged state in every one of its TPR threads (warp butterfly; across warps through
// shared memory, each warp merging the per-warp states in the same order).
template <typename acc_t, int TPR, bool E>
__device__ __forceinline__ Part<acc_t> row_merge(Part<acc_t> p, int lane) {
  p = warp_merge<acc_t, E>(p);
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
    p = warp_merge<acc_t, E>(p);
  }
  return p;
}

// The sum of v over the row's TPR threads, in every one of them, in row_merge's order (warp
// butterfly, then across warps through shared memory): the total of the gradient pass's sums for
// the target's gradient (cerow::kTargetBySum), the same bits in every thread and run.
template <typename acc_t, int TPR>
__device__ __forceinline__ acc_t row_sum(acc_t v, int lane) {
  v = warp_sum(v);
  if constexpr (TPR > 32) {
    constexpr int kWarps = TPR / 32;
    __shared__ acc_t sw[kWarps];
    if (lane % 32 == 0) sw[lane / 32] = v;
    __syncthreads();
    v = lane % 32 < kWarps ? sw[lane % 32] : acc_t(0);
    v = warp_sum(v);
  }
  return v;
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
// they take 42-90 registers and spill nothing (tools/sass_report.py), with fewer blocks of 256
// threads resident per SM (forward 4 -> 2, backward 5 -> 3). The split gradient kernel takes it too
// (capped at 48 registers it spills 32 B). sm_80's ptxas does not spill them, and there the hint
// would only cost registers (48 -> 63, 64 -> 78): not given.
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

// Grid size for <<<>>>, which takes an unsigned int: a clear error instead of a silent wrap.
inline int64_t grid_size(int64_t blocks, const char* op) {
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), op, ": batch too large for one launch (",
              blocks, " blocks); split it");
  return blocks;
}

// A new [N, C] gradient for logits at the logits' offset from a 16-byte boundary, so that both rows
// take 16-byte packs even for logits that start mid-pack (a view at an odd offset); a fresh tensor
// is aligned.
inline at::Tensor grad_like(const at::Tensor& logits) {
  const int64_t N = logits.size(0), C = logits.size(1), esize = logits.element_size();
  const auto lp = reinterpret_cast<uintptr_t>(logits.data_ptr());
  const int64_t shift = lp % esize == 0 ? static_cast<int64_t>(lp % 16) / esize : 0;
  return shift == 0 ? at::empty_like(logits)
                    : at::empty({N * C + 16 / esize}, logits.options()).narrow(0, shift, N * C).view({N, C});
}

// Whether the gradient kernels may take 16-byte packs on logits and grad: both element-aligned and
// at the same offset from a 16-byte boundary.
inline bool packs_fit(const at::Tensor& logits, const at::Tensor& grad) {
  const auto lp = reinterpret_cast<uintptr_t>(logits.data_ptr()), gp = reinterpret_cast<uintptr_t>(grad.data_ptr());
  const int64_t esize = logits.element_size();
  return lp % esize == 0 && gp % esize == 0 && (lp - gp) % 16 == 0;
}

}  // namespace cuda
}  // namespace memcore
