// Row-block kernels of the CPU cross-entropy for rows that fit in L1 (C <= kChunk floats). One
// cloned call handles a whole block of rows, so per-row work (the two maxima around the target,
// the exp sum, log, p(target)) is inlined at the clone's vector width instead of paying a
// function call and a scalar exp/log chain per row: at C = 10 that per-row cost dominated.
// Memory: reads each row once; writes O(rows) outputs into caller-owned arrays.
#pragma once
#include <cstdint>
#include <limits>

#include "vec_math.h"

namespace memcore {
namespace cpu {

// Outputs of one row of the forward, as float.
struct BlockOut {
  float* lse;
  float* loss;
  float* prob;     // p(target) = exp(z_t - lse)
  float* margin;   // z_t - largest other logit
  float* correct;  // 1 when argmax (first maximal index) is the target
};

// Finishes rows [0, n) of a block from the running max, exp sum, neighbouring maxima and target
// logit of each row: across rows, so log and exp vectorise.
MEMCORE_INLINE void finish_rows(int64_t n, const float* __restrict__ mm, const float* __restrict__ s,
                                const float* __restrict__ before, const float* __restrict__ after,
                                const float* __restrict__ zt, BlockOut out) {
  float* __restrict__ o_lse = out.lse;
  float* __restrict__ o_loss = out.loss;
  float* __restrict__ o_prob = out.prob;
  float* __restrict__ o_margin = out.margin;
  float* __restrict__ o_correct = out.correct;
  for (int64_t r = 0; r < n; ++r) {
    // an all -inf row has no finite max: NaN flags it, as it does NaN entries
    const float sr = mm[r] == -std::numeric_limits<float>::infinity()
                         ? std::numeric_limits<float>::quiet_NaN() : s[r];
    const float lse = mm[r] + log_approx(sr);
    const float other = before[r] > after[r] ? before[r] : after[r];
    o_lse[r] = lse;
    o_loss[r] = lse - zt[r];
    o_prob[r] = exp_approx(zt[r] - lse);
    o_margin[r] = zt[r] - other;
    o_correct[r] = (zt[r] > before[r] && zt[r] >= after[r]) ? 1.f : 0.f;
  }
}

// Rows r in [0, n) of z (row row[r], stride C, kLanes <= C <= kChunk), targets t[r] in [0, C)
// (checked by the caller). Lanes run along the row; the last partial block of lanes overlaps the
// previous one (max is idempotent; the sum masks the overlap), so there is no scalar tail.
// tmp: 5 * n floats of scratch.
MEMCORE_CLONES inline void forward_block_f32(const float* z, int64_t C, const int64_t* row,
                                             const int64_t* t, int64_t n, float* tmp, BlockOut out) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  float *mm = tmp, *s = tmp + n, *before = tmp + 2 * n, *after = tmp + 3 * n, *zt = tmp + 4 * n;
  const int64_t tail = C - kLanes;  // start of the overlapping last block
  for (int64_t r = 0; r < n; ++r) {
    const float* x = z + row[r] * C;
    const int32_t tr = static_cast<int32_t>(t[r]);
    // largest logit before and after the target in one sweep (margin, argmax tie rule)
    alignas(64) float accb[kLanes], acca[kLanes];
    for (int k = 0; k < kLanes; ++k) accb[k] = acca[k] = kNegInf;
    int64_t i = 0;
    for (; i + kLanes <= C; i += kLanes)
      for (int k = 0; k < kLanes; ++k) {
        const float v = x[i + k];
        const int32_t j = static_cast<int32_t>(i) + k;
        accb[k] = (j < tr && v > accb[k]) ? v : accb[k];
        acca[k] = (j > tr && v > acca[k]) ? v : acca[k];
      }
    const int64_t full = i;
    if (full < C)
      for (int k = 0; k < kLanes; ++k) {
        const float v = x[tail + k];
        const int32_t j = static_cast<int32_t>(tail) + k;
        accb[k] = (j < tr && v > accb[k]) ? v : accb[k];
        acca[k] = (j > tr && v > acca[k]) ? v : acca[k];
      }
    const float mb = hmax16(accb), ma = hmax16(acca);
    const float ztr = x[tr];
    float m = mb > ma ? mb : ma;
    m = ztr > m ? ztr : m;
    alignas(64) float acc[kLanes] = {0.f};
    for (i = 0; i < full; i += kLanes)
      for (int k = 0; k < kLanes; ++k) acc[k] += exp_approx(x[i + k] - m);
    if (full < C)
      for (int k = 0; k < kLanes; ++k) {
        const float e = exp_approx(x[tail + k] - m);
        acc[k] += tail + k >= full ? e : 0.f;
      }
    mm[r] = m;
    s[r] = hsum16(acc);
    before[r] = mb;
    after[r] = ma;
    zt[r] = ztr;
  }
  finish_rows(n, mm, s, before, after, zt, out);
}

// Rows shorter than a vector (C < kLanes): lanes run across kLanes rows at once (a gather per
// class), so nothing is wasted on padding and there is no horizontal reduction per row.
MEMCORE_CLONES inline void forward_block_narrow_f32(const float* z, int64_t C, const int64_t* row,
                                                    const int64_t* t, int64_t n, float* tmp,
                                                    BlockOut out) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  float *mm = tmp, *s = tmp + n, *before = tmp + 2 * n, *after = tmp + 3 * n, *zt = tmp + 4 * n;
  for (int64_t r0 = 0; r0 < n; r0 += kLanes) {
    const float* p[kLanes];
    int32_t tr[kLanes];
    for (int k = 0; k < kLanes; ++k) {  // a partial last group repeats row r0; its lanes are dropped
      const int64_t r = r0 + k < n ? r0 + k : r0;
      p[k] = z + row[r] * C;
      tr[k] = static_cast<int32_t>(t[r]);
    }
    float mb[kLanes], ma[kLanes], zk[kLanes], m[kLanes], acc[kLanes];
    for (int k = 0; k < kLanes; ++k) mb[k] = ma[k] = zk[k] = kNegInf;
    for (int32_t j = 0; j < C; ++j)
      for (int k = 0; k < kLanes; ++k) {
        const float v = p[k][j];
        mb[k] = (j < tr[k] && v > mb[k]) ? v : mb[k];
        ma[k] = (j > tr[k] && v > ma[k]) ? v : ma[k];
        zk[k] = j == tr[k] ? v : zk[k];
      }
    for (int k = 0; k < kLanes; ++k) {
      const float o = mb[k] > ma[k] ? mb[k] : ma[k];
      m[k] = zk[k] > o ? zk[k] : o;
      acc[k] = 0.f;
    }
    for (int32_t j = 0; j < C; ++j)
      for (int k = 0; k < kLanes; ++k) acc[k] += exp_approx(p[k][j] - m[k]);
    const int64_t cnt = n - r0 < kLanes ? n - r0 : kLanes;
    for (int64_t k = 0; k < cnt; ++k) {
      mm[r0 + k] = m[k];
      s[r0 + k] = acc[k];
      before[r0 + k] = mb[k];
      after[r0 + k] = ma[k];
      zt[r0 + k] = zk[k];
    }
  }
  finish_rows(n, mm, s, before, after, zt, out);
}

// out row r = (softmax(z row) - onehot(t[r])) * g[r], for rows row[r]; both z and out use stride C.
MEMCORE_CLONES inline void backward_block_f32(const float* z, float* out, int64_t C, const int64_t* row,
                                              const int64_t* t, const float* lse, const float* g,
                                              int64_t n) {
  for (int64_t r = 0; r < n; ++r) {
    const float* x = z + row[r] * C;
    float* o = out + row[r] * C;
    const float l = lse[r], gr = g[r];
    for (int64_t j = 0; j < C; ++j) o[j] = exp_approx(x[j] - l) * gr;
    o[t[r]] = (exp_approx(x[t[r]] - l) - 1.f) * gr;
  }
}

}  // namespace cpu
}  // namespace memcore
