// Shared between the CPU and CUDA kernels of memcore and mirrored in memcore/_layout.py.
#pragma once
#include <cstdint>

namespace memcore {

// Per-sample, per-epoch statistics buffer: float64 [num_samples, kNumStats], row-major, so the
// fields of one sample share a cache line and a scatter touches one line per row.
enum Stat : int64_t {
  kLossSum = 0,     // sum of per-row cross-entropy losses
  kRows = 1,        // number of rows (presentations / tokens) seen
  kCorrect = 2,     // number of rows whose argmax equals the target
  kProbSum = 3,     // sum of p(target)
  kProbSqSum = 4,   // sum of p(target)^2
  kMarginSum = 5,   // sum of (target logit - largest other logit)
  kNumStats = 6,
};

// Per-sample input-gradient statistics buffer: float64 [num_samples, kNumGradStats].
enum GradStat : int64_t { kGradSqSum = 0, kGradRows = 1, kNumGradStats = 2 };

// Per-row statistics produced by the forward kernel: float32/64 [N, kNumRowStats].
enum RowStat : int64_t { kRowProb = 0, kRowMargin = 1, kRowCorrect = 2, kNumRowStats = 3 };

// Loss reduction codes of ce_accumulate / ce_forward_reduce: at::Reduction's values, the encoding
// F.cross_entropy uses too (mirrored in memcore/accumulate.py).
enum Reduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };

// Error bits of the int32 status word written by the forward kernel. Any bit set means the
// commit kernel leaves the tracker untouched.
enum Status : int32_t {
  kBadTarget = 1,     // target outside [0, C) and not ignore_index
  kBadIndex = 2,      // index outside [0, num_samples) on a non-ignored row
  kNonFinite = 4,     // NaN/+inf logits, or a -inf target logit: loss is not finite
};

}  // namespace memcore
