// Autocast behaviour of memcore::ce_accumulate, as torchvision registers it for its ops.
//
// F.cross_entropy is on autocast's float32 list: under torch.autocast(dtype=float16 | bfloat16) it
// runs in float32 and returns a float32 loss, whatever the logits' dtype (float64 stays float64).
// ce_accumulate returns its loss in the logits' dtype, so under autocast a float16 "sum" overflowed
// to inf and a bfloat16 "mean" was rounded to 8 bits. Here it returns the loss in float32 instead.
//
// The logits are NOT cast to float32 first (torchvision's cached_cast): memcore's kernels already
// compute in float32 for float16 / bfloat16 logits (the same values a cast would give, since the
// cast is exact), so a cast would only add an N x C float32 copy. Only the result's dtype changes:
// the kernels' float32 loss is returned as is. The other ops already return float32 (opmath)
// outputs; memcore/accumulate.py keeps them float32 under autocast.
#include <ATen/autocast_mode.h>
#include <torch/library.h>

#include "checks.h"
#include "ops.h"

namespace memcore {
namespace {

bool autocast_eligible(const at::Tensor& logits) {
  // autocast's own rule: floating point, not float64
  return logits.is_floating_point() && logits.scalar_type() != at::kDouble;
}

// memcore.accumulate itself no longer calls ce_accumulate (it buffers rows for the compact tracker
// state and keeps its float32 result under autocast in Python, memcore/accumulate.py); this keeps
// the op's own contract for direct callers. ce_forward / ce_forward_reduce need no autocast kernel:
// their outputs are float32 (opmath) already.
template <c10::DispatchKey Key>
Tensor2 ce_accumulate_autocast(at::Tensor& stats, const at::Tensor& logits, const at::Tensor& targets,
                               const at::Tensor& index, int64_t ignore_index, int64_t reduction) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(Key);
  static const auto accumulate = MEMCORE_OP(ce_accumulate);
  if (!autocast_eligible(logits) || logits.scalar_type() == at::kFloat) {
    return accumulate.call(stats, logits, targets, index, ignore_index, reduction);
  }
  // float16 / bfloat16: ce_accumulate's forward + commit (csrc/accumulate.cpp) without its final
  // cast to the logits' dtype
  check_reduction(reduction, /*allow_none=*/true, "memcore::ce_accumulate");
  static const auto forward = MEMCORE_OP(ce_forward);
  static const auto forward_reduce = MEMCORE_OP(ce_forward_reduce);
  static const auto commit = MEMCORE_OP(ce_commit);
  if (reduction == kNone) {
    auto [loss, lse, row_stats, status] = forward.call(logits, targets, index, stats.size(0), ignore_index);
    commit.call(stats, index, targets, loss.detach(), row_stats, status, ignore_index);
    return {loss, status};
  }
  auto [out, count, loss, lse, row_stats, status] =
      forward_reduce.call(logits, targets, index, stats.size(0), ignore_index, reduction);
  commit.call(stats, index, targets, loss, row_stats, status, ignore_index);
  return {out, status};
}

}  // namespace

TORCH_LIBRARY_IMPL(memcore, AutocastCPU, m) {
  MEMCORE_IMPL(m, ce_accumulate, ce_accumulate_autocast<c10::DispatchKey::AutocastCPU>);
}

TORCH_LIBRARY_IMPL(memcore, AutocastCUDA, m) {
  MEMCORE_IMPL(m, ce_accumulate, ce_accumulate_autocast<c10::DispatchKey::AutocastCUDA>);
}

}  // namespace memcore
