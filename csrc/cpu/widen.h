// Rows of half / bfloat16 to float scratch and back, for the CPU kernels that compute in float:
// vectorised for bfloat16 (vec_math.h, bit for bit c10's conversions), c10's scalar conversions
// for the other types.
#pragma once
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <type_traits>

#include "vec_math.h"

namespace memcore {
namespace cpu {

template <typename scalar_t>
void widen(const scalar_t* src, float* dst, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    bf16_to_f32(reinterpret_cast<const uint16_t*>(src), dst, n);
  } else {
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(src[j]);
  }
}

template <typename scalar_t>
void narrow(const float* src, scalar_t* dst, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    f32_to_bf16(src, reinterpret_cast<uint16_t*>(dst), n);
  } else {
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<scalar_t>(src[j]);
  }
}

}  // namespace cpu
}  // namespace memcore
