// Compiles the block kernels (cross_entropy_block.inc) once per x86-64 ISA level and dispatches each call to
// the widest one the CPU supports, chosen once at load time. The wider copies are built under
// `#pragma GCC target` in their own namespaces; nothing from ATen is compiled inside them, so no
// inline ATen code is built for an ISA the machine may lack. Other compilers / architectures get
// the baseline copy only.
#include "cross_entropy_block.h"

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>

#include "vec_math.h"

#pragma GCC diagnostic ignored "-Wpsabi"  // 64-byte vectors are passed only between inlined helpers

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define MEMCORE_PER_ISA 1
#endif

namespace memcore {
namespace cpu {

namespace isa_base {
#define MEMCORE_LANES 4
#include "vec.inc"
#include "cross_entropy_block.inc"
#undef MEMCORE_LANES
}  // namespace isa_base

#ifdef MEMCORE_PER_ISA
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
namespace isa_avx2 {
#define MEMCORE_LANES 8
#include "vec.inc"
#include "cross_entropy_block.inc"
#undef MEMCORE_LANES
}  // namespace isa_avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
namespace isa_avx512 {
#define MEMCORE_LANES 16
#include "vec.inc"
#include "cross_entropy_block.inc"
#undef MEMCORE_LANES
}  // namespace isa_avx512
#pragma GCC pop_options
#endif

namespace {
enum class Isa { kBase, kAvx2, kAvx512 };

// The widest ISA the CPU supports, capped by MEMCORE_CPU_ISA=avx2|baseline (tests use it to run
// the narrower copies on a wider machine).
Isa detect() {
  const char* cap = std::getenv("MEMCORE_CPU_ISA");
  const std::string want = cap ? cap : "";
  if (want == "baseline") return Isa::kBase;
#ifdef MEMCORE_PER_ISA
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4") && want != "avx2") return Isa::kAvx512;
  if (__builtin_cpu_supports("x86-64-v3")) return Isa::kAvx2;
#endif
  return Isa::kBase;
}

const Isa kIsa = detect();
}  // namespace

#ifdef MEMCORE_PER_ISA
#define MEMCORE_DISPATCH(fn, ...)                                          \
  switch (kIsa) {                                                          \
    case Isa::kAvx512: return isa_avx512::fn(__VA_ARGS__);                 \
    case Isa::kAvx2: return isa_avx2::fn(__VA_ARGS__);                     \
    default: return isa_base::fn(__VA_ARGS__);                             \
  }
#else
#define MEMCORE_DISPATCH(fn, ...) return isa_base::fn(__VA_ARGS__);
#endif

template <class O>
void forward_block_f32(const float* z, int64_t C, const int64_t* row, const int64_t* t, int64_t n,
                       BlockTmp tmp, BlockOut out, const OptArgs* o) {
  MEMCORE_DISPATCH(forward_block_f32<O>, z, C, row, t, n, tmp, out, o)
}

template <class O>
void forward_block_narrow_f32(const float* z, int64_t C, const int64_t* row, const int64_t* t,
                              int64_t n, BlockOut out, const OptArgs* o) {
  MEMCORE_DISPATCH(forward_block_narrow_f32<O>, z, C, row, t, n, out, o)
}

template <class O>
void forward_piece_f32(const float* x, int64_t len, int64_t j0, int64_t t, RowAcc* a, OptAcc* oa,
                       const OptArgs* o) {
  MEMCORE_DISPATCH(forward_piece_f32<O>, x, len, j0, t, a, oa, o)
}

template <class O>
void softmax_scale_f32(const float* x, float* out, int64_t n, float lse, float g, int64_t j0, float c,
                       const OptArgs* o) {
  MEMCORE_DISPATCH(softmax_scale_f32<O>, x, out, n, lse, g, j0, c, o)
}

void forward_row_f64(const double* x, int64_t C, int64_t t, double* res) {
  MEMCORE_DISPATCH(forward_row_f64, x, C, t, res)
}

void backward_row_f64(const double* x, double* out, int64_t C, int64_t t, double lse, double g) {
  MEMCORE_DISPATCH(backward_row_f64, x, out, C, t, lse, g)
}

float sumsq_f32(const float* x, int64_t n) { MEMCORE_DISPATCH(sumsq_f32, x, n) }

double sumsq_f64(const double* x, int64_t n) { MEMCORE_DISPATCH(sumsq_f64, x, n) }

template <class O>
void backward_block_f32(const float* z, float* out, int64_t C, const int64_t* row, const int64_t* t,
                        const float* lse, const float* g, int64_t n, const OptArgs* o) {
  MEMCORE_DISPATCH(backward_block_f32<O>, z, out, C, row, t, lse, g, n, o)
}

template <class O>
void backward_block_narrow_f32(const float* z, float* out, int64_t C, const int64_t* row,
                               const int64_t* t, const float* lse, const float* g, int64_t n,
                               const OptArgs* o) {
  MEMCORE_DISPATCH(backward_block_narrow_f32<O>, z, out, C, row, t, lse, g, n, o)
}

float softcap_f32(float x, const OptArgs* o, float* d1) { MEMCORE_DISPATCH(softcap_f32, x, o, d1) }

MEMCORE_CE_INSTANCES(MEMCORE_CE_FWD, MEMCORE_CE_BWD)

const char* block_isa() {
  switch (kIsa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

}  // namespace cpu
}  // namespace memcore
