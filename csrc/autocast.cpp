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
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/extension.h>

#include "common.h"

namespace memcore {
namespace {

using Forward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using ForwardReduce = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

bool autocast_eligible(const at::Tensor& logits) {
  // autocast's own rule: floating point, not float64
  return logits.is_floating_point() && logits.scalar_type() != at::kDouble;
}

template <c10::DispatchKey Key>
std::tuple<at::Tensor, at::Tensor> ce_accumulate_autocast(at::Tensor& stats, const at::Tensor& logits,
                                                           const at::Tensor& targets, const at::Tensor& index,
                                                           int64_t ignore_index, int64_t reduction) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(Key);
  static auto accumulate = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("memcore::ce_accumulate", "")
                               .typed<std::tuple<at::Tensor, at::Tensor>(at::Tensor&, const at::Tensor&,
                                                                         const at::Tensor&, const at::Tensor&,
                                                                         int64_t, int64_t)>();
  const auto dtype = logits.scalar_type();
  if (!autocast_eligible(logits) || dtype == at::kFloat) {
    return accumulate.call(stats, logits, targets, index, ignore_index, reduction);
  }
  // float16 / bfloat16: ce_accumulate's forward + commit without its final cast to the logits' dtype
  static auto forward = c10::Dispatcher::singleton()
                            .findSchemaOrThrow("memcore::ce_forward", "")
                            .typed<Forward(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           int64_t, int64_t)>();
  static auto forward_reduce = c10::Dispatcher::singleton()
                                   .findSchemaOrThrow("memcore::ce_forward_reduce", "")
                                   .typed<ForwardReduce(const at::Tensor&, const at::Tensor&,
                                                        const at::Tensor&, int64_t, int64_t, int64_t)>();
  static auto commit = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("memcore::ce_commit", "")
                           .typed<void(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                       const at::Tensor&, const at::Tensor&, int64_t)>();
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
  m.impl("ce_accumulate", &ce_accumulate_autocast<c10::DispatchKey::AutocastCPU>);
}

TORCH_LIBRARY_IMPL(memcore, AutocastCUDA, m) {
  m.impl("ce_accumulate", &ce_accumulate_autocast<c10::DispatchKey::AutocastCUDA>);
}

}  // namespace memcore
