// Host replays of the CUDA cross-entropy kernels' logic (csrc/kernel_logic.cpp), bound as
// memcore._C._ce_row_replay / _ce_grad_replay / _seg_commit_replay for tests/test_kernel_logic.py.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace memcore {
namespace kernel_logic {

// ce_forward_kernel's logic for one row (1-D CPU tensor, any of the four dtypes), split over tpr
// threads (32, 256 or 512) with 16-byte packs when vec: float64 [lse, loss, prob, margin, correct]
at::Tensor ce_row_replay(const at::Tensor& row, int64_t target, int64_t tpr, bool vec);
// the gradient pass over row into out (may be row itself: ce_forward_grad_'s in-place pass)
void ce_grad_replay(const at::Tensor& row, at::Tensor& out, int64_t target, double lse, double g, int64_t tpr,
                    bool vec);
// one warp of ce_commit_kernel's segmented reduction: index int64 [32] (-1: nothing to add),
// values float64 [32, 6] -> float64 [32, 6], what each lane adds into stats[index]
at::Tensor seg_commit_replay(const at::Tensor& index, const at::Tensor& values);

}  // namespace kernel_logic
}  // namespace memcore
