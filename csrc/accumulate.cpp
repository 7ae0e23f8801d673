// memcore::ce_accumulate (CompositeImplicitAutograd; the only op registered here): the whole of
// `memcore.accumulate` for a batch in one operator call — ce_forward_reduce (per-row loss and
// statistics in one pass over logits, and the mean or sum; ce_forward for reduction "none") and
// ce_commit (scatter into the tracker's float64 [S, 6] buffer, skipped when the status word flags
// an error). Memory: ce_forward's O(N) outputs; nothing of size N x C. Eager mode pays one
// Python-to-C++ crossing instead of one per op (at small batches that crossing cost more than the
// kernels), while autograd and torch.compile see the underlying ops.
#include <torch/library.h>

#include "checks.h"
#include "ops.h"

namespace memcore {
namespace {

Tensor2 ce_accumulate_composite(at::Tensor& stats, const at::Tensor& logits, const at::Tensor& targets,
                                const at::Tensor& index, int64_t ignore_index, int64_t reduction) {
  check_reduction(reduction, /*allow_none=*/true, "memcore::ce_accumulate");
  static const auto forward = MEMCORE_OP(ce_forward);
  static const auto commit = MEMCORE_OP(ce_commit);
  if (reduction == kNone) {
    auto [loss, lse, row_stats, status] = forward.call(logits, targets, index, stats.size(0), ignore_index);
    commit.call(stats, index, targets, loss.detach(), row_stats, status, ignore_index);
    return {loss.to(logits.scalar_type()), status};
  }
  // mean (over the rows that are not ignored; NaN when none is, like torch) or sum
  static const auto forward_reduce = MEMCORE_OP(ce_forward_reduce);
  auto [out, count, loss, lse, row_stats, status] =
      forward_reduce.call(logits, targets, index, stats.size(0), ignore_index, reduction);
  commit.call(stats, index, targets, loss, row_stats, status, ignore_index);
  return {out.to(logits.scalar_type()), status};
}

}  // namespace

TORCH_LIBRARY_IMPL(memcore, CompositeImplicitAutograd, m) {
  MEMCORE_IMPL(m, ce_accumulate, ce_accumulate_composite);
}

}  // namespace memcore
