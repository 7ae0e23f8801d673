// CUDA kernels of the curvature family (schemas in csrc/memcore.cpp, Philox in csrc/philox.h):
// rademacher, rademacher_perturb, probe_reduce. A block of 128 threads owns a (probe,
// sample) row and walks it in tiles of 16,384 elements: each thread draws one Philox4x32-10 call
// (128 signs) into shared memory (2 KiB), then warps read and write fully coalesced. probe_reduce:
// per element the difference and its square in fp32 (fp64 for fp64 gradients), per-thread running
// sums in fp64, one block reduction: deterministic (no atomics), its order set by D only (not the
// CPU kernel's order). Memory: the outputs only; probes are never stored. More: docs/kernels.md.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../curvature.h"
#include "../ops.h"
#include "../philox.h"
#include "cuda_helpers.h"

namespace memcore {
namespace cuda {
namespace {

constexpr int kThreads = 128;  // threads per row; also Philox blocks per tile
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxGrid = 1 << 20;

// Calls f(element, bit) for every element of row (probe, index) of length D; bit is its sign bit.
// Must be reached by all threads of the block (it synchronises).
template <typename F>
__device__ __forceinline__ void visit_row(int64_t D, uint64_t seed, int64_t index, uint32_t probe,
                                          uint4* tile, F&& f) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t nblk = (D + kPhiloxBits - 1) / kPhiloxBits;
  for (int64_t t0 = 0; t0 < nblk; t0 += kThreads) {
    if (t0 + tid < nblk) {
      const Philox4x32 r = rademacher_bits(seed, index, probe, static_cast<uint32_t>(t0 + tid));
      tile[tid] = make_uint4(r.v[0], r.v[1], r.v[2], r.v[3]);
    }
    __syncthreads();
    const int nk = static_cast<int>(nblk - t0 < kThreads ? nblk - t0 : int64_t(kThreads));
    for (int k = warp; k < nk; k += kWarps) {
      const uint4 w = tile[k];
      const int64_t base = (t0 + k) * kPhiloxBits + lane;
      const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int64_t e = base + 32 * q;
        if (e < D) f(e, (words[q] >> lane) & 1u);
      }
    }
    __syncthreads();
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) perturb_kernel(
    const scalar_t* __restrict__ x, scalar_t* __restrict__ out, const int64_t* __restrict__ index,
    int64_t rows, int64_t B, int64_t D, uint64_t seed, int64_t probe_start, double h) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ uint4 tile[kThreads];
  const acc_t hh = static_cast<acc_t>(h);
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t p = r / B, b = r % B;
    scalar_t* o = out + r * D;
    const scalar_t* xr = x ? x + b * D : nullptr;
    visit_row(D, seed, index[b], static_cast<uint32_t>(probe_start + p), tile, [&](int64_t e, uint32_t bit) {
      const acc_t s = bit ? hh : -hh;
      o[e] = xr ? static_cast<scalar_t>(static_cast<acc_t>(xr[e]) + s) : static_cast<scalar_t>(s);
    });
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) probe_reduce_kernel(
    const scalar_t* __restrict__ gp, const scalar_t* __restrict__ gc, const int64_t* __restrict__ index,
    double* __restrict__ sq_out, double* __restrict__ vd_out, int64_t rows, int64_t B, int64_t D,
    uint64_t seed, int64_t probe_start) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ uint4 tile[kThreads];
  __shared__ double red_sq[kWarps], red_vd[kWarps];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t p = r / B, b = r % B;
    const scalar_t* ar = gp + r * D;
    const scalar_t* cr = gc + b * D;
    // double running sums: a thread adds ~D/128 terms, and v . d cancels (the CPU sums 128-term
    // float blocks into doubles); the kernel is memory-bound, so the FP64 adds cost nothing
    double s1 = 0.0, s2 = 0.0;
    visit_row(D, seed, index[b], static_cast<uint32_t>(probe_start + p), tile, [&](int64_t e, uint32_t bit) {
      const acc_t d = static_cast<acc_t>(ar[e]) - static_cast<acc_t>(cr[e]);
      s1 += static_cast<double>(d * d);
      s2 += static_cast<double>(bit ? d : -d);
    });
    s1 = warp_sum(s1);
    s2 = warp_sum(s2);
    if (lane == 0) {
      red_sq[warp] = s1;
      red_vd[warp] = s2;
    }
    __syncthreads();
    if (tid == 0) {
      double t1 = 0.0, t2 = 0.0;
      for (int w = 0; w < kWarps; ++w) {
        t1 += red_sq[w];
        t2 += red_vd[w];
      }
      sq_out[r] = t1;
      vd_out[r] = t2;
    }
    __syncthreads();  // red_* are reused by the next row
  }
}

