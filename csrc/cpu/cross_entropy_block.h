// Row-block kernels of the CPU cross-entropy for rows that fit in L1 (C <= 1024 floats), in
// explicit 16-lane vectors (vec16.inc), compiled for AVX-512, AVX2 and the baseline
// (cross_entropy_block.cpp picks one at load time). One call handles up to kBlock rows, so the
// per-row work (maxima before / after the target, exp sum, log, p(target)) runs at full vector
// width: lanes along the row for C >= 16 (the last vector overlaps the previous one), across 16
// rows for C < 16 (transposed into a [C][16] scratch). Memory: each row is read once (twice from
// L1); outputs are O(rows) in caller-owned arrays. More: docs/kernels.md.
#pragma once
#include <cstdint>
#include <limits>

namespace memcore {
namespace cpu {

constexpr int64_t kBlock = 64;  // rows per block; a multiple of 16

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

// The kernels (cross_entropy_block.inc), dispatched to the widest ISA the CPU has.
//   forward_block_f32:        rows r in [0, n <= kBlock) of z (row row[r], stride C,
//                             16 <= C <= 1024), targets t[r] in [0, C), checked by the caller.
//   forward_block_narrow_f32: the same for C < 16.
//   backward_block_f32:       out row = (softmax(z row) - onehot(t[r])) * g[r], C >= 16 (any C).
//   backward_block_narrow_f32: the same for C < 16.
void forward_block_f32(const float* z, int64_t C, const int64_t* row, const int64_t* t, int64_t n,
                       BlockTmp tmp, BlockOut out);
void forward_block_narrow_f32(const float* z, int64_t C, const int64_t* row, const int64_t* t,
                              int64_t n, BlockOut out);
void backward_block_f32(const float* z, float* out, int64_t C, const int64_t* row, const int64_t* t,
                        const float* lse, const float* g, int64_t n);
void backward_block_narrow_f32(const float* z, float* out, int64_t C, const int64_t* row,
                               const int64_t* t, const float* lse, const float* g, int64_t n);

// "avx512", "avx2" or "baseline": the kernels in use on this machine
const char* block_isa();

}  // namespace cpu
}  // namespace memcore
