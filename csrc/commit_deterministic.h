// Deterministic forms of ce_commit and sqnorm_commit, in ATen ops, for the CUDA kernels under
// torch.use_deterministic_algorithms(True): their float64 atomicAdds make sums over repeated
// indices differ in the last bits from run to run. index_put_(accumulate=True) sorts the indices
// in deterministic mode, so each sample's rows add in a fixed order. Memory: one float64 [N, 6]
// (ce) or [N, 2] (sqnorm) temporary, plus, for sqnorm, one grad-sized square. Same preconditions
// and effect as the ops (a non-zero status commits nothing); any device. csrc/commit_deterministic.cpp.
#pragma once
#include <ATen/ATen.h>

namespace memcore {

void ce_commit_deterministic(at::Tensor& stats, const at::Tensor& index, const at::Tensor& targets,
                             const at::Tensor& loss, const at::Tensor& row_stats, const at::Tensor& status,
                             int64_t ignore_index);

void sqnorm_commit_deterministic(at::Tensor& stats, const at::Tensor& grad, const at::Tensor& scale,
                                 const at::Tensor& index);

}  // namespace memcore
