// Constants of the cross-entropy family shared by its CPU and CUDA kernels; memcore/_layout.py
// mirrors the row-statistic columns and the status bits.
#pragma once
#include <cstdint>

namespace memcore {

// Per-row statistics produced by the forward kernels: opmath [N, kNumRowStats].
enum RowStat : int64_t { kRowProb = 0, kRowMargin = 1, kRowCorrect = 2, kNumRowStats = 3 };

// Loss reduction codes of ce_forward_reduce, ce_forward_grad_ and linear_ce_forward:
// at::Reduction's values, the encoding F.cross_entropy uses too (mirrored in memcore/_validate.py).
enum Reduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };

// Error bits of the int32 status word written by the forward kernels. Any bit set means the
// batch is rejected and the tracker records none of its rows.
enum Status : int32_t {
  kBadTarget = 1,     // target outside [0, C) and not ignore_index
  kBadIndex = 2,      // index outside [0, num_samples) on a non-ignored row
  kNonFinite = 4,     // NaN/+inf logits, or a -inf target logit: loss is not finite
};

}  // namespace memcore
