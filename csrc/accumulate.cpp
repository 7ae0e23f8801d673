// memcore::ce_accumulate: the whole of `memcore.accumulate` for a batch in one operator call —
// ce_forward_reduce (per-row loss and statistics in one pass over logits, and the mean or sum;
// ce_forward for reduction "none") and ce_commit (scatter into the tracker's float64 [S, 6]
// buffer, skipped when the status word flags an error). Registered as CompositeImplicitAutograd:
// eager mode pays one Python-to-C++ crossing instead of one per op (at small batches that crossing
// cost more than the kernels), while autograd and torch.compile see the underlying ops.
#include <torch/extension.h>

#include "checks.h"

namespace memcore {
namespace {

using Forward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

std::tuple<at::Tensor, at::Tensor> ce_accumulate(at::Tensor& stats, const at::Tensor& logits,
                                                  const at::Tensor& targets, const at::Tensor& index,
                                                  int64_t ignore_index, int64_t reduction) {
  check_reduction(reduction, /*allow_none=*/true, "memcore::ce_accumulate");
  static auto forward = c10::Dispatcher::singleton()
                            .findSchemaOrThrow("memcore::ce_forward", "")
                            .typed<Forward(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           int64_t, int64_t)>();
  static auto commit = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("memcore::ce_commit", "")
                           .typed<void(at::Tensor&, const at::Tensor&, const at::Tensor&,
                                       const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                       int64_t)>();
  if (reduction == kNone) {
    auto [loss, lse, row_stats, status] = forward.call(logits, targets, index, stats.size(0), ignore_index);
    commit.call(stats, index, targets, loss.detach(), row_stats, status, ignore_index);
    return {loss.to(logits.scalar_type()), status};
  }
  // mean (over the rows that are not ignored; NaN when none is, like torch) or sum
  static auto forward_reduce =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("memcore::ce_forward_reduce", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t, int64_t)>();
  auto [out, count, loss, lse, row_stats, status] =
      forward_reduce.call(logits, targets, index, stats.size(0), ignore_index, reduction);
  commit.call(stats, index, targets, loss, row_stats, status, ignore_index);
  return {out.to(logits.scalar_type()), status};
}

}  // namespace

TORCH_LIBRARY_IMPL(memcore, CompositeImplicitAutograd, m) { m.impl("ce_accumulate", &ce_accumulate); }

}  // namespace memcore
