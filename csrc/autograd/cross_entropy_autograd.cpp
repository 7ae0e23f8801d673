// Autograd kernels (dispatch key Autograd) of memcore::ce_forward and memcore::ce_forward_reduce,
// the two ops registered here; in C++ like torchvision's csrc/ops/autograd, so the backward runs
// without the Python interpreter and a training step pays no Python cost for the gradient.
// d loss_r / d logits_r = softmax(logits_r) - onehot(target_r), scaled by the row's upstream
// gradient, computed by memcore::ce_backward in one pass. Memory: the node keeps logits, targets,
// lse (and count) alive, copying nothing; lse, row_stats, status (and count, loss) are outputs
// without gradients. Fake tensors for torch.compile are registered in Python (memcore/_ops/).
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "../common.h"
#include "../ops.h"

namespace memcore {
namespace {

at::Tensor call_ce_backward(const at::Tensor& grad_loss, const at::Tensor& logits,
                            const at::Tensor& targets, const at::Tensor& lse, int64_t ignore_index) {
  static const auto op = MEMCORE_OP(ce_backward);
  return op.call(grad_loss, logits, targets, lse, ignore_index);
}

class CEForward : public torch::autograd::Function<CEForward> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                const at::Tensor& logits, const at::Tensor& targets,
                                                const at::Tensor& index, int64_t num_samples,
                                                int64_t ignore_index) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = MEMCORE_OP(ce_forward);
    auto [loss, lse, row_stats, status] = op.call(logits, targets, index, num_samples, ignore_index);
    ctx->save_for_backward({logits, targets, lse});
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->mark_non_differentiable({lse, row_stats, status});
    return {loss, lse, row_stats, status};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    at::Tensor grad = call_ce_backward(grads[0], saved[0], saved[1], saved[2],
                                       ctx->saved_data["ignore_index"].toInt());
    return {grad, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// out = mean / sum of the per-row losses; its gradient reaches every row as grad_out / count or
// grad_out, so loss and reduction are one node and the backward one ce_backward call.
class CEForwardReduce : public torch::autograd::Function<CEForwardReduce> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                const at::Tensor& logits, const at::Tensor& targets,
                                                const at::Tensor& index, int64_t num_samples,
                                                int64_t ignore_index, int64_t reduction) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = MEMCORE_OP(ce_forward_reduce);
    auto [out, count, loss, lse, row_stats, status] =
        op.call(logits, targets, index, num_samples, ignore_index, reduction);
    ctx->save_for_backward({logits, targets, lse, count});
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["reduction"] = reduction;
    ctx->mark_non_differentiable({count, loss, lse, row_stats, status});
    return {out, count, loss, lse, row_stats, status};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& logits = saved[0];
    at::Tensor g = grads[0].to(saved[2].scalar_type());
    if (ctx->saved_data["reduction"].toInt() == kMean) g = g / saved[3];
    at::Tensor grad = call_ce_backward(g.expand({logits.size(0)}), logits, saved[1], saved[2],
                                       ctx->saved_data["ignore_index"].toInt());
    return {grad, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

Tensor6 ce_forward_reduce_autograd(const at::Tensor& logits, const at::Tensor& targets,
                                   const at::Tensor& index, int64_t num_samples, int64_t ignore_index,
                                   int64_t reduction) {
  auto out = CEForwardReduce::apply(logits, targets, index, num_samples, ignore_index, reduction);
  return {out[0], out[1], out[2], out[3], out[4], out[5]};
}

Tensor4 ce_forward_autograd(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& index,
                            int64_t num_samples, int64_t ignore_index) {
  auto out = CEForward::apply(logits, targets, index, num_samples, ignore_index);
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(memcore, Autograd, m) {
  MEMCORE_IMPL(m, ce_forward, ce_forward_autograd);
  MEMCORE_IMPL(m, ce_forward_reduce, ce_forward_reduce_autograd);
}

}  // namespace memcore
