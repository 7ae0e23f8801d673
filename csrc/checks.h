// Argument checks of the cross-entropy family, shared by its CPU and CUDA entry points. The Python
// layer validates first and raises ValueError/TypeError/IndexError naming the argument; these keep
// direct torch.ops calls from ever reading out of bounds.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>

#include "common.h"

namespace memcore {

inline at::ScalarType opmath_dtype(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_rows(const at::Tensor& logits, const at::Tensor& targets, const char* op) {
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be 2-D [N, C], got ", logits.sizes());
  TORCH_CHECK(logits.is_contiguous(), op, ": logits must be contiguous");
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == logits.size(0), op,
              ": targets must be 1-D with N=", logits.size(0), " entries, got ", targets.sizes());
  TORCH_CHECK(targets.scalar_type() == at::kLong, op, ": targets must be int64");
  TORCH_CHECK(targets.device() == logits.device(), op, ": targets must be on ", logits.device());
  TORCH_CHECK(targets.is_contiguous(), op, ": targets must be contiguous");
}

inline void check_vector(const at::Tensor& t, const at::Tensor& logits, at::ScalarType dtype,
                         const char* name, const char* op) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == logits.size(0), op, ": ", name,
              " must be 1-D with N=", logits.size(0), " entries, got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == logits.device(), op, ": ", name, " must be on ", logits.device());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

inline void check_reduction(int64_t reduction, bool allow_none, const char* op) {
  TORCH_CHECK((allow_none && reduction == kNone) || reduction == kMean || reduction == kSum, op,
              ": reduction must be ", allow_none ? "0 (none), " : "", "1 (mean) or 2 (sum), got ",
              reduction);
}

// ce_forward_grad_ (CPU and CUDA): a reduction and logits it can overwrite row by row
inline void check_forward_grad(const at::Tensor& logits, int64_t reduction,
                               const char* op = "memcore::ce_forward_grad_") {
  check_reduction(reduction, /*allow_none=*/false, op);
  TORCH_CHECK(logits.is_contiguous(), op, ": logits must be contiguous (the gradient is written over them)");
}

// ce_input_sqnorm (CPU and CUDA): grad [N, ...] contiguous, scale float64 [N] on grad's device
inline void check_input_sqnorm(const at::Tensor& grad, const at::Tensor& scale) {
  const char* op = "memcore::ce_input_sqnorm";
  TORCH_CHECK(grad.dim() >= 1 && grad.is_contiguous(), op, ": grad must be a contiguous [N, ...] tensor");
  TORCH_CHECK(grad.is_floating_point(), op, ": grad must be floating point, got ", grad.scalar_type());
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == grad.size(0) && scale.scalar_type() == at::kDouble, op,
              ": scale must be float64 [N=", grad.size(0), "], got ", scale.scalar_type(), " ", scale.sizes());
  TORCH_CHECK(scale.device() == grad.device() && scale.is_contiguous(), op, ": scale must be contiguous on ",
              grad.device());
}

// The loss options' scalars and class weights (ce_forward_options / ce_backward_options on CPU and
// CUDA, linear_ce_forward / linear_ce_backward): weight [classes] in the opmath dtype of like (the
// logits, or linear's hidden), contiguous on like's device; weight_name: the argument's name in the op.
inline void check_options(int64_t classes, const at::Tensor& like, double softcap, double label_smoothing,
                          const std::optional<at::Tensor>& weight, const char* op, const char* weight_name = "weight") {
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0.0, op, ": softcap must be finite and >= 0 (0: none), got ",
              softcap);
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, op, ": label_smoothing must be in [0, 1], got ",
              label_smoothing);
  if (weight.has_value()) {
    TORCH_CHECK(weight->dim() == 1 && weight->size(0) == classes, op, ": ", weight_name, " must be [C=", classes,
                "], got ", weight->sizes());
    TORCH_CHECK(weight->scalar_type() == opmath_dtype(like), op, ": ", weight_name, " must be ", opmath_dtype(like),
                ", got ", weight->scalar_type());
    TORCH_CHECK(weight->device() == like.device() && weight->is_contiguous(), op, ": ", weight_name,
                " must be contiguous on ", like.device());
  }
}

// ce_backward_options's per-row coefficients: a, b opmath [N]; c opmath [N] or [0]
inline void check_option_coefficients(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c,
                                      const at::Tensor& logits, const char* op) {
  check_vector(a, logits, opmath_dtype(logits), "a", op);
  check_vector(b, logits, opmath_dtype(logits), "b", op);
  if (c.numel() != 0 || c.dim() != 1) check_vector(c, logits, opmath_dtype(logits), "c", op);
}

// Every argument of ce_forward_options / ce_backward_options (CPU and CUDA)
inline void check_forward_options(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& index,
                                  double softcap, double label_smoothing, const std::optional<at::Tensor>& weight) {
  const char* op = "memcore::ce_forward_options";
  check_rows(logits, targets, op);
  check_vector(index, logits, at::kLong, "index", op);
  check_options(logits.size(1), logits, softcap, label_smoothing, weight, op);
}

inline void check_backward_options(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c,
                                   const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                                   double softcap, const std::optional<at::Tensor>& weight) {
  const char* op = "memcore::ce_backward_options";
  check_rows(logits, targets, op);
  check_vector(lse, logits, opmath_dtype(logits), "lse", op);
  check_option_coefficients(a, b, c, logits, op);
  check_options(logits.size(1), logits, softcap, 0.0, weight, op);
}

inline void check_scale_unless_one(const at::Tensor& grad, const at::Tensor& scale) {
  const char* op = "memcore::scale_unless_one_";
  TORCH_CHECK(grad.is_contiguous() && grad.is_floating_point(), op,
              ": grad must be a contiguous floating-point tensor");
  TORCH_CHECK(scale.numel() == 1 && scale.is_floating_point(), op,
              ": scale must be a 1-element floating-point tensor, got ", scale.sizes());
  TORCH_CHECK(scale.device() == grad.device(), op, ": scale must be on ", grad.device());
}

}  // namespace memcore
