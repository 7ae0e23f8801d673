// The cross_entropy family's options ops, memcore::ce_forward_options and memcore::ce_backward_options
// (schemas and contracts in csrc/memcore.cpp), composed of the default ops and ATen: the reference
// the fused kernels (csrc/cpu/cross_entropy.cpp, csrc/cuda/cross_entropy_options.cu) are tested
// against on any device (memcore._C._ce_*_options_composed), and the CPU kernels for now.
// Memory: with softcap, or for 16-bit logits, one [N, C] opmath copy of the logits (z'), made again
// in the backward; the gradient [N, C] in opmath before its cast to the logits' dtype.
#include <torch/extension.h>

#include <optional>
#include <tuple>

#include "../checks.h"
#include "../common.h"
#include "../ops.h"

namespace memcore {

namespace {

// z' = softcap * tanh(z / softcap) (softcap > 0), else z, in opmath: the logits themselves where
// they are already opmath and uncapped.
at::Tensor capped(const at::Tensor& logits, double softcap) {
  const at::Tensor z = logits.to(opmath_dtype(logits));
  return softcap > 0.0 ? at::tanh(z / softcap) * softcap : z;
}

}  // namespace

Tensor5 ce_forward_options_composed(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& index,
                                    int64_t num_samples, int64_t ignore_index, double softcap,
                                    double label_smoothing, const std::optional<at::Tensor>& weight) {
  const char* op = "memcore::ce_forward_options";
  check_rows(logits, targets, op);
  check_vector(index, logits, at::kLong, "index", op);
  check_options(logits, softcap, label_smoothing, weight, op);
  static const auto forward = MEMCORE_OP(ce_forward);
  const at::Tensor z = capped(logits, softcap);
  auto [loss, lse, row_stats, status] = forward.call(z, targets, index, num_samples, ignore_index);
  at::Tensor smooth = at::empty({0}, lse.options());
  if (label_smoothing > 0.0) {
    // -sum_j u_j log p_j = U lse - sum_j u_j z'_j, U = sum_j u_j
    at::Tensor uz, big_u;
    if (weight.has_value()) {
      uz = at::mv(z, *weight);
      big_u = weight->sum();
    } else {
      uz = z.sum(1);
      big_u = at::scalar_tensor(static_cast<double>(logits.size(1)), lse.options());
    }
    smooth = at::where(targets.ne(ignore_index), big_u * lse - uz, at::zeros({}, lse.options()));
  }
  return {loss, lse, row_stats, status, smooth};
}

at::Tensor ce_backward_options_composed(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c,
                                        const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                                        int64_t ignore_index, double softcap, const std::optional<at::Tensor>& weight) {
  const char* op = "memcore::ce_backward_options";
  check_rows(logits, targets, op);
  check_vector(lse, logits, opmath_dtype(logits), "lse", op);
  check_option_coefficients(a, b, c, logits, op);
  check_options(logits, softcap, 0.0, weight, op);
  static const auto backward = MEMCORE_OP(ce_backward);
  const at::Tensor z = capped(logits, softcap);
  const at::Tensor keep = targets.ne(ignore_index);
  const at::Tensor keep_f = keep.to(lse.scalar_type());
  // a (p - onehot), the target's entry a (p_t - 1) as ce_backward makes it; ignored rows 0
  at::Tensor grad = backward.call(a, z, targets, lse, ignore_index);
  const at::Tensor safe_t = at::where(keep, targets, at::zeros({}, targets.options())).unsqueeze(1);
  // - c u_j on every kept entry, then + (a - b) at the target: a p_t - b - c u_t there
  if (c.numel() != 0) grad.sub_(weight.has_value() ? at::outer(c * keep_f, *weight) : (c * keep_f).unsqueeze(1));
  const at::Tensor fix = (a - b) * keep_f;
  const at::Tensor at_t = grad.gather(1, safe_t) + fix.unsqueeze(1);
  grad.scatter_(1, safe_t, at_t);
  if (softcap > 0.0) grad.mul_(1.0 - (z / softcap).square());
  return grad.to(logits.scalar_type());
}

TORCH_LIBRARY_IMPL(memcore, CPU, m) {
  MEMCORE_IMPL(m, ce_forward_options, ce_forward_options_composed);
  MEMCORE_IMPL(m, ce_backward_options, ce_backward_options_composed);
}


}  // namespace memcore
