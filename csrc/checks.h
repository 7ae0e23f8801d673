// Argument checks shared by the CPU and CUDA entry points. The Python layer validates first and
// raises ValueError/TypeError/IndexError naming the argument; these keep direct torch.ops calls
// from ever reading out of bounds.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "common.h"

namespace memcore {

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
inline void check_forward_grad(const at::Tensor& logits, int64_t reduction) {
  const char* op = "memcore::ce_forward_grad_";
  check_reduction(reduction, /*allow_none=*/false, op);
  TORCH_CHECK(logits.is_contiguous(), op, ": logits must be contiguous (the gradient is written over them)");
}

inline at::ScalarType opmath_dtype(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_commit(const at::Tensor& stats, const at::Tensor& index, const at::Tensor& targets,
                         const at::Tensor& loss, const at::Tensor& row_stats,
                         const at::Tensor& status) {
  const char* op = "memcore::ce_commit";
  TORCH_CHECK(stats.dim() == 2 && stats.size(1) == kNumStats && stats.scalar_type() == at::kDouble &&
                  stats.is_contiguous(),
              op, ": stats must be a contiguous float64 [S, ", int64_t(kNumStats), "] tensor");
  const int64_t n = loss.size(0);
  TORCH_CHECK(loss.dim() == 1, op, ": loss must be 1-D");
  TORCH_CHECK(index.dim() == 1 && index.size(0) == n && index.scalar_type() == at::kLong, op,
              ": index must be int64 [N]");
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == n && targets.scalar_type() == at::kLong, op,
              ": targets must be int64 [N]");
  TORCH_CHECK(row_stats.dim() == 2 && row_stats.size(0) == n && row_stats.size(1) == kNumRowStats &&
                  row_stats.scalar_type() == loss.scalar_type(),
              op, ": row_stats must be [N, ", int64_t(kNumRowStats), "] of loss's dtype");
  TORCH_CHECK(status.numel() == 1 && status.scalar_type() == at::kInt, op,
              ": status must be a 1-element int32 tensor");
  for (const at::Tensor* t : {&index, &targets, &loss, &row_stats, &status}) {
    TORCH_CHECK(t->device() == stats.device(), op, ": all tensors must be on ", stats.device());
    TORCH_CHECK(t->is_contiguous(), op, ": all tensors must be contiguous");
  }
}

inline void check_sqnorm(const at::Tensor& stats, const at::Tensor& grad, const at::Tensor& scale,
                         const at::Tensor& index) {
  const char* op = "memcore::sqnorm_commit";
  TORCH_CHECK(stats.dim() == 2 && stats.size(1) == kNumGradStats && stats.scalar_type() == at::kDouble &&
                  stats.is_contiguous(),
              op, ": stats must be a contiguous float64 [S, ", int64_t(kNumGradStats), "] tensor");
  TORCH_CHECK(grad.dim() >= 1 && grad.is_contiguous(), op, ": grad must be a contiguous [N, ...] tensor");
  const int64_t n = grad.size(0);
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == n && scale.scalar_type() == at::kDouble, op,
              ": scale must be float64 [N]");
  TORCH_CHECK(index.dim() == 1 && index.size(0) == n && index.scalar_type() == at::kLong, op,
              ": index must be int64 [N]");
  for (const at::Tensor* t : {&grad, &scale, &index}) {
    TORCH_CHECK(t->device() == stats.device(), op, ": all tensors must be on ", stats.device());
    TORCH_CHECK(t->is_contiguous(), op, ": all tensors must be contiguous");
  }
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
