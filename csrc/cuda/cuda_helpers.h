// Device helpers shared by the CUDA kernels (cross_entropy.cu, curvature.cu).
// Accumulation type: at::opmath_type<scalar_t> (float for half / bfloat16 / float, double for
// double), the type ATen's own kernels accumulate in.
#pragma once
#include <ATen/OpMathType.h>

#include <cstdint>

namespace memcore {
namespace cuda {

// VEC elements loaded or stored as one 16-byte (or narrower) vector access; the address must be
// aligned to the pack's size.
template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Pack {
  scalar_t v[VEC];
};

// Sum over the 32 lanes of a warp (butterfly: every lane gets the total); all lanes must call it.
template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

}  // namespace cuda
}  // namespace memcore
