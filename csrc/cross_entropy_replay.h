// Host replays of the CUDA cross-entropy kernels' logic (csrc/cross_entropy_replay.cpp), bound as
// memcore._C._ce_row_replay / _ce_grad_replay / _ce_reduce_replay, the split path's
// _ce_split_slices / _ce_split_forward_replay / _ce_split_backward_replay and the ex2 model's
// _ce_ex2_model / _ce_host_ex2 for tests/test_cross_entropy_replay.py and tests/test_cross_entropy_accuracy.py.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

namespace memcore {
namespace replay {

// ce_forward_kernel's logic for one row (1-D CPU tensor, any of the four dtypes), split over tpr
// threads (32, 256 or 512) with 16-byte packs when vec: float64 [lse, loss, prob, margin, correct]
at::Tensor ce_row_replay(const at::Tensor& row, int64_t target, int64_t tpr, bool vec);
// the gradient pass over row into out (may be row itself: ce_forward_grad_'s in-place pass)
void ce_grad_replay(const at::Tensor& row, at::Tensor& out, int64_t target, double lse, double g, int64_t tpr,
                    bool vec);

// the CUDA launcher's slices per row (1: no split) for n rows of c logits of elem_size bytes, sms SMs
int64_t ce_split_slices(int64_t n, int64_t c, int64_t elem_size, int64_t sms);
// ce_forward's split launch over logits [N, C] (a CPU tensor, rows at any alignment), slices per row
// and tpr threads per block: ce_forward's (loss, lse, row_stats, status); with grad, the overwrite
// mode of ce_forward_grad_: the gradient of the mean (sum) of the losses written over logits
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ce_split_forward_replay(
    at::Tensor& logits, const at::Tensor& targets, const at::Tensor& index, int64_t num_samples,
    int64_t ignore_index, int64_t slices, int64_t tpr, bool grad, bool mean);
// ce_backward's split launch: the gradient, allocated at the logits' offset from a 16-byte boundary
at::Tensor ce_split_backward_replay(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& targets,
                                    const at::Tensor& lse, int64_t ignore_index, int64_t slices, int64_t tpr);
// ce_forward_options' CUDA kernel over logits [N, C] (a CPU tensor), tpr threads per row, 16-byte
// packs when vec: the op's (loss, lse, row_stats, status, smooth)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ce_forward_options_replay(
    const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& index, int64_t num_samples,
    int64_t ignore_index, double softcap, double label_smoothing, const std::optional<at::Tensor>& weight,
    int64_t tpr, bool vec);
// ce_backward_options' CUDA kernel: the gradient, at the logits' offset from a 16-byte boundary;
// inplace: written over a copy of the logits there, as ce_forward_grad_options_ runs it
at::Tensor ce_backward_options_replay(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c,
                                      const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                                      int64_t ignore_index, double softcap, const std::optional<at::Tensor>& weight,
                                      int64_t tpr, bool vec, bool inplace);
// the replays' model of ex2.approx.ftz.f32 in this thread (csrc/cross_entropy_replay.cpp): "hashed"
// (the default), "low", "high" or "nearest"; returns the model it replaces
std::string ce_ex2_model(const std::string& model);
// that model's 2^x for x rounded to float (cerow::host_ex2, what cerow::expo runs on the host)
double ce_host_ex2(double x);
// ce_forward_reduce's reduction over per-row losses (1-D CPU float / double) and targets as
// threads (32: the split finish kernel's fold, 1024: ce_reduce_kernel) compute it in the kernels'
// fixed order: (out 0-d in loss's dtype, mean or sum; count 0-d int64)
std::tuple<at::Tensor, at::Tensor> ce_reduce_replay(const at::Tensor& loss, const at::Tensor& targets,
                                                    int64_t ignore_index, bool mean, int64_t threads);

}  // namespace replay
}  // namespace memcore
