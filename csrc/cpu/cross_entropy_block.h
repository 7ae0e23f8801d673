// Row-block kernels of the CPU cross-entropy for rows that fit in L1 (C <= 1024 floats), and the
// piece kernel of longer rows, in explicit vectors one register wide (vec.inc: 16 lanes under
// AVX-512, 8 under AVX2, 4 for the baseline), compiled once per ISA (cross_entropy_block.cpp picks
// one at load time). One call handles up to kBlock rows, so the per-row work (maxima before / after
// the target, exp sum, log, p(target)) runs at full vector width: lanes along the row for C >= 16
// (the last vector overlaps the previous one), across W rows for C < 16 (class by class, each a
// column of the group's rows). Memory: each row is read once (twice from L1); outputs are O(rows)
// in caller-owned arrays. More: docs/kernels.md.
#pragma once
#include <cstdint>
#include <limits>

namespace memcore {
namespace cpu {

constexpr int64_t kBlock = 64;  // rows per block; a multiple of every ISA's lane count

// Per-row outputs of a block, each an array of kBlock floats.
struct BlockOut {
  float* lse;
  float* loss;
  float* prob;     // p(target) = exp(z_t - lse)
  float* margin;   // z_t - largest other logit
  float* correct;  // 1 when argmax (first maximal index) is the target
};

// Per-row intermediates of a block, each an array of kBlock floats.
struct BlockTmp {
  float* m;       // row max
  float* s;       // sum of exp(z - m)
  float* before;  // largest logit before the target (-inf if none)
  float* after;   // largest logit after the target
  float* zt;      // target logit
};

// Running state of a row streamed piece by piece (forward_piece_f32): max m so far (-inf before the
// first finite value), sum s of exp(z - m), and the largest logits before / after the target.
struct RowAcc {
  float m, s, before, after;
};

// The loss options of ce_forward_options / ce_backward_options as compile-time flags of the same
// kernels: kCap, softcap (z' = cap * tanh(z / cap) as each value is loaded); kSmooth, the forward's
// smoothing sum sum_j u_j (m - z'_j) in the exp pass and the backward's - c u_j term; kWeight, u the
// class weights (else 1). Backward instances with options (kOpt) also take the target's factor b
// apart from a. Plain, every flag off, is ce_forward / ce_backward: each option's code sits behind
// `if constexpr`, so Plain compiles to the default kernels.
template <bool kCap_, bool kSmooth_, bool kWeight_, bool kOpt_ = kCap_ || kSmooth_ || kWeight_>
struct Opt {
  static constexpr bool kCap = kCap_, kSmooth = kSmooth_, kWeight = kWeight_, kOpt = kOpt_;
};
using Plain = Opt<false, false, false>;

// Run-time values of the options (nullptr for Plain). Per-row arrays hold kBlock floats, indexed as
// the block's rows.
struct OptArgs {
  float cap, inv_cap;  // softcap and 1 / softcap (kCap)
  const float* u;      // class weights [C] (kWeight)
  float usum;          // sum of u over the row: C, or the weights' sum (forward, kSmooth)
  float* d;            // forward scratch: sum_j u_j (m - z'_j) per row (kSmooth)
  float* smooth;       // forward output: -sum_j u_j log p_j per row (kSmooth)
  const float* b;      // backward: the target's factor per row (kOpt)
  const float* c;      // backward: the smoothing factor per row (kSmooth)
};

// What the options add to a streamed row's running state (forward_piece_f32): the target's
// soft-capped logit (kCap; set by the piece holding it), and (kSmooth, in double across pieces)
// sum_j u_j (m - z'_j) over the pieces so far against the running max m, and the sum of their u.
struct OptAcc {
  float zt;
  double d, usum;
};

// The kernels (cross_entropy_block.inc), dispatched to the widest ISA the CPU has; O is an Opt.
//   forward_block_f32:        rows r in [0, n <= kBlock) of z (row row[r], stride C,
//                             16 <= C <= 1024), targets t[r] in [0, C), checked by the caller.
//   forward_block_narrow_f32: the same for C < 16.
//   forward_piece_f32:        one piece x[0, len >= 16) of a row, classes j0 ..., target t: adds it
//                             into a (rows longer than the blocks', C > 1024, streamed).
//   softmax_scale_f32:        out[0, n >= 16) = exp(x - lse) * g (a streamed row's backward piece).
//   forward_row_f64:          one float64 row, C >= 8: {max before / after the target, max, exp sum}.
//   backward_row_f64:         one float64 row's gradient, C >= 8.
//   sumsq_f32, sumsq_f64:     sum of squares of x[0, n) (ce_input_sqnorm's rows), any n.
//   backward_block_f32:       out row = (softmax(z row) - onehot(t[r])) * g[r], C >= 16 (any C).
//   backward_block_narrow_f32: the same for C < 16.
template <class O>
void forward_block_f32(const float* z, int64_t C, const int64_t* row, const int64_t* t, int64_t n,
                       BlockTmp tmp, BlockOut out, const OptArgs* o);
template <class O>
void forward_block_narrow_f32(const float* z, int64_t C, const int64_t* row, const int64_t* t,
                              int64_t n, BlockOut out, const OptArgs* o);
template <class O>
void forward_piece_f32(const float* x, int64_t len, int64_t j0, int64_t t, RowAcc* a, OptAcc* oa,
                       const OptArgs* o);
template <class O>
void softmax_scale_f32(const float* x, float* out, int64_t n, float lse, float g, int64_t j0, float c,
                       const OptArgs* o);
void forward_row_f64(const double* x, int64_t C, int64_t t, double* res);
void backward_row_f64(const double* x, double* out, int64_t C, int64_t t, double lse, double g);
float sumsq_f32(const float* x, int64_t n);
double sumsq_f64(const double* x, int64_t n);
template <class O>
void backward_block_f32(const float* z, float* out, int64_t C, const int64_t* row, const int64_t* t,
                        const float* lse, const float* g, int64_t n, const OptArgs* o);
template <class O>
void backward_block_narrow_f32(const float* z, float* out, int64_t C, const int64_t* row,
                               const int64_t* t, const float* lse, const float* g, int64_t n,
                               const OptArgs* o);
// softcap of one value, cap * tanh(x / cap), by the kernels' own tanh; *d1 = 1 - tanh^2 where given
float softcap_f32(float x, const OptArgs* o, float* d1);

// The option instances compiled: F(O) for each forward Opt, B(O) for each backward one (the backward
// with options always takes b: kOpt is set even with every option off)
#define MEMCORE_CE_INSTANCES(F, B)                                                                  \
  F(Plain) F(Opt<true, false, false>) F(Opt<false, true, false>) F(Opt<false, true, true>)          \
  F(Opt<true, true, false>) F(Opt<true, true, true>)                                                \
  B(Plain) B(Opt<false, false, false, true>) B(Opt<true, false, false>) B(Opt<false, true, false>)  \
  B(Opt<false, true, true>) B(Opt<true, true, false>) B(Opt<true, true, true>)

// Explicit instantiations of one instance
#define MEMCORE_CE_FWD(...)                                                                                  \
  template void forward_block_f32<__VA_ARGS__>(const float*, int64_t, const int64_t*, const int64_t*,   \
                                               int64_t, BlockTmp, BlockOut, const OptArgs*);           \
  template void forward_block_narrow_f32<__VA_ARGS__>(const float*, int64_t, const int64_t*,            \
                                                      const int64_t*, int64_t, BlockOut, const OptArgs*); \
  template void forward_piece_f32<__VA_ARGS__>(const float*, int64_t, int64_t, int64_t, RowAcc*, OptAcc*, \
                                               const OptArgs*);
#define MEMCORE_CE_BWD(...)                                                                                  \
  template void backward_block_f32<__VA_ARGS__>(const float*, float*, int64_t, const int64_t*,           \
                                                const int64_t*, const float*, const float*, int64_t,   \
                                                const OptArgs*);                                        \
  template void backward_block_narrow_f32<__VA_ARGS__>(const float*, float*, int64_t, const int64_t*,    \
                                                       const int64_t*, const float*, const float*,      \
                                                       int64_t, const OptArgs*);                        \
  template void softmax_scale_f32<__VA_ARGS__>(const float*, float*, int64_t, float, float, int64_t, float, \
                                               const OptArgs*);

// "avx512", "avx2" or "baseline": the kernels in use on this machine
const char* block_isa();

}  // namespace cpu
}  // namespace memcore