unsigned grid_for(int64_t rows) { return static_cast<unsigned>(std::min<int64_t>(rows, kMaxGrid)); }

template <typename scalar_t>
void launch_perturb(const scalar_t* x, scalar_t* out, const int64_t* index, int64_t P, int64_t B,
                    int64_t D, int64_t seed, int64_t probe_start, double h) {
  const int64_t rows = P * B;
  perturb_kernel<scalar_t><<<grid_for(rows), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      x, out, index, rows, B, D, static_cast<uint64_t>(seed), probe_start, h);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor rademacher_perturb_cuda(const at::Tensor& x, const at::Tensor& index, int64_t seed,
                                   int64_t probe_start, int64_t n_probes, double h) {
  const ProbeOutput p = perturb_output(x, index, probe_start, n_probes);
  if (p.out.numel() == 0) return p.out;
  const c10::cuda::CUDAGuard guard(x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rademacher_perturb_cuda", [&] {
    launch_perturb<scalar_t>(x.data_ptr<scalar_t>(), p.out.data_ptr<scalar_t>(), index.data_ptr<int64_t>(),
                             n_probes, p.B, p.D, seed, probe_start, h);
  });
  return p.out;
}

at::Tensor rademacher_cuda(const at::Tensor& index, int64_t seed, int64_t probe_start, int64_t n_probes,
                           at::IntArrayRef sample_shape, at::ScalarType dtype) {
  const ProbeOutput p = rademacher_output(index, probe_start, n_probes, sample_shape, dtype);
  if (p.out.numel() == 0) return p.out;
  const c10::cuda::CUDAGuard guard(index.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "rademacher_cuda", [&] {
    launch_perturb<scalar_t>(nullptr, p.out.data_ptr<scalar_t>(), index.data_ptr<int64_t>(), n_probes, p.B,
                             p.D, seed, probe_start, 1.0);
  });
  return p.out;
}

std::tuple<at::Tensor, at::Tensor> probe_reduce_cuda(const at::Tensor& gp, const at::Tensor& gc,
                                                     const at::Tensor& index, int64_t seed,
                                                     int64_t probe_start) {
  check_probe_reduce(gp, gc, index, probe_start);
  const c10::cuda::CUDAGuard guard(gc.device());
  const int64_t P = gp.size(0), B = gc.size(0);
  const int64_t D = sample_numel(gc.sizes().slice(1), "memcore::probe_reduce");
  const auto f64 = gc.options().dtype(at::kDouble);
  at::Tensor sq = at::zeros({P, B}, f64), vd = at::zeros({P, B}, f64);
  const int64_t rows = P * B;
  if (rows == 0 || D == 0) return {sq, vd};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gc.scalar_type(), "probe_reduce_cuda", [&] {
    probe_reduce_kernel<scalar_t><<<grid_for(rows), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        gp.data_ptr<scalar_t>(), gc.data_ptr<scalar_t>(), index.data_ptr<int64_t>(), sq.data_ptr<double>(),
        vd.data_ptr<double>(), rows, B, D, static_cast<uint64_t>(seed), probe_start);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {sq, vd};
}

}  // namespace

TORCH_LIBRARY_IMPL(memcore, CUDA, m) {
  MEMCORE_IMPL(m, rademacher, rademacher_cuda);
  MEMCORE_IMPL(m, rademacher_perturb, rademacher_perturb_cuda);
  MEMCORE_IMPL(m, probe_reduce, probe_reduce_cuda);
}

}  // namespace cuda
}  // namespace memcore
